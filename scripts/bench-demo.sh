#!/usr/bin/env bash
# Benchmarks the demo video producer with a release hypha-rtc and headless Debian Chromium
# (browser and server share the machine's cores): start-to-first-frame, CPU per viewer,
# four viewers at once, 500 connect/disconnect cycles (CYCLES=N for another count); then
# 1, 4, 8 and 16 viewers at once as str0m clients (benches/demo_viewers.rs: frames per second
# each, server CPU, and how fast the server answers meanwhile; VIEWERS=1,16 for other steps).
# FEATURES=vp8 DEMO_ARGS="--demo-codec vp8" measures VP8 instead of H.264.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/common.sh
source scripts/common.sh
# Without nasm at build time openh264 silently drops its SIMD assembly: the figures would lie.
command -v nasm >/dev/null || { echo "the demo benchmark needs nasm (apt-get install nasm)" >&2; exit 1; }
cargo build --release --locked --bins -q ${FEATURES:+--features "$FEATURES"}
(cd tests/conformance/js && [ -d node_modules ] || PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
DATA=$(mktemp -d)
"$CARGO_TARGET_DIR/release/hypha-rtc" --port "$PORT" --jwt-secret bench --data-dir "$DATA" ${DEMO_ARGS:-} 2>"$DATA/log" &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$DATA"' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/health/liveness" >/dev/null && break; sleep 0.1; done
(cd tests/conformance/js && node demo_bench.mjs "http://127.0.0.1:$PORT/demo/" "$PID" "${CYCLES:-500}")
kill "$PID" 2>/dev/null || true
cargo bench --bench demo_viewers -q ${FEATURES:+--features "$FEATURES"} -- --viewers "${VIEWERS:-1,4,8,16}" ${DEMO_ARGS:+--server-args "$DEMO_ARGS"}
