"""The load-test kit's single-purpose modes (see compare.py's docstring): `--callgrind-only`,
`--cpu-only`, `--paired` (with `--baseline`: two builds), `--latency-only`, `--auth-cost`, `--compression` and the regression guard `--guard`,
built on compare.py's helpers."""

import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import compare
from compare import (LOAD_CPU, ORIGIN_PORT, PER_REQUEST, PROXY_CPU, RINGWAY, ROOT, Measure,
                     measured,
                     Proxy, alternate, callgrind, cpu_model, log, median, medians,
                     nginx_proxy_config, oha_fixed_rate, oha_fixed_rates, origin_config, per_request, ringway,
                     throughput, wait_port, wrk, write)


@contextlib.contextmanager
def nginx_origin(prefix):
    """The nginx origin every mode proxies to, on the load CPU, in a temporary directory."""
    tmp = tempfile.mkdtemp(prefix=prefix)
    os.makedirs(os.path.join(tmp, "www"))
    origin = subprocess.Popen(["taskset", "-c", LOAD_CPU, "nginx", "-c", origin_config(tmp)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(ORIGIN_PORT)
        yield tmp
    finally:
        origin.terminate()
        origin.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def publish(kind, title, intro, table, data):
    """Writes loadtest/results/<date>-<kind>.md (a title naming the machine, an intro, a
    Markdown table) and .json (the raw runs), and prints the table."""
    stamp = datetime.date.today().isoformat()
    if compare.ORIGIN_ONE_WRITE:
        kind += "-one-write"
        intro += (" The origin sends each response in one write (`--one-write-origin`: nginx "
                  "with `sendfile off`).")
    out = os.path.join(ROOT, "loadtest", "results", f"{stamp}-{kind}")
    write(out + ".md", f"# {title}, {stamp}, {cpu_model()}, Linux {os.uname().release}\n\n"
          f"{intro}\n\n" + "\n".join(table) + "\n")
    write(out + ".json", json.dumps(data, indent=1))
    print("\n".join(table))


def callgrind_only(args):
    """Instructions and allocations per request for ringway's variants (and a baseline build),
    exact enough to compare builds: callgrind counts instructions, not time."""
    cg_small, cg_large = (1000, 5000) if args.quick else (5000, 25000)
    builds = [("", RINGWAY)] + ([("baseline ", args.baseline)] if args.baseline else [])
    runs = {}
    with nginx_origin("ringway-callgrind-") as tmp:
        port = 18200
        # Instruction counts still move by a few hundred per request between runs (how many
        # requests share a wake-up, a tick): builds alternate, and the median is reported.
        order = [b for rep in range(args.reps) for b in alternate(builds, rep)]
        for label, binary in order:
            variants = [("io_uring", {}), ("epoll", {"driver": "legacy"}),
                        ("io_uring, 3 transforms", {"transforms": True}),
                        ("epoll, 3 transforms", {"driver": "legacy", "transforms": True}),
                        ("io_uring, cache hits", {"cache": True})]
            for name, kw in variants:
                if label and kw.get("transforms"):
                    continue  # a baseline build may predate header transforms
                port += 1
                p = ringway(tmp, f"{label}{name}", port, binary=binary, **kw)
                try:
                    r = callgrind(p, tmp, cg_small, cg_large)
                finally:
                    p.kill()
                runs.setdefault(p.name, []).append(r)
                log(f"   {p.name:32} {r['instr_per_req']:8.0f} instr/req  "
                    f"{r['allocs_per_req']:.2f} allocs/req")
        if args.with_nginx:
            # The reference the ratios are taken against, counted the same way.
            for _ in range(args.reps):
                port += 1
                p = Proxy("nginx", port, ["nginx", "-c", nginx_proxy_config(tmp, port)])
                try:
                    r = callgrind(p, tmp, cg_small, cg_large)
                finally:
                    p.kill()
                runs.setdefault("nginx", []).append(r)
                log(f"   {'nginx':32} {r['instr_per_req']:8.0f} instr/req  "
                    f"{r['allocs_per_req']:.2f} allocs/req")
    rows = {n: {k: median([r[k] for r in rs]) for k in rs[0]} | {"runs": rs}
            for n, rs in runs.items()}
    ref = rows.get("nginx", {}).get("instr_per_req")
    md = ["| proxy | instructions / request | vs nginx | allocations / request |",
          "|---|---:|---:|---:|"]
    for n, r in rows.items():
        vs = f"{r['instr_per_req'] / ref:.2f}" if ref else "-"
        md.append(f"| {n} | {r['instr_per_req']:.0f} | {vs} | {r['allocs_per_req']:.2f} |")
    publish("callgrind", "Callgrind", "13 B responses, keep-alive, 1 worker; (Ir(25k) - Ir(5k)) "
            f"/ 20k; median of {args.reps}.", md, rows)


def cpu_only(args):
    """CPU µs, system calls, context switches and io_uring submissions per proxied request for
    ringway on both drivers (and a baseline build) and for nginx, all alternating in every rep
    (this VM drifts by up to a third between minutes): medians, each row's median ratio to nginx
    over the reps, and in how many reps a build was cheaper than its baseline."""
    builds = [("", RINGWAY)] + ([("baseline ", args.baseline)] if args.baseline else [])
    runs = {}
    with nginx_origin("ringway-cpu-") as tmp:
        port = 18500
        for rep in range(args.reps):
            variants = [(f"{label}{driver}", binary, driver)
                        for driver in ("io_uring", "legacy") for label, binary in builds]
            variants.append(("nginx", None, None))
            for name, binary, driver in alternate(variants, rep):
                port += 1
                if binary is None:
                    p = Proxy("nginx", port, ["nginx", "-c", nginx_proxy_config(tmp, port)])
                else:
                    p = ringway(tmp, name, port, binary=binary, driver=driver)
                p.start()
                try:
                    throughput(p, "/13B", 2)  # warm-up: pools, buffers, page cache
                    r = throughput(p, "/13B", args.seconds)
                finally:
                    p.stop()
                runs.setdefault(name, []).append(r)
                log(f"   {name:20} {r['rps']:8.0f} rps  {per_request(r)}")
    md = ["| proxy | CPU µs | user µs | system µs | system calls | context switches | "
          "io_uring submissions | CPU vs nginx | cheaper than baseline |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, rs in runs.items():
        m = medians(rs)
        vs = median([a["cpu_us_per_req"] / b["cpu_us_per_req"] for a, b in zip(rs, runs["nginx"])])
        other = runs.get(name[len("baseline "):] if name.startswith("baseline ") else f"baseline {name}")
        wins = (f"{sum(a['cpu_us_per_req'] < b['cpu_us_per_req'] for a, b in zip(rs, other))}"
                f" of {len(rs)}") if other else "-"
        cells = [f"{m[k]:.{d}f}" if k in m else "-" for k, _, d in PER_REQUEST]
        md.append(f"| {name} | " + " | ".join(cells) + f" | {vs:.2f} | {wins} |")
    publish("cpu", "CPU and kernel work per proxied request",
            f"13 B, 50 keep-alive connections (wrk), proxy on CPU {PROXY_CPU}, origin and wrk on "
            f"CPU {LOAD_CPU}; {args.seconds} s runs, {args.reps} reps, proxies alternating, "
            "medians; \"CPU vs nginx\" is the median of each rep's ratio.", md, runs)


# What `--paired` compares: ringway's config and nginx's for the same job.
PAIRED = [("proxied, io_uring", {}, {}), ("proxied, epoll", {"driver": "legacy"}, {}),
          ("respond route", {"respond": True}, {"respond": True}),
          ("cache hit", {"cache": True}, {"cache": True})]


def side_by_side(pair, seconds):
    """Serves both proxies of `pair` at the same time on the proxy CPU, each loaded by its own
    wrk (25 connections) on the load CPU; returns each one's result with its CPU and kernel
    work per request, by name."""
    for p in pair:
        p.start()
    try:
        for p in pair:
            wrk(p.port, "/13B", 1, connections=25)  # warm-up (and cache fill)
        loads = {}
        with Measure(pair[0]) as m0, Measure(pair[1]) as m1:
            threads = [threading.Thread(target=lambda p=p: loads.__setitem__(
                p.name, wrk(p.port, "/13B", seconds, connections=25))) for p in pair]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        for p in pair:
            p.stop()
    return {p.name: m.add_to(loads[p.name]) for p, m in zip(pair, (m0, m1))}


def paired(args):
    """ringway and nginx served at the same time, both on the proxy CPU, each loaded by its own
    wrk (25 connections) on the load CPU, for each of PAIRED over `--reps`: CPU and kernel work
    per request of each, and their ratio. This VM changes speed faster than one alternating rep
    lasts (CPU per request of one proxy moved from 28 to 44 µs between reps); run side by
    side, both proxies see the same machine. With `--baseline`, this build and the baseline
    build are paired instead (proxied, both drivers)."""
    if args.baseline:
        return paired_builds(args)
    runs = {}
    with nginx_origin("ringway-paired-") as tmp:
        port = 18560
        for rep in range(args.reps):
            for scenario, rw_kw, ng_kw in alternate(PAIRED, rep):
                port += 2
                rw = ringway(tmp, f"ringway, {scenario}", port, **rw_kw)
                ng = Proxy(f"nginx, {scenario}", port + 1,
                           ["nginx", "-c", nginx_proxy_config(tmp, port + 1, **ng_kw)])
                got = side_by_side([rw, ng], args.seconds)
                r, n = got[rw.name], got[ng.name]
                r["vs_nginx"] = r["cpu_us_per_req"] / n["cpu_us_per_req"]
                for p, x in ((rw, r), (ng, n)):
                    runs.setdefault(p.name, []).append(x)
                    log(f"   {p.name:28} {x['rps']:8.0f} rps  {per_request(x)}")
                log(f"   rep {rep + 1} {scenario}: ringway/nginx CPU per request "
                    f"{r['vs_nginx']:.2f}")
    md = ["| proxy | CPU µs | user µs | system µs | system calls | context switches | "
          "io_uring submissions | CPU vs nginx, per rep | median |",
          "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for name, rs in runs.items():
        m = medians(rs)
        cells = [f"{m[k]:.{d}f}" if k in m else "-" for k, _, d in PER_REQUEST]
        vs = " ".join(f"{r['vs_nginx']:.2f}" for r in rs) if "vs_nginx" in rs[0] else "-"
        med = f"{median([r['vs_nginx'] for r in rs]):.2f}" if "vs_nginx" in rs[0] else "-"
        md.append(f"| {name} | " + " | ".join(cells) + f" | {vs} | {med} |")
    publish("paired", "ringway and nginx side by side",
            f"Both proxies on CPU {PROXY_CPU} at the same time, each with its own wrk (25 "
            f"keep-alive connections, 13 B) on CPU {LOAD_CPU} with the origin; {args.seconds} s "
            f"runs, {args.reps} reps, medians.", md, runs)


def paired_builds(args):
    """This build and `--baseline` served side by side (proxied 13 B, keep-alive, each driver),
    which goes first alternating: CPU per request of this build over the baseline's, per rep.
    Resolves about 1%, where alternating runs of one build at a time drift by a third."""
    runs, ratios = {}, {}
    with nginx_origin("ringway-paired-builds-") as tmp:
        port = 18660
        for rep in range(args.reps):
            for driver in ("io_uring", "legacy"):
                port += 2
                builds = alternate([("baseline", args.baseline), ("this build", RINGWAY)], rep)
                pair = [ringway(tmp, f"{label}, {driver}", port + i, binary=binary, driver=driver)
                        for i, (label, binary) in enumerate(builds)]
                got = side_by_side(pair, args.seconds)
                new, old = got[f"this build, {driver}"], got[f"baseline, {driver}"]
                ratios.setdefault(driver, []).append(new["cpu_us_per_req"] / old["cpu_us_per_req"])
                for name, x in got.items():
                    runs.setdefault(name, []).append(x)
                    log(f"   {name:28} {x['rps']:8.0f} rps  {per_request(x)}")
                log(f"   rep {rep + 1} {driver}: this build/baseline CPU per request "
                    f"{ratios[driver][-1]:.3f}")
    md = ["| build | CPU µs | user µs | system µs | system calls | context switches | "
          "io_uring submissions | this build / baseline, per rep | median |",
          "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for name, rs in sorted(runs.items()):
        m = medians(rs)
        cells = [f"{m[k]:.{d}f}" if k in m else "-" for k, _, d in PER_REQUEST]
        driver = name.split(", ")[1]
        vs, med = "-", "-"
        if name.startswith("this build"):
            vs = " ".join(f"{x:.3f}" for x in ratios[driver])
            med = f"{median(ratios[driver]):.3f}"
        md.append(f"| {name} | " + " | ".join(cells) + f" | {vs} | {med} |")
    publish("paired-builds", "two ringway builds side by side",
            f"This build ({RINGWAY}) and the baseline ({args.baseline}) on CPU {PROXY_CPU} at the "
            f"same time, each with its own wrk (25 keep-alive connections, 13 B) on CPU "
            f"{LOAD_CPU} with the origin; {args.seconds} s runs, {args.reps} reps, medians.",
            md, runs)


def latency_only(args):
    """p50/p99/p99.9/max at one fixed rate (oha, open loop, latency-corrected) for ringway on both
    drivers and nginx, alternating over the reps; each rep's percentiles are compared with
    nginx's of the same rep (issue 12: p99 and p99.9 at most nginx's in 4 of 5 reps)."""
    rows = {"io_uring": [], "legacy": [], "nginx": []}
    with nginx_origin("ringway-latency-") as tmp:
        proxies = [ringway(tmp, "io_uring", 18551), ringway(tmp, "legacy", 18552, driver="legacy"),
                   Proxy("nginx", 18553, ["nginx", "-c", nginx_proxy_config(tmp, 18553)])]
        try:
            for p in proxies:
                p.start()
                throughput(p, "/13B", 2)  # warm-up: pools, buffers, page cache
            for rep in range(args.reps):
                for p in alternate(proxies, rep):
                    r = oha_fixed_rate(p.port, args.rate, args.seconds)
                    rows[p.name].append(r)
                    log(f"   rep {rep + 1} {p.name:9} {r['achieved_rps']:7.0f} rps, load CPU "
                        f"{r['load_cpu_busy']:.0%}: p50 {r['p50_us']:.0f} p99 {r['p99_us']:.0f} "
                        f"p99.9 {r['p99_9_us']:.0f} max {r['max_us']:.0f} µs")
        finally:
            for p in proxies:
                p.stop()
    keys = [("p50_us", "p50"), ("p99_us", "p99"), ("p99_9_us", "p99.9"), ("max_us", "max")]
    md = ["| proxy | rep | achieved rps | load CPU | p50 µs | p99 µs | p99.9 µs | max µs |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rs in rows.items():
        for i, r in enumerate(rs):
            md.append(f"| {name} | {i + 1} | {r['achieved_rps']:.0f} | {r['load_cpu_busy']:.0%} | "
                      + " | ".join(f"{r[k]:.0f}" for k, _ in keys) + " |")
    summary = ["", "| proxy | median p50 | median p99 | median p99.9 | median max | "
               "p99 ≤ nginx's | p99.9 ≤ nginx's |", "|---|---:|---:|---:|---:|---|---|"]
    for name, rs in rows.items():
        meds = [f"{median([r[k] for r in rs]):.0f}" for k, _ in keys]
        wins = [f"{sum(a[k] <= b[k] for a, b in zip(rs, rows['nginx']))} of {len(rs)}"
                for k in ("p99_us", "p99_9_us")]
        summary.append(f"| {name} | " + " | ".join(meds + wins) + " |")
    publish("latency", f"Latency at {args.rate} requests/s",
            f"oha, open loop with latency correction, 50 connections, 13 B; proxy on CPU "
            f"{PROXY_CPU}, oha and the origin on CPU {LOAD_CPU}; {args.seconds} s per run, "
            f"{args.reps} reps, proxies alternating.", md + summary, rows)


def latency_side_by_side(args):
    """Like `latency_only`, but ringway (one driver at a time) and nginx serve at the same time,
    both on the proxy CPU, each at half of `--rate` from its own oha on the load CPU: both see
    the same machine, which alternating runs on this VM do not."""
    half = args.rate // 2
    rows = {}
    with nginx_origin("ringway-latency-pair-") as tmp:
        proxies = {"io_uring": ringway(tmp, "io_uring", 18571),
                   "epoll": ringway(tmp, "epoll", 18572, driver="legacy")}
        ng = Proxy("nginx", 18573, ["nginx", "-c", nginx_proxy_config(tmp, 18573)])
        try:
            for p in [*proxies.values(), ng]:
                p.start()
                throughput(p, "/13B", 2)  # warm-up: pools, buffers, page cache
            for rep in range(args.reps):
                for name in alternate(list(proxies), rep):
                    # Which oha starts first alternates too.
                    ports = alternate([proxies[name].port, ng.port], rep)
                    got = dict(zip(ports, oha_fixed_rates(ports, half, args.seconds)))
                    r, n = got[proxies[name].port], got[ng.port]
                    rows.setdefault(name, []).append(r)
                    rows.setdefault(f"nginx beside {name}", []).append(n)
                    log(f"   rep {rep + 1} {name:8} load CPU {r['load_cpu_busy']:.0%}: p99 "
                        f"{r['p99_us']:.0f} / nginx {n['p99_us']:.0f}, p99.9 {r['p99_9_us']:.0f} "
                        f"/ nginx {n['p99_9_us']:.0f} µs")
        finally:
            for p in [*proxies.values(), ng]:
                p.stop()
    keys = [("p50_us", "p50"), ("p99_us", "p99"), ("p99_9_us", "p99.9"), ("max_us", "max")]
    md = ["| driver | rep | load CPU | ringway p50 / p99 / p99.9 / max µs | "
          "nginx p50 / p99 / p99.9 / max µs |", "|---|---:|---:|---|---|"]
    summary = ["", "| driver | ringway median p50 / p99 / p99.9 / max µs | nginx median | "
               "p99 ≤ nginx's | p99.9 ≤ nginx's |", "|---|---|---|---|---|"]
    for name in proxies:
        rs, ns = rows[name], rows[f"nginx beside {name}"]
        for i, (r, n) in enumerate(zip(rs, ns)):
            md.append(f"| {name} | {i + 1} | {r['load_cpu_busy']:.0%} | "
                      + " / ".join(f"{r[k]:.0f}" for k, _ in keys) + " | "
                      + " / ".join(f"{n[k]:.0f}" for k, _ in keys) + " |")
        wins = [f"{sum(a[k] <= b[k] for a, b in zip(rs, ns))} of {len(rs)}"
                for k in ("p99_us", "p99_9_us")]
        summary.append(f"| {name} | "
                       + " / ".join(f"{median([r[k] for r in rs]):.0f}" for k, _ in keys) + " | "
                       + " / ".join(f"{median([r[k] for r in ns]):.0f}" for k, _ in keys) + " | "
                       + " | ".join(wins) + " |")
    publish("latency-side-by-side", f"Latency at {args.rate} requests/s, side by side",
            f"ringway and nginx at the same time, both on CPU {PROXY_CPU}, each at {half} "
            f"requests/s from its own oha (open loop with latency correction, 50 connections, "
            f"13 B) on CPU {LOAD_CPU} with the origin; {args.seconds} s per run, {args.reps} "
            f"reps, drivers alternating.", md + summary, rows)


# Issue 14's budget: what a JWT-protected route may add to a request, its token cached.
AUTH_BUDGET = 1500


def auth_cost(args):
    """Instructions per request of the same proxied route, unprotected and JWT-protected (the
    token verified once, then found in the worker's cache), the same request (token included) to
    both, alternating over `--reps`; exits 1 when the median difference is over AUTH_BUDGET."""
    runs = {"unprotected": [], "JWT-protected": []}
    with nginx_origin("ringway-auth-") as tmp:
        port = 18400
        # Both send the same token, so the difference is the check, not a longer request.
        variants = [("unprotected", {"token": True}), ("JWT-protected", {"jwt": True})]
        for rep in range(args.reps):
            for name, kw in alternate(variants, rep):
                port += 1
                p = ringway(tmp, name, port, **kw)
                try:
                    r = callgrind(p, tmp, 5000, 25000)
                finally:
                    p.kill()
                runs[name].append(r)
                log(f"   {name:16} {r['instr_per_req']:8.0f} instr/req  "
                    f"{r['allocs_per_req']:.2f} allocs/req")
    plain, jwt = (median([r["instr_per_req"] for r in runs[n]]) for n in runs)
    allocs = median([r["allocs_per_req"] for r in runs["JWT-protected"]])
    added = jwt - plain
    stamp = datetime.date.today().isoformat()
    out = os.path.join(ROOT, "loadtest", "results", f"{stamp}-auth")
    text = (f"# JWT-protected vs unprotected route, {stamp}, {cpu_model()}, "
            f"Linux {os.uname().release}\n\nio_uring, 1 worker, 13 B, keep-alive, the same request to "
            f"both with a ~700-byte HS256 token (one claim to a header); callgrind, (Ir(25k) - Ir(5k)) / 20k, median of "
            f"{args.reps}, alternating.\n\n| route | instructions / request |\n|---|---:|\n"
            f"| unprotected | {plain:.0f} |\n| JWT-protected (cached token) | {jwt:.0f} |\n"
            f"| added by the JWT check | {added:+.0f} (budget {AUTH_BUDGET}) |\n\n"
            f"Allocations per protected request: {allocs:.2f}.\n")
    write(out + ".md", text)
    write(out + ".json", json.dumps(runs, indent=1))
    print(text)
    if added > AUTH_BUDGET:
        print(f"*** the JWT check adds {added:.0f} instructions, over the {AUTH_BUDGET} budget ***")
        sys.exit(1)
    return 0


GUARD = os.path.join(ROOT, "loadtest", "guard.json")
GUARD_VARIANTS = [("io_uring", {}), ("epoll", {"driver": "legacy"}), ("cache hits", {"cache": True})]


def guard(args):
    """The regression guard: instructions per request are exact under callgrind (io_uring within a
    few, epoll within ~2%), so a rise of more than 5% over the recorded figure is a real one."""
    now = {}
    with nginx_origin("ringway-guard-") as tmp:
        for port, (name, kw) in enumerate(GUARD_VARIANTS, start=18300):
            p = ringway(tmp, name, port, **kw)
            try:
                now[name] = round(callgrind(p, tmp, 5000, 25000)["instr_per_req"])
            finally:
                p.kill()
    if args.record:
        write(GUARD, json.dumps({"recorded": datetime.date.today().isoformat(),
                                 "machine": cpu_model(), "instr_per_req": now}, indent=1) + "\n")
        print(f"recorded {now} in {GUARD}")
        return 0
    with open(GUARD) as f:
        recorded = json.load(f)["instr_per_req"]
    failed = False
    for name, value in now.items():
        limit = recorded[name] * 1.05
        verdict = "ok" if value <= limit else "REGRESSION"
        failed |= value > limit
        print(f"{name:12} {value:8} instr/req  recorded {recorded[name]:8}  "
              f"({value / recorded[name] - 1:+.1%}, limit +5%)  {verdict}")
    if failed:
        print("\n*** instructions per request rose more than 5% over loadtest/guard.json ***")
        sys.exit(1)
    return 0


def json_document(size=20 * 1024):
    """A JSON array of small records, `size` bytes: what an API answers."""
    items, n = [], 0
    while sum(map(len, items)) + len(items) < size - 2:
        items.append(f'{{"id":{n},"name":"item {n}","price":{n * 7 % 1000}.{n % 100:02d},'
                     f'"tags":["a{n % 13}","b{n % 7}"],"active":{"true" if n % 3 else "false"}}}')
        n += 1
    return ("[" + ",".join(items) + "]")[:size - 1] + "]"


def compressed_size(port, coding):
    """The body bytes of one response for `Accept-Encoding: coding`."""
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}",
                          "-H", f"Accept-Encoding: {coding}",
                          f"http://127.0.0.1:{port}/api.json"],
                         capture_output=True, text=True, timeout=10).stdout
    return int(out or 0)


def compression(args):
    """Response compression's cost: CPU µs per response and bytes out for a 20 KiB JSON, ringway
    (gzip, br, zstd at its levels) against nginx's `gzip on` at the same gzip level (1, nginx's
    default), and both sending it uncompressed; proxies alternating in every rep."""
    nginx_gzip = ("gzip on; gzip_comp_level 1; gzip_min_length 1024; gzip_proxied any; "
                  "gzip_types text/plain application/json;")
    runs, sizes = {}, {}
    with nginx_origin("ringway-compression-") as tmp:
        write(os.path.join(tmp, "www", "api.json"), json_document())
        port = 18700
        variants = [("ringway gzip", "gzip"), ("nginx gzip", "gzip"), ("ringway br", "br"),
                    ("ringway zstd", "zstd"), ("ringway identity", "identity"),
                    ("nginx identity", "identity")]
        for rep in range(args.reps):
            for name, coding in alternate(variants, rep):
                port += 1
                if name.startswith("nginx"):
                    conf = nginx_proxy_config(tmp, port)
                    with open(conf) as f:
                        text = f.read()
                    write(conf, text.replace("location / {", nginx_gzip + " location / {"))
                    p = Proxy(name, port, ["nginx", "-c", conf])
                else:
                    p = ringway(tmp, name, port, compression=True)
                p.start()
                try:
                    header = [f"Accept-Encoding: {coding}"]
                    sizes[name] = compressed_size(port, coding)
                    measured(p, lambda: wrk(port, "/api.json", 2, headers=header))  # warm-up
                    r = measured(p, lambda: wrk(port, "/api.json", args.seconds, headers=header))
                finally:
                    p.stop()
                runs.setdefault(name, []).append(r)
                log(f"   {name:18} {r['rps']:8.0f} rps  {r['cpu_us_per_req']:6.1f} CPU µs/resp  "
                    f"{sizes[name]} bytes")
    md = ["| proxy | responses/s | CPU µs per response | vs nginx gzip | bytes out |",
          "|---|---:|---:|---:|---:|"]
    for name, rs in runs.items():
        m = medians(rs)
        vs = median([a["cpu_us_per_req"] / b["cpu_us_per_req"]
                     for a, b in zip(rs, runs["nginx gzip"])])
        md.append(f"| {name} | {m['rps']:.0f} | {m['cpu_us_per_req']:.1f} | {vs:.2f} | "
                  f"{sizes[name]} |")
    publish("compression", "Response compression: CPU and bytes per 20 KiB JSON response",
            f"A 20 KiB JSON from the nginx origin, 50 keep-alive connections (wrk, with "
            f"`Accept-Encoding`), proxy on CPU {PROXY_CPU}, origin and wrk on CPU {LOAD_CPU}; "
            f"{args.seconds} s runs, {args.reps} reps, alternating, medians; \"vs nginx gzip\" is "
            "the median of each rep's ratio. nginx: `gzip on; gzip_comp_level 1`.", md, runs)
