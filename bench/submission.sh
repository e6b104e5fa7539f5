#!/usr/bin/env bash
# Submission throughput: altroute vs Postfix, same machine, same client, one run.
#
#   bench/submission.sh [MESSAGES] [SESSIONS] [SIZE]     (defaults: 5000 20 4096)
#
# Client: Postfix's smtp-source (-s SESSIONS parallel sessions, -l SIZE octets of payload,
# -m MESSAGES). Servers:
#   * altroute (release build), spool in a temp dir on the same disk as Postfix's queue,
#     delivery disabled so every message stays queued;
#   * a private Postfix instance (its own config_directory and queue_directory in the temp
#     dir, inet_interfaces = 127.0.0.1, a free port, mydestination empty, relayhost a dead
#     address and defer_transports = smtp, so mail stays queued without delivery attempts),
#     default durability (Postfix fsyncs each queue file before answering 250).
# Both sides do the same work per message: parse, write a queue file durably, answer 250.
# Prints messages per second for each and the ratio. Needs root (Postfix runs its daemons
# as the postfix user) and the Debian packages postfix and swaks (see scripts/setup.sh).
set -euo pipefail

MESSAGES=${1:-5000}
SESSIONS=${2:-20}
SIZE=${3:-4096}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
SMTP_SOURCE=/usr/sbin/smtp-source

for tool in "$SMTP_SOURCE" /usr/sbin/postfix /usr/sbin/postconf; do
    [ -x "$tool" ] || { echo "missing $tool: apt-get install -y postfix" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "run as root (the private Postfix instance needs it)" >&2; exit 1; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
    for _ in $(seq 1 600); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    return 1
}

now() { date +%s.%N; }

# Runs smtp-source against 127.0.0.1:$1 and prints the elapsed seconds.
submit() {
    local start end
    start=$(now)
    "$SMTP_SOURCE" -s "$SESSIONS" -l "$SIZE" -m "$MESSAGES" -f bench@client.test -t rcpt@dest.test "127.0.0.1:$1"
    end=$(now)
    python3 -c "print(f'{$end - $start:.3f}')"
}

WORK=$(mktemp -d /var/tmp/altroute-bench.XXXXXX)
chmod 755 "$WORK"
ALTROUTE_PID=
POSTFIX_CONF=
cleanup() {
    [ -n "$ALTROUTE_PID" ] && kill "$ALTROUTE_PID" 2>/dev/null && wait "$ALTROUTE_PID" 2>/dev/null
    [ -n "$POSTFIX_CONF" ] && postfix -c "$POSTFIX_CONF" stop >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "== building altroute (release)"
(cd "$ROOT" && cargo build --release -p altroute --bin altroute 2>&1 | tail -1)
ALTROUTE=$TARGET/release/altroute

echo "== altroute"
A_PORT=$(free_port)
ADMIN_PORT=$(free_port)
cat > "$WORK/altroute.toml" <<EOF
[server]
hostname = "bench.localdomain"
listen = ["127.0.0.1:$A_PORT"]
[relay]
allow_networks = ["127.0.0.0/8"]
[spool]
dir = "$WORK/altroute-spool"
[delivery]
enabled = false
[policy]
file = "$ROOT/examples/policies/hosted-suite.toml"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
EOF
RUST_LOG=warn "$ALTROUTE" serve -c "$WORK/altroute.toml" 2>"$WORK/altroute.log" &
ALTROUTE_PID=$!
wait_port "$A_PORT"
A_SECS=$(submit "$A_PORT")
kill -TERM "$ALTROUTE_PID"; wait "$ALTROUTE_PID" || true; ALTROUTE_PID=
A_QUEUED=$(find "$WORK/altroute-spool/msg" -type f | wc -l)
echo "altroute: $MESSAGES messages in $A_SECS s, $A_QUEUED queued"

echo "== postfix $(postconf -d -h mail_version)"
P_PORT=$(free_port)
POSTFIX_CONF=$WORK/postfix-conf
mkdir -p "$POSTFIX_CONF" "$WORK/postfix-queue" "$WORK/postfix-data"
# master.lock and the TLS caches live in data_directory, which Postfix wants to own.
chown postfix:postfix "$WORK/postfix-data"
cat > "$POSTFIX_CONF/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $WORK/postfix-queue
data_directory = $WORK/postfix-data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.localdomain
mydomain = localdomain
myorigin = \$myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_transport = error:local delivery disabled
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost = [127.0.0.1]:9
defer_transports = smtp
maillog_file = $WORK/postfix.log
default_process_limit = 200
smtpd_client_connection_count_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_connection_rate_limit = 0
EOF
# The stock master.cf with smtpd on our port and no chroot (the queue dir is not a chroot).
sed -e "s/^smtp      inet  n       -       y /127.0.0.1:$P_PORT inet n - n /" \
    -e 's/^\([a-z]*  *\(unix\|inet\|unix-dgram\|fifo\|pass\)  *[-n]  *[-n]  *\)y /\1n /' \
    /usr/share/postfix/master.cf.dist > "$POSTFIX_CONF/master.cf"
postfix -c "$POSTFIX_CONF" check
postfix -c "$POSTFIX_CONF" start >/dev/null 2>&1 || { tail -5 "$WORK/postfix.log" >&2; exit 1; }
wait_port "$P_PORT"
P_SECS=$(submit "$P_PORT")
sleep 1
postfix -c "$POSTFIX_CONF" stop >/dev/null 2>&1;
P_QUEUED=$(find "$WORK/postfix-queue/"{incoming,active,deferred,maildrop} -type f 2>/dev/null | wc -l)
POSTFIX_CONF=

python3 - "$MESSAGES" "$A_SECS" "$P_SECS" "$A_QUEUED" "$P_QUEUED" "$SESSIONS" "$SIZE" <<'EOF'
import sys
n, a, p, aq, pq, s, size = sys.argv[1:]
n, a, p = int(n), float(a), float(p)
print(f"messages={n} sessions={s} size={size}")
print(f"altroute: {n / a:8.0f} msgs/s  ({a:.2f} s, {aq} queued)")
print(f"postfix:  {n / p:8.0f} msgs/s  ({p:.2f} s, {pq} queued)")
print(f"ratio altroute/postfix: {p / a:.2f}x")
EOF
