"""Attacks that need a separate server process (its memory, its log) or the real client on the
receiving end; each asserts that the attacker gains nothing and a normal client still works."""

import asyncio
import json
import re
import threading
import time
from pathlib import Path

import msgpack
import pytest
import websockets
from hypha_rpc import connect_to_server

from conftest import Server, json_line, node_background, run, wait_for

pytestmark = pytest.mark.timeout(180)


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class PeakRss:
    """Samples a process's resident memory every 20 ms until stopped; keeps the peak."""

    def __init__(self, pid):
        self.pid, self.peak, self.running = pid, rss_kib(pid), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.02)

    def stop(self):
        self.running = False
        self.thread.join(timeout=5)
        return self.peak


async def raw_connect(url, client_id):
    ws = await websockets.connect(url, max_size=None)
    await ws.send(json.dumps({"client_id": client_id, "workspace": None, "token": None, "reconnection_token": None}))
    info = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert info["type"] == "connection_info", info
    return ws, info


async def raw_call(ws, to, method, args, session, wait=True, extra=None):
    header = {"type": "method", "to": to, "method": method, "session": session}
    body = {"args": args, "promise": "*", "t": 30, **(extra or {})}
    await ws.send(msgpack.packb(header) + msgpack.packb(body))
    if not wait:
        return None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        message = await asyncio.wait_for(ws.recv(), 20)
        if isinstance(message, str):
            continue
        unpacker = msgpack.Unpacker()
        unpacker.feed(message)
        parts = list(unpacker)
        method_name = parts[0].get("method", "")
        if method_name == f"{session}.resolve":
            return parts[1]["args"][0]
        if method_name == f"{session}.reject":
            raise RuntimeError(parts[1]["args"][0]["_rvalue"])
    raise AssertionError(f"no answer to {session}")


def nils(count):
    """A msgpack array of `count` nils: one byte each on the wire."""
    return b"\xdd" + count.to_bytes(4, "big") + b"\xc0" * count


def test_amplifying_messages_leave_memory_bounded():
    server = Server().start()
    try:
        async def main():
            witness = await connect_to_server({"server_url": server.url})
            await witness.echo("warm up")
            baseline = rss_kib(server.proc.pid)
            peak = PeakRss(server.proc.pid)
            ws, info = await raw_connect(server.ws_url, "amplifier")
            manager = f"*/{info['manager_id']}"
            cache = "services.built-in.message_cache."
            # 15 MB of nils through the message cache, then process: refused before decoding.
            count = 15 * 1024 * 1024
            message = msgpack.packb({"type": "method", "to": manager, "method": "services.default.echo"})
            message += b"\x81\xa4args\x91" + nils(count)
            await raw_call(ws, manager, cache + "create", ["big"], "c0")
            for i in range(0, len(message), 256 * 1024):
                await raw_call(ws, manager, cache + "set", ["big", i // (256 * 1024), message[i:i + 256 * 1024]], f"s{i}")
            await raw_call(ws, manager, cache + "process", ["big"], "p0")
            # Three 2 MiB frames of nils calling echo, whose answers are never read.
            frame_nils = 2 * 1024 * 1024 - 200
            for n in range(3):
                header = msgpack.packb({"type": "method", "to": manager, "method": "services.default.echo", "session": f"e{n}"})
                body = b"\x83\xa4args\x91" + nils(frame_nils) + b"\xa7promise\xa1*\xa1t\x1e"
                await ws.send(header + body)
            await asyncio.sleep(0)
            assert await witness.echo("still here") == "still here"
            # The refusals arrive as answers to the calls that had a promise.
            errors = []
            deadline = time.monotonic() + 10
            while len(errors) < 3 and time.monotonic() < deadline:
                message = await asyncio.wait_for(ws.recv(), 10)
                if isinstance(message, bytes):
                    unpacker = msgpack.Unpacker()
                    unpacker.feed(message)
                    parts = list(unpacker)
                    if parts[0].get("method", "").endswith(".reject"):
                        errors.append(parts[1]["args"][0]["_rvalue"])
            assert len(errors) == 3 and all("holds more than" in e or "to decode" in e for e in errors), errors
            grown = peak.stop() - baseline
            # Sent: about 21 MB. Decoded naively it would take over 1 GB.
            assert grown < 120 * 1024, f"RSS grew by {grown} KiB"
            await ws.close()
            await witness.disconnect()

        run(main())
        assert server.alive()
    finally:
        server.stop()


async def vault_and_stranger(server, alice_id, stranger_id):
    """A real client offering a protected `vault.reveal` (its calls' contexts are recorded), and
    a raw connection from another workspace: (alice, calls, stranger, alice's address)."""
    alice = await connect_to_server({"server_url": server.url, "client_id": alice_id})
    calls = []

    def reveal(context=None):
        calls.append(context)
        return "the secret"

    await alice.register_service({"id": "vault", "config": {"visibility": "protected", "require_context": True},
                                  "reveal": reveal})
    stranger, _ = await raw_connect(server.ws_url, stranger_id)
    return alice, calls, stranger, f"{alice.config.workspace}/{alice_id}"


def test_a_chunked_call_cannot_pass_for_the_owner_of_a_real_client(server):
    async def main():
        alice, calls, ws, target = await vault_and_stranger(server, "alice-cli", "mallory")
        cache = "services.built-in.message_cache."
        # The assembled message names alice's own workspace as its sender.
        main_part = msgpack.packb({"type": "method", "method": "services.vault.reveal", "session": "m1"})
        forged = main_part + msgpack.packb({"args": [], "promise": "*", "t": 10, "from": f"{alice.config.workspace}/x",
                                            "padding": b"\0" * 600_000})
        await raw_call(ws, target, cache + "create", ["k1", False], "c1")
        for i in range(0, len(forged), 256 * 1024):
            await raw_call(ws, target, cache + "set", ["k1", i // (256 * 1024), forged[i:i + 256 * 1024], False], f"s{i}")
        with pytest.raises(RuntimeError, match='carries "from"'):
            await raw_call(ws, target, cache + "process", ["k1", False], "p1")

        # Alice's client got the chunks and keeps them until a process or remove that will not
        # come: the server tells it to remove them, as it does when a sender leaves mid-way.
        async def alice_holds_nothing():
            return not alice.rpc._object_store.get("message_cache")

        await wait_for(alice_holds_nothing, 10, "alice's client to drop the refused message")
        await raw_call(ws, target, cache + "create", ["k2", False], "c2")
        await raw_call(ws, target, cache + "set", ["k2", 0, main_part, False], "s2")
        assert len(alice.rpc._object_store["message_cache"]) == 1
        # Directly, in one frame, the same.
        with pytest.raises(RuntimeError, match='carries "from"'):
            await raw_call(ws, target, "services.vault.reveal", [], "d1", extra={"from": f"{alice.config.workspace}/x"})
        with pytest.raises(RuntimeError, match='carries "ctx"'):
            await raw_call(ws, target, "services.vault.reveal", [], "d2",
                           extra={"ctx": {"from": f"{alice.config.workspace}/x", "ws": alice.config.workspace}})
        # An honest call from another workspace is refused by alice's own client, as it should be.
        with pytest.raises(RuntimeError, match="Permission denied"):
            await raw_call(ws, target, "services.vault.reveal", [], "h1")
        assert calls == []
        await ws.close()
        await wait_for(alice_holds_nothing, 10, "alice's client to drop what a sender that left began")
        await alice.disconnect()

    run(main())


async def answers(ws, sessions, any_of=()):
    """Reads `ws` until each of `sessions`, and one of `any_of` if given, is answered:
    {session: ("resolve" | "reject", value)}."""
    found = {}
    deadline = time.monotonic() + 20

    def done():
        return all(s in found for s in sessions) and (not any_of or any(s in found for s in any_of))

    while not done() and time.monotonic() < deadline:
        try:
            message = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            break
        if isinstance(message, str):
            continue
        unpacker = msgpack.Unpacker()
        unpacker.feed(message)
        parts = list(unpacker)
        session, _, outcome = parts[0].get("method", "").rpartition(".")
        if (session in sessions or session in any_of) and outcome in ("resolve", "reject"):
            found[session] = (outcome, parts[1]["args"][0])
    assert done(), f"answered: {found}, waited for {sessions} and one of {any_of}"
    return found


def test_a_receiver_that_reconnects_assembles_only_what_the_server_saw(server):
    async def main():
        alice, calls, ws, target = await vault_and_stranger(server, "alice-re", "mallory-re")
        cache = "services.built-in.message_cache."
        # A whole forged message (its body names alice's workspace as the sender) sits in
        # alice's cache, never processed.
        forged = msgpack.packb({"type": "method", "method": "services.vault.reveal", "session": "m1"})
        forged += msgpack.packb({"args": [], "promise": "*", "t": 10, "from": f"{alice.config.workspace}/x"})
        await raw_call(ws, target, cache + "create", ["k3", False], "c1")
        await raw_call(ws, target, cache + "set", ["k3", 0, forged, False], "s1")
        # Alice's connection drops; her client comes back by itself and keeps its cache.
        await alice.rpc._connection._websocket.close()
        assert await alice.echo("back") == "back"
        held = alice.rpc._object_store.get("message_cache") or {}
        assert any(key.startswith("k3~") for key in held), held
        # The same key again, a clean message appended, processed: the server scanned only the
        # clean one, and alice's client must assemble only that (it then refuses the stranger).
        clean = msgpack.packb({"type": "method", "method": "services.vault.reveal", "session": "m2"})
        clean += msgpack.packb({"args": [], "promise": "*", "t": 10})
        # (An attacker would go on whatever the create answered.)
        await raw_call(ws, target, cache + "create", ["k3", False], "c2", wait=False)
        created = await answers(ws, {"c2"})
        await raw_call(ws, target, cache + "append", ["k3", clean, False], "a2")
        await raw_call(ws, target, cache + "process", ["k3", False], "p2", wait=False)
        answered = await answers(ws, {"p2"}, any_of={"m1", "m2"})
        assert calls == [] and "m1" not in answered, answered
        assert answered["m2"][0] == "reject" and "Permission denied" in answered["m2"][1]["_rvalue"], answered
        assert created["c2"][0] == "resolve" and answered["p2"][0] == "resolve", (created, answered)
        await ws.close()
        await alice.disconnect()

    run(main())


def test_a_receiver_that_fails_to_process_a_message_is_told_to_drop_it(server):
    async def main():
        alice, calls, ws, target = await vault_and_stranger(server, "alice-fp", "mallory-fp")
        cache = "services.built-in.message_cache."
        # Number keys: the JavaScript clients read them, the Python client's decoder refuses
        # them, and its process then fails before it deletes the chunks.
        message = msgpack.packb({"type": "method", "method": "services.vault.reveal", "session": "m5"})
        message += msgpack.packb({"args": [{1: "one"}], "promise": "*", "t": 10})
        await raw_call(ws, target, cache + "create", ["k5", False], "c5")
        await raw_call(ws, target, cache + "append", ["k5", message, False], "a5")
        with pytest.raises(RuntimeError, match="int is not allowed for map key"):
            await raw_call(ws, target, cache + "process", ["k5", False], "p5")

        # The server saw the reject go back: the receiver is told to remove what it kept.
        async def alice_holds_nothing():
            return not alice.rpc._object_store.get("message_cache")

        await wait_for(alice_holds_nothing, 10, "alice's client to drop the message it failed to process")
        assert calls == []
        await ws.close()
        await alice.disconnect()

    run(main())


def test_client_log_lines_cannot_be_forged_or_flood_the_log():
    server = Server().start()
    try:
        async def main():
            client = await connect_to_server({"server_url": server.url})
            await client.log("hello\n2026-12-02T00:00:00Z ERROR forged by a client\r\x1b[31mred")
            before = server.log.stat().st_size
            with pytest.raises(Exception):
                for _ in range(20):
                    await client.log("x" * 1_000_000)
            assert await client.echo("ok") == "ok"
            await client.disconnect()
            return before

        before = run(main())
        log = server.log.read_text()
        assert not re.search(r"^2026-12-02T00:00:00Z ERROR forged", log, re.MULTILINE), log[-2000:]
        assert "\\n2026-12-02T00:00:00Z ERROR forged" in log
        assert "\x1b[31m" not in log
        grown = server.log.stat().st_size - before
        # At most five messages (the anonymous burst), each cut to 1,000 characters.
        assert grown < 20_000, grown
    finally:
        server.stop()


async def refused(ws, data, session=None):
    """Sends raw `data`; returns the server's refusal: its error message, or the reject of
    `session`. Fails if the frame was answered otherwise or not at all."""
    await ws.send(data)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            message = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            break
        if isinstance(message, str):
            error = json.loads(message)
            if error.get("type") == "error":
                return error["message"]
            continue
        unpacker = msgpack.Unpacker()
        unpacker.feed(message)
        parts = list(unpacker)
        if session and parts[0].get("method") == f"{session}.reject":
            return parts[1]["args"][0]["_rvalue"]
    raise AssertionError("the frame was not refused")


def test_a_node_client_survives_what_its_decoder_would_die_of(server):
    """The JavaScript client decodes and fires a frame outside any try: each of these would end
    its Node process (or make it read a name the server did not). Refused, it lives on."""
    proc = node_background("provider.mjs", server.url, "js-victim")
    try:
        ws_name = json_line(proc.stdout, "READY ")["workspace"]
        target = f"{ws_name}/js-victim"

        def header(**extra):
            return msgpack.packb({"type": "method", "to": target, "method": "services.js-math.add", **extra})

        def with_raw_key(raw):
            # A header {"to": target, <raw key>: 1} with the key's bytes as given.
            return b"\x82" + msgpack.packb("to") + msgpack.packb(target) + bytes([0xa0 | len(raw)]) + raw + b"\x01"

        body_end = msgpack.packb("promise") + msgpack.packb("*") + msgpack.packb("t") + msgpack.packb(5)
        cases = [
            # `__proto__` written overlong (C1 9F is `_` to its decoder): a header key.
            (with_raw_key(b"\xc1\x9f_proto__"), None, "not valid UTF-8"),
            # A type that is an array (read as the property "constructor").
            (b"\x82" + msgpack.packb("to") + msgpack.packb(target) + b"\xa4type\x91\xabconstructor", None,
             "must be a string"),
            (msgpack.packb({"type": "constructor", "to": target}), None, "every JavaScript object has"),
            # In a call's body: a nil key, a `__proto__` key, an odd timestamp, an array type.
            (header(session="b1") + b"\x83\xa4args\x91\x81\xc0\x01" + body_end, "b1", "map key that is nil"),
            (header(session="b2") + b"\x83\xa4args\x91\x81\xa9__proto__\x01" + body_end, "b2", "__proto__"),
            (header(session="b3") + b"\x83\xa4args\x91\xc7\x03\xff\x00\x00\x00" + body_end, "b3", "timestamp"),
            (header(session="b4") + b"\x84\xa4args\x90\xa4type\x91\xabconstructor" + body_end, "b4",
             "type that is not a string"),
        ]

        async def main():
            ws, _ = await raw_connect(server.ws_url, "mallory-js")
            for data, session, expected in cases:
                message = await refused(ws, data, session)
                assert expected in message, (expected, message)
            await ws.close()
            assert proc.poll() is None, proc.stderr.read()
            c = await connect_to_server({"server_url": server.url})
            svc = await c.get_service(f"{target}:js-math")
            assert await svc.add(20, 22) == 42
            await c.disconnect()

        run(main())
    finally:
        proc.stdin.close()
        proc.wait(timeout=20)
