#!/usr/bin/env bash
# Cross-instance routing figures: starts Debian's redis-server and two release hypha-rtc
# instances sharing it, all on loopback, then runs the load client (benches/load.rs) twice:
# caller and responder on the same instance, then on different instances.
#   scripts/bench-cluster.sh
#   CALLS=20000 PAIRS=50 scripts/bench-cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/common.sh
source scripts/common.sh
CALLS="${CALLS:-5000}"
PAIRS="${PAIRS:-100}"
command -v redis-server >/dev/null || { echo "missing prerequisite: redis-server (Debian package redis-server)" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cargo build --release --locked --bin hypha-rtc
BIN="$CARGO_TARGET_DIR/release/hypha-rtc"
WORK=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
    redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && break
    sleep 0.1
done

PORTS=()
for name in one two; do
    port=$(free_port)
    # Every client of the benchmark comes from loopback (one address): no per-address cap.
    "$BIN" --port "$port" --jwt-secret bench-secret --server-id "bench-$name" --no-demo --max-connections-per-address 0 \
        --data-dir "$WORK/$name" --redis-uri "redis://127.0.0.1:$REDIS_PORT/0" 2>"$WORK/$name.log" &
    PIDS+=($!)
    PORTS+=("$port")
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$port/health/liveness" >/dev/null && break
        sleep 0.1
    done
done

ONE="ws://127.0.0.1:${PORTS[0]}/ws"
TWO="ws://127.0.0.1:${PORTS[1]}/ws"
cargo bench --bench load -- --url "$ONE" --responder-url "$ONE" --idle 0 --calls "$CALLS" \
    --pairs "$PAIRS" --label "same instance (two instances sharing Redis)"
cargo bench --bench load -- --url "$ONE" --responder-url "$TWO" --idle 0 --calls "$CALLS" \
    --pairs "$PAIRS" --label "cross-instance (through Redis)"
