#!/usr/bin/env bash
# One routing decision (plan + verdict) through altroute's proxy-wasm host vs native
# decide(): p50/p99/p99.9 warm and with cold caches, the contract floor (a WAT module
# making the same host calls without deciding anything), a control (native work as long
# as a wasm pair, timed in turns with it: the machine's own tail), and plugin-ready time
# from a cached artifact. Release build. Prints a Markdown table for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(uname -r)"
cargo run --release --locked -q -p altroute-tests --example decision_bench
