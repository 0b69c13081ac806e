#!/usr/bin/env python3
"""TLS: ringway vs nginx on this machine, in one run, same certificate, same pinning.

Both proxies run one worker pinned to CPU 0, terminate TLS 1.3 with the same certificate
(ECDSA P-256, then RSA-2048) and proxy to the same nginx origin over cleartext keep-alive; the
load generators and the origin share CPU 1. Proxies alternate (A B, B A, ...). Reported, as
medians and as ringway/nginx ratios:

  * keep-alive: requests/s (wrk, 50 connections, 13 B) and the proxy's CPU µs per request;
  * instructions per proxied request under callgrind (oha over TLS, (Ir(25k) - Ir(5k)) / 20k);
  * a new connection per request (wrk with `Connection: close`): handshakes/s and CPU µs per
    connection (handshake, request, close);
  * full and resumed handshakes from one client (`openssl s_time -new` / `-reuse`): CPU µs per
    connection, and the resumed/full ratio;
  * memory: 10,000 idle TLS connections on one ringway worker, RSS growth per connection.

Results go to loadtest/results/<date>-tls.{json,md}. Only 127.0.0.1 is targeted; every step is
bounded in time.

Usage: python3 loadtest/tls.py [--seconds 10] [--reps 3] [--quick] [--no-callgrind]
"""

import argparse
import datetime
import json
import os
import re
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time

from compare import (LOAD_CPU, ORIGIN_PORT, PROXY_CPU, RINGWAY, ROOT, Proxy, cpu_model, log,
                     measured, median, origin_config, parse_callgrind, ratio, wait_port, write)

KINDS = {"ecdsa": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
         "rsa": ["-newkey", "rsa:2048"]}


def make_cert(tmp, kind):
    """A private CA and a `localhost` certificate signed by it; returns (cert, key, ca)."""
    d = os.path.join(tmp, kind)
    os.makedirs(d, exist_ok=True)

    def run(*argv):
        subprocess.run(["openssl", *argv], check=True, capture_output=True, cwd=d)

    run("req", "-x509", *KINDS["ecdsa"], "-nodes", "-days", "30", "-subj", "/CN=bench CA",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", *KINDS[kind], "-nodes", "-subj", "/CN=localhost", "-keyout", "leaf.key",
        "-out", "leaf.csr")
    write(os.path.join(d, "ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-days", "30",
        "-out", "leaf.pem", "-extfile", "ext")
    return tuple(os.path.join(d, f) for f in ("leaf.pem", "leaf.key", "ca.pem"))


def ringway_tls(tmp, port, cert, key, max_connections=10000):
    conf = write(os.path.join(tmp, f"ringway-tls-{port}.toml"), f"""
[runtime]
workers = 1
pin_cores = [0]

[limits]
max_connections = {max_connections}

[[listeners]]
name = "tls"
address = "127.0.0.1:{port}"
[listeners.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]

[[upstreams]]
name = "origin"
targets = ["127.0.0.1:{ORIGIN_PORT}"]
max_idle_per_target = 64

[[routes]]
name = "all"
listener = "tls"
upstream = "origin"
""")
    return Proxy("ringway", port, [RINGWAY, "--config", conf])


def nginx_tls(tmp, port, cert, key):
    conf = write(os.path.join(tmp, f"nginx-tls-{port}.conf"), f"""
worker_processes 1;
daemon off;
master_process off;
error_log {tmp}/nginx-tls-{port}.err warn;
pid {tmp}/nginx-tls-{port}.pid;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  upstream origin {{ server 127.0.0.1:{ORIGIN_PORT}; keepalive 64; keepalive_requests 10000000; }}
  server {{
    listen 127.0.0.1:{port} ssl backlog=4096;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_tickets on;
    location / {{ proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
""")
    return Proxy("nginx", port, ["nginx", "-c", conf])


def wrk_tls(port, seconds, close=False):
    argv = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c50", f"-d{seconds}s",
            f"https://127.0.0.1:{port}/13B"]
    if close:
        argv[5:5] = ["-H", "Connection: close"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1))}


def s_time(port, ca, seconds, reuse):
    """`openssl s_time`: sequential connections, each fetching /13B; full or resumed."""
    argv = ["taskset", "-c", LOAD_CPU, "openssl", "s_time", "-connect", f"127.0.0.1:{port}",
            "-CAfile", ca, "-www", "/13B", "-time", str(seconds), "-reuse" if reuse else "-new"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    m = re.search(r"(\d+) connections in ([\d.]+)s", out)
    if not m:
        raise RuntimeError(f"s_time: {out}")
    return {"requests": int(m.group(1)), "rps": int(m.group(1)) / float(m.group(2))}


def callgrind_tls(proxy, tmp, small, large):
    runs = []
    for n in (small, large):
        out = os.path.join(tmp, f"cg.tls.{proxy.name}.{n}")
        proxy.start(under=["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p"])
        subprocess.run(["oha", "--no-tui", "--insecure", "-n", "100", "-c", "10",
                        f"https://127.0.0.1:{proxy.port}/13B"], capture_output=True, timeout=300)
        subprocess.run(["oha", "--no-tui", "--insecure", "-n", str(n), "-c", "10",
                        f"https://127.0.0.1:{proxy.port}/13B"], capture_output=True, timeout=900)
        dump = f"{out}.{proxy.proc.pid}.1"
        subprocess.run(["callgrind_control", "-d", str(proxy.proc.pid)], capture_output=True,
                       timeout=120)
        deadline = time.time() + 120
        while not (os.path.exists(dump) and "\ntotals:" in open(dump, errors="replace").read()):
            if time.time() > deadline:
                raise RuntimeError(f"callgrind dump of {proxy.name} did not appear")
            time.sleep(0.2)
        proxy.kill()
        runs.append(parse_callgrind(dump))
    (ir1, al1), (ir2, al2) = runs
    return {"instr_per_req": (ir2 - ir1) / (large - small),
            "allocs_per_req": (al2 - al1) / (large - small)}


def idle_memory(tmp, cert, key, ca, count):
    """RSS growth of one ringway worker per idle TLS connection (handshake done, no request)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 1024)), hard))
    p = ringway_tls(tmp, 18210, cert, key, max_connections=count + 100).start()
    try:
        time.sleep(0.5)
        before = rss_kib(p.pid)
        ctx = ssl.create_default_context(cafile=ca)
        conns = []
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", 18210))
            conns.append(ctx.wrap_socket(s, server_hostname="localhost"))
        time.sleep(1.0)
        after = rss_kib(p.pid)
        for c in conns:
            c.close()
        return {"connections": count, "rss_before_kib": before, "rss_after_kib": after,
                "kib_per_connection": (after - before) / count}
    finally:
        p.stop()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="3 s runs, 1 rep, small callgrind runs")
    ap.add_argument("--no-callgrind", action="store_true")
    ap.add_argument("--idle", type=int, default=10000, help="idle TLS connections for memory")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.reps = 3, 1
    tmp = tempfile.mkdtemp(prefix="ringway-tls-")
    os.makedirs(os.path.join(tmp, "www"))
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "cpu_model": cpu_model(), "kernel": os.uname().release,
           "layout": f"proxy on CPU {PROXY_CPU}; clients and the nginx origin on CPU {LOAD_CPU}",
           "seconds": args.seconds, "reps": args.reps, "kinds": {}}
    origin = subprocess.Popen(["taskset", "-c", LOAD_CPU, "nginx", "-c", origin_config(tmp)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(ORIGIN_PORT)
        for kind in KINDS:
            cert, key, ca = make_cert(tmp, kind)
            proxies = [ringway_tls(tmp, 18200, cert, key), nginx_tls(tmp, 18201, cert, key)]
            scen = {"keep-alive": lambda p: wrk_tls(p.port, args.seconds),
                    "new connection per request": lambda p: wrk_tls(p.port, args.seconds, True),
                    "full handshake (s_time -new)": lambda p: s_time(p.port, ca, args.seconds, False),
                    "resumed handshake (s_time -reuse)": lambda p: s_time(p.port, ca, args.seconds, True)}
            runs = {s: {p.name: [] for p in proxies} for s in scen}
            for p in proxies:
                p.start()
            for rep in range(args.reps):
                for s, fn in scen.items():
                    for p in (proxies if rep % 2 == 0 else proxies[::-1]):
                        r = measured(p, lambda: fn(p))
                        log(f"{kind:5} {s:36} {p.name:8} {r['rps']:9.0f}/s  "
                            f"{r['cpu_us_per_req']:7.1f} µs CPU (user {r['user_us_per_req']:.1f}, "
                            f"sys {r['sys_us_per_req']:.1f})  load CPU {r['load_cpu_busy']:.0%}")
                        runs[s][p.name].append(r)
            for p in proxies:
                p.stop()
            out = {s: {name: {k: median([r[k] for r in rs]) for k in rs[0]}
                       for name, rs in per.items()} for s, per in runs.items()}
            if not args.no_callgrind:
                small, large = (1000, 5000) if args.quick else (5000, 25000)
                for p in proxies:
                    cg = callgrind_tls(p, tmp, small, large)
                    log(f"{kind:5} callgrind {p.name:8} {cg['instr_per_req']:9.0f} instr/req "
                        f"{cg['allocs_per_req']:.2f} allocs/req")
                    out.setdefault("callgrind", {})[p.name] = cg
            res["kinds"][kind] = out
        cert, key, ca = make_cert(tmp, "ecdsa")
        res["idle_memory"] = idle_memory(tmp, cert, key, ca, args.idle)
        log(f"idle: {res['idle_memory']}")
    finally:
        origin.terminate()
        origin.wait()
    stamp = datetime.date.today().isoformat()
    base = os.path.join(ROOT, "loadtest", "results", f"{stamp}-tls")
    write(base + ".json", json.dumps(res, indent=1) + "\n")
    write(base + ".md", report(res))
    print(report(res))
    return 0


def report(res):
    md = [f"# TLS: ringway vs nginx ({res['date']})", "",
          f"{res['cpu_model']}, Linux {res['kernel']}; {res['layout']}; "
          f"{res['reps']} alternating reps of {res['seconds']} s, medians.", ""]
    for kind, out in res["kinds"].items():
        md += [f"## {kind}", "", "| scenario | ringway /s | nginx /s | ringway CPU µs | "
               "nginx CPU µs | CPU ratio |", "|---|---|---|---|---|---|"]
        for s, per in out.items():
            if s == "callgrind":
                continue
            r, n = per["ringway"], per["nginx"]
            md.append(f"| {s} | {r['rps']:.0f} | {n['rps']:.0f} | {r['cpu_us_per_req']:.1f} | "
                      f"{n['cpu_us_per_req']:.1f} | {ratio(r['cpu_us_per_req'], n['cpu_us_per_req']):.2f} |")
        full = out["full handshake (s_time -new)"]["ringway"]["cpu_us_per_req"]
        resumed = out["resumed handshake (s_time -reuse)"]["ringway"]["cpu_us_per_req"]
        md.append("")
        md.append(f"ringway resumed/full CPU per connection: {resumed / full:.2f}")
        if "callgrind" in out:
            cg = out["callgrind"]
            md.append(f"instructions per keep-alive request: ringway "
                      f"{cg['ringway']['instr_per_req']:.0f} "
                      f"({cg['ringway']['allocs_per_req']:.2f} allocs), nginx "
                      f"{cg['nginx']['instr_per_req']:.0f}: ratio "
                      f"{ratio(cg['ringway']['instr_per_req'], cg['nginx']['instr_per_req']):.2f}")
        md.append("")
    if "idle_memory" in res:
        m = res["idle_memory"]
        md.append(f"Idle TLS connections: {m['connections']} on one worker, RSS "
                  f"{m['rss_before_kib']} → {m['rss_after_kib']} KiB: "
                  f"{m['kib_per_connection']:.1f} KiB per connection.")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
