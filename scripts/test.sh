#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs (scripts/setup.sh), then
# checks formatting and lints (native and wasm32), builds everything and runs every test.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

step() { printf '\n== %s\n' "$*"; }

step "setup"
bash scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all --check

step "clippy (native, all targets)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "clippy (wasm32: policy crate and modules)"
cargo clippy --locked --target wasm32-unknown-unknown \
    -p altroute-policy -p altroute-policy-module -p altroute-testguest \
    -p altroute-ext-finance-secure -p altroute-ext-business-hours -- -D warnings
cargo clippy --locked --target wasm32-unknown-unknown -p altroute-policy --features guest -- -D warnings

step "build"
cargo build --workspace --all-targets --locked

step "tests"
cargo test --workspace --locked --no-fail-fast

step "all green"
