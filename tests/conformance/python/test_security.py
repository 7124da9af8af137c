"""A hand-made client that lies about its identity to real clients, bad tokens, and floods (the
protocol checks that need no real client are in tests/protocol.rs)."""

import asyncio
import json

import msgpack
import pytest
import websockets
from hypha_rpc import connect_to_server

from conftest import SECRET, Server, hypha_token, run

pytestmark = pytest.mark.timeout(120)


async def raw_connect(url, token=None, workspace=None, client_id="raw"):
    ws = await websockets.connect(url, max_size=None)
    await ws.send(json.dumps({"client_id": client_id, "workspace": workspace, "token": token, "reconnection_token": None}))
    info = json.loads(await asyncio.wait_for(ws.recv(), 5))
    return ws, info


async def recv_binary(ws, timeout=5):
    while True:
        msg = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(msg, bytes):
            unpacker = msgpack.Unpacker()
            unpacker.feed(msg)
            return list(unpacker)


def test_forged_identity_is_overwritten(server):
    async def main():
        a = await connect_to_server({"server_url": server.url, "client_id": "guarded"})
        seen = []

        def record(context=None):
            seen.append(context)
            return "ok"

        await a.register_service({"id": "vault", "config": {"visibility": "public", "require_context": True}, "open": record})
        raw, info = await raw_connect(server.ws_url, client_id="mallory")
        assert info["type"] == "connection_info"
        header = {
            "type": "method",
            "from": f"{a.config.workspace}/guarded",  # pretends to be the provider itself
            "to": f"{a.config.workspace}/guarded",
            "ws": a.config.workspace,
            "user": {"id": "root", "roles": ["admin"], "is_anonymous": False},
            "method": "services.vault.open",
            "session": "s1",
        }
        body = {"args": [], "promise": "*", "t": 10}
        await raw.send(msgpack.packb(header) + msgpack.packb(body))
        reply = await recv_binary(raw)
        assert reply[0]["method"] == "s1.resolve"
        assert reply[0]["from"] == f"{a.config.workspace}/guarded"
        assert reply[1]["args"] == ["ok"]
        ctx = seen[0]
        assert ctx["from"] == f"{info['workspace']}/mallory"
        assert ctx["ws"] == info["workspace"]
        assert ctx["user"]["id"] == info["user"]["id"] != "root"
        assert "admin" not in ctx["user"]["roles"]
        await raw.close()
        await a.disconnect()

    run(main())


def test_protected_service_in_another_workspace_is_refused(server):
    async def main():
        a = await connect_to_server({"server_url": server.url})
        await a.register_service({"id": "private", "config": {"visibility": "protected"}, "f": lambda: "secret"})
        b = await connect_to_server({"server_url": server.url})
        assert a.config.workspace != b.config.workspace
        with pytest.raises(Exception, match="Permission denied"):
            await b.get_service(f"{a.config.workspace}/{a.config.client_id}:private")
        # Calling it directly, bypassing the manager, is refused by the provider's own RPC.
        raw, info = await raw_connect(server.ws_url, client_id="sneak")
        header = {"type": "method", "to": f"{a.config.workspace}/{a.config.client_id}", "method": "services.private.f", "session": "s2"}
        await raw.send(msgpack.packb(header) + msgpack.packb({"args": [], "promise": "*", "t": 10}))
        reply = await recv_binary(raw)
        assert reply[0]["method"] == "s2.reject"
        assert "Permission denied" in reply[1]["args"][0]["_rvalue"]
        await raw.close()
        await a.disconnect()
        await b.disconnect()

    run(main())


@pytest.mark.parametrize(
    "token,message",
    [
        (hypha_token("eve", expires_in=-3600), "expired"),
        (hypha_token("eve", secret="another-secret"), "signature"),
        (hypha_token("eve", alg="HS512"), "algorithm"),
        ("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJldmUiLCJleHAiOjQxMDI0NDQ4MDB9.", "malformed|algorithm"),
        ("not-a-token", "malformed"),
        (hypha_token("eve", {"lab": "r"}, wid="lab"), "bound to workspace lab"),
    ],
)
def test_bad_tokens_are_refused(server, token, message):
    async def main():
        workspace = "other" if "wid" in message or "bound" in message else None
        with pytest.raises(Exception, match=message):
            await connect_to_server({"server_url": server.url, "token": token, "workspace": workspace})
        raw = await websockets.connect(server.ws_url)
        await raw.send(json.dumps({"client_id": "x", "token": token, "workspace": workspace}))
        error = json.loads(await asyncio.wait_for(raw.recv(), 5))
        assert error["type"] == "error" and error["message"].startswith("Authentication error")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(raw.recv(), 5)
        assert closed.value.rcvd.code == 1008

    run(main())


def test_workspace_without_permission_is_refused(server):
    async def main():
        with pytest.raises(Exception, match="Permission denied for workspace lab"):
            await connect_to_server({"server_url": server.url, "token": hypha_token("eve"), "workspace": "lab"})

    run(main())


def test_flood_closes_only_the_flooder():
    server = Server("--ws-rate-limit", "500").start()
    try:

        async def main():
            witness = await connect_to_server({"server_url": server.url})
            raw, info = await raw_connect(server.ws_url, client_id="flooder")
            frame = msgpack.packb({"type": "method", "to": "nobody", "method": "x"})
            with pytest.raises(websockets.ConnectionClosed) as closed:
                for _ in range(20000):
                    await raw.send(frame)
                for _ in range(20000):
                    await asyncio.wait_for(raw.recv(), 5)
            # The close frame may be lost when the server drops a socket with unread input.
            assert closed.value.rcvd is None or closed.value.rcvd.code == 1008
            assert await witness.echo("alive") == "alive"
            await witness.disconnect()

        run(main())
        assert server.alive()
        assert 'reason="rate limit"' in server.log.read_text()
    finally:
        server.stop()
