"""The documented use cases, as users run them: a web page with the client's browser bundle
signing in and reaching a Python instrument over WebRTC (the remote microscope), the
synchronous client (`hypha_rpc.sync`) doing the same, and a plain aiortc peer built from the
server's ICE servers with `RTCIceServer(..., credentialType="password")` relaying through a
real coturn."""

import asyncio
import json
import re
import subprocess
import sys
import time

import pytest
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from hypha_rpc import connect_to_server, register_rtc_service

from conftest import COTURN_SECRET, Coturn, Server, hypha_token, node, result_of, run

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def relaying():
    """A server and a coturn that relays to loopback peers (peers and coturn share this host)."""
    coturn = Coturn(COTURN_SECRET, "--allow-loopback-peers", "--allowed-peer-ip=127.0.0.1")
    server = Server("--coturn-secret", COTURN_SECRET, "--coturn-uri", f"127.0.0.1:{coturn.port}").start()
    yield server, coturn
    server.stop()
    coturn.stop()


def relay_only(sdp):
    """The SDP with only its relay candidates, so the peers can reach each other only
    through coturn."""
    lines = [l for l in sdp.splitlines() if not (l.startswith("a=candidate:") and " typ relay" not in l)]
    return "\r\n".join(lines) + "\r\n"


def nominated_remote_types(pc):
    connection = pc.sctp.transport.transport.iceGatherer._connection
    return [pair.remote_candidate.type for pair in connection._nominated.values()]


def test_aiortc_peer_relays_through_coturn_with_issued_credentials(relaying):
    server, coturn = relaying

    async def main():
        api = await connect_to_server({"server_url": server.url, "token": hypha_token("relay-user")})
        servers = await api.get_rtc_ice_servers()
        turn = [s for s in servers if any(u.startswith("turn:") for u in s["urls"])]
        assert turn and turn[0]["username"].endswith(":relay-user"), servers
        ice = [
            RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"), credentialType="password")
            for s in servers
        ]
        offerer = RTCPeerConnection(RTCConfiguration(iceServers=ice))
        answerer = RTCPeerConnection(RTCConfiguration(iceServers=ice))
        try:
            received = asyncio.Queue()

            @answerer.on("datachannel")
            def on_channel(channel):
                channel.on("message", lambda message: channel.send("echo:" + message))

            channel = offerer.createDataChannel("probe")
            channel.on("message", received.put_nowait)
            opened = asyncio.Event()
            channel.on("open", opened.set)

            await offerer.setLocalDescription(await offerer.createOffer())
            offer = offerer.localDescription.sdp
            assert re.search(r"typ relay raddr", offer), "no relay candidate: the issued credentials did not allocate"
            await answerer.setRemoteDescription(RTCSessionDescription(relay_only(offer), "offer"))
            await answerer.setLocalDescription(await answerer.createAnswer())
            answer = answerer.localDescription.sdp
            assert " typ relay " in answer
            await offerer.setRemoteDescription(RTCSessionDescription(relay_only(answer), "answer"))

            await asyncio.wait_for(opened.wait(), 30)
            channel.send("hello")
            assert await asyncio.wait_for(received.get(), 10) == "echo:hello"
            # Each side reached the other's relayed address on coturn.
            assert nominated_remote_types(offerer) == ["relay"]
            assert nominated_remote_types(answerer) == ["relay"]
        finally:
            await offerer.close()
            await answerer.close()
            await api.disconnect()

    run(main(), timeout=120)


SYNC_SCRIPT = """
import json, sys
from hypha_rpc.sync import login, connect_to_server, register_rtc_service, get_rtc_service
url = sys.argv[1]
token = login({"server_url": url, "login_timeout": 60})
scope = connect_to_server({"server_url": url, "token": token, "client_id": "scope"})
scope.register_service({
    "id": "microscope",
    "config": {"visibility": "public"},
    "snap": lambda exposure: {"exposure": exposure, "pixels": [exposure] * 4},
})
# The server's ICE servers on both sides (the clients' default is a public STUN server).
register_rtc_service(scope, "microscope-rtc", {"visibility": "public", "ice_servers": scope.get_rtc_ice_servers()})
viewer = connect_to_server({"server_url": url, "token": token, "client_id": "viewer"})
ice = viewer.get_rtc_ice_servers()
pc = get_rtc_service(viewer, scope.config.workspace + "/microscope-rtc", {"ice_servers": ice})
mic = pc.get_service("microscope")
snap = mic.snap(3)
stats = pc.getStats()
print("RESULT " + json.dumps({"user": viewer.config.user["email"], "ice": ice, "snap": snap,
      "state": pc.connectionState}), flush=True)
pc.close()
viewer.disconnect()
scope.disconnect()
"""


def test_sync_client_signs_in_and_reaches_an_instrument_over_webrtc(relaying):
    from test_login import PASSWORD, add_user

    server, _ = relaying
    add_user(server, "sync@example.org")
    proc = subprocess.Popen([sys.executable, "-u", "-c", SYNC_SCRIPT, server.url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "the sync client ended early:\n" + "".join(lines)
            lines.append(line)
            if "login at " in line:
                break
        url = line.split("login at ", 1)[1].strip()
        page = result_of(node("fill_login.mjs", url, "sync@example.org", PASSWORD))
        assert "Signed in as sync@example.org" in page["result"]
        out, _ = proc.communicate(timeout=120)
        lines.append(out)
        assert proc.returncode == 0, "".join(lines)
        result = result_of(out)
    finally:
        proc.kill()
    assert result["user"] == "sync@example.org"
    assert result["snap"] == {"exposure": 3, "pixels": [3, 3, 3, 3]}
    assert result["state"] == "connected", result
    turn = [s for s in result["ice"] if any(u.startswith("turn:") for u in s["urls"])]
    assert turn and turn[0]["credential"], result["ice"]


def test_browser_bundle_signs_in_and_calls_a_python_instrument_over_webrtc(relaying):
    """The remote microscope: a page loading dist/hypha-rpc-websocket.min.js (from the pinned
    npm package, served from this machine) signs in, gets ICE servers with `getRtcIceServers()`
    and calls the Python instrument's functions over the data channel, relayed by coturn."""
    from test_login import PASSWORD, add_user

    server, _ = relaying
    add_user(server, "viewer@example.org")

    async def main():
        scope = await connect_to_server({
            "server_url": server.url, "token": hypha_token("lab-scope-owner", {"lab-scope": "rw"}),
            "workspace": "lab-scope", "client_id": "scope",
        })
        await scope.register_service({
            "id": "microscope", "config": {"visibility": "public"},
            "snap": lambda exposure: {"exposure": exposure, "pixels": [exposure] * 4},
        })
        await register_rtc_service(scope, "microscope-rtc", {
            "visibility": "public", "ice_servers": await scope.get_rtc_ice_servers(),
        })
        try:
            # The page runs while this loop keeps answering for the instrument.
            return result_of(await asyncio.to_thread(
                node, "remote_microscope.mjs", server.url, "lab-scope/microscope-rtc",
                "viewer@example.org", PASSWORD, timeout=150))
        finally:
            await scope.disconnect()

    page = run(main(), timeout=200)
    print("remote microscope page:", json.dumps({k: page.get(k) for k in ("seconds", "pair", "state", "workspace")}))
    assert "error" not in page, page["error"]
    assert page["bundle"] == "/hypha-rpc/hypha-rpc-websocket.min.js"
    assert "Signed in as viewer@example.org" in page["signedIn"]
    assert page["workspace"].startswith("ws-user-"), page["workspace"]
    turn = [s for s in page["iceServers"] if any(u.startswith("turn:") for u in s["urls"])]
    assert turn and turn[0]["credential"], page["iceServers"]
    assert page["image"] == {"exposure": 3, "pixels": [3, 3, 3, 3]}
    assert page["state"] == "connected"
    assert page["pair"] and page["pair"]["local"] == "relay", page["pair"]
    assert page["consoleErrors"] == [] and page["failed"] == [], page
