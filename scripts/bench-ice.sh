#!/usr/bin/env bash
# Benchmarks get_rtc_ice_servers with the coturn probe cached: over HTTP with a Bearer token
# under wrk (Debian), and through the websocket RPC with the project's load client. Starts
# coturn (from the repository's turnserver.conf) and a release hypha-rtc on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/common.sh
source scripts/common.sh
command -v wrk >/dev/null || { echo "missing prerequisite: wrk (apt-get install wrk)" >&2; exit 1; }
command -v turnserver >/dev/null || { echo "missing prerequisite: coturn (apt-get install coturn)" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SECRET=bench-coturn-secret
JWT=bench-jwt-secret
TURN_PORT=$(free_port)
PORT=$(free_port)
DATA=$(mktemp -d)
cargo build --release --locked --bins -q
turnserver -c turnserver.conf --listening-ip=127.0.0.1 --listening-port="$TURN_PORT" --relay-ip=127.0.0.1 \
    --static-auth-secret="$SECRET" --realm=bench.test --no-tls --no-dtls --pidfile="$DATA/turn.pid" \
    --min-port=45000 --max-port=45050 >/dev/null 2>&1 &
TURN_PID=$!
# The per-user limit would refuse a benchmark's burst; it is measured off.
"$CARGO_TARGET_DIR/release/hypha-rtc" --port "$PORT" --jwt-secret "$JWT" --data-dir "$DATA" --max-connections-per-address 0 \
    --coturn-secret "$SECRET" --coturn-uri "127.0.0.1:$TURN_PORT" --ice-rate-limit 0 2>"$DATA/server.log" &
SERVER_PID=$!
trap 'kill $SERVER_PID $TURN_PID 2>/dev/null || true; rm -rf "$DATA"' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/health/liveness" >/dev/null && break; sleep 0.1; done

# A Hypha-style HS256 token for user "bench".
TOKEN=$(JWT="$JWT" python3 - <<'PY'
import base64, hashlib, hmac, json, os, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
now = int(time.time())
claims = {"iss": "https://amun.ai/", "sub": "bench", "aud": "https://amun-ai.eu.auth0.com/api/v2/",
          "iat": now, "exp": now + 3600, "scope": "", "https://amun.ai/roles": []}
payload = b64(json.dumps(claims).encode())
sig = hmac.new(os.environ["JWT"].encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
print(f"{header}.{payload}.{b64(sig)}")
PY
)
URL="http://127.0.0.1:$PORT/public/services/coturn/get_rtc_ice_servers"
curl -sf -H "Authorization: Bearer $TOKEN" "$URL" >/dev/null   # warms the probe cache
echo "== get_rtc_ice_servers over HTTP (wrk, 2 threads, 64 connections, 10 s)"
wrk -t2 -c64 -d10s --latency -H "Authorization: Bearer $TOKEN" "$URL" | grep -E "Requests/sec|Latency|50%|90%|99%|Non-2xx|Socket errors"
echo "== get_rtc_ice_servers through the websocket RPC"
cargo bench --bench load -- --url "ws://127.0.0.1:$PORT/ws" --pid "$SERVER_PID" --ice-token "$TOKEN" --seconds 5 2>/dev/null | grep -v "^=="
