"""The HTTP surface: service calls, health, configuration, CORS, errors."""

import json
import urllib.request

import pytest
from hypha_rpc import connect_to_server

from conftest import hypha_token, run

pytestmark = pytest.mark.timeout(60)


def test_health_and_config(server):
    assert server.http("/health/liveness")[:2] == (200, {"status": "OK"})
    assert server.http("/health/readiness")[0] == 200
    status, config, _ = server.http("/assets/config.json")
    assert status == 200 and config["public_base_url"] == server.url and config["manager_id"].startswith("manager-")


def test_manager_over_http(server):
    token = hypha_token("gina")
    status, body, _ = server.http("/ws-user-gina/services/ws/echo?data=%7B%22a%22%3A1%7D", token=token)
    assert (status, body) == (200, {"a": 1})
    status, body, _ = server.http("/ws-user-gina/services/ws/echo", token=token, data={"data": [1, "two"]}, method="POST")
    assert (status, body) == (200, [1, "two"])
    status, body, _ = server.http("/ws-user-gina/services/ws/echo?data=1")
    assert status == 403 and body["success"] is False and "Permission denied" in body["detail"]
    status, body, headers = server.http("/ws-user-gina/services/ws/echo?data=1", token="bad")
    assert status == 401 and "Authentication error" in body["detail"] and headers["WWW-Authenticate"] == "Bearer"
    status, body, _ = server.http("/ws-user-gina/services/ws/no_such_function", token=token)
    assert status == 404


def test_client_service_over_http(server):
    async def main():
        token = hypha_token("hank")
        c = await connect_to_server({"server_url": server.url, "token": token, "client_id": "httpprov"})
        await c.register_service({
            "id": "math",
            "config": {"visibility": "protected", "require_context": True},
            "add": lambda a, b, context=None: {"sum": a + b, "user": context["user"]["id"]},
        })
        import asyncio

        status, body, _ = await asyncio.to_thread(server.http, "/ws-user-hank/services/math/add?a=2&b=40", token)
        assert (status, body) == (200, {"sum": 42, "user": "hank"})
        status, body, _ = await asyncio.to_thread(server.http, "/ws-user-hank/services/math/add", token, {"a": 1, "b": 1}, "POST")
        assert (status, body) == (200, {"sum": 2, "user": "hank"})
        status, body, _ = await asyncio.to_thread(server.http, "/ws-user-hank/services/math/add?a=2&b=40")
        assert status == 403, body
        status, body, _ = await asyncio.to_thread(server.http, "/ws-user-hank/services/nothing/add", token)
        assert status == 404 and "Service not found" in body["detail"]
        status, body, _ = await asyncio.to_thread(server.http, "/ws-user-hank/services/math/add", token, "not a dict", "POST")
        assert status == 500 and body["success"] is False
        await c.disconnect()

    run(main())


def test_cors_and_bad_json(server):
    req = urllib.request.Request(server.url + "/public/services/ws/echo", method="OPTIONS", headers={
        "Origin": "https://app.example.org", "Access-Control-Request-Method": "POST"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.org"
    req = urllib.request.Request(server.url + "/public/services/ws/echo", data=b"{broken", method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=5)
        raise AssertionError("bad JSON was accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 400 and "not valid JSON" in json.loads(e.read())["detail"]
