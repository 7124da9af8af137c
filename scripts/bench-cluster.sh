#!/usr/bin/env bash
# Cross-instance routing figures: starts Debian's redis-server and two release hypha-rtc
# instances sharing it, all on loopback, then runs the load client (benches/load.rs) twice:
# caller and responder on the same instance, then on different instances, in ROUNDS alternating
# rounds, and prints the medians and the cross-instance ratio of each figure, and the CPU that
# Redis and both instances spent on each run.
#   scripts/bench-cluster.sh
#   ROUNDS=5 CALLS=20000 PAIRS=50 scripts/bench-cluster.sh
#   LINKS=0 scripts/bench-cluster.sh   (frames between the instances through Redis, no --instance-link)
#   WORKERS=1 scripts/bench-cluster.sh  (runtime worker threads per instance; default: one per
#                                        core, as the server starts without TOKIO_WORKER_THREADS)
#   SHARE=1 scripts/bench-cluster.sh    (the cores shared out as the README advises for several
#                                        instances on one host: the two instances get half the
#                                        cores' worth of workers each, and the same-instance runs
#                                        go to a third instance that has them all)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/common.sh
source scripts/common.sh
CALLS="${CALLS:-5000}"
PAIRS="${PAIRS:-100}"
ROUNDS="${ROUNDS:-3}"
LINKS="${LINKS:-1}"
WORKERS="${WORKERS:-$(nproc)}"
SHARE="${SHARE:-0}"
[ "$WORKERS" -ge 1 ] 2>/dev/null || { echo "WORKERS must be a positive number, got '$WORKERS'" >&2; exit 1; }
[ "$SHARE" = 0 ] || [ "$SHARE" = 1 ] || { echo "SHARE must be 0 or 1, got '$SHARE'" >&2; exit 1; }
# Workers of the instance that serves the same-instance runs, and of each of the two.
SOLO_WORKERS="$WORKERS"
PAIR_WORKERS="$WORKERS"
if [ "$SHARE" = 1 ]; then
    SOLO_WORKERS=$(nproc)
    PAIR_WORKERS=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))
fi
VIA="through Redis"
[ "$LINKS" = 1 ] && VIA="over the instance link"
[ "$ROUNDS" -ge 1 ] 2>/dev/null || { echo "ROUNDS must be a positive number, got '$ROUNDS'" >&2; exit 1; }
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

# start_instance NAME WORKERS: starts an instance sharing Redis; prints nothing, sets PORT.
start_instance() {
    local port link=()
    port=$(free_port)
    [ "$LINKS" = 1 ] && link=(--instance-link 127.0.0.1:0)
    # Every client of the benchmark comes from loopback (one address): no per-address cap.
    TOKIO_WORKER_THREADS="$2" "$BIN" --port "$port" --jwt-secret bench-secret --server-id "bench-$1" --no-demo --max-connections-per-address 0 \
        --data-dir "$WORK/$1" --redis-uri "redis://127.0.0.1:$REDIS_PORT/0" "${link[@]}" 2>"$WORK/$1.log" &
    PIDS+=($!)
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$port/health/liveness" >/dev/null && break
        sleep 0.1
    done
    PORT=$port
}
start_instance one "$PAIR_WORKERS"
ONE="ws://127.0.0.1:$PORT/ws"
start_instance two "$PAIR_WORKERS"
TWO="ws://127.0.0.1:$PORT/ws"
SOLO="$ONE"
if [ "$SHARE" = 1 ]; then
    start_instance solo "$SOLO_WORKERS"
    SOLO="ws://127.0.0.1:$PORT/ws"
fi
cargo bench --no-run --locked --bench load
# run_load RESPONDER_URL LABEL KIND: prints the load client's report and appends
# "SEQUENTIAL_P50_US PAIRS_MSGS_PER_S WINDOW_MSGS_PER_S SERVER_TICKS" to $WORK/figures.KIND
run_load() {
    local before caller="$ONE"
    [ "$3" = same ] && caller="$SOLO"
    before=$(ticks "${PIDS[@]}")
    cargo bench --bench load -- --url "$caller" --responder-url "$1" --idle 0 --calls "$CALLS" \
        --pairs "$PAIRS" --label "$2" 2>"$WORK/load.err" | tee "$WORK/last" \
        || { cat "$WORK/load.err" >&2; exit 1; }
    awk '
        /routed call round trip, sequential/ { for (i = 1; i <= NF; i++) if ($i == "p50") { seq = $(i + 1); break } }
        /100 concurrent pairs|concurrent pairs:/ { for (i = 1; i <= NF; i++) if ($i == "routed" && $(i + 1) == "messages/s") { pairs = $(i - 1) } }
        /calls in flight/ { for (i = 1; i <= NF; i++) if ($i == "routed" && $(i + 1) == "messages/s") { win = $(i - 1) } }
        END { if (seq == "" || pairs == "" || win == "") exit 1; printf "%s %s %s ", seq, pairs, win }' "$WORK/last" >>"$WORK/figures.$3" \
        || { echo "the load client printed no figures" >&2; exit 1; }
    echo $(($(ticks "${PIDS[@]}") - before)) >>"$WORK/figures.$3"
}
for round in $(seq 1 "$ROUNDS"); do
    run_load "$SOLO" "round $round: same instance ($SOLO_WORKERS runtime worker(s); instances sharing Redis)" same
    run_load "$TWO" "round $round: cross-instance ($VIA, $PAIR_WORKERS runtime worker(s) each)" cross
done
if [ "$SHARE" = 1 ]; then
    echo "== the cores shared out: same instance with $SOLO_WORKERS runtime worker thread(s), across two instances with $PAIR_WORKERS each, frames between them $VIA"
else
    echo "== two instances, $WORKERS runtime worker thread(s) each, frames between them $VIA"
fi
python3 - "$WORK/figures.same" "$WORK/figures.cross" <<'PY'
import statistics, sys
same = [list(map(float, line.split())) for line in open(sys.argv[1])]
cross = [list(map(float, line.split())) for line in open(sys.argv[2])]
print(f"== medians of {len(same)} alternating rounds: same instance, cross-instance, ratio")
names = ["sequential round trip p50 (us)", "routed messages/s, 1 call in flight per pair",
         "routed messages/s, 16 calls in flight per pair"]
for i, name in enumerate(names):
    s, c = statistics.median(r[i] for r in same), statistics.median(r[i] for r in cross)
    spread = ", ".join(f"{b / a:.2f}" for a, b in zip((r[i] for r in same), (r[i] for r in cross)))
    if i == 0:
        print(f"{name}: {s:,.0f} / {c:,.0f} (+{c - s:,.0f} us across instances; per round +" +
              ", +".join(f"{r2[0] - r1[0]:,.0f}" for r1, r2 in zip(same, cross)) + ")")
    else:
        print(f"{name}: {s:,.0f} / {c:,.0f}, ratio {c / s:.2f} (per round {spread}; goal >= 0.8)")
s, c = statistics.median(r[3] for r in same), statistics.median(r[3] for r in cross)
print(f"CPU of Redis and the instances for one load-client run (clock ticks): {s:,.0f} / {c:,.0f}, "
      f"cross-instance costs {c / s:.2f}x (per round " +
      ", ".join(f"{r2[3] / r1[3]:.2f}x" for r1, r2 in zip(same, cross)) + ")")
PY
