"""The HTTP streaming transport (GET/POST /rpc) with the real client, and what an attacker
tries against it: writing for someone else's stream, forged tokens, oversized frames."""

import asyncio

import httpx
import msgpack
import pytest
from hypha_rpc import connect_to_server

from urllib.parse import urlencode

from conftest import announce_body, hypha_token, run, wait_for

pytestmark = pytest.mark.timeout(90)


class RawStream:
    """GET /rpc read by hand: the frames as they come (length-prefixed msgpack)."""

    def __init__(self, url, client_id, token=None, workspace=None):
        self.client = httpx.AsyncClient(timeout=10)
        self.params = {"client_id": client_id}
        if workspace:
            self.params["workspace"] = workspace
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url + "/rpc"
        self.buffer = b""

    async def open(self):
        request = self.client.build_request("GET", self.url, params=self.params, headers=self.headers)
        self.response = await self.client.send(request, stream=True)
        self.chunks = self.response.aiter_bytes()
        return self.response.status_code

    async def next(self, timeout=5):
        while True:
            if len(self.buffer) >= 4:
                length = int.from_bytes(self.buffer[:4], "big")
                if len(self.buffer) >= 4 + length:
                    frame, self.buffer = self.buffer[4 : 4 + length], self.buffer[4 + length :]
                    unpacker = msgpack.Unpacker()
                    unpacker.feed(frame)
                    return list(unpacker)
            self.buffer += await asyncio.wait_for(self.chunks.__anext__(), timeout)

    async def post(self, body, **params):
        return await self.client.post(self.url, content=body, params={**self.params, **params}, headers=self.headers)

    async def close(self):
        await self.response.aclose()
        await self.client.aclose()


def test_real_client_over_http_reaches_websocket_peers_and_back(server):
    async def main():
        ws_peer = await connect_to_server({"server_url": server.url, "client_id": "ws-peer"})
        await ws_peer.register_service({"id": "adder", "config": {"visibility": "public"}, "add": lambda a, b: a + b})
        token = await ws_peer.generate_token()
        workspace = ws_peer.config.workspace
        http_peer = await connect_to_server({
            "server_url": server.url, "client_id": "http-peer", "transport": "http",
            "workspace": workspace, "token": token,
        })
        assert http_peer.config.workspace == workspace
        assert http_peer.config.hypha_version
        adder = await http_peer.get_service("ws-peer:adder")
        assert await adder.add(2, 40) == 42
        # The other way: a websocket client calls a service of the HTTP client, with a callback.
        await http_peer.register_service({
            "id": "twice", "config": {"visibility": "public"},
            "run": lambda x, callback: callback(x * 2),
        })
        got = []
        twice = await ws_peer.get_service("http-peer:twice")
        await twice.run(21, got.append)
        assert got == [42]
        # A large argument travels as chunks, POST by POST.
        blob = bytes(range(256)) * 4096
        echo = await ws_peer.register_service({"id": "echo", "config": {"visibility": "public"}, "echo": lambda x: x})
        assert echo
        remote = await http_peer.get_service("ws-peer:echo")
        assert await remote.echo(blob) == blob
        clients = await ws_peer.list_clients()
        assert f"{workspace}/http-peer" in clients
        await http_peer.disconnect()

        async def gone():
            return f"{workspace}/http-peer" not in await ws_peer.list_clients()

        await wait_for(gone, 30, "the HTTP client to be forgotten after it disconnected")
        await ws_peer.disconnect()

    run(main())


def test_a_post_must_carry_the_streams_cookie(server):
    async def main():
        victim = await connect_to_server({"server_url": server.url, "client_id": "victim", "transport": "http"})
        calls = []
        await victim.register_service({"id": "safe", "config": {"visibility": "public"}, "open": lambda: calls.append(1)})
        workspace = victim.config.workspace
        frame = msgpack.packb({
            "type": "method", "to": f"{workspace}/victim", "method": "services.safe.open", "session": "s1",
        }) + msgpack.packb({"args": [], "promise": "*", "t": 10})
        async with httpx.AsyncClient(timeout=10) as mallory:
            params = {"client_id": "victim", "workspace": workspace}
            answer = await mallory.post(f"{server.url}/rpc", params=params, content=frame)
            assert answer.status_code == 403 and "session cookie" in answer.json()["detail"]
            for guess in ("hypha_rpc_1=x", "hypha_rpc_2=0000000000000000000000000000000", "access_token=x"):
                answer = await mallory.post(f"{server.url}/rpc", params=params, content=frame, headers={"Cookie": guess})
                assert answer.status_code == 403, guess
            # Even a signed-in user of another workspace cannot write for the stream.
            token = hypha_token("mallory")
            answer = await mallory.post(f"{server.url}/rpc", params=params, content=frame, headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 403
            # A client with no stream here is told to open one (the client retries on 400).
            answer = await mallory.post(f"{server.url}/rpc", params={"client_id": "nobody", "workspace": workspace}, content=frame)
            assert answer.status_code == 400 and "GET /rpc" in answer.json()["detail"]
        assert calls == []
        await victim.disconnect()

    run(main())


def test_stream_admission_and_limits(server):
    async def main():
        forged = hypha_token("eve", secret="not-the-server-secret-but-long-enough-to-sign-with-0123456789")
        stream = RawStream(server.url, "eve-client", token=forged)
        assert await stream.open() == 401
        await stream.close()
        # Anonymous users may not open a stream in someone else's workspace.
        stream = RawStream(server.url, "eve-client", workspace="ws-user-alice")
        assert await stream.open() == 403
        await stream.close()
        # A manager id is the server's.
        stream = RawStream(server.url, "manager-x")
        assert await stream.open() == 400
        await stream.close()

        stream = RawStream(server.url, "raw-http")
        assert await stream.open() == 200
        assert stream.response.headers["content-type"] == "application/x-msgpack-stream"
        [info] = await stream.next()
        assert info["type"] == "connection_info" and info["client_id"] == "raw-http"
        assert info["workspace"].startswith("ws-user-anonymouz-")
        stream.params["workspace"] = info["workspace"]
        # The session cookie came with the stream, so the POSTs below speak for it.
        answer = await stream.post(msgpack.packb({"type": "refresh_token"}))
        assert answer.status_code == 200
        [token_message] = await stream.next()
        assert token_message["type"] == "reconnection_token" and token_message["reconnection_token"]
        # Refused on its declared length, before a byte of the body is read.
        cookie = "; ".join(f"{name}={value}" for name, value in stream.client.cookies.items())
        status, text = await announce_body(server.url, "/rpc?" + urlencode(stream.params), 3 * 1024 * 1024,
                                           headers={"Cookie": cookie})
        assert status == 413 and "chunked" in text, text
        answer = await stream.post(b"")
        assert answer.status_code == 400
        answer = await stream.post(b"\xc1 not msgpack")
        assert answer.status_code == 422
        # A frame that claims a server-only method is refused, and the stream stays usable.
        answer = await stream.post(msgpack.packb({"type": "method", "to": "*", "method": "x"}) + msgpack.packb({"args": []}))
        assert answer.status_code in (200, 422)
        answer = await stream.post(msgpack.packb({"type": "ping"}))
        assert answer.status_code == 200
        while (await stream.next())[0].get("type") != "pong":
            pass
        await stream.close()

    run(main())


def test_reconnection_token_reopens_the_same_client(server):
    async def main():
        stream = RawStream(server.url, "comeback")
        assert await stream.open() == 200
        [info] = await stream.next()
        await stream.close()
        again = RawStream(server.url, "comeback")
        again.params.update(workspace=info["workspace"], reconnection_token=info["reconnection_token"])
        assert await again.open() == 200
        [info2] = await again.next()
        assert info2["workspace"] == info["workspace"]
        await again.close()
        # Another client id cannot use that token.
        thief = RawStream(server.url, "thief")
        thief.params.update(workspace=info["workspace"], reconnection_token=info["reconnection_token"])
        assert await thief.open() in (401, 403)
        await thief.close()

    run(main())
