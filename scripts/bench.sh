#!/usr/bin/env bash
# Runs the load client (benches/load.rs) against hypha-rtc and, side by side, against the
# reference Python Hypha server from PyPI, both on loopback, and prints both sets of figures.
#   scripts/bench.sh            # both servers
#   HYPHA_REF=0 scripts/bench.sh  # hypha-rtc only
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/common.sh
source scripts/common.sh
IDLE="${IDLE:-10000}"
REF_IDLE="${REF_IDLE:-1000}"
HYPHA_VERSION=0.21.137

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo bench --bench load -- --idle "$IDLE"
# The cost of a connect as connections grow: server CPU per 1,000 connects into one workspace
# with none held and with HELD held there.
cargo bench --bench load -- --connect-cost "${HELD:-10000}"
# A reconnect storm: STORM clients with a service each, a server restart, all back.
cargo bench --bench load -- --reconnect-storm "${STORM:-10000}"

[ "${HYPHA_REF:-1}" = 1 ] || exit 0
VENV="$CACHE/hypha-ref-$HYPHA_VERSION"
if [ ! -f "$VENV/.complete" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # sqlmodel 0.0.25 and later refuse the naive datetimes this Hypha release stores.
    "$VENV/bin/python" -m pip install -q "hypha[s3]==$HYPHA_VERSION" "sqlmodel==0.0.24"
    touch "$VENV/.complete"
fi
start_reference() {
    PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    # Hypha's default limits (200 messages/s per connection, 10 concurrent handshakes) would
    # stop the load client; lift them so the comparison measures the server, not its throttles.
    HYPHA_WS_MSG_RATE_LIMIT=1000000 HYPHA_MAX_CONCURRENT_CONNECTIONS=1000 \
        "$VENV/bin/python" -m hypha.server --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
    REF_PID=$!
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$PORT/health/liveness" >/dev/null && return 0
        kill -0 $REF_PID 2>/dev/null || { cat "$LOG"; exit 1; }
        sleep 0.1
    done
    echo "the reference server did not start" >&2
    exit 1
}
LOG=$(mktemp)
REF_PID=
trap 'kill $REF_PID 2>/dev/null || true; rm -f "$LOG"' EXIT
LABEL="hypha (Python) $HYPHA_VERSION"
# Its embedded store runs out of connections with many idle clients and does not recover
# quickly, so idle memory is measured on a process of its own.
start_reference
cargo bench --bench load -- --url "ws://127.0.0.1:$PORT/ws" --pid "$REF_PID" --label "$LABEL" --idle 0
kill $REF_PID; wait $REF_PID 2>/dev/null || true
start_reference
cargo bench --bench load -- --url "ws://127.0.0.1:$PORT/ws" --pid "$REF_PID" --label "$LABEL" \
    --idle "$REF_IDLE" --idle-only
