#!/usr/bin/env bash
# What one HTTP context costs in altroute's proxy-wasm host, part by part: WAT modules
# making some of the host calls of a routing question (the header block read, the
# decision headers added one by one or set all at once) with the request headers the
# relay sends for a verdict. Release build. Prints a Markdown table for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(uname -r)"
cargo run --release --locked -q -p altroute-tests --example host_costs
