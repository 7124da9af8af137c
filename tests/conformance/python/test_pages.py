"""The server's pages in headless Chromium: each loads with no console error, no failed request
and no HTTP error, is not blank, fits a phone's width and keeps to its own resources; what it
shows depends on who looks (the public summary, or an admin's details)."""

import json
import os
import subprocess

import pytest

from conftest import BIN, COTURN_SECRET, SECRET, Server, node, result_of, run, wait_until
from test_login import PASSWORD, add_user, store_args

pytestmark = pytest.mark.timeout(240)

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
SCREENSHOTS = os.environ.get("HYPHA_RTC_SCREENSHOTS", "/tmp/hypha-rtc-pages")


@pytest.fixture(scope="module")
def site(coturn):
    server = Server("--coturn-secret", COTURN_SECRET, "--coturn-uri", f"127.0.0.1:{coturn.port}").start()
    add_user(server, "admin@example.org", "admin")
    add_user(server, "user@example.org")
    yield server
    server.stop()


def visit(server, visits, sign_in=None):
    plan = {"screenshots": SCREENSHOTS, "visits": visits}
    if sign_in:
        plan["signIn"] = {"url": server.url + "/login", "email": sign_in, "password": PASSWORD}
    return result_of(node("pages.mjs", json.dumps(plan), timeout=120))["visits"]


def assert_clean(page):
    assert page["status"] == 200, page
    assert page["consoleErrors"] == [] and page["failed"] == [] and page["httpErrors"] == [], page
    assert page["colours"] > 5, f"{page['name']} looks blank"
    assert not page["horizontalOverflow"], f"{page['name']} is wider than the screen"
    assert page["csp"] and "default-src 'self'" in page["csp"], page["csp"]


TURN_CHECKED = "document.getElementById('turn-state').textContent !== 'checking…'"
DETAILS_SHOWN = ("!document.getElementById('details').hidden && "
                 "document.getElementById('chart-probe').childElementCount > 0")


def test_home_page_public_summary_and_admin_details(site):
    # Credentials issued now show in the admin's chart of the last 24 hours.
    admin_token = token_for(site, "admin@example.org")
    status, servers, _ = site.http("/public/services/coturn/get_rtc_ice_servers", token=admin_token)
    assert status == 200 and servers
    # The periodic probe has run once at start-up: the chart has a point.
    wait_until(lambda: site.http("/api/status", token=admin_token)[1]["details"]["probe"]["history"], 15,
               "the first coturn probe")

    anonymous = visit(site, [
        {"name": "home-desktop", "url": site.url + "/", "viewport": DESKTOP, "waitFor": TURN_CHECKED,
         "texts": ["#turn-state", "#who", "#python-snippet"]},
        {"name": "home-phone", "url": site.url + "/", "viewport": PHONE, "waitFor": TURN_CHECKED,
         "texts": ["#turn-state"]},
        # The other pages a visitor meets, on a phone.
        {"name": "login-phone", "url": site.url + "/login", "viewport": PHONE},
        {"name": "doctor-phone", "url": site.url + "/doctor/", "viewport": PHONE,
         "waitFor": "!document.getElementById('run').disabled", "texts": ["#who"]},
        {"name": "demo-phone", "url": site.url + "/demo/", "viewport": PHONE,
         "waitFor": "document.getElementById('signin').textContent.startsWith('Not signed in')"},
    ])
    for page in anonymous[:2]:
        assert_clean(page)
        assert page["texts"]["#turn-state"] == "reachable"
    for page in anonymous[2:]:
        assert_clean(page)
    assert anonymous[0]["texts"]["#who"] == "Visitor"
    assert f'"server_url": "{site.url}"' in anonymous[0]["texts"]["#python-snippet"]

    [admin, accounts] = visit(site, [
        {"name": "home-admin", "url": site.url + "/", "viewport": DESKTOP, "waitFor": DETAILS_SHOWN,
         "texts": ["#who", "#d-issued", "#d-store", "#d-instances", "#d-probe"]},
        {"name": "accounts-phone", "url": site.url + "/admin/", "viewport": PHONE, "waitFor": "window.adminReady",
         "texts": ["#users"]},
    ], sign_in="admin@example.org")
    assert_clean(admin)
    assert_clean(accounts)
    assert "admin@example.org" in accounts["texts"]["#users"]
    assert admin["texts"]["#who"] == "admin@example.org"
    assert int(admin["texts"]["#d-issued"]) >= 1
    assert admin["texts"]["#d-store"] == "SQLite"
    assert admin["texts"]["#d-instances"] == "1"
    assert "accepted a TURN allocation" in admin["texts"]["#d-probe"]

    # A signed-in user who is not an admin sees the summary only.
    [user] = visit(site, [
        {"name": "home-user", "url": site.url + "/", "viewport": PHONE, "waitFor": TURN_CHECKED,
         "texts": ["#who"]},
    ], sign_in="user@example.org")
    assert_clean(user)
    assert user["texts"]["#who"] == "user@example.org"


def token_for(server, email):
    """A token for a local user, from the `token` command."""
    result = subprocess.run([BIN, "token", "--email", email, "--jwt-secret", SECRET, *store_args(server)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_status_api_tells_details_to_admins_only(site):
    status, public, _ = site.http("/api/status")
    assert status == 200 and public["name"] == "hypha-rtc" and public["user"] is None
    assert "details" not in public and public["turn"]["state"] in ("ok", "unknown")
    _, as_user, _ = site.http("/api/status", token=token_for(site, "user@example.org"))
    assert as_user["user"]["email"] == "user@example.org" and "details" not in as_user
    _, as_admin, _ = site.http("/api/status", token=token_for(site, "admin@example.org"))
    details = as_admin["details"]
    assert details["store"] == {"kind": "SQLite", "state": "ok"}
    assert details["cluster"]["instances"] == [details["cluster"]["instance"]]
    assert "secret" not in json.dumps(as_admin).lower()


def setup_link(server):
    """The first-run link the server printed at start-up."""
    import re

    found = {}

    def printed():
        match = re.search(r"(http://\S+/setup\?key=[a-z0-9]+)", server.log.read_text())
        if match:
            found["url"] = match.group(1)
        return bool(found)

    wait_until(printed, 10, "the first-run link in the server's output")
    return found["url"]


def test_first_run_link_creates_the_admin_once():
    server = Server().start()
    try:
        link = setup_link(server)
        page = result_of(node("first_run.mjs", link, "first@example.org", PASSWORD, SCREENSHOTS, timeout=120))
        assert page["openedStatus"] == 200
        assert page["mismatch"] == "The two passwords differ."
        assert page["created"] == "The admin account first@example.org is ready."
        assert page["againStatus"] == 404 and "does not work" in page["spent"]
        assert "Signed in as first@example.org" in page["signedIn"]
        # The only errors the browser reports are the refusals asked for: the differing
        # passwords (400) and the spent link (404).
        assert page["failed"] == [], page
        for error in page["consoleErrors"]:
            assert error.startswith(("mismatch: ", "again: ")) and ("status of 400" in error or "status of 404" in error), error
        listed = subprocess.run([BIN, "user", "list", *store_args(server)], capture_output=True, text=True, timeout=30)
        assert "first@example.org" in listed.stdout and "\tadmin\t" in listed.stdout, listed.stdout
        # A guessed key does nothing, and a restart with an account prints no link.
        status, body, _ = server.http_text_status("/setup?key=" + "a" * 43)
        assert status == 404 and "does not work" in body
        server.stop()
        server.log.write_text("")
        server.start()
        assert "/setup?key=" not in server.log.read_text()
    finally:
        server.stop()


def test_first_run_link_is_void_once_an_account_exists():
    server = Server().start()
    try:
        link = setup_link(server)
        add_user(server, "cli-admin@example.org", "admin")
        status, body, _ = server.http_text_status(link.split(str(server.port), 1)[1])
        assert status == 404 and "does not work" in body
    finally:
        server.stop()


def test_api_description_covers_the_routes_and_reads_in_a_browser(site):
    status, spec, _ = site.http("/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.1") and spec["servers"] == [{"url": site.url}]
    # Every plain GET route it names is there (the transports and the one-time page aside).
    for path, item in spec["paths"].items():
        if "{" in path or "get" not in item or path in ("/ws", "/rpc", "/setup"):
            continue
        code, _, _ = site.http_text_status(path)
        assert code != 404, f"{path} is described but not served"
    [page] = visit(site, [
        {"name": "api-docs-phone", "url": site.url + "/api-docs", "viewport": PHONE,
         "waitFor": "document.querySelectorAll('.operation').length > 10", "texts": ["#api"]},
    ])
    assert_clean(page)
    assert "GET /{workspace}/services/{service}/{function}" in page["texts"]["#api"]


def test_the_accounts_page_adds_a_user_who_signs_in_and_refuses_non_admins(site):
    page = result_of(node("admin_page.mjs", site.url, "admin@example.org", "new@example.org", "user@example.org",
                          PASSWORD, os.path.join(SCREENSHOTS, "admin.png"), timeout=120))
    assert page["added"] == "Added new@example.org.", page
    assert "new@example.org" in page["users"] and "admin@example.org" in page["users"]
    assert "Signed in as new@example.org" in page["newUserSignedIn"]
    assert page["adminSeen"]["consoleErrors"] == [] and page["adminSeen"]["failed"] == [], page["adminSeen"]
    # A signed-in user without the admin role: told so, and the API refuses (403).
    assert "Only admins manage accounts" in page["refused"] and page["adminHidden"] is True
    assert page["apiStatus"] == 403
    assert all("403" in e for e in page["userSeen"]["consoleErrors"]), page["userSeen"]


def test_the_accounts_api_checks_like_the_command_line(site):
    admin = token_for(site, "admin@example.org")
    user = token_for(site, "user@example.org")
    assert site.http("/api/admin/users")[0] == 401
    assert site.http("/api/admin/users", token=user)[0] == 403
    assert site.http("/api/admin/users", token=user, data={"email": "x@example.org", "password": "long enough"})[0] == 403
    # The same checks as `user add`.
    status, body, _ = site.http("/api/admin/users", token=admin, data={"email": "not-an-email", "password": "long enough"})
    assert status == 400 and "is not an email address" in body["detail"]
    status, body, _ = site.http("/api/admin/users", token=admin, data={"email": "short@example.org", "password": "short"})
    assert status == 400 and "at least 8 characters" in body["detail"]
    status, body, _ = site.http("/api/admin/users", token=admin, data={"email": "user@example.org", "password": "long enough"})
    assert status == 400 and "already exists" in body["detail"]
    status, body, _ = site.http("/api/admin/users", token=admin, data={"email": "temp@example.org", "password": "long enough"})
    assert status == 201 and body["roles"] == []
    # Revoking a token through the page's API: refused from then on.
    temp = token_for(site, "temp@example.org")
    assert site.http("/api/status", token=temp)[1]["user"]["email"] == "temp@example.org"
    assert site.http("/api/admin/revoke", token=admin, data={"token": temp})[0] == 200
    assert site.http("/api/status", token=temp)[1]["user"] is None
    # A new password, then disabling: the command line no longer mints tokens for it.
    assert site.http("/api/admin/users/password", token=admin, data={"email": "temp@example.org", "password": "x"})[0] == 400
    assert site.http("/api/admin/users/password", token=admin, data={"email": "temp@example.org", "password": "another long one"})[0] == 200
    assert site.http("/api/admin/users/disable", token=admin, data={"email": "temp@example.org"})[0] == 200
    result = subprocess.run([BIN, "token", "--email", "temp@example.org", "--jwt-secret", SECRET, *store_args(site)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "disabled" in result.stderr
    # The audit lists issuance per hour and per user.
    status, audit, _ = site.http("/api/admin/audit", token=admin)
    assert status == 200 and sum(n for _, n in audit["per_hour"]) >= 1 and audit["by_user"], audit


LURE = b"""<!doctype html><title>an app</title><p id="out"></p><script>
fetch('/api/admin/users', {method: 'POST', credentials: 'include', headers: {'Content-Type': 'application/json'},
  body: JSON.stringify({email: 'lured@example.org', password: 'long enough'})})
  .then((r) => 'status ' + r.status, (e) => 'failed ' + e)
  .then((t) => { document.getElementById('out').textContent = t; });
</script>"""


def test_an_app_page_cannot_act_with_its_visitors_sign_in(site):
    """Anyone may serve an app on the server's origin, an anonymous client too. An admin who
    opens one lends it nothing: the page runs sandboxed in an opaque origin, its request to add
    an account goes without the admin's cookie and is refused, and no account is added; the
    headers an app could use on the origin itself (Set-Cookie, Clear-Site-Data) never leave
    the server."""
    import asyncio

    import httpx
    from hypha_rpc import connect_to_server

    from test_apps import asgi_service

    async def app(scope, receive, send):
        headers = [[b"content-type", b"text/html; charset=utf-8"]]
        if scope["path"] == "/on-the-origin":
            headers += [[b"set-cookie", b"access_token=planted; Path=/"], [b"clear-site-data", b'"cookies"']]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": LURE})

    async def main():
        provider = await connect_to_server({"server_url": site.url})
        await provider.register_service(asgi_service("lure", app))
        url = f"{site.url}/{provider.config.workspace}/apps/lure/"
        async with httpx.AsyncClient(timeout=20) as http:
            served = await http.get(url + "on-the-origin")
        plan = [{"name": "app-sandboxed", "url": url, "viewport": PHONE,
                 "waitFor": "document.getElementById('out').textContent !== ''", "texts": ["#out"]}]
        seen = await asyncio.to_thread(visit, site, plan, "admin@example.org")
        await provider.disconnect()
        return served, seen[0]

    served, page = run(main())
    assert served.status_code == 200 and b"lured@example.org" in served.content
    assert "set-cookie" not in served.headers and "clear-site-data" not in served.headers
    policy = served.headers["content-security-policy"]
    assert "sandbox" in policy and "allow-same-origin" not in policy, policy
    assert page["status"] == 200 and page["csp"] == policy, page
    outcome = page["texts"]["#out"]
    assert outcome.startswith("failed") or outcome in ("status 401", "status 403"), outcome
    admin = token_for(site, "admin@example.org")
    status, users, _ = site.http("/api/admin/users", token=admin)
    assert status == 200 and "lured@example.org" not in json.dumps(users), users
