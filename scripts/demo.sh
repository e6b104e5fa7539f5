#!/usr/bin/env bash
# `altroute demo` on a fresh machine: installs the wasm target, builds the relay (which
# embeds the standard policy module) and runs the self-contained loopback showcase.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
    rustup target add wasm32-unknown-unknown
fi
cargo build --release --locked -p altroute
exec target/release/altroute demo "$@"
