#!/usr/bin/env bash
# Fuzzes the request parser, head writer and chunked decoder (fuzz/fuzz_targets/request.rs) for
# SECONDS (default 60), installing cargo-fuzz if it is missing. Crashes land in fuzz/artifacts/.
# RUSTC_BOOTSTRAP=1 lets the stable toolchain use the sanitizer flags cargo-fuzz needs.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
RUSTC_BOOTSTRAP=1 exec cargo fuzz run request -- -max_total_time="$seconds"
