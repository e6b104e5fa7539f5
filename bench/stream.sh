#!/usr/bin/env bash
# The SMTP edge filter (the policy module's stream face) through altroute's proxy-wasm
# host: one SMTP session and one 16 KiB body read (text and base64), next to the no-op
# module bench/noop-stream.wat in the same run. Release build. Prints a Markdown table
# for BENCHMARKS.md. BENCH_MODULE=path/to/module.wasm measures another build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(uname -r)"
cargo run --release --locked -q -p altroute-tests --example stream_bench
