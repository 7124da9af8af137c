"""Several instances behind one address: two hypha-rtc processes sharing Debian's redis-server
and a PostgreSQL database, driven by the real Python hypha-rpc client."""

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
from hypha_rpc import connect_to_server, get_rtc_service, register_rtc_service

from conftest import BIN, COTURN_SECRET, Server, allocate, free_port, hypha_token, run, wait_until
from test_login import PASSWORD, post_form

pytestmark = pytest.mark.timeout(240)


class Redis:
    """A private redis-server on a loopback port, without persistence: a restart loses all."""

    def __init__(self, *extra, password=None):
        assert shutil.which("redis-server"), "Redis is not installed (Debian package redis-server)"
        self.port = free_port()
        self.proc = None
        self.extra = list(extra)
        self.password = password
        self.start()

    @property
    def uri(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", "/tmp", *self.extra]
            + (["--requirepass", self.password] if self.password else []),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, 15, "redis-server to answer PING")

    def ping(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            if self.password:
                s.sendall(f"AUTH {self.password}\r\n".encode())
                assert s.recv(16).startswith(b"+OK")
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def command(self, *args):
        """Sends one command (signed in as the default user where there is a password) and
        returns the raw reply."""
        def encode(*words):
            return f"*{len(words)}\r\n".encode() + b"".join(
                f"${len(w.encode())}\r\n{w}\r\n".encode() for w in words)

        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            if self.password:
                s.sendall(encode("AUTH", self.password))
                assert s.recv(64).startswith(b"+OK")
            s.sendall(encode(*args))
            return s.recv(4096)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Balancer:
    """A small TCP balancer: each connection goes to the first backend that accepts it."""

    def __init__(self, backends):
        self.backends = backends
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10), "the balancer did not start"

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        ready.set()
        self.loop.run_forever()

    async def _serve(self, reader, writer):
        for port in self.backends:
            try:
                up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
                break
            except OSError:
                continue
        else:
            writer.close()
            return

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def stop(self):
        async def shutdown():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def redis():
    r = Redis()
    yield r
    r.stop()


def instance(name, redis, database_url, coturn):
    """An instance that the others link to directly (frames between instances skip Redis);
    its link's port is `link_port`."""
    link_port = free_port()
    server = Server("--server-id", name, "--redis-uri", redis.uri, "--database-url", database_url,
                    "--coturn-secret", COTURN_SECRET, "--coturn-uri", f"127.0.0.1:{coturn.port}",
                    "--instance-link", f"127.0.0.1:{link_port}")
    server.link_port = link_port
    return server


@pytest.fixture
def pair(redis, postgres, coturn):
    """Two fresh instances sharing Redis and one new database."""
    _, database_url = postgres.new_database()
    suffix = free_port()
    one = instance(f"one-{suffix}", redis, database_url, coturn).start()
    two = instance(f"two-{suffix}", redis, database_url, coturn).start()
    yield one, two
    one.stop()
    two.stop()


async def poll(what, check, timeout=30):
    """Awaits `check()` until it returns a true value or raises nothing; returns that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = await check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - polling; the last error is reported
            last = exc
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def test_a_service_on_one_instance_is_used_from_the_other(pair, coturn):
    one, two = pair

    async def main():
        token = hypha_token("ann")
        a = await connect_to_server({"server_url": one.url, "token": token, "client_id": "prov"})
        b = await connect_to_server({"server_url": two.url, "token": token, "client_id": "cons"})
        assert a.config.manager_id != b.config.manager_id
        added = asyncio.Queue()
        b.on("service_added", lambda event: added.put_nowait(event["data"]))
        await b.subscribe(["service_added", "client_disconnected"])

        await a.register_service({
            "id": "lab", "config": {"visibility": "protected"},
            "size": lambda data: len(data), "echo": lambda data: data, "add": lambda x, y: x + y,
        })
        event = await asyncio.wait_for(added.get(), 10)
        assert event["id"].endswith("/prov:lab")

        listed = await b.list_services()
        assert any(s["id"].endswith("/prov:lab") for s in listed), listed
        clients = await b.list_clients()
        assert any(c.endswith("/prov") for c in clients) and any(c.endswith("/cons") for c in clients), clients

        lab = await b.get_service("prov:lab")
        assert await lab.add(2, 40) == 42
        big = os.urandom(4 * 1024 * 1024)
        assert await lab.size(big) == len(big)
        assert await lab.echo(big) == big

        # The processes of both chunked messages (b's call, vetted by two; a's answer, vetted
        # by one) were answered across the instances under the sessions their callers chose.
        async def all_answered():
            pending = [c.rpc.get_session_stats()["promise_sessions"] for c in (a, b)]
            awaited = []
            for server in (one, two):
                _, metrics, _ = await asyncio.to_thread(server.http_text, "/metrics")
                awaited.append(re.search(r"^hypha_rtc_chunked_answers_awaited (\d+)", metrics, re.M).group(1))
            return pending == [0, 0] and awaited == ["0", "0"]

        await poll("both chunked messages' processes to be answered", all_answered, timeout=10)

        # ICE credentials from either instance allocate on the same coturn.
        for server in (a, b):
            servers = await server.get_rtc_ice_servers()
            assert (await allocate(servers[0], coturn.port))[0] == "127.0.0.1"

        # WebRTC: registered through one instance, reached through the other.
        await register_rtc_service(a, "lab-rtc", {"visibility": "protected", "ice_servers": []})
        pc = await get_rtc_service(b, f"{a.config.workspace}/lab-rtc", {"ice_servers": []})
        over_rtc = await pc.get_service("lab")
        assert await over_rtc.add(1, 1) == 2
        await pc.close()

        # The manager's data is in the shared store (PostgreSQL here); ping crosses instances.
        await a.set_env("SHARED", {"from": "one"})
        assert await b.get_env("SHARED") == {"from": "one"}
        await a.log_event("scan.done", {"n": 1})
        assert [e["data"] for e in await b.get_events("scan.done")] == [{"n": 1}]
        await a.register_service_type({"id": "scope", "name": "Scope", "definition": {"snap": {}}})
        assert [t["id"] for t in await b.list_service_types()] == [f"{a.config.workspace}/scope"]
        assert await b.ping("prov") == "pong"
        await a.disconnect()
        await b.disconnect()

    run(main(), timeout=180)
    for server in (one, two):
        _, metrics, _ = server.http_text("/metrics")
        values = dict(line.split(" ", 1) for line in metrics.splitlines() if line and not line.startswith("#"))
        assert values["hypha_rtc_bus_up"] == "1"
        assert int(values["hypha_rtc_bus_sent_total"]) > 0 and int(values["hypha_rtc_bus_received_total"]) > 0
        # The frames went over the direct link each way, not through Redis.
        assert values["hypha_rtc_bus_links"] == "1", metrics
        status, ready, _ = server.http("/health/readiness")
        assert status == 200 and ready["redis"]["state"] == "ok", ready


def test_sigterm_waits_for_a_call_from_the_other_instance(pair):
    """A call from a client of one instance to a client of the other keeps the callee's
    instance from stopping until it is answered, and no longer: an answered HTTP service call
    (the other instance's manager calling the client's protected service) holds nothing up."""
    one, two = pair

    def resolved(server):
        _, metrics, _ = server.http_text("/metrics")
        found = re.search(r'^hypha_rtc_calls_total\{outcome="resolved"\} (\d+)', metrics, re.M)
        assert found, metrics
        return int(found.group(1))

    async def main():
        token = hypha_token("ida")
        callee = await connect_to_server({"server_url": two.url, "token": token, "client_id": "slow"})
        started = asyncio.Event()

        async def slow(x):
            started.set()
            await asyncio.sleep(2)
            return x + 1

        await callee.register_service({"id": "slow", "config": {"visibility": "protected"}, "f": slow,
                                       "quick": lambda x: x + 1})
        caller = await connect_to_server({"server_url": one.url, "token": token, "client_id": "waits"})
        svc = await caller.get_service("slow:slow")
        assert await svc.quick(1) == 2
        assert resolved(one) >= 1
        # Counted once in the cluster: by the caller's instance, not the callee's too.
        assert resolved(two) == 0
        # An HTTP call through the caller's instance: that instance's manager calls the
        # callee, whose client lets only its own manager into a protected service.
        status, body, _ = await asyncio.to_thread(one.http, "/ws-user-ida/services/slow/quick?x=1", token)
        assert (status, body) == (200, 2), body
        call = asyncio.ensure_future(svc.f(41))
        await asyncio.wait_for(started.wait(), 10)
        sent = time.monotonic()
        two.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(call, 15) == 42
        answered = time.monotonic()
        assert answered - sent > 1.0, "the call was answered before the shutdown waited for it"
        # The callee stays connected: nothing else it was called for may hold the stop (the
        # wait would last the whole --shutdown-timeout, 20 s).
        assert await asyncio.to_thread(two.proc.wait, 10) == 0
        assert time.monotonic() - answered < 8, "the stop waited for a call already answered"
        await asyncio.wait_for(caller.disconnect(), 5)

    run(main())


def test_a_chunked_answer_across_instances_holds_neither_stop(pair):
    """A call answered in chunks (a result larger than one frame) by a client of the other
    instance has ended on both instances: neither one's graceful stop waits for it."""
    one, two = pair

    async def main():
        token = hypha_token("ida")
        callee = await connect_to_server({"server_url": two.url, "token": token, "client_id": "big"})

        async def big(n):
            return b"x" * n

        await callee.register_service({"id": "big", "config": {"visibility": "protected"}, "f": big})
        caller = await connect_to_server({"server_url": one.url, "token": token, "client_id": "asks"})
        svc = await caller.get_service("big:big")
        assert len(await svc.f(3 * 1024 * 1024)) == 3 * 1024 * 1024
        assert len(await svc.f(10)) == 10
        sent = time.monotonic()
        # Both clients stay connected: only a call still counted would hold a stop (for the
        # whole --shutdown-timeout, 20 s).
        one.proc.send_signal(signal.SIGTERM)
        two.proc.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(asyncio.to_thread(one.proc.wait, 30), asyncio.to_thread(two.proc.wait, 30))
        return codes, time.monotonic() - sent

    codes, took = run(main())
    assert codes == [0, 0]
    assert took < 8, f"a graceful stop waited {took:.1f} s for a call already answered"


def test_a_workspace_made_on_one_instance_is_owned_and_deleted_on_both(pair):
    one, two = pair

    async def main():
        owner_token = hypha_token("wanda")
        a = await connect_to_server({"server_url": one.url, "token": owner_token, "client_id": "wanda-one"})
        await a.create_workspace({"id": "shared-lab", "persistent": True})
        # The other instance reads it from the store within seconds: the owner gets in there.
        b = await poll("the workspace to reach the other instance", lambda: connect_to_server({
            "server_url": two.url, "token": owner_token, "workspace": "shared-lab", "client_id": "wanda-two"}))
        assert (await b.get_workspace_info())["owners"] == ["wanda"]
        guest_token = await b.generate_token({"workspace": "shared-lab", "permission": "read"})
        guest = await connect_to_server({"server_url": two.url, "token": guest_token, "workspace": "shared-lab",
                                         "client_id": "guest"})
        assert "shared-lab" in [w["id"] for w in await guest.list_workspaces()]
        admin = await connect_to_server({"server_url": two.url, "token": hypha_token("root-c", roles=["admin"])})
        # Deleted through the first instance: the connections on the second are closed too.
        await a.delete_workspace("shared-lab")

        async def closed():
            return await admin.list_clients("shared-lab") == []

        await poll("the second instance to close the deleted workspace's clients", closed)
        with pytest.raises(Exception, match="does not exist or is not accessible"):
            await connect_to_server({"server_url": two.url, "token": guest_token, "workspace": "shared-lab",
                                     "client_id": "guest-again"})
        await admin.disconnect()
        await a.disconnect()

    run(main(), timeout=120)


def test_sign_in_revocation_and_audit_are_shared(pair, postgres):
    one, two = pair
    database_url = next(a for a in one.extra if a.startswith("postgres://"))
    added = subprocess.run([BIN, "user", "add", "ada@example.org", "--password-stdin", "--database-url", database_url],
                           input=PASSWORD + "\n", capture_output=True, text=True, timeout=30)
    assert added.returncode == 0, added.stderr

    async def main():
        # Sign-in started on one instance, completed on the other, collected on the first.
        anon = await connect_to_server({"server_url": one.url})
        login = await anon.get_service("public/hypha-login")
        started = await login.start()
        status, body, _ = post_form(two, {"email": "ada@example.org", "password": PASSWORD, "key": started["key"]})
        assert status == 200, body
        token = await login.check(started["key"], timeout=10)
        await anon.disconnect()

        ada = await connect_to_server({"server_url": two.url, "token": token})
        assert ada.config.user["email"] == "ada@example.org"
        await ada.get_rtc_ice_servers()
        child = await ada.generate_token({"workspace": ada.config.workspace, "permission": "read_write"})
        probe = await connect_to_server({"server_url": one.url, "token": child})
        await probe.get_rtc_ice_servers()
        await probe.disconnect()
        # Revoked on one instance, refused by both.
        await ada.revoke_token(child)
        with pytest.raises(Exception, match="revoked"):
            await connect_to_server({"server_url": one.url, "token": child})
        with pytest.raises(Exception, match="revoked"):
            await connect_to_server({"server_url": two.url, "token": child})
        await ada.disconnect()

    run(main())
    # Both instances audited into the one database.
    database = database_url.rsplit("/", 1)[1]
    # (rows are written a few milliseconds after their answer)
    users = lambda: postgres.psql(database, "SELECT DISTINCT user_id FROM ice_credentials").split()
    wait_until(lambda: len(users()) == 2, 10, "both instances' audit rows")


def test_a_killed_instance_leaves_no_ghosts_and_its_clients_move(redis, postgres, coturn):
    _, database_url = postgres.new_database()
    suffix = free_port()
    one = instance(f"one-{suffix}", redis, database_url, coturn).start()
    two = instance(f"two-{suffix}", redis, database_url, coturn).start()
    # Clients of the first instance come in through a balancer that falls back to the second.
    balancer = Balancer([one.port, two.port])
    try:

        async def main():
            token = hypha_token("cal")
            a = await connect_to_server({"server_url": balancer.url, "token": token, "client_id": "mover"})
            await a.register_service({"id": "count", "config": {"visibility": "protected"}, "inc": lambda x: x + 1})
            b = await connect_to_server({"server_url": two.url, "token": token, "client_id": "watcher"})
            gone = asyncio.Queue()
            b.on("client_disconnected", lambda event: gone.put_nowait(event["data"]))
            await b.subscribe(["client_disconnected"])
            count = await b.get_service("mover:count")
            assert await count.inc(1) == 2

            # A client on the first instance that will not reconnect: its services must go.
            c = await connect_to_server({"server_url": one.url, "token": token, "client_id": "doomed"})
            await c.register_service({"id": "ghost", "config": {"visibility": "protected"}, "f": lambda: 1})
            ghost = await b.get_service("doomed:ghost")

            killed_at = time.monotonic()
            one.proc.send_signal(signal.SIGKILL)
            one.proc.wait(timeout=10)

            # A call to a client of the dead instance is refused at once, not timed out.
            started = time.monotonic()
            with pytest.raises(Exception, match="not connected"):
                await ghost.f()
            assert time.monotonic() - started < 3
            _, metrics, _ = two.http_text("/metrics")
            assert re.search(r'^hypha_rtc_calls_total\{outcome="peer_gone"\} [1-9]', metrics, re.M), metrics

            async def ghost_gone():
                listed = await b.list_services()
                return not any(s["id"].endswith("/doomed:ghost") for s in listed)

            await poll("the dead instance's services to vanish", ghost_gone, timeout=40)
            assert time.monotonic() - killed_at < 30
            event = await asyncio.wait_for(gone.get(), 10)
            assert event["id"] in ("doomed", "mover")

            async def mover_back():
                svc = await b.get_service("mover:count")
                return await svc.inc(41) == 42

            await poll("the moved client to be reachable again", mover_back, timeout=60)
            await b.disconnect()
            await a.disconnect()
            c_task = asyncio.ensure_future(c.disconnect())
            await asyncio.wait([c_task], timeout=2)

        run(main(), timeout=200)
    finally:
        balancer.stop()
        one.stop()
        two.stop()


def test_instances_recover_when_redis_restarts(redis, postgres, coturn):
    _, database_url = postgres.new_database()
    suffix = free_port()
    one = instance(f"one-{suffix}", redis, database_url, coturn).start()
    two = instance(f"two-{suffix}", redis, database_url, coturn).start()
    try:

        async def main():
            token = hypha_token("dee")
            a = await connect_to_server({"server_url": one.url, "token": token, "client_id": "before"})
            await a.register_service({"id": "early", "config": {"visibility": "protected"}, "f": lambda: "early"})
            b = await connect_to_server({"server_url": two.url, "token": token, "client_id": "caller"})
            assert await (await b.get_service("before:early")).f() == "early"

            await asyncio.to_thread(redis.stop)
            # Without Redis: the registry says so clearly, and local traffic goes on.
            with pytest.raises(Exception, match="Redis"):
                await b.list_services()
            with pytest.raises(Exception, match="Redis"):
                await b.register_service({"id": "during", "config": {"visibility": "protected"}, "f": lambda: 1})
            assert await b.echo("still here") == "still here"
            # TURN credentials come from the instance's own manager, which no other instance
            # can stand in for: nothing to ask Redis, so they are still handed out.
            for server in (one, two):
                status, servers, _ = await asyncio.to_thread(
                    server.http, "/public/services/coturn/get_rtc_ice_servers", token)
                assert status == 200, servers
                assert any(entry.get("credential") for entry in servers), servers
            ice = await b.get_service("public/coturn")
            assert any(entry.get("credential") for entry in await ice.get_rtc_ice_servers())
            await asyncio.to_thread(redis.start)

            # Both instances come back on their own; what was registered before is there again.
            async def early_back():
                return await (await b.get_service("before:early")).f() == "early"

            await poll("the service registered before the outage", early_back, timeout=30)
            await a.register_service({"id": "late", "config": {"visibility": "protected"}, "f": lambda: "late"})
            assert await (await b.get_service("before:late")).f() == "late"
            c = await connect_to_server({"server_url": two.url, "token": token, "client_id": "after"})
            await c.register_service({"id": "fresh", "config": {"visibility": "protected"}, "f": lambda: "fresh"})
            assert await (await a.get_service("after:fresh")).f() == "fresh"
            assert one.proc.poll() is None and two.proc.poll() is None
            for client in (a, b, c):
                await client.disconnect()

        run(main(), timeout=200)
    finally:
        one.stop()
        two.stop()


def test_redis_with_passwords_over_tcp_and_a_unix_socket(postgres, coturn, tmp_path):
    """Redis that asks for a password: one instance signs in as the default user over TCP, the
    other as an ACL user over a unix socket, and calls cross between them both ways; a wrong
    password stops the start with a message that names Redis and never shows the password."""
    sock = tmp_path / "redis.sock"
    redis = Redis("--unixsocket", str(sock), "--unixsocketperm", "700",
                  "--user", "bus", "on", ">bus-word", "~*", "&*", "+@all", password="main-word")
    _, database_url = postgres.new_database()
    common = ("--database-url", database_url, "--coturn-secret", COTURN_SECRET,
              "--coturn-uri", f"127.0.0.1:{coturn.port}")
    suffix = free_port()
    wrong = Server("--server-id", f"wrong-{suffix}", "--redis-uri",
                   f"redis://:not-the-word@127.0.0.1:{redis.port}/0", *common)
    one = Server("--server-id", f"one-{suffix}", "--redis-uri",
                 f"redis://:main-word@127.0.0.1:{redis.port}/0", *common)
    two = Server("--server-id", f"two-{suffix}", "--redis-uri",
                 f"redis+unix://{sock}?user=bus&pass=bus-word", *common)
    try:
        proc = subprocess.run([BIN, "--port", str(wrong.port), "--jwt-secret", wrong.secret, "--data-dir",
                               str(wrong.data_dir), *wrong.extra], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert "Redis" in proc.stderr and "not-the-word" not in proc.stderr, proc.stderr
        one.start()
        two.start()

        async def main():
            token = hypha_token("gus")
            a = await connect_to_server({"server_url": one.url, "token": token, "client_id": "a"})
            b = await connect_to_server({"server_url": two.url, "token": token, "client_id": "b"})
            await a.register_service({"id": "s", "config": {"visibility": "protected"}, "f": lambda x: x + 1})
            await b.register_service({"id": "s", "config": {"visibility": "protected"}, "f": lambda x: x * 2})
            for _ in range(20):
                assert await (await b.get_service("a:s")).f(1) == 2
                assert await (await a.get_service("b:s")).f(5) == 10

            # The ACL user's password changes under the second instance and its connections
            # are cut: its bus is refused (and says so), then comes back with the password.
            assert redis.command("ACL", "SETUSER", "bus", "resetpass", ">other-word").startswith(b"+OK")
            assert redis.command("CLIENT", "KILL", "USER", "bus").startswith(b":")

            def bus_up():
                _, metrics, _ = two.http_text("/metrics")
                found = re.search(r"^hypha_rtc_bus_up (\d+)", metrics, re.M)
                assert found, metrics
                return found.group(1) == "1"

            await poll("the refusal in the log", lambda: asyncio.to_thread(
                lambda: "Redis refused to sign in" in two.log.read_text() and not bus_up()))
            assert redis.command("ACL", "SETUSER", "bus", "resetpass", ">bus-word").startswith(b"+OK")
            await poll("the bus back", lambda: asyncio.to_thread(bus_up))

            async def crosses():
                return await (await a.get_service("b:s")).f(6) == 12

            await poll("a call across again", crosses)
            for client in (a, b):
                await client.disconnect()

        run(main(), timeout=120)
        for server in (one, two):
            assert "not-the-word" not in server.log.read_text()
            for word in ("bus-word", "main-word", "other-word"):
                assert word not in server.log.read_text()
    finally:
        one.stop()
        two.stop()
        redis.stop()


def test_a_twin_server_id_is_refused(pair):
    one, _ = pair
    server_id = one.extra[one.extra.index("--server-id") + 1]
    twin = subprocess.run([BIN, "--port", str(free_port()), "--data-dir", str(one.data_dir / "twin"),
                           "--jwt-secret", one.secret, *one.extra], capture_output=True, text=True, timeout=60)
    # It waits out the lease a restarted instance would have left, then gives up: the twin renews.
    assert twin.returncode == 1, twin.stderr
    assert f'another live instance uses the server id "{server_id}"' in twin.stderr, twin.stderr
    assert one.alive()


async def hello(url, client_id, token=None, reconnection_token=None):
    """A raw websocket client; returns the socket and the server's first answer."""
    import json

    import websockets

    ws = await websockets.connect(url)
    await ws.send(json.dumps({"client_id": client_id, "workspace": None, "token": token,
                              "reconnection_token": reconnection_token}))
    return ws, json.loads(await asyncio.wait_for(ws.recv(), 10))


async def closed_with(ws, timeout):
    """Waits for the server to close `ws`; returns what it said (error text and close reason)."""
    import websockets

    said = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            message = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
            if isinstance(message, str):
                said.append(message)
    except websockets.ConnectionClosed as closed:
        return " ".join(said) + " " + (closed.rcvd.reason if closed.rcvd else "")
    except asyncio.TimeoutError:
        pass
    raise AssertionError(f"the connection stayed open for {timeout} s")


def test_a_client_id_cannot_be_taken_over_and_a_move_closes_the_old_connection(pair, redis):
    one, two = pair

    async def main():
        token = hypha_token("eli")
        # A client that moves to the other instance while its old connection is alive: the
        # old connection is closed.
        mover, info = await hello(one.ws_url, "mover", token)
        assert info["type"] == "connection_info", info
        moved, info2 = await hello(two.ws_url, "mover", token, info["reconnection_token"])
        assert info2["type"] == "connection_info", info2
        assert "another server instance" in await closed_with(mover, 15)

        provider, info = await hello(one.ws_url, "provider", token)
        assert info["type"] == "connection_info", info
        await asyncio.to_thread(redis.stop)
        # Someone else with the same token (so the same workspace) cannot claim the
        # provider's id while the directory cannot be asked.
        intruder, refusal = await hello(two.ws_url, "provider", token)
        assert refusal["type"] == "error" and "Redis" in refusal["message"], refusal
        await intruder.close()
        # The provider itself, with its reconnection token, may come back elsewhere...
        back, info3 = await hello(two.ws_url, "provider", token, info["reconnection_token"])
        assert info3["type"] == "connection_info", info3
        await asyncio.to_thread(redis.start)
        # ...and once Redis is back the two claims are settled: the proven, newer one stays.
        assert "another server instance" in await closed_with(provider, 40)
        await back.send('{"type":"ping"}')
        while (reply := await asyncio.wait_for(back.recv(), 10)) and "pong" not in str(reply):
            pass
        for ws in (moved, back):
            await ws.close()

    run(main(), timeout=200)


def test_the_instance_link_takes_nothing_from_a_stranger(pair):
    """The link port proves the other side knows the instances' secret before it takes a
    frame: a guessed proof, a frame sent without any greeting, and another protocol are all
    cut off, and the instances go on routing between themselves."""
    one, two = pair

    def cut_off(first, then=None):
        with socket.create_connection(("127.0.0.1", one.link_port), timeout=5) as s:
            s.sendall(first)
            if then is not None:
                greeting = b""
                while len(greeting) < 5 + 1 + len(one.extra[1]) + 32:
                    part = s.recv(4096)
                    assert part, "the link answers a greeting with its own"
                    greeting += part
                assert greeting.startswith(b"HRTL1")
                s.sendall(then)
            left = b""
            try:
                while part := s.recv(4096):
                    left += part
            except ConnectionResetError:
                pass  # closed with bytes of ours unread
            return left

    name = b"stranger"
    hello = b"HRTL1" + bytes([len(name)]) + name + os.urandom(32)
    # A proof made without the secret: no acceptance byte, the connection closes.
    assert cut_off(hello, os.urandom(32)) == b""
    # A frame with no greeting at all, and an HTTP request: closed without an answer.
    assert cut_off(b"\x00\x00\x00\x10\x00\x06ws1/ab" + b"\x80" * 10) == b""
    assert cut_off(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""

    async def main():
        token = hypha_token("kim")
        a = await connect_to_server({"server_url": one.url, "token": token, "client_id": "far"})
        await a.register_service({"id": "twice", "config": {"visibility": "protected"}, "f": lambda x: 2 * x})
        b = await connect_to_server({"server_url": two.url, "token": token, "client_id": "near"})
        svc = await b.get_service("far:twice")
        assert await svc.f(21) == 42
        await a.disconnect()
        await b.disconnect()

    run(main(), timeout=60)
    _, metrics, _ = two.http_text("/metrics")
    assert re.search(r"^hypha_rtc_bus_links 1$", metrics, re.M), metrics
