#!/bin/sh
# Builds the C extension example: hold_list.c -> $1 (default ./hold_list.wasm).
# Needs Debian's clang and lld (scripts/setup.sh installs them). No libc, no WASI: the
# module imports only the proxy-wasm functions it calls.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/hold_list.wasm"}
command -v clang >/dev/null || { echo "clang is missing: apt-get install -y clang lld" >&2; exit 1; }
command -v wasm-ld >/dev/null || { echo "wasm-ld is missing: apt-get install -y lld" >&2; exit 1; }
clang --target=wasm32 -nostdlib -O2 -Wall -Wextra -Werror \
  -Wl,--no-entry -Wl,--strip-all -Wl,--initial-memory=262144 \
  -o "$out" "$here/hold_list.c"
echo "built $out"
