"""Accounts and sign-in: the real clients' login() with Chromium filling the page, refusals,
lock-out, revocation, tokens from the command line and from generate_token."""

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from hypha_rpc import connect_to_server

from conftest import BIN, JS_DIR, Server, json_line, node, node_background, result_of, run, wait_until

pytestmark = pytest.mark.timeout(180)
PASSWORD = "correct horse battery"


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request):
    """The suite runs once on the embedded SQLite store and once on PostgreSQL."""
    return request.getfixturevalue("postgres") if request.param == "postgres" else None


def store_args(server):
    if server.postgres:
        return ["--database-url", next(a for a in server.extra if a.startswith("postgres://"))]
    return ["--data-dir", str(server.data_dir)]


def add_user(server, email, *roles, password=PASSWORD):
    args = [BIN, "user", "add", email, "--password-stdin", *store_args(server)]
    for role in roles:
        args += ["--role", role]
    result = subprocess.run(args, input=password + "\n", capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def cli(server, *args, stdin=None):
    return subprocess.run([BIN, *args, *store_args(server), "--jwt-secret", server.secret],
                          input=stdin, capture_output=True, text=True, timeout=30)


def post_form(server, fields):
    data = urllib.parse.urlencode(fields).encode()
    req = urllib.request.Request(server.url + "/public/apps/hypha-login/", data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers


@pytest.fixture
def accounts(backend):
    from test_turn import COTURN_SECRET, Coturn

    coturn = Coturn()
    server = Server("--coturn-secret", COTURN_SECRET, "--coturn-uri", f"127.0.0.1:{coturn.port}", postgres=backend).start()
    add_user(server, "ann@example.org", "admin")
    add_user(server, "bob@example.org")
    yield server
    server.stop()
    coturn.stop()


def test_python_login_with_browser_sign_in(accounts):
    script = (
        "import asyncio, hypha_rpc\n"
        f"token = asyncio.run(hypha_rpc.login({{'server_url': '{accounts.url}', 'login_timeout': 60}}))\n"
        "print('TOKEN ' + token, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-u", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        while "login at " not in line:
            line = proc.stdout.readline()
            assert line, "login() printed no URL"
        url = line.split("login at ", 1)[1].strip()
        assert url.startswith(f"{accounts.url}/public/apps/hypha-login/?key=")
        page = result_of(node("fill_login.mjs", url, "ann@example.org", PASSWORD))
        assert "Signed in as ann@example.org" in page["result"]
        assert page["hasCookie"] and page["httpOnly"] and page["sameSite"] == "Strict"
        token = json_line_raw(proc.stdout, "TOKEN ")
        proc.wait(timeout=30)
    finally:
        proc.kill()

    async def main():
        server = await connect_to_server({"server_url": accounts.url, "token": token})
        assert server.config.user["email"] == "ann@example.org"
        servers = await server.get_rtc_ice_servers()
        assert servers[0]["username"].endswith(":" + server.config.user["id"])
        await server.disconnect()

    run(main())


def json_line_raw(stream, prefix):
    for _ in range(1000):
        line = stream.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    raise AssertionError(f"no {prefix!r} line")


def test_javascript_login_with_browser_sign_in(accounts):
    proc = node_background("login.mjs", accounts.url)
    try:
        url = json_line_raw(proc.stdout, "LOGIN_URL ")
        page = result_of(node("fill_login.mjs", url, "bob@example.org", PASSWORD))
        assert "Signed in as bob@example.org" in page["result"]
        token = json.loads(json_line_raw(proc.stdout, "RESULT "))["token"]
        proc.wait(timeout=30)
    finally:
        proc.kill()

    async def main():
        server = await connect_to_server({"server_url": accounts.url, "token": token})
        assert server.config.user["email"] == "bob@example.org"
        await server.disconnect()

    run(main())


def test_refusals_each_with_its_message(accounts):
    assert "Invalid email or password" in post_form(accounts, {"email": "ann@example.org", "password": "wrong"})[1]
    assert "Invalid email or password" in post_form(accounts, {"email": "nobody@example.org", "password": PASSWORD})[1]
    add_user(accounts, "cat@example.org")
    assert cli(accounts, "user", "disable", "cat@example.org").returncode == 0
    status, body, _ = post_form(accounts, {"email": "cat@example.org", "password": PASSWORD})
    assert status == 401 and "This account is disabled" in body

    async def main():
        anon = await connect_to_server({"server_url": accounts.url})
        login = await anon.get_service("public/hypha-login")
        started = await login.start()
        accounts.sql(f"UPDATE login_keys SET expires_at = 0 WHERE login_key = '{started['key']}'")
        status, body, _ = post_form(accounts, {"email": "ann@example.org", "password": PASSWORD, "key": started["key"]})
        assert status == 400 and "The login key has expired" in body
        with pytest.raises(Exception, match="Invalid login key|expired"):
            await login.check(started["key"], timeout=1)
        with pytest.raises(Exception, match="Invalid login key"):
            await login.check("no-such-key", timeout=1)
        await anon.disconnect()

    run(main())
    # A disabled user's existing token is refused too.
    token = cli(accounts, "token", "--email", "bob@example.org").stdout.strip()
    add_user(accounts, "dan@example.org")
    dan = cli(accounts, "token", "--email", "dan@example.org").stdout.strip()
    assert cli(accounts, "user", "disable", "dan@example.org").returncode == 0

    async def refused():
        with pytest.raises(Exception, match="disabled"):
            await connect_to_server({"server_url": accounts.url, "token": dan})
        with pytest.raises(Exception, match="Permission denied for workspace"):
            await connect_to_server({"server_url": accounts.url, "token": token, "workspace": "somebody-else"})

    run(refused())


def test_lockout_works_and_ends(backend):
    server = Server("--login-max-failures", "3", "--login-lockout", "2", postgres=backend).start()
    try:
        add_user(server, "eve@example.org")
        for _ in range(3):
            assert post_form(server, {"email": "eve@example.org", "password": "nope"})[0] == 401
        status, body, _ = post_form(server, {"email": "eve@example.org", "password": PASSWORD})
        assert status == 429 and "Too many failed sign-ins" in body
        wait_until(lambda: post_form(server, {"email": "eve@example.org", "password": PASSWORD})[0] == 200, 10,
                   "the lock-out to end")
        log = server.log.read_text()
        assert PASSWORD not in log and "nope" not in log
    finally:
        server.stop()


def test_tokens_revocation_and_generate_token(backend):
    server = Server(postgres=backend).start()
    try:
        add_user(server, "fay@example.org")
        token = cli(server, "token", "--email", "fay@example.org", "--expires-in", "600").stdout.strip()

        async def main():
            fay = await connect_to_server({"server_url": server.url, "token": token})
            own = fay.config.workspace
            reader = await fay.generate_token({"workspace": own, "permission": "read", "expires_in": 600})
            parsed = await fay.parse_token(reader)
            assert parsed["scope"]["workspaces"] == {own: "r"} and parsed["parent"] == fay.config.user["id"]
            guest = await connect_to_server({"server_url": server.url, "token": reader, "workspace": own})
            with pytest.raises(Exception, match="read_write"):
                await guest.register_service({"id": "nope", "f": lambda: 1})
            with pytest.raises(Exception, match="Only an admin"):
                await guest.generate_token({"workspace": own, "permission": "admin"})
            await guest.disconnect()
            with pytest.raises(Exception, match="Only an admin of workspace other"):
                await fay.generate_token({"workspace": "other"})
            await fay.revoke_token(reader)
            with pytest.raises(Exception, match="revoked"):
                await connect_to_server({"server_url": server.url, "token": reader, "workspace": own})
            await fay.disconnect()
            return reader

        reader = run(main())
        status, body, _ = server.http("/public/services/ws/echo?data=1", reader)
        assert status == 401 and "revoked" in body["detail"]
        server.stop()
        server.start()  # the revocation and the user survive a restart
        status, body, _ = server.http("/public/services/ws/echo?data=1", reader)
        assert status == 401 and "revoked" in body["detail"]
        assert server.http("/public/services/ws/echo?data=2", token)[:2] == (200, 2)
        log = server.log.read_text()
        assert token not in log and reader not in log
    finally:
        server.stop()


def test_login_key_survives_restart_and_cookie_works(backend):
    server = Server(postgres=backend).start()
    try:
        add_user(server, "gus@example.org")

        async def start():
            anon = await connect_to_server({"server_url": server.url})
            started = await (await anon.get_service("public/hypha-login")).start()
            await anon.disconnect()
            return started["key"]

        key = run(start())
        server.stop()
        server.start()
        status, body, headers = post_form(server, {"email": "gus@example.org", "password": PASSWORD, "key": key})
        assert status == 200 and "Signed in" in body
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie

        async def check():
            anon = await connect_to_server({"server_url": server.url})
            profile = await (await anon.get_service("public/hypha-login")).check(key, timeout=5, profile=True)
            await anon.disconnect()
            return profile

        profile = run(check())
        assert profile["email"] == "gus@example.org" and profile["token"]
        token = cookie.split(";")[0].split("=", 1)[1]
        req = urllib.request.Request(server.url + f"/{profile['workspace']}/services/ws/echo?data=3",
                                     headers={"Cookie": f"access_token={token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.loads(r.read()) == 3
    finally:
        server.stop()
