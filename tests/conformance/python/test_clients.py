"""The real hypha-rpc clients (PyPI and npm) against hypha-rtc: services, large data, WebRTC."""

import asyncio
import re
import time

import numpy as np
import pytest
from hypha_rpc import connect_to_server, get_rtc_service, register_rtc_service

from conftest import hypha_token, json_line, node, node_background, result_of, run

pytestmark = pytest.mark.timeout(180)


async def all_answered(pending, what):
    """Polls `pending()` (calls a client still awaits the answer to) until it is 0. A chunked
    message's `process` is answered after the call it carries, so this is what shows that
    the answer came back under the session its caller chose."""
    deadline = time.monotonic() + 10
    while (n := await pending()) > 0:
        assert time.monotonic() < deadline, f"{what}: {n} calls never answered"
        await asyncio.sleep(0.05)


def local_pending(client):
    async def pending():
        return client.rpc.get_session_stats()["promise_sessions"]

    return pending


async def server_awaits_no_answer(server):
    """The server's own count of processed chunked messages whose answer it awaits."""
    deadline = time.monotonic() + 10
    while True:
        _, metrics, _ = await asyncio.to_thread(server.http_text, "/metrics")
        found = re.search(r"^hypha_rtc_chunked_answers_awaited (\d+)", metrics, re.M)
        assert found, metrics
        if found.group(1) == "0":
            return
        assert time.monotonic() < deadline, f"still awaited: {found.group(1)}"
        await asyncio.sleep(0.05)


def test_hypha_token_register_get_and_context(server):
    async def main():
        alice = hypha_token("alice", {"lab": "rw"})
        bob = hypha_token("bob", {"lab": "r"})
        a = await connect_to_server({"server_url": server.url, "token": alice, "workspace": "lab", "client_id": "prov"})
        assert a.config.workspace == "lab"
        assert a.config.user["id"] == "alice"
        await a.register_service({
            "id": "whoami",
            "config": {"visibility": "protected", "require_context": True},
            "who": lambda context=None: {"user": context["user"]["id"], "ws": context["ws"], "from": context["from"]},
        })
        b = await connect_to_server({"server_url": server.url, "token": bob, "workspace": "lab", "client_id": "cons"})
        svc = await b.get_service("whoami")
        assert svc.id == "lab/prov:whoami"
        assert await svc.who() == {"user": "bob", "ws": "lab", "from": "lab/cons"}
        info = await b.get_service_info("lab/prov:whoami")
        assert info["id"] == "lab/prov:whoami"
        ids = [s["id"] for s in await b.list_services("lab")]
        assert "lab/prov:whoami" in ids
        # Read-only users cannot register services.
        with pytest.raises(Exception, match="read_write"):
            await b.register_service({"id": "nope", "f": lambda: 1})
        await b.disconnect()
        await a.disconnect()

    run(main())


def test_numpy_4mb_through_the_server(server):
    async def main():
        a = await connect_to_server({"server_url": server.url})
        await a.register_service({"id": "arr", "config": {"visibility": "public"}, "echo": lambda x: x})
        b = await connect_to_server({"server_url": server.url})
        data = np.random.default_rng(1).random((512, 1024))  # 4 MiB of float64
        assert data.nbytes == 4 * 1024 * 1024
        svc = await b.get_service(f"{a.config.workspace}/{a.config.client_id}:arr")
        assert np.array_equal(await svc.echo(data), data)  # client -> client, chunked
        # Both chunked messages' processes (b's call, a's answer) were answered too.
        await all_answered(local_pending(b), "the caller")
        await all_answered(local_pending(a), "the callee")
        await server_awaits_no_answer(server)
        assert np.array_equal(await b.echo(data), data)  # through the server's own manager
        await a.disconnect()
        await b.disconnect()

    run(main())


def test_rtc_service_between_python_clients(server):
    async def main():
        a = await connect_to_server({"server_url": server.url, "client_id": "rtc-prov"})
        await a.register_service({"id": "calc", "config": {"visibility": "public"}, "add": lambda x, y: x + y})
        await register_rtc_service(a, "rtc", {"visibility": "public", "ice_servers": []})
        b = await connect_to_server({"server_url": server.url})
        pc = await get_rtc_service(b, f"{a.config.workspace}/rtc", {"ice_servers": []})
        calc = await pc.get_service("calc")
        assert await calc.add(2, 40) == 42
        await pc.close()
        await a.disconnect()
        await b.disconnect()

    run(main())


def test_webrtc_auto_mode(server):
    async def main():
        token = hypha_token("carol")
        cfg = {"server_url": server.url, "token": token, "webrtc": True, "webrtc_config": {"ice_servers": []}}
        a = await connect_to_server({**cfg, "client_id": "auto-a"})
        await a.register_service({"id": "mul", "config": {"visibility": "public"}, "mul": lambda x, y: x * y})
        b = await connect_to_server({**cfg, "client_id": "auto-b"})
        svc = await b.get_service("auto-a:mul")
        assert await svc.mul(6, 7) == 42
        assert getattr(svc, "_webrtc", False) is True
        await a.disconnect()
        await b.disconnect()

    run(main())


def test_anonymous_client(server):
    async def main():
        c = await connect_to_server({"server_url": server.url})
        assert c.config.workspace.startswith("ws-user-anonymouz-")
        assert c.config.user["is_anonymous"] is True
        assert await c.echo("x") == "x"
        await c.register_service({"id": "anon", "f": lambda: 1})
        assert any(s["id"].endswith(":anon") for s in await c.list_services())
        await c.disconnect()

    run(main())


def test_javascript_register_and_get(server):
    out = node("roundtrip.mjs", server.url, hypha_token("jsuser"))
    result = result_of(out)
    assert result["sameWorkspace"] and result["workspace"] == "ws-user-jsuser"
    assert result["echoed"] == {"n": 42, "s": "text"}
    assert result["serviceId"] == "ws-user-jsuser/js-provider:js-echo"
    assert result["infoId"] == result["serviceId"]
    assert "ws-user-jsuser/js-provider:js-echo" in result["listed"]


def test_javascript_provider_python_consumer(server):
    proc = node_background("provider.mjs", server.url, "js-prov")
    try:
        ws = json_line(proc.stdout, "READY ")["workspace"]

        async def main():
            c = await connect_to_server({"server_url": server.url})
            svc = await c.get_service(f"{ws}/js-prov:js-math")
            assert await svc.add(20, 22) == 42
            assert await svc.greet("py") == "hello py from js"
            # 3 MiB each way: a chunked call from Python, a chunked answer from JavaScript,
            # each processed under a session the server chose and answered under the caller's.
            data = bytes(range(256)) * (3 * 4096)
            assert await svc.echo(data) == data
            await all_answered(local_pending(c), "the Python caller")
            await all_answered(svc.pending, "the JavaScript callee")
            await server_awaits_no_answer(server)
            await c.disconnect()

        run(main())
    finally:
        proc.stdin.close()
        proc.wait(timeout=20)


def test_python_provider_javascript_consumer(server):
    async def main():
        a = await connect_to_server({"server_url": server.url, "client_id": "py-prov"})
        await a.register_service(
            {
                "id": "py-math",
                "config": {"visibility": "public"},
                "square": lambda x: x * x,
                "total": lambda b: sum(b),
            }
        )
        svc = f"{a.config.workspace}/py-prov:py-math"
        out = await asyncio.to_thread(node, "consumer.mjs", server.url, svc, "square", "[12]")
        assert result_of(out) == 144
        # A chunked call from JavaScript (3 MiB of sevens).
        out = await asyncio.to_thread(node, "consumer.mjs", server.url, svc, "total", '[{"$bytes": 3145728}]')
        assert result_of(out) == 7 * 3145728
        assert "PENDING 0" in out.splitlines(), out
        await server_awaits_no_answer(server)
        await a.disconnect()

    run(main())


def test_call_to_departed_peer_fails_fast(server):
    async def main():
        a = await connect_to_server({"server_url": server.url})
        await a.register_service({"id": "gone", "config": {"visibility": "public"}, "f": lambda: 1})
        b = await connect_to_server({"server_url": server.url})
        svc = await b.get_service(f"{a.config.workspace}/{a.config.client_id}:gone")
        assert await svc.f() == 1
        await a.disconnect()
        started = time.monotonic()
        with pytest.raises(Exception, match="not connected|not found|disconnected"):
            await svc.f()
        assert time.monotonic() - started < 5, "the call waited for a time-out instead of the dead-peer reject"
        with pytest.raises(Exception, match="Service not found"):
            await b.get_service(f"{a.config.workspace}/{a.config.client_id}:gone")
        await b.disconnect()

    run(main())


def test_manager_events_reach_subscribers(server):
    async def main():
        import asyncio

        token = hypha_token("ivy")
        a = await connect_to_server({"server_url": server.url, "token": token, "client_id": "watcher"})
        added, gone = asyncio.Queue(), asyncio.Queue()
        a.on("service_added", lambda event: added.put_nowait(event["data"]))
        a.on("client_disconnected", lambda event: gone.put_nowait(event["data"]))
        await a.subscribe(["service_added", "client_disconnected"])
        b = await connect_to_server({"server_url": server.url, "token": token, "client_id": "newcomer"})
        await b.register_service({"id": "fresh", "f": lambda: 1})
        while (await asyncio.wait_for(added.get(), 10))["id"] != "ws-user-ivy/newcomer:fresh":
            pass
        await b.disconnect()
        assert await asyncio.wait_for(gone.get(), 10) == {"id": "newcomer", "workspace": "ws-user-ivy"}
        with pytest.raises(Exception, match="event_types"):
            await a.subscribe(42)
        await a.disconnect()

    run(main())


def test_an_anonymous_client_mints_a_token_for_its_own_workspace(server):
    """As in Hypha: an anonymous user is admin of its temporary workspace and may share it."""
    async def main():
        a = await connect_to_server({"server_url": server.url, "client_id": "host"})
        await a.register_service({"id": "inside", "config": {"visibility": "protected"}, "f": lambda: "in"})
        token = await a.generate_token()  # read_write by default, as in Hypha
        b = await connect_to_server({"server_url": server.url, "token": token, "workspace": a.config.workspace})
        assert b.config.workspace == a.config.workspace
        assert b.config.user["is_anonymous"] is True
        assert await (await b.get_service("host:inside")).f() == "in"
        with pytest.raises(Exception, match="[Aa]nonymous"):
            await b.get_rtc_ice_servers()
        with pytest.raises(Exception, match="admin of workspace ws-user-someone"):
            await a.generate_token({"workspace": "ws-user-someone"})
        await b.disconnect()
        await a.disconnect()

    run(main())
