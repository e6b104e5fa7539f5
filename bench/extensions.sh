#!/usr/bin/env bash
# p50/p99 decision time of other mail while one policy extension misbehaves (an infinite
# loop scoped to *.victim.test, asked continuously by another thread), vs the same chain
# with the extension well behaved: with the default cool-down and with it disabled.
# The chain is standard module + finance-secure + the hostile extension.
# Prints a Markdown table for BENCHMARKS.md. PROFILE=release (default) or dev.
#
#   bench/extensions.sh [QUESTIONS=20000]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PROFILE=${PROFILE:-release}
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(uname -r), profile $PROFILE"
cargo run --profile "$PROFILE" --locked -q -p altroute --example extension_bench -- "${1:-20000}"
