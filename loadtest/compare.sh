#!/usr/bin/env bash
# The one command for the comparison: ringway vs nginx vs HAProxy on this machine.
# Installs what it needs (Debian packages, oha via cargo, matplotlib via pip), builds ringway in
# release, then runs loadtest/compare.py (pass --quick for a short run). Traffic goes only to
# 127.0.0.1 and every run is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in wrk nginx haproxy valgrind taskset perf; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    pkgs=()
    for t in "${missing[@]}"; do
        case "$t" in taskset) pkgs+=(util-linux) ;; perf) pkgs+=(linux-perf) ;; *) pkgs+=("$t") ;; esac
    done
    apt-get update -qq && apt-get install -y -qq "${pkgs[@]}"
fi
command -v oha >/dev/null 2>&1 || cargo install oha --locked
python3 -c "import matplotlib" 2>/dev/null || pip install -q matplotlib

cargo build --release --locked
exec python3 loadtest/compare.py "$@"
