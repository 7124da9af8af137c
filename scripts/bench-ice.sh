#!/usr/bin/env bash
# Benchmarks get_rtc_ice_servers with the coturn probe cached: over HTTP with a Bearer token
# under wrk (Debian), side by side with Debian's nginx answering the same body with
# `return 200` (the baseline, same wrk, alternating rounds; with each server's own CPU per
# request, the steadier figure where wrk shares the cores), and through the websocket RPC with
# the project's load client. Starts coturn (from the repository's turnserver.conf), nginx and
# a release hypha-rtc on loopback. After the run it stops hypha-rtc with SIGTERM and checks that
# the audit table holds one row for every credential the server says it issued.
#   scripts/bench-ice.sh              # 3 rounds of 5 s each
#   ROUNDS=5 SECONDS_PER_ROUND=10 scripts/bench-ice.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/common.sh
source scripts/common.sh
command -v wrk >/dev/null || apt_install wrk
command -v turnserver >/dev/null || apt_install coturn
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || apt_install nginx
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
ROUNDS="${ROUNDS:-3}"
SECS="${SECONDS_PER_ROUND:-5}"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SECRET=bench-coturn-secret
JWT=bench-jwt-secret
TURN_PORT=$(free_port)
PORT=$(free_port)
NGINX_PORT=$(free_port)
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
NGINX_PID=
trap 'kill $SERVER_PID $TURN_PID $NGINX_PID 2>/dev/null || true; wait 2>/dev/null; rm -rf "$DATA"' EXIT
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
# Also warms the probe cache; coturn may still be starting, so ask until it answers.
BODY=
for _ in $(seq 1 100); do
    BODY=$(curl -sf -H "Authorization: Bearer $TOKEN" "$URL") && break
    sleep 0.1
done
[ -n "$BODY" ] || { echo "get_rtc_ice_servers did not answer: $(curl -s -H "Authorization: Bearer $TOKEN" "$URL")" >&2; exit 1; }

# nginx answering the same body, as a baseline for what this machine's HTTP stack can do.
mkdir -p "$DATA/nginx"
cat >"$DATA/nginx/nginx.conf" <<CONF
worker_processes 2;
daemon off;
pid $DATA/nginx/nginx.pid;
error_log $DATA/nginx/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $DATA/nginx; proxy_temp_path $DATA/nginx; fastcgi_temp_path $DATA/nginx;
    uwsgi_temp_path $DATA/nginx; scgi_temp_path $DATA/nginx;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / { default_type application/json; return 200 '$BODY'; }
    }
}
CONF
"$NGINX" -c "$DATA/nginx/nginx.conf" -p "$DATA/nginx" &
NGINX_PID=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$NGINX_PORT/" >/dev/null && break; sleep 0.1; done
[ "$(curl -sf "http://127.0.0.1:$NGINX_PORT/")" = "$BODY" ] || { echo "nginx does not answer the body" >&2; exit 1; }

# run_wrk URL PID...: prints "REQUESTS_PER_SECOND P99_MS NON_2XX CPU_US_PER_REQUEST", the last
# from the CPU the processes given (the server under test) spent over the run.
run_wrk() {
    local url=$1 before after
    shift
    before=$(ticks "$@")
    wrk -t2 -c64 -d"${SECS}s" --latency -H "Authorization: Bearer $TOKEN" "$url" >"$DATA/wrk.out"
    after=$(ticks "$@")
    awk -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" '
        /requests in/ { requests = $1 }
        /Requests\/sec/ { rps = $2 }
        /^ *99%/ { p = $2; if (p ~ /us$/) { sub(/us/, "", p); p /= 1000 } else if (p ~ /ms$/) { sub(/ms/, "", p) } else if (p ~ /s$/) { sub(/s/, "", p); p *= 1000 } }
        /Non-2xx/ { bad = $NF }
        END { printf "%s %.2f %d %.2f\n", rps, p, bad + 0, (requests > 0 ? ticks * 1e6 / hz / requests : 0) }' "$DATA/wrk.out"
}
echo "== get_rtc_ice_servers over HTTP against nginx return 200 (${#BODY}-byte body), wrk -t2 -c64, $ROUNDS alternating rounds of $SECS s"
# nginx's CPU is its workers' (and its master's).
NGINX_PIDS=("$NGINX_PID" $(pgrep -P "$NGINX_PID" || true))
OURS=(); BASE=(); OURS_CPU=(); BASE_CPU=()
for round in $(seq 1 "$ROUNDS"); do
    read -r rps p99 bad cpu < <(run_wrk "$URL" "$SERVER_PID")
    [ "$bad" = 0 ] || { echo "hypha-rtc answered $bad requests with a non-2xx status" >&2; exit 1; }
    OURS+=("$rps"); OURS_CPU+=("$cpu"); echo "round $round: hypha-rtc $rps req/s (p99 $p99 ms), server CPU $cpu us per request"
    read -r rps p99 bad cpu < <(run_wrk "http://127.0.0.1:$NGINX_PORT/" "${NGINX_PIDS[@]}")
    BASE+=("$rps"); BASE_CPU+=("$cpu"); echo "round $round: nginx     $rps req/s (p99 $p99 ms), server CPU $cpu us per request"
done
python3 - "${OURS[*]}" "${BASE[*]}" "${OURS_CPU[*]}" "${BASE_CPU[*]}" <<'PY'
import statistics, sys
ours, base, ours_cpu, base_cpu = ([float(x) for x in arg.split()] for arg in sys.argv[1:5])
o, b = statistics.median(ours), statistics.median(base)
print(f"median: hypha-rtc {o:,.0f} req/s, nginx {b:,.0f} req/s, ratio {o / b:.2f} (goal >= 0.5)")
# The steadier figure on a shared machine: what each server's own CPU pays per request.
oc, bc = statistics.median(ours_cpu), statistics.median(base_cpu)
if oc > 0:
    print(f"median server CPU per request: hypha-rtc {oc:.1f} us, nginx {bc:.1f} us (nginx's over hypha-rtc's: {bc / oc:.2f})")
PY

echo "== get_rtc_ice_servers through the websocket RPC"
cargo bench --bench load -- --url "ws://127.0.0.1:$PORT/ws" --pid "$SERVER_PID" --ice-token "$TOKEN" --seconds 5 2>/dev/null | grep -v "^=="

# Every credential handed out is in the audit table once the server has stopped (SIGTERM).
ISSUED=$(curl -sf "http://127.0.0.1:$PORT/metrics" | awk '/^hypha_rtc_ice_credentials_issued_total / { print $2 }')
kill -TERM "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
ROWS=$(python3 -c 'import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("select count(*) from ice_credentials").fetchone()[0])' "$DATA/hypha-rtc.db")
echo "== audit: $ISSUED credentials issued, $ROWS rows in the audit table after SIGTERM"
[ "$ISSUED" = "$ROWS" ] || { echo "the audit lost rows" >&2; exit 1; }
