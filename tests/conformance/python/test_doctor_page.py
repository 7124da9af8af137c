"""The connectivity doctor page in headless Chromium, signed in, with a real coturn on
loopback: a relay candidate over UDP and over TCP and a data channel through the relay to the
server's own peer; with coturn's secret wrong the verdict names the credentials; with coturn
stopped it says TURN is unreachable, within a bounded time; anonymous visitors get STUN only."""

import os

import pytest

from conftest import COTURN_SECRET, Coturn, Server, node, result_of
from test_login import PASSWORD, add_user

pytestmark = pytest.mark.timeout(240)
SCREENSHOTS = os.environ.get("HYPHA_RTC_SCREENSHOTS", "/tmp/hypha-rtc-pages")


def run_doctor(server, name, email=None):
    args = [server.url, os.path.join(SCREENSHOTS, f"{name}.png")]
    if email:
        args += [email, PASSWORD]
    os.makedirs(SCREENSHOTS, exist_ok=True)
    page = result_of(node("doctor_page.mjs", *args, timeout=150))
    print(f"{name}: verdict in {page['toVerdictMs']} ms: {page['verdict']}\n{page['report']['text']}")
    assert page["consoleErrors"] == [] and page["failed"] == [] and page["httpErrors"] == [], page
    return page


def relaying_coturn(secret=COTURN_SECRET):
    # coturn relays to this machine's loopback addresses (where the server's peer listens).
    return Coturn(secret, "--allow-loopback-peers", "--allowed-peer-ip=127.0.0.1")


def server_for(coturn, secret=COTURN_SECRET):
    server = Server("--coturn-secret", secret, "--coturn-uri", f"127.0.0.1:{coturn.port}").start()
    add_user(server, "doc@example.org")
    return server


def test_signed_in_the_doctor_finds_udp_tcp_relays_and_a_path_through_them():
    coturn = relaying_coturn()
    server = server_for(coturn)
    try:
        page = run_doctor(server, "doctor-signed-in", "doc@example.org")
        assert "Signed in as doc@example.org" in page["who"]
        gathers = {g["kind"]: g for g in page["report"]["gathers"]}
        assert gathers["TURN over UDP"]["ok"] and gathers["TURN over UDP"]["address"].startswith("127.0.0.1:")
        assert gathers["TURN over TCP"]["ok"], gathers
        relay = page["report"]["viaRelay"]
        assert relay["ok"] and relay["rttMs"] > 0 and relay["mbps"] > 0, relay
        assert relay["pair"].startswith("relay"), relay
        assert "TURN over UDP, TURN over TCP work" in page["verdict"]
        assert "Through the relay: round trip" in page["report"]["detail"]
        assert "verdict:" in page["report"]["text"] and "steps:" in page["report"]["text"]
    finally:
        server.stop()
        coturn.stop()


def test_a_wrong_secret_is_named_in_the_verdict():
    coturn = relaying_coturn()
    server = server_for(coturn, secret="not-coturns-secret")
    try:
        page = run_doctor(server, "doctor-wrong-secret", "doc@example.org")
        assert "refuses the credentials this server issues (401)" in page["verdict"], page["verdict"]
    finally:
        server.stop()
        coturn.stop()


def test_coturn_stopped_means_turn_is_unreachable_within_bounded_time():
    coturn = relaying_coturn()
    server = server_for(coturn)
    coturn.stop()
    try:
        page = run_doctor(server, "doctor-coturn-down", "doc@example.org")
        assert "TURN is unreachable from here" in page["verdict"], page["verdict"]
        assert page["toVerdictMs"] < 30000, page["toVerdictMs"]
    finally:
        server.stop()


def test_anonymous_visitors_check_stun_and_the_direct_path():
    coturn = relaying_coturn()
    server = server_for(coturn)
    try:
        page = run_doctor(server, "doctor-anonymous")
        assert "Not signed in" in page["who"]
        assert "Sign in to check TURN" in page["verdict"]
        kinds = {g["kind"] for g in page["report"]["gathers"]}
        assert kinds == {"STUN"}, kinds
        assert page["report"]["direct"]["ok"], page["report"]["direct"]
    finally:
        server.stop()
        coturn.stop()


def test_the_echo_peer_refuses_floods_and_bad_offers():
    """What an anonymous caller can ask of the echo peer: at most four sessions waiting from one
    address, and offers that are not offers with a data channel are refused with a reason."""
    import asyncio
    import json
    import urllib.error
    import urllib.request

    from aiortc import RTCPeerConnection

    server = Server().start()

    def post(body):
        request = urllib.request.Request(server.url + "/doctor/offer", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    async def offer():
        pc = RTCPeerConnection()
        pc.createDataChannel("echo")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    try:
        assert post({"sdp": "v=0", "type": "answer"})[0] == 400
        status, body = post({"sdp": "not sdp", "type": "offer"})
        assert status == 400 and "not valid SDP" in body["detail"]
        sdp = asyncio.run(offer())
        answers = [post({"sdp": sdp, "type": "offer"}) for _ in range(5)]
        assert [status for status, _ in answers[:4]] == [200] * 4, answers
        assert answers[4][0] == 429 and "too many connectivity checks" in answers[4][1]["detail"], answers[4]
    finally:
        server.stop()
