#!/usr/bin/env python3
"""ringway's cache against the independent HTTP cache test suite (github.com/http-tests/cache-tests).

Runs the suite's origin server, ringway in front of it as a caching reverse proxy (one route,
`default_ttl_ms = 0` so that nothing without explicit freshness is stored, as the suite expects),
and the suite's command-line client, once per build and worker count. Reports passes among the
suite's "required" (conformance) and "optimal" tests, and every test whose result differs
between the first two runs. Everything listens on 127.0.0.1 and every step is bounded in time.

    python3 loadtest/cache_tests.py --suite /path/to/cache-tests \\
        --binary target/release/ringway --workers 1 2 [--baseline OLD_BINARY]

The suite needs Node.js and `npm install` in its directory. Results go to
loadtest/results/<date>-cache-tests.{json,md}.
"""

import argparse
import datetime
import json
import pathlib
import subprocess
import tempfile
import time
import urllib.request

ORIGIN_PORT = 8000
PROXY_PORT = 8002
RESULTS = pathlib.Path(__file__).resolve().parent / "results"

CONFIG = """[runtime]
workers = {workers}
pin_cores = false
[cache]
[[listeners]]
name = "public"
address = "127.0.0.1:{proxy}"
[[upstreams]]
name = "origin"
targets = ["127.0.0.1:{origin}"]
[[routes]]
name = "all"
listener = "public"
path_prefix = "/"
upstream = "origin"
cache = {{ default_ttl_ms = 0 }}
"""


def wait_for(url, seconds=10):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # answered
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def test_kinds(suite):
    script = (
        f"import tests from '{suite}/tests/index.mjs'\n"
        "const out = {}\n"
        "for (const s of tests) for (const t of s.tests) out[t.id] = t.kind || 'required'\n"
        "console.log(JSON.stringify(out))"
    )
    out = subprocess.run(["node", "--input-type=module", "-e", script],
                         capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


def run_once(suite, binary, workers):
    env = {"npm_config_protocol": "http", "npm_config_port": str(ORIGIN_PORT),
           "npm_config_pidfile": "/tmp/ringway-cache-tests.pid", "PATH": "/usr/bin:/bin:/usr/local/bin"}
    origin = subprocess.Popen(["node", "test-engine/server/server.mjs"], cwd=suite, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://127.0.0.1:{ORIGIN_PORT}/")
        with tempfile.NamedTemporaryFile("w", suffix=".toml") as cfg:
            cfg.write(CONFIG.format(workers=workers, proxy=PROXY_PORT, origin=ORIGIN_PORT))
            cfg.flush()
            proxy = subprocess.Popen([binary, "--config", cfg.name], env={"RINGWAY_LOG": "error"},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_for(f"http://127.0.0.1:{PROXY_PORT}/")
                cli_env = dict(env, npm_config_base=f"http://127.0.0.1:{PROXY_PORT}", npm_package_config_id="")
                out = subprocess.run(["node", "--no-warnings", "test-engine/cli.mjs"], cwd=suite,
                                     env=cli_env, capture_output=True, text=True, timeout=900)
                return json.loads(out.stdout)
            finally:
                proxy.terminate()
                proxy.wait(timeout=20)
    finally:
        origin.terminate()
        origin.wait(timeout=20)


def tally(results, kinds):
    counts = {}
    for test, outcome in results.items():
        kind = kinds.get(test, "?")
        passed, total = counts.get(kind, (0, 0))
        counts[kind] = (passed + (outcome is True), total + 1)
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", required=True, help="a checkout of http-tests/cache-tests, npm-installed")
    ap.add_argument("--binary", default="target/release/ringway")
    ap.add_argument("--baseline", help="another ringway build to run as well")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    suite = str(pathlib.Path(args.suite).resolve())
    kinds = test_kinds(suite)
    builds = [("ringway", str(pathlib.Path(args.binary).resolve()))]
    if args.baseline:
        builds.append(("baseline", str(pathlib.Path(args.baseline).resolve())))
    runs = {}
    for name, binary in builds:
        for w in args.workers:
            label = f"{name}, {w} worker{'s' if w > 1 else ''}"
            print(f"running {label} ...", flush=True)
            runs[label] = run_once(suite, binary, w)
    lines = ["| build | required passed | optimal passed | all passed |", "|---|---:|---:|---:|"]
    for label, results in runs.items():
        c = tally(results, kinds)
        req, opt = c.get("required", (0, 0)), c.get("optimal", (0, 0))
        passed = sum(p for p, _ in c.values())
        lines.append(f"| {label} | {req[0]}/{req[1]} | {opt[0]}/{opt[1]} | {passed}/{len(results)} |")
    labels = list(runs)
    if len(labels) >= 2:
        a, b = runs[labels[0]], runs[labels[1]]
        diff = [t for t in sorted(set(a) | set(b))
                if (a.get(t) is True) != (b.get(t) is True) and kinds.get(t) in ("required", "optimal")]
        lines.append("")
        lines.append(f"Differences between {labels[0]} and {labels[1]}: {len(diff)}")
        lines += [f"- {kinds[t]} `{t}`: {a.get(t)} / {b.get(t)}" for t in diff]
    failing = [f"- {kinds[t]} `{t}`: {v}" for t, v in sorted(runs[labels[0]].items())
               if v is not True and kinds.get(t) == "required"]
    lines += ["", f"Required tests failing for {labels[0]}: {len(failing)}"] + failing
    report = "\n".join(lines)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{datetime.date.today()}-cache-tests"
    stem.with_suffix(".md").write_text(report + "\n")
    stem.with_suffix(".json").write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
