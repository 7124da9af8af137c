"""The workspace manager's functions with Hypha's names, arguments and results, through the
real clients: list_services filters, ping(client_id), get_env/set_env, events, service types,
and the HTTP routes for service and workspace info."""

import time

import httpx
import pytest
from hypha_rpc import connect_to_server

from conftest import hypha_token, node, result_of, run

pytestmark = pytest.mark.timeout(180)


def test_list_services_honours_filters_and_patterns(server):
    async def main():
        token = hypha_token("lister", {"lab-list": "rw"})
        a = await connect_to_server({"server_url": server.url, "token": token, "workspace": "lab-list", "client_id": "prov"})
        await a.register_service({"id": "alpha-svc", "type": "imaging", "config": {"visibility": "public"}, "f": lambda: 1})
        await a.register_service({"id": "beta-svc", "type": "analysis", "config": {"visibility": "protected"}, "f": lambda: 2})
        await a.register_service({"id": "hidden-svc", "config": {"visibility": "unlisted"}, "f": lambda: 3})
        ids = lambda services: sorted(s["id"] for s in services)

        assert ids(await a.list_services({"service_id": "alpha-svc"})) == ["lab-list/prov:alpha-svc"]
        assert ids(await a.list_services({"type": "analysis"})) == ["lab-list/prov:beta-svc"]
        # Every client's `built-in` service is public too.
        assert ids(await a.list_services({"visibility": "public", "client_id": "prov"})) == ["lab-list/prov:alpha-svc", "lab-list/prov:built-in"]
        assert ids(await a.list_services("lab-list/prov:*-svc")) == ["lab-list/prov:alpha-svc", "lab-list/prov:beta-svc"]
        assert ids(await a.list_services("prov:beta*")) == ["lab-list/prov:beta-svc"]
        assert ids(await a.list_services("lab-list/alpha-svc")) == ["lab-list/prov:alpha-svc"]
        # Unlisted services are left out unless asked for.
        assert "lab-list/prov:hidden-svc" not in ids(await a.list_services())
        assert "lab-list/prov:hidden-svc" in ids(await a.list_services(include_unlisted=True))
        # list_apps() asks for the `default` services only: none here, not every service.
        assert await a.list_apps() == []
        with pytest.raises(Exception, match='Invalid query keys: "colour"'):
            await a.list_services({"colour": "red"})
        with pytest.raises(Exception, match="Invalid characters in query part"):
            await a.list_services("lab-list/pr<o>v:x")

        # Another user sees the public service only, and no unlisted one even when asking.
        other = await connect_to_server({"server_url": server.url, "token": hypha_token("outsider")})
        public = ["lab-list/prov:alpha-svc", "lab-list/prov:built-in"]
        assert ids(await other.list_services("lab-list")) == public
        assert ids(await other.list_services("lab-list", include_unlisted=True)) == public
        # `*`: public services of every workspace, with the caller's own.
        everywhere = ids(await other.list_services("*"))
        assert "lab-list/prov:alpha-svc" in everywhere and "lab-list/prov:beta-svc" not in everywhere
        await other.disconnect()
        await a.disconnect()

    run(main())


def test_ping_reaches_the_client_itself(server):
    async def main():
        token = hypha_token("pinger", {"lab-ping": "rw"})
        a = await connect_to_server({"server_url": server.url, "token": token, "workspace": "lab-ping", "client_id": "target"})
        b = await connect_to_server({"server_url": server.url, "token": token, "workspace": "lab-ping", "client_id": "asker"})
        assert await b.ping("target") == "pong"
        assert await b.ping("lab-ping/target") == "pong"
        missing = await b.ping("nobody-here", timeout=2)
        assert missing.startswith("Failed to ping client lab-ping/nobody-here")
        # A client of a workspace the caller cannot read is refused, not pinged.
        stranger = await connect_to_server({"server_url": server.url, "token": hypha_token("stranger")})
        with pytest.raises(Exception, match="Permission denied for workspace lab-ping"):
            await stranger.ping("lab-ping/target")
        await a.disconnect()
        # Gone: the answer says so within the time-out instead of "pong".
        t0 = time.monotonic()
        gone = await b.ping("target", timeout=2)
        assert gone.startswith("Failed to ping client lab-ping/target"), gone
        assert time.monotonic() - t0 < 10
        await stranger.disconnect()
        await b.disconnect()

    run(main())


def test_env_events_and_service_types(server):
    async def main():
        token = hypha_token("datauser", {"lab-data": "rw"})
        a = await connect_to_server({"server_url": server.url, "token": token, "workspace": "lab-data"})
        assert await a.get_env() == {}
        await a.set_env("MODEL", "resnet-50")
        await a.set_env("LIMITS", {"fps": 30, "sizes": [1, 2]})
        assert await a.get_env("MODEL") == "resnet-50"
        assert await a.get_env() == {"LIMITS": {"fps": 30, "sizes": [1, 2]}, "MODEL": "resnet-50"}
        await a.set_env("MODEL", None)
        with pytest.raises(Exception, match="Environment variable 'MODEL' not found in workspace lab-data"):
            await a.get_env("MODEL")

        before = time.time() - 1
        await a.log_event("scan.started", {"sample": 1})
        await a.log_event("scan.started", {"sample": 2})
        await a.log_event("scan.done")
        events = await a.get_events("scan.started")
        assert [e["data"] for e in events] == [{"sample": 1}, {"sample": 2}]
        assert all(e["workspace"] == "lab-data" and e["user_id"] == "datauser" for e in events)
        assert events[0]["timestamp"].endswith("Z") and events[0]["timestamp"][:2] == "20"
        assert len(await a.get_events(start_time=before)) == 3
        assert await a.get_events(end_time=before) == []
        stats = await a.get_event_stats()
        assert stats == [{"event_type": "scan.done", "count": 1}, {"event_type": "scan.started", "count": 2}]
        with pytest.raises(Exception, match="no spaces"):
            await a.log_event("has space")
        with pytest.raises(Exception, match="start_time must be"):
            await a.get_events(start_time="last tuesday")

        # Another user of the same workspace reads only their own events.
        b = await connect_to_server({"server_url": server.url, "token": hypha_token("reader", {"lab-data": "r"}), "workspace": "lab-data"})
        assert await b.get_events() == []
        with pytest.raises(Exception, match="read_write"):
            await b.log_event("x")
        with pytest.raises(Exception, match="read_write"):
            await b.get_env()

        info = await a.register_service_type({"id": "camera", "name": "Camera", "definition": {"snap": {"type": "function"}}})
        assert info["id"] == "lab-data/camera"
        with pytest.raises(Exception, match="Service type already exists: lab-data/camera"):
            await a.register_service_type({"id": "camera", "name": "Camera", "definition": {}})
        with pytest.raises(Exception, match="current workspace"):
            await a.register_service_type({"id": "other-ws/camera", "name": "C", "definition": {}})
        assert (await b.get_service_type("lab-data/camera"))["name"] == "Camera"
        assert [t["id"] for t in await b.list_service_types()] == ["lab-data/camera"]
        with pytest.raises(Exception, match="Service type not found: nope"):
            await a.get_service_type("nope")
        outsider = await connect_to_server({"server_url": server.url, "token": hypha_token("outsider2")})
        with pytest.raises(Exception, match="Permission denied"):
            await outsider.get_service_type("lab-data/camera")
        await outsider.disconnect()
        await b.disconnect()
        await a.disconnect()

    run(main())


def test_anonymous_data_is_bounded(server):
    async def main():
        anon = await connect_to_server({"server_url": server.url})
        await anon.set_env("K", "v")
        assert await anon.get_env("K") == "v"
        with pytest.raises(Exception, match="at most 4096 bytes"):
            await anon.set_env("BIG", "x" * 5000)
        for i in range(15):
            await anon.set_env(f"K{i}", i)
        with pytest.raises(Exception, match="most environment variables it may \\(16\\)"):
            await anon.set_env("ONE_MORE", 1)
        await anon.disconnect()

    run(main())


def test_http_service_and_workspace_info(server):
    async def main():
        token = hypha_token("httpinfo", {"lab-http": "rw"})
        a = await connect_to_server({"server_url": server.url, "token": token, "workspace": "lab-http", "client_id": "prov"})
        await a.register_service({"id": "open-svc", "name": "Open", "config": {"visibility": "public"}, "f": lambda: 1})
        await a.register_service({"id": "closed-svc", "config": {"visibility": "protected"}, "f": lambda: 1})
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            r = await http.get("/lab-http/services/open-svc")
            assert r.status_code == 200, r.text
            assert r.json()["id"] == "lab-http/prov:open-svc" and r.json()["name"] == "Open"
            assert (await http.get("/lab-http/services/prov:open-svc")).json()["id"] == "lab-http/prov:open-svc"
            r = await http.get("/lab-http/services/closed-svc")
            assert r.status_code == 403, r.text
            r = await http.get("/lab-http/services/closed-svc", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200 and r.json()["id"] == "lab-http/prov:closed-svc"
            assert (await http.get("/lab-http/services/none-such")).status_code == 404
            r = await http.get("/lab-http/info", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200 and r.json()["id"] == "lab-http", r.text
            assert (await http.get("/lab-http/info")).status_code == 403
        await a.disconnect()

    run(main())


def test_javascript_client_uses_the_manager_data_functions(server):
    result = result_of(node("manager.mjs", server.url, hypha_token("jsdata")))
    assert result["env"] == {"text": "hello", "n": 3}
    assert result["events"] == [{"type": "js.measured", "data": {"value": 7}, "user": "jsdata"}]
    assert result["stats"] == [{"event_type": "js.measured", "count": 1}]
    assert result["listed"] == ["ws-user-jsdata/js-manager:js-listed"]
    assert result["pong"] == "pong"
    assert "Environment variable 'MISSING' not found" in result["refused"]
