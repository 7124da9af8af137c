"""`hypha-rtc doctor` against a real coturn (UDP, TCP and TLS on loopback): exit 0 when all is
well; a wrong secret, a wrong external address and coturn down each make it fail, naming the
problem and what to change."""

import os
import re
import subprocess
import tempfile
import time

import pytest

from conftest import BIN, COTURN_SECRET, Coturn, Server, free_port, make_certificate, wait_until

pytestmark = pytest.mark.timeout(120)


def doctor(coturn_port, secret=COTURN_SECRET, tls_port=None, ca=None, timeout=3):
    args = [BIN, "--coturn-uri", f"127.0.0.1:{coturn_port}", "--coturn-secret", secret, "doctor",
            "--step-timeout", str(timeout)]
    if tls_port:
        args[1:1] = ["--coturn-tls-port", str(tls_port)]
    if ca:
        args += ["--ca-file", str(ca)]
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "HYPHA_RTC_BIN"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=90, env=env)
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


@pytest.fixture(scope="module")
def certificate():
    return make_certificate(tempfile.mkdtemp(prefix="hypha-rtc-doctor-"))


def test_all_is_well_over_udp_tcp_and_tls(certificate):
    cert, key, ca = certificate
    coturn = Coturn(COTURN_SECRET, "--allow-loopback-peers", "--allowed-peer-ip=127.0.0.1", tls=(cert, key))
    try:
        code, out, took = doctor(coturn.port, tls_port=coturn.tls_port, ca=ca)
        print(f"doctor took {took:.2f} s:\n{out}")
        assert code == 0, out
        assert "--coturn-secret matches coturn's static-auth-secret" in out
        assert 'realm "hypha-rtc.test"' in out
        assert "clocks agree" in out
        assert "coturn relays at 127.0.0.1, an address clients are given" in out
        assert "is reachable from this machine" in out
        for url in (f"turn:127.0.0.1:{coturn.port} (UDP)", f"turn:127.0.0.1:{coturn.port}?transport=tcp (TCP)",
                    f"turns:127.0.0.1:{coturn.tls_port}?transport=tcp (TLS)"):
            assert f"{url}: allocation accepted" in out, url
        assert re.search(r"TLS certificate of 127\.0\.0\.1:\d+ for localhost, 127\.0\.0\.1, expires in \d+ hours, trusted", out), out
        assert "All is well" in out and "warning" in out  # the test certificate lives a day
        # Without the private CA the certificate is not trusted: that is a problem, named.
        code, out, _ = doctor(coturn.port, tls_port=coturn.tls_port)
        assert code == 1 and "is not trusted here" in out and "--ca-file" in out, out
    finally:
        coturn.stop()


def test_a_wrong_secret_is_named():
    coturn = Coturn()
    try:
        code, out, _ = doctor(coturn.port, secret="not-the-secret")
        assert code == 1, out
        assert "rejects credentials made with --coturn-secret" in out
        assert "make --coturn-secret equal to static-auth-secret" in out
    finally:
        coturn.stop()


def test_a_wrong_external_address_is_named():
    # coturn says it relays at a public address that is not the one clients are given (the
    # address is only written into answers; nothing is sent to it).
    coturn = Coturn(COTURN_SECRET, "--external-ip=198.51.100.7/127.0.0.1")
    try:
        code, out, _ = doctor(coturn.port)
        assert code == 1, out
        assert "coturn relays at 198.51.100.7, but clients are given 127.0.0.1" in out
        assert "external-ip=127.0.0.1/198.51.100.7" in out or "--public-coturn-uri" in out
    finally:
        coturn.stop()


def test_coturn_down_is_named_within_bounded_time():
    port = free_port()
    code, out, took = doctor(port, timeout=2)
    assert code == 1, out
    assert f"127.0.0.1:{port}" in out and ("unreachable" in out or "timed out" in out), out
    assert "start coturn" in out
    # UDP, then TCP: each step gives up within its time-out.
    assert took < 20, took


def test_readiness_shows_every_address_clients_are_given(certificate):
    cert, key, _ = certificate
    coturn = Coturn(COTURN_SECRET, tls=(cert, key))
    down = free_port()
    server = Server("--coturn-secret", COTURN_SECRET, "--coturn-uri", f"127.0.0.1:{coturn.port}",
                    "--public-coturn-uri", f"127.0.0.1:{coturn.port},127.0.0.1:{down}",
                    "--coturn-tls-port", str(coturn.tls_port)).start()
    try:
        listeners = wait_until(lambda: server.http("/health/readiness")[1]["coturn"].get("listeners"), 20,
                               "the first check of the listeners")
        states = {l["url"]: l for l in listeners}
        assert states[f"turn:127.0.0.1:{coturn.port}"]["state"] == "ok"
        assert states[f"turn:127.0.0.1:{coturn.port}?transport=tcp"]["state"] == "ok"
        tls = states[f"turns:127.0.0.1:{coturn.tls_port}?transport=tcp"]
        assert tls["state"] == "ok" and tls["certificate"]["names"] == ["localhost", "127.0.0.1"]
        # The test CA is not one this machine trusts: said, not hidden.
        assert tls["certificate"]["trusted"] is False
        # A second public address where nothing listens: named, with why (for this loopback caller).
        assert states[f"turn:127.0.0.1:{down}"]["state"] in ("unreachable", "timed_out")
        assert "127.0.0.1" in states[f"turn:127.0.0.1:{down}"]["detail"]
    finally:
        server.stop()
        coturn.stop()
