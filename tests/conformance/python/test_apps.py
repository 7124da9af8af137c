"""ASGI apps through the server (`/{workspace}/apps/{service}/...`) with the real Python
client as the app's provider: request bodies streamed in, responses streamed out as they come,
the caller's identity in the app's context and its credentials kept from the app, and the
refusals (protected apps, oversized bodies, callbacks called by someone else)."""

import asyncio
import hashlib
import json

import httpx
import pytest
from hypha_rpc import connect_to_server

from conftest import announce_body, hypha_token, run

pytestmark = pytest.mark.timeout(180)


def asgi_service(service_id, app, visibility="public", seen=None):
    """What the client's register_asgi_service registers, without its FastAPI import."""

    async def serve(args, context=None):
        if seen is not None:
            seen.append({"user": context["user"]["id"], "receive": args["receive"]._encoded_method})
        await app(args["scope"], args["receive"], args["send"])

    return {"id": service_id, "type": "asgi", "serve": serve, "config": {"visibility": visibility, "require_context": True}}


async def read_body(receive):
    body = b""
    while True:
        message = await receive()
        assert message["type"] == "http.request", message
        body += message["body"]
        if not message.get("more_body"):
            return body


async def respond(send, status, payload, content_type=b"application/json"):
    await send({"type": "http.response.start", "status": status, "headers": [[b"content-type", content_type], [b"x-app", b"yes"]]})
    await send({"type": "http.response.body", "body": payload})


def test_requests_reach_the_app_and_answers_stream_back(server):
    async def main():
        token = hypha_token("appowner", {"lab-apps": "rw"})
        provider = await connect_to_server({"server_url": server.url, "token": token, "workspace": "lab-apps", "client_id": "web"})
        release = asyncio.Event()
        seen = []

        async def app(scope, receive, send):
            if scope["path"] == "/echo":
                body = await read_body(receive)
                headers = {k.decode(): v.decode() for k, v in scope["headers"]}
                await respond(send, 201, json.dumps({
                    "method": scope["method"], "path": scope["path"], "query": scope["query_string"].decode(),
                    "size": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                    "has_authorization": "authorization" in headers, "has_cookie": "cookie" in headers,
                    "custom": headers.get("x-custom"),
                }).encode())
            elif scope["path"] == "/events":
                await send({"type": "http.response.start", "status": 200, "headers": [[b"content-type", b"text/event-stream"]]})
                await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
                # The rest only once the client has read the first event: proof it streamed.
                await asyncio.wait_for(release.wait(), 30)
                await send({"type": "http.response.body", "body": b"data: second\n\n", "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            elif scope["path"] == "/fail":
                raise RuntimeError("the instrument is unplugged")
            else:
                await respond(send, 404, b'{"detail": "Not Found"}')

        await provider.register_service(asgi_service("scope-web", app, seen=seen))
        base = f"{server.url}/lab-apps/apps/scope-web"
        body = bytes(range(256)) * (3 * 4096)  # 3 MiB
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(f"{base}/echo?x=1&y=2", content=body,
                                headers={"Authorization": f"Bearer {token}", "Cookie": "access_token=secret", "X-Custom": "kept"})
            assert r.status_code == 201, r.text
            assert r.headers["x-app"] == "yes"
            assert r.json() == {"method": "POST", "path": "/echo", "query": "x=1&y=2", "size": len(body),
                                "sha256": hashlib.sha256(body).hexdigest(), "has_authorization": False,
                                "has_cookie": False, "custom": "kept"}
            # The app's context names the caller, as the server decided it.
            assert seen[-1]["user"] == "appowner"
            r = await http.get(f"{base}/echo")
            assert r.status_code == 201 and r.json()["size"] == 0 and r.json()["method"] == "GET"
            assert seen[-1]["user"] == "http-anonymous" or seen[-1]["user"].startswith("anonymouz-"), seen[-1]

            async with http.stream("GET", f"{base}/events") as r:
                assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
                chunks = r.aiter_text()
                first = await asyncio.wait_for(chunks.__anext__(), 10)
                assert first == "data: first\n\n"
                release.set()
                rest = "".join([c async for c in chunks])
                assert rest == "data: second\n\n"

            r = await http.get(f"{base}/fail")
            assert r.status_code == 500 and "the instrument is unplugged" in r.text
            assert (await http.get(f"{base}/nowhere")).status_code == 404
            r = await http.get(f"{server.url}/lab-apps/apps/none-such/")
            assert r.status_code == 404

        # A service that is not an ASGI app is not served as one.
        await provider.register_service({"id": "plain", "config": {"visibility": "public"}, "f": lambda: 1})
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.get(f"{server.url}/lab-apps/apps/plain/")
            assert r.status_code == 404 and "is not an ASGI app" in r.text
        await provider.disconnect()
        # Its provider gone, the app is gone.
        async with httpx.AsyncClient(timeout=30) as http:
            assert (await http.get(f"{base}/echo")).status_code == 404

    run(main())


def test_app_refusals(server):
    async def main():
        token = hypha_token("appguard", {"lab-guard": "rw"})
        provider = await connect_to_server({"server_url": server.url, "token": token, "workspace": "lab-guard", "client_id": "web"})
        seen = []

        async def app(scope, receive, send):
            await read_body(receive)
            await respond(send, 200, b'{"ok": true}')

        await provider.register_service(asgi_service("private-web", app, visibility="protected", seen=seen))
        await provider.register_service(asgi_service("public-web", app, seen=seen))
        async with httpx.AsyncClient(timeout=30) as http:
            # Protected: only callers who may use the workspace's services.
            assert (await http.get(f"{server.url}/lab-guard/apps/private-web/")).status_code == 403
            outsider = hypha_token("outsider-apps")
            r = await http.get(f"{server.url}/lab-guard/apps/private-web/", headers={"Authorization": f"Bearer {outsider}"})
            assert r.status_code == 403
            r = await http.get(f"{server.url}/lab-guard/apps/private-web/", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200 and r.json() == {"ok": True}
            # Anonymous callers send at most 1 MiB; signed-in ones 16 MiB.
            # (Announced with Content-Length, refused before a byte of it is read.)
            status, text = await announce_body(server.url, "/lab-guard/apps/public-web/", 1024 * 1024 + 1)
            assert status == 413 and "at most 1048576 bytes" in text, text
            r = await http.post(f"{server.url}/lab-guard/apps/public-web/", content=b"x" * (1024 * 1024 + 1),
                                headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200

        # The callbacks handed to the app answer its provider alone: another client that
        # learns their address is refused.
        hijack = {}

        async def slow_app(scope, receive, send):
            hijack["method"] = seen[-1]["receive"]
            await asyncio.wait_for(hijack_done.wait(), 30)
            await read_body(receive)
            await respond(send, 200, b'{"ok": true}')

        hijack_done = asyncio.Event()
        await provider.register_service(asgi_service("slow-web", slow_app, seen=seen))
        attacker = await connect_to_server({"server_url": server.url, "token": hypha_token("mallory")})
        async with httpx.AsyncClient(timeout=30) as http:
            pending = asyncio.ensure_future(http.post(f"{server.url}/lab-guard/apps/slow-web/", content=b"private body"))
            for _ in range(300):
                if "method" in hijack:
                    break
                await asyncio.sleep(0.05)
            encoded = dict(hijack["method"])
            stolen = attacker.rpc._generate_remote_method(encoded)
            with pytest.raises(Exception, match="belongs to another client"):
                await stolen()
            hijack_done.set()
            r = await pending
            assert r.status_code == 200
        await attacker.disconnect()
        await provider.disconnect()

    run(main())
