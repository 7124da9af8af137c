"""TURN credentials against the real coturn from Debian, started from the repository's own
turnserver.conf with test overrides on its command line."""

import asyncio
import base64
import hashlib
import hmac
import os
import shutil
import socket
import subprocess
import time
import urllib.parse

import pytest
from aiortc import RTCIceServer
from hypha_rpc import connect_to_server

from conftest import BIN, COTURN_SECRET, ROOT, Coturn, Server, allocate, free_port, hypha_token, node, result_of, run, wait_until

pytestmark = pytest.mark.timeout(120)
@pytest.fixture(scope="module")
def turn_server(coturn):
    s = Server("--coturn-secret", COTURN_SECRET, "--coturn-uri", f"127.0.0.1:{coturn.port}").start()
    yield s
    s.stop()


def check_entry(entry, port, ttl):
    assert set(entry) == {"username", "credential", "urls"}
    RTCIceServer(**entry)  # what aiortc users do with each entry
    assert entry["urls"][:3] == [f"turn:127.0.0.1:{port}", f"stun:127.0.0.1:{port}", f"turn:127.0.0.1:{port}?transport=tcp"]
    expiry = int(entry["username"].split(":", 1)[0])
    assert abs(expiry - (time.time() + ttl)) < 10


def test_python_client_credentials_allocate_on_coturn(turn_server, coturn):
    async def main():
        server = await connect_to_server({"server_url": turn_server.url, "token": hypha_token("kim", expires_in=2 * 86400)})
        servers = await server.get_rtc_ice_servers()
        assert len(servers) == 1
        check_entry(servers[0], coturn.port, 43200)
        assert servers[0]["username"].endswith(":kim")
        relayed = await allocate(servers[0], coturn.port)
        assert relayed[0] == "127.0.0.1"
        short = await server.get_rtc_ice_servers(ttl=120, test_connectivity=False)
        check_entry(short[0], coturn.port, 120)
        await server.disconnect()

    run(main())


def test_http_credentials_allocate_on_coturn(turn_server, coturn):
    token = hypha_token("lee", expires_in=2 * 86400)
    status, servers, _ = turn_server.http("/public/services/coturn/get_rtc_ice_servers", token)
    assert status == 200, servers
    check_entry(servers[0], coturn.port, 43200)
    status, servers, _ = turn_server.http("/ws-user-lee/services/ws/get_rtc_ice_servers?ttl=60", token)
    assert status == 200, servers
    check_entry(servers[0], coturn.port, 60)
    run(allocate(servers[0], coturn.port))
    _, metrics, _ = turn_server.http_text("/metrics")
    issued = int(next(l for l in metrics.splitlines() if l.startswith("hypha_rtc_ice_credentials_issued_total ")).split()[1])
    assert issued >= 2
    # Above the maximum: clamped.
    status, servers, _ = turn_server.http("/ws-user-lee/services/ws/get_rtc_ice_servers?ttl=999999999", token)
    check_entry(servers[0], coturn.port, 86400)
    # Never longer than the token that asked for them (a revoked token's credentials end with it).
    status, servers, _ = turn_server.http("/public/services/coturn/get_rtc_ice_servers", hypha_token("lee", expires_in=600))
    assert status == 200, servers
    check_entry(servers[0], coturn.port, 600)


def test_issuances_are_audited_without_the_credential(turn_server):
    import sqlite3

    status, servers, _ = turn_server.http("/ws-user-sam/services/ws/get_rtc_ice_servers?ttl=300", hypha_token("sam"))
    assert status == 200
    db = turn_server.data_dir / "hypha-rtc.db"

    def audited():
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT user_id, issued_at, ttl, expires_at FROM ice_credentials WHERE user_id = 'sam'").fetchall()

    wait_until(lambda: len(audited()) == 1, 10, "the audit row")
    user_id, issued_at, ttl, expires_at = audited()[0]
    assert (user_id, ttl, expires_at - issued_at) == ("sam", 300, 300)
    assert str(expires_at) == servers[0]["username"].split(":")[0]
    with sqlite3.connect(db) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(ice_credentials)")]
    assert not any("credential" in c or "password" in c for c in columns)
    for path in db.parent.iterdir():
        assert servers[0]["credential"].encode() not in path.read_bytes(), path


def test_every_credential_is_audited_also_across_a_sigterm(coturn):
    """Audit rows are written in batches after the answer: none may be lost when the server
    is stopped (SIGTERM) while credentials are being handed out."""
    import signal
    import sqlite3

    import httpx

    s = Server("--coturn-secret", COTURN_SECRET, "--coturn-uri", f"127.0.0.1:{coturn.port}", "--ice-rate-limit", "0").start()
    url = f"{s.url}/public/services/coturn/get_rtc_ice_servers?test_connectivity=false"
    issued = 0

    async def main():
        nonlocal issued
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {hypha_token('ivy')}"}, timeout=10) as client:
            async def caller():
                nonlocal issued
                for _ in range(5_000):
                    try:
                        response = await client.get(url)
                    except httpx.HTTPError:
                        return
                    if response.status_code != 200:
                        return
                    issued += 1
                    if issued == 500:
                        s.proc.send_signal(signal.SIGTERM)

            await asyncio.gather(*(caller() for _ in range(16)))

    try:
        run(main())
        assert s.proc.wait(timeout=20) == 0, s.log.read_text()
    finally:
        s.stop()
    with sqlite3.connect(s.data_dir / "hypha-rtc.db") as db:
        rows = db.execute("SELECT COUNT(*) FROM ice_credentials WHERE user_id = 'ivy'").fetchone()[0]
    assert issued >= 500 and rows == issued, (issued, rows)


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_audit_rows_the_store_refuses_at_a_stop_are_written_at_the_next_start(coturn, store, request):
    """The store refuses the audit's writes when the server is stopped: the rows it holds
    are kept in a private file in the data directory, and the next start writes them and
    removes the file; none lost, none written twice. The metrics show rows waiting."""
    import signal
    import stat

    postgres = request.getfixturevalue("postgres") if store == "postgres" else None
    s = Server("--coturn-secret", COTURN_SECRET, "--coturn-uri", f"127.0.0.1:{coturn.port}", "--ice-rate-limit", "0", "--audit-required", "false", postgres=postgres)
    path = "/public/services/coturn/get_rtc_ice_servers?test_connectivity=false"
    token = hypha_token("ada")
    if postgres:
        refuse = ["CREATE FUNCTION deny() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'the store is read-only'; END $$ LANGUAGE plpgsql",
                  "CREATE TRIGGER deny BEFORE INSERT ON ice_credentials FOR EACH STATEMENT EXECUTE FUNCTION deny()"]
        allow = "DROP TRIGGER deny ON ice_credentials"
    else:
        refuse = ["CREATE TRIGGER deny BEFORE INSERT ON ice_credentials BEGIN SELECT RAISE(ABORT, 'the store is read-only'); END"]
        allow = "DROP TRIGGER deny"

    def rows():
        counted = s.sql("SELECT COUNT(*) FROM ice_credentials WHERE user_id = 'ada'")
        return int(counted.strip()) if isinstance(counted, str) else counted[0][0]

    def metric(name):
        _, text, _ = s.http_text("/metrics")
        return int(float(next(l for l in text.splitlines() if l.startswith(name + " ")).split()[1]))

    def kept():
        return sorted(s.data_dir.glob("audit-unwritten-*.jsonl"))

    try:
        s.start()
        for _ in range(3):
            assert s.http(path, token)[0] == 200
        wait_until(lambda: rows() == 3, 10, "the first rows")
        for statement in refuse:
            s.sql(statement)
        secrets = []
        for _ in range(40):
            status, servers, _ = s.http(path, token)
            assert status == 200, servers
            secrets.append(servers[0]["credential"])
        wait_until(lambda: metric("hypha_rtc_audit_rows_waiting") == 40, 10, "40 rows waiting")
        assert metric("hypha_rtc_audit_rows_written_total") == 3
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=30) == 0, s.log.read_text()
        log = s.log.read_text()
        assert "they are kept in the files" in log, log
        [file] = kept()
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        text = file.read_text()
        assert text.count("\n") == 40 and '"u":"ada"' in text
        assert not any(secret in text for secret in secrets)
        assert rows() == 3
        s.sql(allow)
        s.start()
        wait_until(lambda: rows() == 43, 10, "the kept rows written")
        wait_until(lambda: not kept(), 10, "the file removed")
        wait_until(lambda: metric("hypha_rtc_audit_rows_written_total") == 40, 10, "40 rows counted")
        assert s.http(path, token)[0] == 200
        wait_until(lambda: rows() == 44, 10, "a new row")
        assert metric("hypha_rtc_audit_rows_unrecorded_total") == 0
    finally:
        s.stop()


def test_coturn_refuses_expired_and_foreign_credentials(coturn):
    def credential(secret, expiry):
        username = f"{expiry}:mallory"
        digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
        return {"username": username, "credential": base64.b64encode(digest).decode()}

    run(allocate(credential(COTURN_SECRET, int(time.time()) + 60), coturn.port))  # the control
    for bad in [credential(COTURN_SECRET, int(time.time()) - 60), credential("another-secret", int(time.time()) + 60)]:
        with pytest.raises(Exception, match="401|Unauthorized"):
            run(allocate(bad, coturn.port))


def test_refusals(turn_server):
    async def main():
        anon = await connect_to_server({"server_url": turn_server.url})
        with pytest.raises(Exception) as refused:
            await anon.get_rtc_ice_servers()
        assert "Anonymous users are not allowed to get RTC ICE servers" in str(refused.value)
        await anon.disconnect()
        user = await connect_to_server({"server_url": turn_server.url, "token": hypha_token("moe")})
        for ttl in (-1, 0, "abc", 1.5):
            with pytest.raises(Exception, match="ttl must be a positive integer"):
                await user.get_rtc_ice_servers(ttl=ttl)
        with pytest.raises(Exception, match="test_connectivity must be true or false"):
            await user.get_rtc_ice_servers(test_connectivity="maybe")
        await user.disconnect()

    run(main())
    status, body, _ = turn_server.http("/public/services/coturn/get_rtc_ice_servers")
    assert status == 403 and body["detail"] == "Anonymous users are not allowed to get RTC ICE servers"
    status, body, _ = turn_server.http("/ws-user-moe/services/ws/get_rtc_ice_servers?ttl=abc", hypha_token("moe"))
    assert status == 400 and "ttl" in body["detail"]


def test_not_configured_and_rate_limit(coturn):
    plain = Server().start()
    try:
        status, body, _ = plain.http("/ws-user-ned/services/ws/get_rtc_ice_servers", hypha_token("ned"))
        assert status == 503 and "--coturn-secret and --coturn-uri" in body["detail"]
    finally:
        plain.stop()
    limited = Server("--coturn-secret", COTURN_SECRET, "--coturn-uri", f"127.0.0.1:{coturn.port}", "--ice-rate-limit", "3").start()
    try:
        token = hypha_token("ola")
        codes = [limited.http("/ws-user-ola/services/ws/get_rtc_ice_servers", token)[0] for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        status, body, _ = limited.http("/ws-user-ola/services/ws/get_rtc_ice_servers", token)
        assert "at most 3 a minute" in body["detail"]
        # Another user has a budget of their own.
        assert limited.http("/ws-user-pat/services/ws/get_rtc_ice_servers", hypha_token("pat"))[0] == 200
    finally:
        limited.stop()


@pytest.mark.parametrize("case", ["up", "down", "wrong-secret"])
def test_probe_reports_each_state_within_its_budget(coturn, case):
    port = coturn.port if case != "down" else free_port()
    secret = COTURN_SECRET if case != "wrong-secret" else "not-the-secret"
    server = Server("--coturn-secret", secret, "--coturn-uri", f"127.0.0.1:{port}").start()
    try:
        started = time.monotonic()
        status, ready, _ = server.http("/health/readiness")
        elapsed = time.monotonic() - started
        assert status == 200 and elapsed < 2.5, elapsed
        _, metrics, _ = server.http_text("/metrics")
        assert f"hypha_rtc_coturn_probe_up {1 if case == 'up' else 0}" in metrics, metrics
        expected = {"up": "ok", "down": ("unreachable", "timed_out"), "wrong-secret": "secret_rejected"}[case]
        assert ready["coturn"]["state"] in (expected if isinstance(expected, tuple) else (expected,)), ready
        status, body, _ = server.http("/ws-user-quinn/services/ws/get_rtc_ice_servers", hypha_token("quinn"))
        if case == "up":
            assert status == 200
        else:
            assert status == 503
            assert {"down": "unreachable", "wrong-secret": "does not match its static-auth-secret"}[case] in body["detail"] \
                or "timed out" in body["detail"]
            # Without the probe the credentials are still handed out.
            status, _, _ = server.http("/ws-user-quinn/services/ws/get_rtc_ice_servers?test_connectivity=false", hypha_token("quinn"))
            assert status == 200
    finally:
        server.stop()


def test_malformed_turn_options_stop_startup():
    for args, needle in [
        (["--coturn-secret", "s", "--coturn-uri", "host:port"], "--coturn-uri (HYPHA_COTURN_URI)"),
        (["--coturn-secret", "s"], "--coturn-uri"),
        (["--coturn-secret", "s", "--coturn-uri", "h:1", "--public-coturn-uri", "a:1,[::1"], "--public-coturn-uri"),
        (["--ice-server", "turn:1.2.3.4:3478"], "expected turn:<host>:<port>[<user>:<password>]"),
    ]:
        result = subprocess.run([BIN, "--port", "0", *args], capture_output=True, text=True, timeout=10, cwd="/tmp")
        assert result.returncode == 2 and needle in result.stderr, (args, result.stderr)
    assert "s3cr3t" not in subprocess.run([BIN, "--coturn-secret", "s3cr3t", "--coturn-uri", "bad:uri"],
                                          capture_output=True, text=True, timeout=10, cwd="/tmp").stderr


def test_chromium_connects_through_coturn_with_issued_credentials():
    assert shutil.which("chromium"), "Debian chromium is not installed"
    # Both browser peers are on this host, so this coturn must relay between loopback
    # addresses, which the shipped configuration forbids for production.
    relay = Coturn(COTURN_SECRET, "--allow-loopback-peers", "--allowed-peer-ip=127.0.0.1")
    server = Server("--coturn-secret", COTURN_SECRET, "--coturn-uri", f"127.0.0.1:{relay.port}").start()
    try:
        status, servers, _ = server.http("/public/services/coturn/get_rtc_ice_servers", hypha_token("rae"))
        assert status == 200
        import json

        result = result_of(node("relay.mjs", json.dumps(servers), timeout=90))
        assert result == {"got": "through the relay", "back": "echo: through the relay", "candidateType": "relay"}
    finally:
        server.stop()
        relay.stop()
