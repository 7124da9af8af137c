"""Running it in production: TLS served by the server itself (the real Python client over wss://,
the demo page in headless Chromium over https://), /metrics on its own port with counters that
move, JSON logs, and a graceful SIGTERM that lets a call in flight finish."""

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import socket
import tempfile
import time
import urllib.request

import pytest
from hypha_rpc import connect_to_server

from conftest import Server, free_port, hypha_token, make_certificate, node, result_of, run, wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def certificate():
    return make_certificate(tempfile.mkdtemp(prefix="hypha-rtc-tls-"))


def spki_hash(cert_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def test_python_clients_over_wss_with_the_test_ca(certificate):
    server = Server(tls=certificate).start()
    try:

        async def main():
            config = {"server_url": server.url.replace("127.0.0.1", "localhost"), "ssl": server.ssl}
            a = await connect_to_server({**config, "token": hypha_token("tia"), "client_id": "tls-a"})
            await a.register_service({"id": "sq", "config": {"visibility": "protected"}, "f": lambda x: x * x})
            b = await connect_to_server({**config, "token": hypha_token("tia"), "client_id": "tls-b"})
            assert await (await b.get_service("tls-a:sq")).f(12) == 144
            assert b.config.public_base_url.startswith("https://")
            await a.disconnect()
            await b.disconnect()
            # A client that does not trust the certificate is refused by its own TLS check.
            with pytest.raises(Exception, match="(?i)certificate"):
                await connect_to_server({"server_url": server.url})

        run(main())
        # Plain HTTP on the TLS port gets nothing, and the server goes on.
        with pytest.raises(Exception):
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health/liveness", timeout=3)
        assert server.alive()
    finally:
        server.stop()


def test_demo_page_plays_over_https_in_chromium(certificate):
    server = Server(tls=certificate).start()
    try:
        # Chromium trusts exactly this certificate's key; the page script's own requests (node)
        # trust the test CA.
        os.environ["CHROMIUM_EXTRA_ARGS"] = f"--ignore-certificate-errors-spki-list={spki_hash(certificate[0])}"
        os.environ["NODE_EXTRA_CA_CERTS"] = str(certificate[2])
        result = result_of(node("demo.mjs", f"{server.url}/demo/", timeout=90))
        assert result["framesDecoded"] >= 60, result
        assert (result["frameWidth"], result["frameHeight"]) == (1280, 720)
    finally:
        os.environ.pop("CHROMIUM_EXTRA_ARGS", None)
        os.environ.pop("NODE_EXTRA_CA_CERTS", None)
        server.stop()


def read_metrics(port):
    """Parses the OpenMetrics text format: {(name, labels): value}; checks every sample belongs to a
    family with a TYPE line (a counter's samples end in _total, a histogram's in _bucket, _sum,
    _count), that histogram buckets never decrease, and that the text ends with # EOF."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        text = r.read().decode()
    assert text.endswith("# EOF\n"), text[-200:]
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    samples, typed = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in suffixes, line
            typed[name] = kind
        elif line and not line.startswith("#"):
            match = re.fullmatch(r'([a-z_]+)(\{[a-z_]+="[a-z_0-9.+Inf]+"\})? (-?[0-9.e+]+)', line)
            assert match, line
            name = match.group(1)
            family = next((f for f, kind in typed.items() for suffix in suffixes[kind] if name == f + suffix), None)
            assert family, f"{name} belongs to no family with a TYPE line"
            samples[(name, match.group(2) or "")] = float(match.group(3))
    for family, kind in typed.items():
        if kind == "histogram":
            buckets = [v for (n, _), v in samples.items() if n == family + "_bucket"]
            assert buckets and buckets == sorted(buckets) and buckets[-1] == samples[(family + "_count", "")], family
    return samples


def test_metrics_on_their_own_port_move_with_traffic():
    metrics_port = free_port()
    server = Server("--metrics-port", str(metrics_port)).start()
    try:
        # Only on the metrics port.
        assert server.http("/metrics")[0] == 404
        before = read_metrics(metrics_port)
        for name in ("hypha_rtc_connections", "hypha_rtc_routed_messages_total", "hypha_rtc_routed_bytes_total",
                     "hypha_rtc_ice_credentials_issued_total", "hypha_rtc_ice_credentials_refused_total",
                     "hypha_rtc_demo_viewers", "hypha_rtc_demo_frames_total", "hypha_rtc_call_duration_seconds_count",
                     "hypha_rtc_ice_duration_seconds_count"):
            assert (name, "") in before, name

        async def main():
            a = await connect_to_server({"server_url": server.url, "token": hypha_token("mo"), "client_id": "m-a"})
            await a.register_service({"id": "m", "config": {"visibility": "protected"}, "f": lambda: 1,
                                      "bad": lambda: 1 / 0})
            b = await connect_to_server({"server_url": server.url, "token": hypha_token("mo"), "client_id": "m-b"})
            svc = await b.get_service("m-a:m")
            for _ in range(5):
                assert await svc.f() == 1
            with pytest.raises(Exception):
                await svc.bad()
            during = read_metrics(metrics_port)
            assert during[("hypha_rtc_connections", "")] == before[("hypha_rtc_connections", "")] + 2
            await a.disconnect()
            await b.disconnect()

        run(main())
        after = read_metrics(metrics_port)
        assert after[("hypha_rtc_routed_messages_total", "")] >= before[("hypha_rtc_routed_messages_total", "")] + 12
        assert after[("hypha_rtc_routed_bytes_total", "")] > before[("hypha_rtc_routed_bytes_total", "")]
        calls = lambda m, outcome: m.get(("hypha_rtc_calls_total", f'{{outcome="{outcome}"}}'), 0)  # noqa: E731
        assert calls(after, "resolved") >= calls(before, "resolved") + 5
        assert calls(after, "rejected") >= calls(before, "rejected") + 1
        latency = ("hypha_rtc_call_duration_seconds_count", "")
        assert after[latency] >= before[latency] + 6
        assert ("hypha_rtc_calls_total", '{outcome="peer_gone"}') in after  # moves in test_cluster
        server_ok = ("hypha_rtc_server_calls_total", '{outcome="ok"}')
        assert after[server_ok] > before[server_ok]
    finally:
        server.stop()


def test_sigterm_lets_a_call_in_flight_finish_and_logs_are_json():
    server = Server("--log-format", "json", "--coturn-secret", "never-logged-secret", "--coturn-uri",
                    "127.0.0.1:9").start()
    try:

        async def main():
            a = await connect_to_server({"server_url": server.url, "token": hypha_token("gus"), "client_id": "slow"})
            started = asyncio.Event()

            async def slow(x):
                started.set()
                await asyncio.sleep(2)
                return x + 1

            await a.register_service({"id": "slow", "config": {"visibility": "protected"}, "f": slow})
            b = await connect_to_server({"server_url": server.url, "token": hypha_token("gus"), "client_id": "waits"})
            svc = await b.get_service("slow:slow")
            call = asyncio.ensure_future(svc.f(41))
            await asyncio.wait_for(started.wait(), 10)
            sent = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)

            def refused():
                try:
                    socket.create_connection(("127.0.0.1", server.port), timeout=0.5).close()
                    return False
                except OSError:
                    return True

            # New connections are refused at once while the call is still running.
            await asyncio.to_thread(wait_until, refused, 1.5, "the listener to close")
            assert not call.done()
            assert await asyncio.wait_for(call, 15) == 42
            assert time.monotonic() - sent > 1.0, "the call was answered before the shutdown waited for it"
            for client in (a, b):
                try:
                    await asyncio.wait_for(client.disconnect(), 5)
                except Exception:  # noqa: BLE001 - the server is gone; nothing to say goodbye to
                    pass

        run(main())
        assert server.proc.wait(timeout=30) == 0
        lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.strip()]
        messages = [line["fields"].get("message", "") for line in lines]
        assert "connection opened" in messages and "shutting down: no new connections, waiting for calls in flight" in messages
        closed = [line["fields"] for line in lines if line["fields"].get("message") == "connection closed"]
        assert {c["client"].rsplit("/", 1)[1] for c in closed} >= {"slow", "waits"}
        assert all(c["reason"] in ("server shutdown", "closed by the client") for c in closed), closed
        assert "never-logged-secret" not in server.log.read_text()
        assert messages[-1] == "stopped"
    finally:
        server.stop()


def test_sigterm_after_chunked_answers_stops_at_once():
    """A call answered in chunks (a result larger than one frame) has ended: a later graceful
    stop does not wait for it."""
    server = Server().start()
    try:

        async def main():
            a = await connect_to_server({"server_url": server.url, "token": hypha_token("gus"), "client_id": "big"})

            async def big(n):
                return b"x" * n

            await a.register_service({"id": "big", "config": {"visibility": "protected"}, "f": big})
            b = await connect_to_server({"server_url": server.url, "token": hypha_token("gus"), "client_id": "asks"})
            svc = await b.get_service("big:big")
            # Larger than the clients' chunk size: the answer comes through the message cache.
            assert len(await svc.f(3 * 1024 * 1024)) == 3 * 1024 * 1024
            assert len(await svc.f(10)) == 10
            sent = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            # Both clients stay connected: only a call still counted would hold the stop.
            code = await asyncio.to_thread(server.proc.wait, 30)
            return code, time.monotonic() - sent

        code, took = run(main())
        assert code == 0
        assert took < 8, f"the graceful stop waited {took:.1f} s for calls already answered"
    finally:
        server.stop()


def test_sigterm_waits_for_a_call_whose_callee_sends_much_to_a_callback():
    """A callback the caller passed, called with more than one frame holds (sent in chunks
    under the caller's call, like an answer), does not end that call: a graceful stop still
    waits for its answer."""
    server = Server().start()
    try:

        async def main():
            a = await connect_to_server({"server_url": server.url, "token": hypha_token("gus"), "client_id": "reports"})
            reported = asyncio.Event()

            async def work(report):
                await report(b"x" * (3 * 1024 * 1024))
                reported.set()
                await asyncio.sleep(2)
                return "done"

            await a.register_service({"id": "work", "config": {"visibility": "protected"}, "f": work})
            b = await connect_to_server({"server_url": server.url, "token": hypha_token("gus"), "client_id": "hears"})
            svc = await b.get_service("reports:work")
            heard = []
            call = asyncio.ensure_future(svc.f(lambda data: heard.append(len(data))))
            await asyncio.wait_for(reported.wait(), 20)
            assert heard == [3 * 1024 * 1024]
            sent = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(call, 15) == "done"
            assert time.monotonic() - sent > 1.0, "the call was answered before the shutdown waited for it"

        run(main())
        assert server.proc.wait(timeout=30) == 0
    finally:
        server.stop()
