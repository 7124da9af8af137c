#!/usr/bin/env bash
# Cold start: how long the release hypha-rtc takes from exec to a live /health/liveness (with
# the demo on and with --no-demo), against Debian's coturn from exec to its first STUN answer,
# in alternating rounds on loopback; prints the medians, the ratio and the idle RSS.
#   scripts/bench-start.sh            # 7 rounds
#   ROUNDS=11 scripts/bench-start.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/common.sh
source scripts/common.sh
command -v turnserver >/dev/null || apt_install coturn
cargo build --release --locked --bin hypha-rtc
BIN="${CARGO_TARGET_DIR:-target}/release/hypha-rtc"
python3 - "$BIN" "${ROUNDS:-7}" <<'PY'
import os, shutil, socket, statistics, subprocess, sys, tempfile, time, urllib.request

binary, rounds = sys.argv[1], int(sys.argv[2])

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def wait(ready, deadline=10.0):
    started = time.monotonic()
    while time.monotonic() - started < deadline:
        if ready():
            return True
        time.sleep(0.001)
    raise SystemExit("did not start within 10 s")

def hypha(extra):
    port, data = free_port(), tempfile.mkdtemp(prefix="hypha-rtc-start-")
    started = time.monotonic()
    proc = subprocess.Popen([binary, "--port", str(port), "--data-dir", data, "--jwt-secret", "s" * 40, *extra],
                            stderr=subprocess.DEVNULL)
    def live():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health/liveness", timeout=0.2).status == 200
        except OSError:
            return False
    wait(live)
    took = time.monotonic() - started
    time.sleep(1)
    with open(f"/proc/{proc.pid}/status") as status:
        rss = next(int(l.split()[1]) for l in status if l.startswith("VmRSS:"))
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(data, ignore_errors=True)
    return took * 1000, rss / 1024

def coturn():
    port = free_port()
    request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
    started = time.monotonic()
    proc = subprocess.Popen(["turnserver", "-n", "--listening-ip=127.0.0.1", f"--listening-port={port}",
                             "--no-tls", "--no-dtls", "--no-cli", "--use-auth-secret", "--static-auth-secret=s",
                             "--realm=bench", f"--pidfile=/tmp/turnserver-start-{port}.pid", "--log-file=stdout"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def answers():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.005)
            s.sendto(request, ("127.0.0.1", port))
            try:
                return s.recvfrom(2048)[0][8:20] == request[8:20]
            except OSError:
                return False
    wait(answers)
    took = time.monotonic() - started
    proc.terminate()
    proc.wait(10)
    return took * 1000

demo, plain, turn, rss_demo, rss_plain = [], [], [], [], []
for _ in range(rounds):
    ms, rss = hypha([]); demo.append(ms); rss_demo.append(rss)
    ms, rss = hypha(["--no-demo"]); plain.append(ms); rss_plain.append(rss)
    turn.append(coturn())
m = statistics.median
print(f"cold start to a live /health/liveness, median of {rounds} alternating rounds:")
print(f"  hypha-rtc, demo on:  {m(demo):.0f} ms (range {min(demo):.0f}-{max(demo):.0f}); idle RSS {m(rss_demo):.1f} MiB")
print(f"  hypha-rtc --no-demo: {m(plain):.0f} ms (range {min(plain):.0f}-{max(plain):.0f}); idle RSS {m(rss_plain):.1f} MiB")
print(f"  coturn to its first STUN answer: {m(turn):.0f} ms (range {min(turn):.0f}-{max(turn):.0f})")
print(f"  ratio hypha-rtc (demo on) / coturn: {m(demo) / m(turn):.2f}; goal: at most 50 ms, idle RSS at most 20 MiB")
PY
