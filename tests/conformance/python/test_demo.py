"""The built-in video producer, first increment: the /demo/ page plays H.264 from the server's
str0m peer in headless Chromium; bad offers are refused with a message."""

import json
import re
import urllib.request

import pytest

from conftest import node, result_of

pytestmark = pytest.mark.timeout(120)


def post_offer(server, body):
    req = urllib.request.Request(server.url + "/demo/offer", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_demo_page_plays_720p_in_chromium(server, tmp_path):
    import os

    os.environ["SCREENSHOT"] = str(tmp_path / "demo.png")
    result = result_of(node("demo.mjs", f"{server.url}/demo/", timeout=90))
    assert result["framesDecoded"] >= 60, result
    assert (result["frameWidth"], result["frameHeight"]) == (1280, 720)
    assert result["codec"] == "video/H264", result
    assert result["sixtyFramesMs"] < 5000, result
    # The page times Start to the first frame on screen and shows it among its labelled
    # figures, with the codec, the resolution and both ends of the selected candidate pair.
    assert 0 < result["firstFrameMs"] < 5000, result
    fields = result["fields"]
    assert fields["s-resolution"] == "1280x720" and fields["s-codec"] == "H264", fields
    # The browser's end of a loopback pair is peer-reflexive; the server's is a host candidate.
    assert re.fullmatch(r"(host|srflx|prflx|relay)\S*( \S+)? → host 127\.0\.0\.1:\d+", fields["s-pair"]), fields
    assert fields["s-first"] == f"{result['firstFrameMs']} ms", fields
    assert fields["s-bitrate"].endswith("Mbit/s") and fields["s-rtt"].endswith("ms"), fields
    assert "Not signed in" in fields["signin"] and fields["state"] == "Playing.", fields
    # The phases of the connection, in words, and no raw JSON anywhere on the page.
    assert [p["name"] for p in result["phases"]][0] == "signaling: the server answered", result["phases"]
    assert {"ICE: a path was found", "DTLS: encrypted", "first frame on screen"} <= {p["name"] for p in result["phases"]}
    assert "{" not in result["pageText"], result["pageText"]
    assert result["consoleErrors"] == [], result["consoleErrors"]
    assert result["distinctColours"] > 5, "the video frame looks blank"
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    # Text and speed apply to this viewer only, confirmed by the server within 100 ms.
    assert result["text1"]["text"] == "viewer one" and result["text1"]["ms"] < 100, result["text1"]
    assert result["speed1"]["speed"] == 800 and result["speed1"]["ms"] < 100
    assert result["text2"]["text"] == "viewer two" and result["secondFrames"] >= 10
    assert result["still1"]["text"] == "viewer one", "the second viewer changed the first one's text"
    assert "more than 200 characters" in result["tooLong"]["error"]
    assert result["negative"]["speed"] == 0 and result["negative"]["text"] == "viewer one"
    # Stop pauses (no frames for a second), Start resumes.
    assert result["pausedFrames"] <= 1, result
    assert result["resumedFrames"] >= 15, result
    # Disconnect frees both viewers' sessions on the server at once, not after a time-out.
    assert result["viewersBefore"] == 2, result
    assert result["viewersAfter"] == 0 and result["disconnectMs"] < 3000, result
    # The page itself still works after a stream: the server went on.
    assert server.alive()


def test_bad_offers_are_refused_and_the_server_goes_on(server):
    status, body = post_offer(server, {"sdp": "this is not sdp", "type": "offer"})
    assert status == 400 and "not valid SDP" in body["detail"]
    status, body = post_offer(server, {"sdp": "v=0\r\n", "type": "answer"})
    assert status == 400 and "offer" in body["detail"]
    audio_only = ("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
                  "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\n"
                  "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"
                  "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\na=setup:actpass\r\n"
                  "a=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\n")
    status, body = post_offer(server, {"sdp": audio_only, "type": "offer"})
    assert status == 400 and "no video" in body["detail"], body
    status, _ = post_offer(server, {"nothing": 1})
    assert status in (400, 422)
    assert server.alive()


def test_demo_options(tmp_path):
    from conftest import BIN, Server
    import subprocess

    small = Server("--demo-resolution", "640x360", "--demo-fps", "15").start()
    try:
        result = result_of(node("demo.mjs", f"{small.url}/demo/", timeout=90))
        assert (result["frameWidth"], result["frameHeight"]) == (640, 360), result
    finally:
        small.stop()
    # VP8 through libvpx (the test command builds with the vp8 feature).
    vp8 = Server("--demo-codec", "vp8").start()
    try:
        result = result_of(node("demo.mjs", f"{vp8.url}/demo/", timeout=90))
        assert result["codec"] == "video/VP8" and result["framesDecoded"] >= 60, result
        assert (result["frameWidth"], result["frameHeight"]) == (1280, 720), result
        assert result["distinctColours"] > 5, "the VP8 frame looks blank"
    finally:
        vp8.stop()
    off = Server("--no-demo").start()
    try:
        try:
            urllib.request.urlopen(off.url + "/demo/", timeout=5)
            raise AssertionError("/demo/ answered with --no-demo")
        except urllib.error.HTTPError as e:
            assert e.code == 404
    finally:
        off.stop()
    for args, needle in [(["--demo-resolution", "1280x721"], "--demo-resolution"), (["--demo-fps", "0"], "--demo-fps"),
                         (["--rtc-ip", "nope"], "--rtc-ip"), (["--demo-codec", "av2"], "--demo-codec")]:
        r = subprocess.run([BIN, "--port", "0", *args], capture_output=True, text=True, timeout=10, cwd=tmp_path)
        assert r.returncode == 2 and needle in r.stderr, r.stderr


def test_signed_in_relay_through_coturn():
    from conftest import Server
    from test_login import PASSWORD, add_user
    from test_turn import COTURN_SECRET, Coturn

    # Browser and server share this host, so coturn must relay to loopback (not in production).
    coturn = Coturn(COTURN_SECRET, "--allow-loopback-peers", "--allowed-peer-ip=127.0.0.1")
    server = Server("--coturn-secret", COTURN_SECRET, "--coturn-uri", f"127.0.0.1:{coturn.port}").start()
    try:
        add_user(server, "viv@example.org")
        result = result_of(node("demo_relay.mjs", server.url, "viv@example.org", PASSWORD, timeout=90))
        assert result["candidate"] == "relay", result
        assert result["framesDecoded"] >= 30 and result["frameWidth"] == 1280, result
    finally:
        server.stop()
        coturn.stop()


def demo_gauge(server, name="hypha_rtc_demo_viewers"):
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


@pytest.fixture
def own_server():
    """A server of the test's own, so its viewer gauge counts only the test's viewers."""
    from conftest import Server

    s = Server().start()
    yield s
    s.stop()


def test_python_aiortc_client_receives_the_video_and_controls_it(own_server):
    """The real Python client: get_rtc_service with a receive-only transceiver gets 720p video,
    and the viewer's controls are a hypha-rpc service on the data channel it opened."""
    import asyncio

    from hypha_rpc import connect_to_server, get_rtc_service

    from conftest import run, wait_until

    server = own_server

    async def main():
        client = await connect_to_server({"server_url": server.url})
        sizes, enough = [], asyncio.Event()
        # Bad offers through the service itself are rejected with a message.
        producer = await client.get_service("public/video-producer")
        for params, needle in [({"sdp": "nonsense", "type": "offer"}, "not valid SDP"),
                               ({"sdp": "v=0", "type": "answer"}, "offer"), ({}, "sdp")]:
            try:
                await producer.offer(params)
                raise AssertionError(f"{params} was accepted")
            except Exception as e:  # noqa: BLE001 - hypha-rpc raises a plain Exception
                assert needle in str(e), e

        async def on_init(pc):
            pc.addTransceiver("video", direction="recvonly")

            @pc.on("track")
            def on_track(track):
                async def read():
                    while True:
                        try:
                            frame = await track.recv()
                        except Exception:  # noqa: BLE001 - the track ends when the peer closes
                            return
                        sizes.append((frame.width, frame.height))
                        if len(sizes) >= 30:
                            enough.set()

                asyncio.ensure_future(read())

        pc = await get_rtc_service(client, "public/video-producer", {"on_init": on_init, "ice_servers": []})
        await asyncio.wait_for(enough.wait(), 30)
        assert len(sizes) >= 30 and sizes[-1] == (1280, 720), sizes[-3:]

        controls = await pc.get_service("controls")
        state = await controls.set_text("from python")
        assert state["text"] == "from python" and state["paused"] is False, state
        assert (state["width"], state["height"]) == (1280, 720)
        assert (await controls.set_speed(-40))["speed"] == 0
        assert (await controls.set_speed(1e12))["speed"] == 2000
        for bad, needle in [("x" * 10_000, "more than 200 characters"), (float("nan"), "finite number")]:
            call = controls.set_text(bad) if isinstance(bad, str) else controls.set_speed(bad)
            try:
                await call
                raise AssertionError(f"{bad!r} was accepted")
            except Exception as e:  # noqa: BLE001 - hypha-rpc raises a plain Exception
                assert needle in str(e), e
        try:
            await pc.get_service("nothing-here")
            raise AssertionError("an unknown service was found")
        except Exception as e:  # noqa: BLE001
            assert "controls" in str(e), e
        # The peer went on after the bad calls: the state is intact, frames keep coming.
        state = await controls.get_state()
        assert state["text"] == "from python", state
        before = len(sizes)
        stopped = await controls.stop()
        assert stopped["paused"] is True
        resumed = await controls.start()
        assert resumed["paused"] is False
        deadline = asyncio.get_running_loop().time() + 10
        while len(sizes) < before + 15 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert len(sizes) >= before + 15, "no frames after start()"
        await pc.close()
        await client.disconnect()

    run(main(), timeout=90)
    # Closing the connection ends the viewer's session on the server at once (DTLS
    # close_notify), well before the silence time-out (8 s) would.
    wait_until(lambda: demo_gauge(server) == 0, 3, "the demo viewer to be cleaned up")
    assert demo_gauge(server, "hypha_rtc_demo_sessions_total") >= 1
    assert server.alive()


def test_media_addresses_several_rtc_ips_and_a_public_one():
    """Every --rtc-ip is a host candidate in the answer, --rtc-public-ip is advertised as well,
    and the real Python client connects over one of them."""
    import asyncio

    from hypha_rpc import connect_to_server, get_rtc_service

    from conftest import Server, run

    server = Server("--rtc-ip", "127.0.0.1", "--rtc-ip", "127.0.0.2", "--rtc-public-ip", "127.0.0.3").start()

    async def main():
        client = await connect_to_server({"server_url": server.url})
        got = asyncio.Event()

        async def on_init(pc):
            pc.addTransceiver("video", direction="recvonly")

            @pc.on("track")
            def on_track(track):
                async def read():
                    await track.recv()
                    got.set()

                asyncio.ensure_future(read())

        pc = await get_rtc_service(client, "public/video-producer", {"on_init": on_init, "ice_servers": []})
        await asyncio.wait_for(got.wait(), 20)
        candidates = [line for line in pc.remoteDescription.sdp.splitlines() if line.startswith("a=candidate")]
        await pc.close()
        await client.disconnect()
        return candidates

    try:
        candidates = run(main(), timeout=60)
        for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            assert any(f" {ip} " in c and "typ host" in c for c in candidates), (ip, candidates)
    finally:
        server.stop()


def test_media_address_options_are_validated(tmp_path):
    import subprocess

    from conftest import BIN

    for args, needle in [(["--rtc-public-ip", "::5", "--rtc-ip", "127.0.0.1"], "same IP version"),
                         (["--rtc-public-ip", "192.0.2.7"], "also give --rtc-ip"),
                         (["--rtc-public-ip", "0.0.0.0"], "--rtc-public-ip"),
                         (["--rtc-ip", "224.0.0.1"], "--rtc-ip")]:
        r = subprocess.run([BIN, "--port", "0", *args], capture_output=True, text=True, timeout=10, cwd=tmp_path)
        assert r.returncode == 2 and needle in r.stderr, (args, r.stderr)
    # The environment takes a list; each entry is checked.
    r = subprocess.run([BIN, "--port", "0"], capture_output=True, text=True, timeout=10, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "HYPHA_RTC_IP": "127.0.0.1, nope"})
    assert r.returncode == 2 and "HYPHA_RTC_IP" in r.stderr and "nope" in r.stderr, r.stderr
