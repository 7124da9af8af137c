#!/usr/bin/env bash
# Starts the whole stack on this machine: coturn (Debian's package) configured from the
# repository's turnserver.conf with a generated shared secret, and hypha-rtc (release build)
# with the embedded store and bus, the demo producer on and that secret. Prints the address to
# open. Ctrl-C or SIGTERM stops both. Run again while it is up, it says so and changes nothing.
#
#   scripts/run.sh                                   # http://127.0.0.1:9527/demo/
#   HYPHA_HOST=0.0.0.0 TURN_PUBLIC_HOST=rtc.example.org scripts/run.sh
#
# Settings (environment): HYPHA_HOST, HYPHA_PORT (9527), TURN_PORT (3478), TURN_PUBLIC_HOST
# (the address clients reach coturn at; default: HYPHA_HOST, or this machine's first address
# when that is 0.0.0.0), TURN_LISTEN_IP (default: every interface), TURN_MIN_PORT/TURN_MAX_PORT
# (relay ports, 49152-65535), HYPHA_RTC_STATE (secrets, data and logs; ~/.local/state/hypha-rtc),
# HYPHA_RTC_BIN (a built hypha-rtc; default: build the release one). Other HYPHA_* variables
# reach hypha-rtc as usual.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE="${HYPHA_RTC_STATE:-$HOME/.local/state/hypha-rtc}"
HOST="${HYPHA_HOST:-127.0.0.1}"
PORT="${HYPHA_PORT:-9527}"
TURN_PORT="${TURN_PORT:-3478}"
TURN_MIN_PORT="${TURN_MIN_PORT:-49152}"
TURN_MAX_PORT="${TURN_MAX_PORT:-65535}"
unset HYPHA_HOST HYPHA_PORT

mkdir -p "$STATE"
chmod 700 "$STATE"
if [ -f "$STATE/stack.pid" ] && kill -0 "$(cat "$STATE/stack.pid")" 2>/dev/null; then
    echo "hypha-rtc is already running (pid $(cat "$STATE/stack.pid")): open $(cat "$STATE/url")"
    exit 0
fi

# shellcheck source=scripts/common.sh
source scripts/common.sh
command -v turnserver >/dev/null || apt_install coturn
command -v curl >/dev/null || apt_install curl

BIN="${HYPHA_RTC_BIN:-}"
if [ -z "$BIN" ]; then
    command -v cargo >/dev/null || { echo "missing prerequisite: cargo (Rust toolchain, https://rustup.rs)" >&2; exit 1; }
    # Without nasm openh264 silently builds without its SIMD assembly.
    command -v nasm >/dev/null || apt_install nasm
    cargo build --release --locked --bin hypha-rtc
    BIN="${CARGO_TARGET_DIR:-target}/release/hypha-rtc"
fi

# Secrets are generated once and kept, so tokens and credentials survive a restart.
secret() {
    [ -s "$STATE/$1" ] || (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/$1")
    cat "$STATE/$1"
}
export HYPHA_COTURN_SECRET; HYPHA_COTURN_SECRET=$(secret coturn-secret)
export HYPHA_JWT_SECRET; HYPHA_JWT_SECRET=$(secret jwt-secret)

if [ -n "${TURN_PUBLIC_HOST:-}" ]; then
    PUBLIC_TURN="$TURN_PUBLIC_HOST"
elif [ "$HOST" = 0.0.0.0 ] || [ "$HOST" = "::" ]; then
    PUBLIC_TURN=$(hostname -I 2>/dev/null | awk '{print $1}')
    PUBLIC_TURN="${PUBLIC_TURN:-127.0.0.1}"
else
    PUBLIC_TURN="$HOST"
fi
case "$PUBLIC_TURN" in *:*) PUBLIC_TURN="[$PUBLIC_TURN]" ;; esac
URL_HOST="$HOST"
LOCAL_HOST="$HOST"
case "$HOST" in
    0.0.0.0) URL_HOST="$PUBLIC_TURN"; LOCAL_HOST=127.0.0.1 ;;
    ::) URL_HOST="$PUBLIC_TURN"; LOCAL_HOST="[::1]" ;;
    *:*) URL_HOST="[$HOST]"; LOCAL_HOST="[$HOST]" ;;
esac
URL="http://$URL_HOST:$PORT/demo/"

# coturn's configuration: the repository's, with the secret and realm of this stack. TLS is
# left to a deployment with certificates (see deploy/).
(umask 077 && sed -e "s/^static-auth-secret=.*/static-auth-secret=$HYPHA_COTURN_SECRET/" \
    -e "s/^realm=.*/realm=hypha-rtc/" -e '/^cert=/d' -e '/^pkey=/d' turnserver.conf >"$STATE/turnserver.conf")
TURN_ARGS=(-c "$STATE/turnserver.conf" --listening-port="$TURN_PORT" --min-port="$TURN_MIN_PORT"
    --max-port="$TURN_MAX_PORT" --no-tls --no-dtls --pidfile="$STATE/turnserver.pid")
[ -n "${TURN_LISTEN_IP:-}" ] && TURN_ARGS+=(--listening-ip="$TURN_LISTEN_IP" --relay-ip="$TURN_LISTEN_IP")

PIDS=()
stop() {
    trap - INT TERM EXIT
    kill "${PIDS[@]}" 2>/dev/null || true
    wait "${PIDS[@]}" 2>/dev/null || true
    rm -f "$STATE/stack.pid" "$STATE/url"
}
trap 'stop; exit 0' INT TERM
trap stop EXIT

# Where this run's output starts in the log, to find the first-run link it prints.
LOG_START=$(stat -c %s "$STATE/hypha-rtc.log" 2>/dev/null || echo 0)
turnserver "${TURN_ARGS[@]}" >"$STATE/coturn.log" 2>&1 &
PIDS+=($!)
"$BIN" --host "$HOST" --port "$PORT" --data-dir "$STATE/data" \
    --coturn-uri "127.0.0.1:$TURN_PORT" --public-coturn-uri "$PUBLIC_TURN:$TURN_PORT" \
    2> >(tee -a "$STATE/hypha-rtc.log" >&2) &
PIDS+=($!)
echo $$ >"$STATE/stack.pid"
echo "$URL" >"$STATE/url"

# Ready when hypha-rtc answers and its probe says coturn takes the credentials it mints.
for _ in $(seq 1 300); do
    for pid in "${PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null || { echo "the stack did not start; logs in $STATE" >&2; exit 1; }
    done
    if curl -sf "http://$LOCAL_HOST:$PORT/health/readiness" 2>/dev/null | grep -q '"state":"ok"'; then
        echo "hypha-rtc is up with coturn on port $TURN_PORT: open $URL"
        SETUP=$(tail -c +"$((LOG_START + 1))" "$STATE/hypha-rtc.log" | grep -o 'https\?://[^ ]*/setup?key=[a-z0-9]*' | tail -n 1 || true)
        if [ -n "$SETUP" ]; then
            echo "First run: no account exists yet. Create the admin account at $SETUP (the link works once, for 60 minutes)"
        fi
        wait -n "${PIDS[@]}" || true
        echo "a part of the stack stopped; stopping the rest (logs in $STATE)" >&2
        exit 1
    fi
    sleep 0.1
done
echo "coturn did not accept hypha-rtc's credentials within 30 s; logs in $STATE" >&2
exit 1
