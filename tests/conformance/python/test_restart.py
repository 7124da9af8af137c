"""The server restarts: clients reconnect on their own and their services come back."""

import asyncio
import time

import pytest
from hypha_rpc import connect_to_server

from conftest import Server, hypha_token, run

pytestmark = pytest.mark.timeout(180)


def test_clients_reconnect_and_reregister_after_restart():
    server = Server().start()
    try:

        async def main():
            token = hypha_token("dave")
            a = await connect_to_server({"server_url": server.url, "token": token, "client_id": "stay-a"})
            await a.register_service({"id": "counter", "config": {"visibility": "protected"}, "inc": lambda x: x + 1})
            b = await connect_to_server({"server_url": server.url, "token": token, "client_id": "stay-b"})
            assert await (await b.get_service("stay-a:counter")).inc(1) == 2

            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)

            deadline = time.monotonic() + 60
            last = None
            while time.monotonic() < deadline:
                try:
                    svc = await b.get_service("stay-a:counter")
                    assert await svc.inc(41) == 42
                    break
                except Exception as exc:  # noqa: BLE001 - polling until the clients are back
                    last = exc
                    await asyncio.sleep(0.2)
            else:
                raise AssertionError(f"services did not come back after the restart: {last}")
            await a.disconnect()
            await b.disconnect()

        run(main(), timeout=150)
    finally:
        server.stop()
