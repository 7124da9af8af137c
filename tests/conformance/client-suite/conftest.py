"""Fixtures of the hypha-rpc client suite, starting hypha-rtc instead of Hypha.

One hypha-rtc serves the whole run on WS_PORT: `websocket_server` gives its URL, and
`restartable_server` gives the server itself, which a test may restart (the published tests
connect through WS_SERVER_URL and then restart `restartable_server`, so both must be the same
server); a restart keeps its data directory, so tokens and sign-ins survive as with Hypha. The
server has a data directory and log of its own and is stopped by its process group at the end. Tests listed in known.py are skipped (they need
infrastructure hypha-rtc does not claim) or reported as expected failures (a gap not built
yet), each with its reason.
"""

import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from . import WS_PORT
from .known import EXCLUDED, GAPS

BIN = os.environ["HYPHA_RTC_BIN"]
SECRET = "client-suite-secret-0123456789abcdef"


class HyphaRtc:
    """One hypha-rtc process on loopback."""

    def __init__(self, port):
        self.port = port
        self.data_dir = Path(tempfile.mkdtemp(prefix="hypha-rtc-client-suite-"))
        self.log = self.data_dir / "server.log"
        self.proc = None

    def start(self, timeout=15):
        env = {k: v for k, v in os.environ.items() if not k.startswith("HYPHA_")}
        self.proc = subprocess.Popen(
            [BIN, "--host", "127.0.0.1", "--port", str(self.port), "--jwt-secret", SECRET,
             "--data-dir", str(self.data_dir), "--no-demo"],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"),
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health/liveness", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"hypha-rtc exited at start:\n{self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"hypha-rtc did not answer within {timeout} s")
            time.sleep(0.05)

    def stop(self, timeout=10):
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def restart(self, stop_delay=0.5, start_timeout=15):
        self.stop()
        time.sleep(stop_delay)  # the published tests ask for this pause between stop and start
        self.start(timeout=start_timeout)


@pytest.fixture(scope="session")
def hypha_rtc():
    server = HyphaRtc(WS_PORT).start()
    yield server
    server.stop()


@pytest.fixture
def websocket_server(hypha_rtc):
    if hypha_rtc.proc.poll() is not None:
        hypha_rtc.start()
    return f"ws://127.0.0.1:{WS_PORT}/ws"


@pytest.fixture
def restartable_server(hypha_rtc):
    if hypha_rtc.proc.poll() is not None:
        hypha_rtc.start()
    return hypha_rtc


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.nodeid.split("/")[-1]
        reason = EXCLUDED.get(name) or EXCLUDED.get(name.split("::")[0])
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
            continue
        reason = GAPS.get(name) or GAPS.get(name.split("::")[0])
        if reason:
            item.add_marker(pytest.mark.xfail(reason=reason, run=False))
