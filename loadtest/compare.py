#!/usr/bin/env python3
"""ringway vs nginx vs HAProxy on this machine, in one run.

Every proxy runs with one worker/thread, logging off, pinned to CPU 0, in front of the same
nginx origin; the load generator and the origin share CPU 1. Proxies are measured in
alternating order (A B C D, then D C B A, ...) so that machine drift cancels out. Reported:

  * max throughput (wrk, 50 keep-alive connections) for 13 B, 1 KiB and 16 KiB bodies, with the
    proxy's CPU microseconds per request (utime+stime from /proc) and whether CPU 1, where the
    load generator runs, was saturated;
  * latency at a fixed rate (oha, open loop with latency correction) at 50% and 80% of nginx's
    max: p50, p99, p99.9, max;
  * instructions per proxied request under callgrind, (Ir(25k) - Ir(5k)) / 20k, and heap
    allocations per request counted from the same runs;
  * extra scenarios: a fixed-response route, 1000 routes, cache hits (vs the proxied path and
    nginx's proxy_cache), a rate-limited route, a new connection per request, and ringway with
    2 workers.

Results go to loadtest/results/<date>-<host>.{json,md,png}; the last line printed is the ratio
summary. Only 127.0.0.1 is targeted and every step is bounded in time.

--callgrind-only [--reps N] [--baseline BINARY] counts only ringway's instructions and
allocations per request (proxied on both drivers, with three header transforms, cache hits),
alternating with another build when one is given, into loadtest/results/<date>-callgrind.*:
the before/after check for a change to the request path. With --with-nginx, nginx is counted the
same way and every row shows its ratio to it.

--cpu-only [--reps N] [--baseline BINARY] measures CPU µs (user, system), system calls, context
switches and io_uring submissions per proxied request for ringway on both drivers, a baseline
build if given, and nginx, all alternating; each row's ratio to nginx is the median of the reps'.

--paired [--reps N] serves ringway and nginx at the same time, both on the proxy CPU, each loaded
by its own wrk (25 connections), on both drivers: CPU per request of each under the same machine
state, and their ratio per rep (this VM's speed drifts faster than an alternating rep lasts).
--paired --baseline BINARY serves this build and the baseline side by side instead (proxied, both
drivers): this build's CPU per request over the baseline's, per rep; it resolves about 1%.

--latency-only [--rate R] [--reps N] measures p50/p99/p99.9/max at R requests/s (default 10000)
for ringway on both drivers and nginx, alternating, and counts the reps where ringway's p99 and
p99.9 were at most nginx's.

--one-write-origin, with any mode, has the nginx origin send each response in one write
(sendfile off) rather than head and body as two segments, which make the proxy's kernel send a
pure ACK per request; a mode's results go to <date>-<kind>-one-write.*, the full kit's JSON
records it as origin_one_write.
"""

import argparse
import base64
import datetime
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RINGWAY = os.path.join(ROOT, "target", "release", "ringway")
ORIGIN_PORT = 19000
PROXY_CPU = "0"
LOAD_CPU = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
BODIES = {"13B": 13, "1KiB": 1024, "16KiB": 16384}
# With `sendfile on` the nginx origin sends a response's head and body as two segments, and the
# proxy's kernel acknowledges the pair at once: one pure ACK per request, the same for every
# proxy. `--one-write-origin` turns sendfile off, so head and body leave in one write, as from
# most API backends.
ORIGIN_ONE_WRITE = False


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def wait_port(port, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def wait_closed(port, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                time.sleep(0.05)
        except OSError:
            return
    raise RuntimeError(f"port {port} still open after {timeout}s")


def cpu_ticks(pid):
    """(utime, stime) of a process and all its threads, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


# Kernel work counted per request while a throughput run lasts (perf, tracepoints; every thread
# of the proxy): system calls, context switches (voluntary and not), io_uring submissions.
KERNEL_EVENTS = {"raw_syscalls:sys_enter": "syscalls", "context-switches": "ctx_switches",
                 "io_uring:io_uring_submit_req": "uring_submits"}


class KernelCounts:
    """`perf stat` attached to a process for the length of a `with` block."""

    def __init__(self, pid):
        self.pid, self.proc, self.counts = pid, None, {}

    def __enter__(self):
        if shutil.which("perf"):
            self.proc = subprocess.Popen(
                ["perf", "stat", "-x", ",", "-e", ",".join(KERNEL_EVENTS), "-p", str(self.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(0.2)  # attached before the load starts
        return self

    def __exit__(self, *exc):
        if self.proc is None:
            return False
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=30)
        for line in err.splitlines():
            cols = line.split(",")
            if len(cols) > 2 and cols[2] in KERNEL_EVENTS and cols[0].strip().isdigit():
                self.counts[KERNEL_EVENTS[cols[2]]] = int(cols[0])
        return False


def cpu_busy(cpu):
    """(busy, total) jiffies of one CPU from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                idle = v[3] + v[4]
                return sum(v) - idle, sum(v)
    raise RuntimeError(f"cpu{cpu} not in /proc/stat")


class Proxy:
    """A proxy process started pinned to PROXY_CPU and stopped with SIGTERM."""

    def __init__(self, name, port, argv, cpus=PROXY_CPU, headers=()):
        self.name, self.port, self.argv, self.cpus = name, port, argv, cpus
        # Request headers every request to it carries (a JWT-protected route's token).
        self.headers = list(headers)
        self.proc = None

    def start(self, under=None):
        # taskset goes first: valgrind does not follow the exec that taskset would do.
        argv = ["taskset", "-c", self.cpus] + (under or []) + self.argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_port(self.port, timeout=60 if under else 20)
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        wait_closed(self.port)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        wait_closed(self.port)

    def ticks(self):
        return cpu_ticks(self.proc.pid)

    @property
    def pid(self):
        return self.proc.pid


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def origin_config(tmp):
    for name, size in BODIES.items():
        write(os.path.join(tmp, "www", name), ("x" * (size - 1)) + "\n")
    return write(os.path.join(tmp, "origin.conf"), f"""
worker_processes 1;
daemon off;
master_process off;
error_log {tmp}/origin.err warn;
pid {tmp}/origin.pid;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  sendfile {"off" if ORIGIN_ONE_WRITE else "on"};
  open_file_cache max=16;
  keepalive_requests 10000000;
  default_type text/plain;
  server {{
    listen 127.0.0.1:{ORIGIN_PORT} reuseport backlog=4096;
    root {tmp}/www;
  }}
}}
""")


def nginx_proxy_config(tmp, port, respond=False, cache=False):
    location = ('return 200 "hello, world\\n";' if respond else
                'proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection "";')
    cache_path = ""
    if cache:
        cache_path = f"proxy_cache_path {tmp}/nginx-cache-{port} keys_zone=c:10m;"
        location += " proxy_cache c; proxy_cache_valid 200 60s;"
    return write(os.path.join(tmp, f"nginx-{port}.conf"), f"""
worker_processes 1;
daemon off;
master_process off;
error_log {tmp}/nginx-{port}.err warn;
pid {tmp}/nginx-{port}.pid;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  {cache_path}
  upstream origin {{ server 127.0.0.1:{ORIGIN_PORT}; keepalive 64; keepalive_requests 10000000; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{ {location} }}
  }}
}}
""")


def haproxy_config(tmp, port):
    return write(os.path.join(tmp, f"haproxy-{port}.cfg"), f"""
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
  option http-keep-alive
frontend f
  bind 127.0.0.1:{port}
  default_backend b
backend b
  server origin 127.0.0.1:{ORIGIN_PORT}
""")


JWT_SECRET = "the-load-test-kit-hmac-secret-0123456789"


def jwt_token(secret=JWT_SECRET):
    """An HS256 token of a typical size (about 700 bytes, as an RS256 one from an identity
    provider), valid for a day. The cached path costs the same whatever the algorithm: a hash and
    a comparison of the token's bytes."""
    def b64(raw):
        return base64.urlsafe_b64encode(raw).rstrip(b"=")
    now = int(time.time())
    claims = {"iss": "https://idp.example.com/", "aud": "orders-api", "sub": "user-1234567890",
              "iat": now, "exp": now + 86400, "scope": "orders:read orders:write profile email",
              "org": {"tenant": "t-42", "plan": "enterprise"},
              "jti": "0f8c1b4e-6f7d-4a57-9d2c-" + "x" * 300}
    signing = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + b"." + \
        b64(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), signing, hashlib.sha256).digest()
    return (signing + b"." + b64(signature)).decode()


def ringway_config(tmp, port, driver="io_uring", workers=1, routes=1, respond=False, cache=False,
                   rate_limit=False, transforms=False, jwt=False, compression=False):
    cores = "[0]" if workers == 1 else "[0, 1]"
    route_extra = ""
    lines = [f"""[runtime]
workers = {workers}
pin_cores = {cores}
driver = "{driver}"

[[listeners]]
name = "public"
address = "127.0.0.1:{port}"

[[upstreams]]
name = "origin"
targets = ["127.0.0.1:{ORIGIN_PORT}"]
max_idle_per_target = 64
"""]
    if cache:
        lines.append("[cache]\nmax_bytes = 67108864\n")
        route_extra += "cache = { default_ttl_ms = 600000 }\n"
    if rate_limit:
        # One key, a limit far above what this machine can send: every request pays the admit.
        lines.append('[[rate_limits]]\nname = "all"\nkey = "route"\nrate = 100000000\n'
                     'burst = 100000000\nheaders = false\n')
        route_extra += 'rate_limits = ["all"]\n'
    if jwt:
        secret = write(os.path.join(tmp, "jwt-secret"), JWT_SECRET)
        lines.append(f'[[auth]]\nname = "idp"\ntype = "jwt"\nissuer = "https://idp.example.com/"\n'
                     f'audiences = ["orders-api"]\nalgorithms = ["HS256"]\n'
                     f'secret = {{ file = "{secret}" }}\n'
                     f'claims_to_headers = {{ "x-tenant" = "org.tenant" }}\n')
        route_extra += 'auth = ["idp"]\n'
    if compression:
        route_extra += ('compression = { algorithms = ["zstd", "br", "gzip"], '
                        'types = ["text/*", "application/json"] }\n')
    if transforms:
        # Three header transforms: two on the request, one on the response.
        route_extra += ('request_headers = { set = { "x-env" = "prod" }, add = { "x-tag" = "a" } }\n'
                        'response_headers = { remove = ["server"] }\n')
    for i in range(routes - 1):
        lines.append(f'[[routes]]\nname = "r{i}"\nlistener = "public"\npath_prefix = "/svc{i}/"\n'
                     f'upstream = "origin"\n')
    if respond:
        lines.append('[[routes]]\nname = "all"\nlistener = "public"\npath_prefix = "/"\n'
                     'respond = { status = 200, body = "hello, world\\n" }\n')
    else:
        lines.append('[[routes]]\nname = "all"\nlistener = "public"\npath_prefix = "/"\n'
                     'upstream = "origin"\n' + route_extra)
    name = f"ringway-{port}.toml"
    return write(os.path.join(tmp, name), "\n".join(lines))


def ringway(tmp, name, port, binary=RINGWAY, **kw):
    cpus = PROXY_CPU if kw.get("workers", 1) == 1 else f"{PROXY_CPU},{LOAD_CPU}"
    headers = [f"Authorization: Bearer {jwt_token()}"] if kw.pop("token", kw.get("jwt")) else []
    return Proxy(name, port, [binary, "--config", ringway_config(tmp, port, **kw)], cpus=cpus,
                 headers=headers)


def wrk(port, path, seconds, connections=50, close=False, cpus=LOAD_CPU, headers=()):
    argv = ["taskset", "-c", cpus, "wrk", "-t1" if cpus == LOAD_CPU else "-t2",
            f"-c{connections}", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}{path}"]
    if close:
        argv[5:5] = ["-H", "Connection: close"]
    for h in headers:
        argv[5:5] = ["-H", h]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "requests": total, "non2xx": int(errors.group(1)) if errors else 0}


def throughput(proxy, path, seconds, **kw):
    """Requests/s, and per request: CPU µs (user, system, both), system calls, context switches
    and io_uring submissions of the proxy, counted over the whole run."""
    return measured(proxy, lambda: wrk(proxy.port, path, seconds, **kw))


class Measure:
    """A proxy's CPU and kernel work over the length of a `with` block, and how busy the load
    generator's CPU was; `add_to(r)` adds them per request to a load generator's result."""

    def __init__(self, proxy):
        self.proxy, self.kernel = proxy, KernelCounts(proxy.pid)

    def __enter__(self):
        self.kernel.__enter__()
        self.t0, self.b0 = self.proxy.ticks(), cpu_busy(LOAD_CPU)
        return self

    def __exit__(self, *exc):
        self.b1, self.t1 = cpu_busy(LOAD_CPU), self.proxy.ticks()
        return self.kernel.__exit__(*exc)

    def add_to(self, r):
        n = max(r["requests"], 1)
        r["user_us_per_req"] = (self.t1[0] - self.t0[0]) / CLK_TCK * 1e6 / n
        r["sys_us_per_req"] = (self.t1[1] - self.t0[1]) / CLK_TCK * 1e6 / n
        r["cpu_us_per_req"] = r["user_us_per_req"] + r["sys_us_per_req"]
        for key, count in self.kernel.counts.items():
            r[f"{key}_per_req"] = count / n
        r["load_cpu_busy"] = (self.b1[0] - self.b0[0]) / max(self.b1[1] - self.b0[1], 1)
        return r


def measured(proxy, run):
    """Runs `run()` (a load generator returning a dict with `requests`), adding the proxy's CPU
    and kernel work per request and how busy the load generator's CPU was."""
    with Measure(proxy) as m:
        r = run()
    return m.add_to(r)


def oha_fixed_rate(port, rate, seconds):
    return oha_fixed_rates([port], rate, seconds)[0]


def oha_fixed_rates(ports, rate, seconds):
    """One oha per port, all at the same time, each at `rate` (open loop, latency-corrected,
    50 connections); the load CPU's busy share is over all of them."""
    def argv(port):
        return ["taskset", "-c", LOAD_CPU, "oha", "--no-tui", "--output-format", "json",
                "--latency-correction", "-z", f"{seconds}s", "-c", "50", "-q", str(int(rate)),
                f"http://127.0.0.1:{port}/13B"]
    b0 = cpu_busy(LOAD_CPU)
    runs = [subprocess.Popen(argv(port), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True) for port in ports]
    outs = [r.communicate(timeout=seconds + 60)[0] for r in runs]
    b1 = cpu_busy(LOAD_CPU)
    busy = (b1[0] - b0[0]) / max(b1[1] - b0[1], 1)
    results = []
    for out in outs:
        d = json.loads(out)
        p = d["latencyPercentiles"]
        results.append({"rate": int(rate), "achieved_rps": d["summary"]["requestsPerSec"],
                        "load_cpu_busy": busy, "success": d["summary"]["successRate"],
                        "p50_us": p["p50"] * 1e6, "p99_us": p["p99"] * 1e6,
                        "p99_9_us": p["p99.9"] * 1e6, "max_us": d["summary"]["slowest"] * 1e6})
    return results


def callgrind(proxy, tmp, small, large):
    """Instructions and allocator calls per request: the difference of two runs cancels start-up.

    The counts are dumped with callgrind_control once the requests are done, and the process is
    then killed: under valgrind an io_uring worker waiting in io_uring_enter keeps valgrind's
    lock, so the other threads (signal handling, shutdown) can starve for minutes."""
    runs = []
    for n in (small, large):
        out = os.path.join(tmp, f"cg.{proxy.name}.{n}")
        for f in os.listdir(tmp):
            if f.startswith(os.path.basename(out) + "."):
                os.remove(os.path.join(tmp, f))
        proxy.start(under=["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p"])
        url = f"http://127.0.0.1:{proxy.port}/13B"
        first = urllib.request.Request(url, headers=dict(h.split(": ", 1) for h in proxy.headers))
        urllib.request.urlopen(first, timeout=30).read()
        headers = [a for h in proxy.headers for a in ("-H", h)]
        subprocess.run(["oha", "--no-tui", "-n", str(n), "-c", "10", *headers, url],
                       capture_output=True, timeout=900)
        dump = f"{out}.{proxy.proc.pid}.1"
        subprocess.run(["callgrind_control", "-d", str(proxy.proc.pid)], capture_output=True,
                       timeout=120)
        deadline = time.time() + 120
        while time.time() < deadline:
            if os.path.exists(dump) and "\ntotals:" in open(dump, errors="replace").read():
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"callgrind dump of {proxy.name} did not appear")
        proxy.kill()
        runs.append(parse_callgrind(dump))
    (ir1, al1), (ir2, al2) = runs
    return {"instr_per_req": (ir2 - ir1) / (large - small),
            "allocs_per_req": (al2 - al1) / (large - small)}


ALLOC_FNS = re.compile(r"^(malloc|calloc|realloc|posix_memalign|aligned_alloc|"
                       r"mi_(malloc|zalloc|calloc|realloc|rezalloc)(_aligned)?)$")


def parse_callgrind(path):
    """Total Ir and the number of calls into allocator entry points."""
    names, total, allocs, callee = {}, 0, 0, None
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("summary:"):
                total = int(line.split()[1])
            elif line.startswith("cfn="):
                m = re.match(r"cfn=\((\d+)\)(?: (.*))?", line.strip())
                if m.group(2):
                    names[m.group(1)] = m.group(2)
                callee = names.get(m.group(1), "")
            elif line.startswith("calls=") and callee is not None:
                if ALLOC_FNS.match(callee.split("'")[0]):
                    allocs += int(line.split("=")[1].split()[0])
                callee = None
            elif line.startswith("fn="):
                m = re.match(r"fn=\((\d+)\)(?: (.*))?", line.strip())
                if m and m.group(2):
                    names[m.group(1)] = m.group(2)
    return total, allocs


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def alternate(items, rep):
    return items if rep % 2 == 0 else list(reversed(items))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10, help="per throughput/latency run")
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions")
    ap.add_argument("--quick", action="store_true", help="3 s runs, 1 rep, small callgrind runs")
    ap.add_argument("--no-callgrind", action="store_true")
    ap.add_argument("--callgrind-only", action="store_true",
                    help="only instructions and allocations per request of ringway's variants "
                         "(proxied io_uring and epoll, 3 header transforms, cache hits)")
    ap.add_argument("--with-nginx", action="store_true",
                    help="with --callgrind-only: also count nginx's instructions per request, "
                         "and show each row's ratio to it")
    ap.add_argument("--baseline", metavar="BINARY",
                    help="with --callgrind-only, --cpu-only: also measure this ringway build, for "
                         "before/after; with --paired: serve it side by side with this build "
                         "instead of nginx (CPU per request of this build over it, ~1%% resolution)")
    ap.add_argument("--cpu-only", action="store_true",
                    help="only CPU and kernel work per proxied request (13 B, keep-alive) of ringway "
                         "on both drivers and nginx, alternating with --baseline if given: "
                         "before/after for a change to how ringway drives the kernel")
    ap.add_argument("--paired", action="store_true",
                    help="ringway and nginx served at the same time on the proxy CPU, each with "
                         "its own wrk: CPU per request of each under the same machine state")
    ap.add_argument("--latency-only", action="store_true",
                    help="only p50/p99/p99.9/max at one fixed rate (--rate) for ringway on both "
                         "drivers and nginx, alternating, each rep compared with nginx's")
    ap.add_argument("--side-by-side", action="store_true",
                    help="with --latency-only: ringway (each driver in turn) and nginx served at "
                         "the same time, each at half of --rate from its own oha")
    ap.add_argument("--rate", type=int, default=10000,
                    help="with --latency-only: requests/s (default 10000, where this VM's load "
                         "core stays near 70%% busy)")
    ap.add_argument("--guard", action="store_true",
                    help="exit 1, loudly, if instructions per request (callgrind: proxied on both "
                         "drivers, cache hits) rose more than 5%% above loadtest/guard.json")
    ap.add_argument("--auth-cost", action="store_true",
                    help="instructions per request of a JWT-protected route (token from the cache "
                         "of verified tokens) against the same route unprotected (callgrind)")
    ap.add_argument("--one-write-origin", action="store_true",
                    help="the origin sends each response's head and body in one write (sendfile "
                         "off) rather than two segments, which cost the proxy a pure ACK each")
    ap.add_argument("--compression", action="store_true",
                    help="CPU per response and bytes out for a 20 KiB JSON: ringway's gzip, br and "
                         "zstd against nginx's gzip at the same level, alternating")
    ap.add_argument("--record", action="store_true",
                    help="with --guard: write the figures measured now into loadtest/guard.json")
    args = ap.parse_args()
    global ORIGIN_ONE_WRITE
    ORIGIN_ONE_WRITE = args.one_write_origin
    # The modes import this module by name: let them find this instance, flag set, rather than
    # a second copy of it.
    sys.modules.setdefault("compare", sys.modules[__name__])
    if (args.guard or args.callgrind_only or args.cpu_only or args.auth_cost or args.latency_only
            or args.paired or args.compression):
        import modes  # the single-purpose modes, in loadtest/modes.py
        if args.compression:
            return modes.compression(args)
        if args.guard:
            return modes.guard(args)
        if args.paired:
            return modes.paired(args)
        if args.latency_only:
            return (modes.latency_side_by_side if args.side_by_side else modes.latency_only)(args)
        if args.auth_cost:
            return modes.auth_cost(args)
        return modes.callgrind_only(args) if args.callgrind_only else modes.cpu_only(args)
    if args.quick:
        args.seconds, args.reps = 3, 1
    cg_small, cg_large = (1000, 5000) if args.quick else (5000, 25000)

    tmp = tempfile.mkdtemp(prefix="ringway-compare-")
    os.makedirs(os.path.join(tmp, "www"))
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "host": socket.gethostname(), "cpus": os.cpu_count(),
               "cpu_model": cpu_model(), "kernel": os.uname().release,
               "layout": f"proxy on CPU {PROXY_CPU}; wrk/oha and the nginx origin on CPU {LOAD_CPU}",
               "origin_one_write": ORIGIN_ONE_WRITE,
               "versions": versions(), "seconds": args.seconds, "reps": args.reps}
    origin = subprocess.Popen(["taskset", "-c", LOAD_CPU, "nginx", "-c", origin_config(tmp)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = []
    try:
        wait_port(ORIGIN_PORT)
        proxies = [
            ringway(tmp, "ringway", 18080),
            Proxy("nginx", 18081, ["nginx", "-c", nginx_proxy_config(tmp, 18081)]),
            Proxy("haproxy", 18083, ["haproxy", "-f", haproxy_config(tmp, 18083)]),
            ringway(tmp, "ringway-legacy", 18082, driver="legacy"),
        ]
        procs.extend(proxies)

        log("== direct to origin (reference)")
        results["direct_rps"] = wrk(ORIGIN_PORT, "/13B", args.seconds)["rps"]

        # Max throughput, proxies side by side.
        tp = {name: {p.name: [] for p in proxies} for name in BODIES}
        for p in proxies:
            p.start()
        for rep in range(args.reps):
            for body in BODIES:
                for p in alternate(proxies, rep):
                    r = throughput(p, f"/{body}", args.seconds)
                    log(f"   {body:6} {p.name:15} {r['rps']:>10.0f} rps  {per_request(r)}  "
                        f"load CPU busy {r['load_cpu_busy']:.0%}")
                    tp[body][p.name].append(r)
        results["throughput"] = {
            body: {name: medians(runs) for name, runs in per.items()}
            for body, per in tp.items()}

        # Fixed-rate latency at 50% and 80% of nginx's max, alternating, medians per percentile.
        nginx_max = results["throughput"]["13B"]["nginx"]["rps"]
        lat = {}
        for share in (0.5, 0.8):
            key = f"{int(share * 100)}%"
            runs = {p.name: [] for p in proxies}
            for rep in range(args.reps):
                for p in alternate(proxies, rep):
                    r = oha_fixed_rate(p.port, nginx_max * share, args.seconds)
                    log(f"   {key} {p.name:15} p50 {r['p50_us']:8.0f}  p99 {r['p99_us']:8.0f}  "
                        f"p99.9 {r['p99_9_us']:8.0f}  max {r['max_us']:8.0f} us  "
                        f"({r['achieved_rps']:.0f} rps, load CPU busy {r['load_cpu_busy']:.0%})")
                    runs[p.name].append(r)
            lat[key] = {name: {k: median([r[k] for r in rs]) for k in rs[0]} | {"runs": rs}
                        for name, rs in runs.items()}
        results["latency"] = lat
        for p in proxies:
            p.stop()

        # Scenarios beyond plain proxying.
        extra = {}
        log("== extra scenarios")
        pairs = [
            ("respond route (no upstream)",
             [ringway(tmp, "ringway", 18090, respond=True),
              Proxy("nginx", 18091, ["nginx", "-c", nginx_proxy_config(tmp, 18091, respond=True)])],
             {}),
            ("1000 routes", [ringway(tmp, "ringway", 18092, routes=1000)], {}),
            ("cache hit vs proxied",
             [ringway(tmp, "ringway-cached", 18098, cache=True),
              ringway(tmp, "ringway", 18099),
              Proxy("nginx-cached", 18100,
                    ["nginx", "-c", nginx_proxy_config(tmp, 18100, cache=True)])],
             {}),
            ("rate-limited route (every request admitted)",
             [ringway(tmp, "ringway-limited", 18101, rate_limit=True),
              ringway(tmp, "ringway", 18102)],
             {}),
            ("new connection per request",
             [ringway(tmp, "ringway", 18093),
              Proxy("nginx", 18094, ["nginx", "-c", nginx_proxy_config(tmp, 18094)]),
              Proxy("haproxy", 18095, ["haproxy", "-f", haproxy_config(tmp, 18095)])],
             {"close": True}),
        ]
        for title, group, kw in pairs:
            extra[title] = {}
            for p in group:
                p.start()
                procs.append(p)
            for rep in range(args.reps):
                for p in alternate(group, rep):
                    r = throughput(p, "/13B", args.seconds, **kw)
                    extra[title].setdefault(p.name, []).append(r)
            for p in group:
                p.stop()
            extra[title] = {n: medians(rs) for n, rs in extra[title].items()}
            log(f"   {title}: " + "; ".join(f"{n} {v['rps']:.0f} rps, {per_request(v)}"
                                           for n, v in extra[title].items()))
        # Scaling: 1 worker vs 2 workers, load generator on both CPUs.
        one, two = ringway(tmp, "ringway-1w", 18096), ringway(tmp, "ringway-2w", 18097, workers=2)
        scale = {}
        for p in (one, two):
            p.start()
            procs.append(p)
            scale[p.name] = wrk(p.port, "/13B", args.seconds, cpus="0,1")["rps"]
            p.stop()
        extra["scaling (wrk on both CPUs)"] = {n: {"rps": v} for n, v in scale.items()}
        log(f"   scaling: {scale}")
        results["extra"] = extra

        if not args.no_callgrind:
            log("== callgrind (instructions per request)")
            cg = {}
            for p in proxies:
                cg[p.name] = callgrind(p, tmp, cg_small, cg_large)
                log(f"   {p.name:15} {cg[p.name]['instr_per_req']:8.0f} instr/req  "
                    f"{cg[p.name]['allocs_per_req']:.2f} allocs/req")
            # A cache hit never reaches the origin: the gateway's own cost of answering.
            cached = ringway(tmp, "ringway-cached", 18103, cache=True)
            procs.append(cached)
            cg[cached.name] = callgrind(cached, tmp, cg_small, cg_large)
            log(f"   {cached.name:15} {cg[cached.name]['instr_per_req']:8.0f} instr/req  "
                f"{cg[cached.name]['allocs_per_req']:.2f} allocs/req (cache hits)")
            results["callgrind"] = cg
    finally:
        for p in procs:
            try:
                p.stop()
            except Exception:
                pass
        origin.terminate()
        origin.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    report(results)


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def versions():
    def first(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except Exception:
            return "unknown"
    return {"ringway": first([RINGWAY, "--version"]), "nginx": first(["nginx", "-v"]),
            "haproxy": first(["haproxy", "-v"]), "wrk": first(["wrk", "-v"]),
            "oha": first(["oha", "--version"])}


def ratio(a, b):
    return a / b if b else float("nan")


# Per-request figures of a throughput run, in the order they are shown.
PER_REQUEST = [("cpu_us_per_req", "µs CPU", 1), ("user_us_per_req", "user", 1),
               ("sys_us_per_req", "sys", 1), ("syscalls_per_req", "syscalls", 2),
               ("ctx_switches_per_req", "ctx sw", 3), ("uring_submits_per_req", "uring ops", 2)]


def per_request(r):
    """`37.9 µs CPU (user 3.1, sys 34.8), 0.41 syscalls, 0.020 ctx sw, 2.00 uring ops`."""
    parts = [f"{r[k]:.{d}f} {label}" for k, label, d in PER_REQUEST[3:] if k in r]
    return (f"{r['cpu_us_per_req']:.1f} µs CPU (user {r['user_us_per_req']:.1f}, "
            f"sys {r['sys_us_per_req']:.1f})" + "".join(f", {p}" for p in parts))


def medians(runs):
    """The median of every per-run figure, with the runs kept."""
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    return {k: median([r[k] for r in runs if k in r]) for k in keys} | {"runs": runs}


def report(res):
    out_dir = os.path.join(ROOT, "loadtest", "results")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{res['date'][:10]}-{res['host']}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=2)

    names = ["ringway", "ringway-legacy", "nginx", "haproxy"]
    md = [f"## ringway vs nginx vs HAProxy — {res['date']} on `{res['host']}`", "",
          f"{res['cpus']} CPUs ({res['cpu_model']}), Linux {res['kernel']}; {res['layout']}; "
          f"{res['seconds']} s runs, {res['reps']} alternating reps, medians. "
          f"Direct to origin: {res['direct_rps']:.0f} rps.", "",
          "### Max throughput (wrk, 50 keep-alive connections, 1 proxy worker)", "",
          "| body | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for body, per in res["throughput"].items():
        md.append(f"| {body} | " + " | ".join(
            f"{per[n]['rps']:.0f} rps, {per[n]['cpu_us_per_req']:.1f} µs CPU/req"
            f"{' (load CPU saturated)' if per[n]['load_cpu_busy'] > 0.95 else ''}"
            for n in names) + " |")
    md += ["", "### Kernel work per request (13 B, max throughput runs; perf, every thread)", "",
           "| proxy | CPU µs | user µs | system µs | system calls | context switches | "
           "io_uring submissions |", "|---|---:|---:|---:|---:|---:|---:|"]
    for n in names:
        r = res["throughput"]["13B"][n]
        cells = [f"{r[k]:.{d}f}" if k in r else "-" for k, _, d in PER_REQUEST]
        md.append(f"| {n} | " + " | ".join(cells) + " |")
    md += ["", "### Latency at a fixed rate (oha, open loop, latency-corrected), 13 B", "",
           "A run whose load CPU was saturated measures the load generator as much as the proxy.",
           "", "| load | proxy | achieved rps | load CPU | p50 µs | p99 µs | p99.9 µs | max µs |",
           "|---|---|---|---|---|---|---|---|"]
    for load, per in res["latency"].items():
        for n in names:
            r = per[n]
            md.append(f"| {load} of nginx max ({r['rate']} rps) | {n} | {r['achieved_rps']:.0f} | "
                      f"{r['load_cpu_busy']:.0%} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | "
                      f"{r['p99_9_us']:.0f} | {r['max_us']:.0f} |")
    md += ["", "### Other scenarios (13 B)", "", "| scenario | results |", "|---|---|"]
    for title, per in res["extra"].items():
        md.append(f"| {title} | " + "; ".join(
            f"{n}: {v['rps']:.0f} rps" + (f", {per_request(v)} per request"
                                          if "user_us_per_req" in v else "")
            for n, v in per.items()) + " |")
    if "callgrind" in res:
        md += ["", "### Instructions per proxied request (callgrind, 13 B, keep-alive)", "",
               "| proxy | instructions/request | heap allocations/request |", "|---|---|---|"]
        for n in names + [n for n in res["callgrind"] if n not in names]:
            c = res["callgrind"][n]
            md.append(f"| {n} | {c['instr_per_req']:.0f} | {c['allocs_per_req']:.2f} |")

    t, lat = res["throughput"]["13B"], res["latency"]
    summary = (f"ringway/nginx rps={ratio(t['ringway']['rps'], t['nginx']['rps']):.2f} "
               f"cpu/req={ratio(t['ringway']['cpu_us_per_req'], t['nginx']['cpu_us_per_req']):.2f} "
               f"p99@50%={ratio(lat['50%']['ringway']['p99_us'], lat['50%']['nginx']['p99_us']):.2f} "
               f"p99@80%={ratio(lat['80%']['ringway']['p99_us'], lat['80%']['nginx']['p99_us']):.2f}")
    legacy = (f"ringway-legacy/nginx rps={ratio(t['ringway-legacy']['rps'], t['nginx']['rps']):.2f} "
              f"cpu/req={ratio(t['ringway-legacy']['cpu_us_per_req'], t['nginx']['cpu_us_per_req']):.2f} "
              f"p99@50%={ratio(lat['50%']['ringway-legacy']['p99_us'], lat['50%']['nginx']['p99_us']):.2f}")
    if "callgrind" in res:
        c = res["callgrind"]
        summary += (f" instr/req={ratio(c['ringway']['instr_per_req'], c['nginx']['instr_per_req']):.2f}"
                    f" allocs/req={c['ringway']['allocs_per_req']:.2f}")
        legacy += f" instr/req={ratio(c['ringway-legacy']['instr_per_req'], c['nginx']['instr_per_req']):.2f}"
    md += ["", f"`{summary}`", "", f"`{legacy}`", ""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md))
    plot(res, names, stem + ".png")
    print("\n".join(md))
    print(f"results: {stem}.json, {stem}.md, {stem}.png")
    print(summary)


def plot(res, names, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    bodies = list(res["throughput"])
    width = 0.2
    for i, n in enumerate(names):
        axes[0].bar([x + i * width for x in range(len(bodies))],
                    [res["throughput"][b][n]["rps"] for b in bodies], width, label=n)
        axes[1].bar([x + i * width for x in range(len(bodies))],
                    [res["throughput"][b][n]["cpu_us_per_req"] for b in bodies], width, label=n)
    for ax, title in ((axes[0], "requests/s (higher is better)"),
                      (axes[1], "proxy CPU µs per request (lower is better)")):
        ax.set_xticks([x + 1.5 * width for x in range(len(bodies))], bodies)
        ax.set_title(title)
        ax.legend(fontsize=8)
    pct = ["p50_us", "p99_us", "p99_9_us", "max_us"]
    for n in names:
        for load, style in (("50%", "-"), ("80%", "--")):
            r = res["latency"][load][n]
            axes[2].plot(["p50", "p99", "p99.9", "max"], [r[k] for k in pct], style, marker="o",
                         label=f"{n} @{load}")
    axes[2].set_yscale("log")
    axes[2].set_title("latency µs at fixed rate (lower is better)")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{res['host']} {res['date'][:10]}: {res['layout']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
