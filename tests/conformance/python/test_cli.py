"""The command line: help, layered settings, warnings for unknown HYPHA_* variables."""

import os
import subprocess
import tempfile
import urllib.request
import json

import pytest

from conftest import BIN, free_port, wait_until

pytestmark = pytest.mark.timeout(60)


def run_bin(*args, env=None, timeout=10):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HYPHA_")}
    full_env.update(env or {})
    return subprocess.run([BIN, *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=tempfile.mkdtemp(prefix="hypha-rtc-cli-"))


def test_help_documents_every_option():
    out = run_bin("--help").stdout
    for option in ["--host", "--port", "--public-base-url", "--jwt-secret", "--config", "--from-env",
                   "--ws-idle-timeout", "--max-frame-size", "--ws-rate-limit"]:
        assert option in out, option
    assert "HYPHA_PUBLIC_BASE_URL" in out and "JWT_SECRET" in out


def test_bad_values_stop_startup_with_a_message():
    result = run_bin(env={"HYPHA_PORT": "eighty"})
    assert result.returncode == 2 and "port" in result.stderr
    result = run_bin("--public-base-url", "ftp://x")
    assert result.returncode == 2 and "public_base_url must start with http" in result.stderr
    result = run_bin("--port", "not-a-number")
    assert result.returncode != 0 and "--port" in result.stderr


def test_layers_and_unknown_variable_warning(tmp_path):
    port = free_port()
    config = tmp_path / "hypha-rtc.toml"
    config.write_text(f'port = 1\npublic_base_url = "https://from-file.example.org"\n')
    proc = subprocess.Popen(
        [BIN, "--config", str(config), "--port", str(port), "--from-env", "--data-dir", str(tmp_path / "data")],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("HYPHA_")},
             "HYPHA_PUBLIC_BASE_URL": "https://from-env.example.org", "HYPHA_COTURN_SECRT": "typo",
             "JWT_SECRET": "fallback-secret"},
        stderr=subprocess.PIPE, text=True,
    )
    try:
        def up():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/assets/config.json", timeout=1) as r:
                return json.loads(r.read())
        wait_until(lambda: up() is not None, 15, "the server to start")
        # The command line beat the file for the port; the environment beat the file for the URL.
        assert up()["public_base_url"] == "https://from-env.example.org"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "HYPHA_COTURN_SECRT" in err and "unknown environment variable" in err
    assert "fallback-secret" not in err
