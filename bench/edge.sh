#!/usr/bin/env bash
# SMTP sessions per second through the Envoy SMTP edge, with and without the altroute
# policy module as a network filter, in one run: the same Envoy config
# (deploy/envoy/edge-static.yaml) with the filter block and with it removed, tcp_proxy to
# Postfix's smtp-sink, Postfix's smtp-source as the client (one message per session:
# smtp-source opens a new connection for every message unless given -d). A third Envoy
# runs the same filter block with a module that does nothing (bench/noop-stream.wat):
# what Envoy's wasm plumbing alone costs, the floor under any module. The three Envoys
# run side by side for the whole run, with the same settings; the rounds rotate which
# variant goes first, so a load change on the machine hits all alike. Prints every
# round, the median rates and the ratios (goal: the filter costs at most 10%).
#
#   bench/edge.sh [MESSAGES=2000] [SESSIONS=20] [SIZE=1024] [ROUNDS=3]
#
# Needs: Envoy (ENVOY_BIN, default .venv/bin/envoy from scripts/setup.sh), postfix
# (smtp-sink, smtp-source), curl, jq. ALTROUTE_BIN (to compile the policy) and
# POLICY_WASM (the module) default to building them with cargo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MESSAGES=${1:-2000}
SESSIONS=${2:-20}
SIZE=${3:-1024}
ROUNDS=${4:-3}
ENVOY=${ENVOY_BIN:-.venv/bin/envoy}
TARGET=${CARGO_TARGET_DIR:-target}
for tool in "$ENVOY" /usr/sbin/smtp-sink /usr/sbin/smtp-source curl jq; do
    command -v "$tool" >/dev/null || { echo "missing $tool (scripts/setup.sh, apt-get install postfix curl jq)" >&2; exit 1; }
done
if [ -z "${ALTROUTE_BIN:-}" ]; then
    cargo build --release --locked -q -p altroute
    ALTROUTE_BIN=$TARGET/release/altroute
fi
if [ -z "${POLICY_WASM:-}" ]; then
    cargo build --release --locked -q -p altroute-modules
    POLICY_WASM=$(ls -t "$TARGET"/release/build/altroute-modules-*/out/altroute_policy.wasm | head -1)
fi

WORK=$(mktemp -d)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The policy of the Envoy tests: partner.example requires TLS; the benchmark's recipient
# (rcpt@random.example) is opportunistic, so every message passes the filter's check.
cat >"$WORK/policy.toml" <<'TOML'
[policy]
name = "edge"

[[tls_compliance]]
name = "partners"
domains = ["partner.example"]
TOML
POLICY_JSON=$("$ALTROUTE_BIN" policy compile "$WORK/policy.toml" | jq -c .)

SINK_PORT=$(free_port)
USER_ARGS=()
[ "$(id -u)" = 0 ] && USER_ARGS=(-u nobody)
/usr/sbin/smtp-sink "${USER_ARGS[@]}" "127.0.0.1:$SINK_PORT" 256 &
PIDS+=($!)

# The no-op module: text in the repository, compiled here.
cargo run --release --locked -q -p proxy-wasm-host --example wat2wasm -- bench/noop-stream.wat "$WORK/noop.wasm"

render() { # $1 = listen port, $2 = with|noop|without
    local module=$POLICY_WASM
    [ "$2" = noop ] && module=$WORK/noop.wasm
    sed -e "s|{{LISTEN_PORT}}|$1|" -e "s|{{UPSTREAM_PORT}}|$SINK_PORT|" \
        -e "s|{{MODULE}}|$module|" -e "s|{{STREAM_CONFIG_JSON}}|$POLICY_JSON|" \
        deploy/envoy/edge-static.yaml |
        if [ "$2" = without ]; then sed '/# BEGIN altroute filter/,/# END altroute filter/d'; else cat; fi
}

# Start Envoy ($1 = with|noop|without); sets LISTEN and ENVOY_PID.
start_envoy() {
    LISTEN=$(free_port)
    render "$LISTEN" "$1" >"$WORK/envoy-$1.yaml"
    rm -f "$WORK/admin-$1"
    "$ENVOY" -c "$WORK/envoy-$1.yaml" --concurrency 1 --base-id $((RANDOM % 1000 + 7000)) \
        --admin-address-path "$WORK/admin-$1" --log-level warn >"$WORK/envoy-$1.log" 2>&1 &
    ENVOY_PID=$!
    PIDS+=("$ENVOY_PID")
    for _ in $(seq 600); do
        if [ -s "$WORK/admin-$1" ] && [ "$(curl -s "http://$(cat "$WORK/admin-$1")/ready")" = LIVE ]; then
            return
        fi
        sleep 0.1
    done
    echo "envoy ($1) not ready:" >&2; cat "$WORK/envoy-$1.log" >&2; exit 1
}

# CPU time (user + system, in clock ticks) Envoy $1 has used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# Sessions per second of one smtp-source run against $LISTEN (one message per session).
run() {
    local start end
    start=$(date +%s.%N)
    /usr/sbin/smtp-source -s "$SESSIONS" -m "$1" -l "$SIZE" -f bench@client.test \
        -t rcpt@random.example "127.0.0.1:$LISTEN"
    end=$(date +%s.%N)
    echo "$1 / ($end - $start)" | bc -l
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "envoy: $("$ENVOY" --version | grep -o 'version: [^ ]*' | head -1)"
echo "client: smtp-source -s $SESSIONS -m $MESSAGES -l $SIZE; $ROUNDS rounds, rotating order"
echo "module: $POLICY_WASM ($(wc -c <"$POLICY_WASM") bytes, sha256 $(sha256sum "$POLICY_WASM" | cut -c1-12))"
VARIANTS=(without noop with)
declare -A RATES CPU RATIOS
for variant in "${VARIANTS[@]}"; do
    start_envoy "$variant"
    eval "PORT_$variant=$LISTEN"
    eval "PID_$variant=$ENVOY_PID"
    run 100 >/dev/null # warm-up: first connections, V8 code warm
done
for round in $(seq "$ROUNDS"); do
    # Rotate the order: each variant goes first, second and third as often.
    shift_by=$(((round - 1) % 3))
    order="${VARIANTS[*]:$shift_by} ${VARIANTS[*]:0:$shift_by}"
    declare -A THIS
    for variant in $order; do
        eval "LISTEN=\$PORT_$variant; PID=\$PID_$variant"
        before=$(cpu_ticks "$PID")
        rate=$(run "$MESSAGES")
        # Envoy's own CPU per session: unlike the rate, it does not depend on how much
        # of the machine the client, the sink and other processes took meanwhile.
        us=$(echo "($(cpu_ticks "$PID") - $before) * 1000000 / $(getconf CLK_TCK) / $MESSAGES" | bc -l)
        RATES[$variant]+="$rate "
        CPU[$variant]+="$us "
        THIS[$variant]=$rate
        printf 'round %d %-7s filter: %8.1f sessions/s, envoy CPU %6.1f us/session\n' "$round" "$variant" "$rate" "$us"
    done
    # The runs of one round ran back to back under the same load: their ratio is the
    # figure least disturbed by load changes on a shared machine.
    for variant in with noop; do
        RATIOS[$variant]+="$(echo "${THIS[$variant]} / ${THIS[without]}" | bc -l) "
    done
    printf 'round %d with/without: %.3f, noop/without: %.3f\n' "$round" \
        "$(echo "${THIS[with]} / ${THIS[without]}" | bc -l)" "$(echo "${THIS[noop]} / ${THIS[without]}" | bc -l)"
done
median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
WITHOUT=$(median "${RATES[without]}")
NOOP=$(median "${RATES[noop]}")
WITH=$(median "${RATES[with]}")
printf 'median without filter: %.1f sessions/s\nmedian no-op filter:   %.1f sessions/s\nmedian with filter:    %.1f sessions/s\n' "$WITHOUT" "$NOOP" "$WITH"
printf 'ratio of the medians, with/without: %.3f (%.1f%% slower)\n' "$(echo "$WITH / $WITHOUT" | bc -l)" "$(echo "(1 - $WITH / $WITHOUT) * 100" | bc -l)"
PAIRED=$(median "${RATIOS[with]}")
printf 'median of the per-round ratios:     %.3f (%.1f%% slower)\n' "$PAIRED" "$(echo "(1 - $PAIRED) * 100" | bc -l)"
PAIRED_NOOP=$(median "${RATIOS[noop]}")
printf 'no-op module (the floor), median of the per-round ratios: %.3f (%.1f%% slower)\n' "$PAIRED_NOOP" "$(echo "(1 - $PAIRED_NOOP) * 100" | bc -l)"
CPU_WITHOUT=$(median "${CPU[without]}")
CPU_NOOP=$(median "${CPU[noop]}")
CPU_WITH=$(median "${CPU[with]}")
printf 'median envoy CPU per session: without %.1f us, no-op filter %.1f us, with %.1f us (filter: +%.1f us, x%.3f; of which the plumbing floor: +%.1f us)\n' \
    "$CPU_WITHOUT" "$CPU_NOOP" "$CPU_WITH" "$(echo "$CPU_WITH - $CPU_WITHOUT" | bc -l)" "$(echo "$CPU_WITH / $CPU_WITHOUT" | bc -l)" \
    "$(echo "$CPU_NOOP - $CPU_WITHOUT" | bc -l)"
# Proof that the filter ran: the module counts the SMTP sessions it saw.
echo "filter sessions counted: $(curl -s "http://$(cat "$WORK/admin-with")/stats?filter=altroute_smtp_sessions_total")"
