"""Shipping: the one-command stack brought up, used and torn down; the deployment files checked as
far as they can be without Docker or Kubernetes (parsed, cross-checked against the server's own
options, validated by systemd and nginx); the nginx example carrying a real client over TLS."""

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest
import yaml
from hypha_rpc import connect_to_server

from conftest import BIN, ROOT, Server, allocate, free_port, hypha_token, make_certificate, run, stun_binding_ok, wait_until

pytestmark = pytest.mark.timeout(180)


def known_options():
    """The server's long options, from its own --help."""
    text = subprocess.run([BIN, "--help"], capture_output=True, text=True, timeout=30).stdout
    return set(re.findall(r"--([a-z][a-z0-9-]+)", text))


def unknown_variables(names):
    options = known_options()
    return [n for n in names if n.startswith("HYPHA_") and n[6:].lower().replace("_", "-") not in options]


def interpolate(text, env):
    """Compose's variable syntax: $VAR, ${VAR}, ${VAR:-default}, ${VAR:?error}, $$."""

    def one(match):
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1) or match.group(4), match.group(2), match.group(3)
        value = env.get(name, "")
        if op == ":-" and not value:
            return arg
        if op == ":?" and not value:
            raise KeyError(f"{name}: {arg}")
        return value

    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)", one, text)


def port_open(port):
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_run_command_brings_up_the_stack_and_tears_it_down():
    state = Path(tempfile.mkdtemp(prefix="hypha-rtc-stack-"))
    port, turn_port = free_port(), free_port()
    relay = 42000 + (turn_port % 1000) * 10
    env = {**os.environ, "HYPHA_RTC_STATE": str(state), "HYPHA_PORT": str(port), "TURN_PORT": str(turn_port),
           "TURN_LISTEN_IP": "127.0.0.1", "TURN_MIN_PORT": str(relay), "TURN_MAX_PORT": str(relay + 9),
           "HYPHA_RTC_BIN": BIN}
    env.pop("HYPHA_RTC_CACHE", None)
    stack = subprocess.Popen([str(ROOT / "scripts" / "run.sh")], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = ""
        for _ in range(200):
            line = stack.stdout.readline()
            if not line or "open http" in line:
                break
        assert f"open http://127.0.0.1:{port}/demo/" in line, line
        # A fresh stack has no account: it shows the link that creates the first admin.
        first_run = stack.stdout.readline()
        assert f"Create the admin account at http://127.0.0.1:{port}/setup?key=" in first_run, first_run
        setup_path = first_run.split(f":{port}", 1)[1].split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{setup_path}", timeout=10) as page:
            assert page.status == 200 and "Create the first admin" in page.read().decode()

        async def main():
            secret = (state / "jwt-secret").read_text()
            client = await connect_to_server({"server_url": f"http://127.0.0.1:{port}", "token": hypha_token("sam", secret=secret)})
            servers = await client.get_rtc_ice_servers()
            assert servers[0]["urls"][0] == f"turn:127.0.0.1:{turn_port}"
            assert (await allocate(servers[0], turn_port))[0] == "127.0.0.1"
            await client.disconnect()

        run(main())
        # Twice: the second run sees the first and changes nothing.
        again = subprocess.run([str(ROOT / "scripts" / "run.sh")], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
        assert stack.poll() is None
        for name in ("jwt-secret", "coturn-secret", "turnserver.conf"):
            assert (state / name).stat().st_mode & 0o077 == 0, name
        assert (state / "coturn-secret").read_text() not in (state / "hypha-rtc.log").read_text()

        stack.send_signal(signal.SIGTERM)
        assert stack.wait(timeout=30) == 0
        assert not port_open(port)
        with pytest.raises(OSError):
            stun_binding_ok(turn_port)
        assert not (state / "stack.pid").exists()
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGKILL)


COMPOSE_ENV = {"HYPHA_JWT_SECRET": "jwt-for-the-check", "HYPHA_COTURN_SECRET": "coturn-for-the-check",
               "HYPHA_PUBLIC_COTURN_URI": "turn.example.org:3478", "HYPHA_COTURN_EXTERNAL_IP": "203.0.113.7",
               "HYPHA_POSTGRES_PASSWORD": "pg-for-the-check"}


def compose_service(name, env=COMPOSE_ENV):
    """The compose file as compose reads it: YAML first, then variables in string values."""

    def walk(value):
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return interpolate(value, env) if isinstance(value, str) else value

    compose = walk(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))
    return compose, compose["services"][name]


def test_compose_file_agrees_with_the_server_and_coturn():
    compose, hypha = compose_service("hypha-rtc")
    _, coturn = compose_service("coturn")
    environment = {k: str(v) for k, v in hypha["environment"].items()}
    assert unknown_variables(environment) == []
    # Configured only through HYPHA_* variables.
    referenced = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", (ROOT / "docker-compose.yml").read_text()))
    assert referenced and all(name.startswith("HYPHA_") for name in referenced), referenced
    flags = dict(arg.split("=", 1) for arg in coturn["command"] if arg.startswith("--") and "=" in arg)
    assert flags["--static-auth-secret"] == environment["HYPHA_COTURN_SECRET"] == COMPOSE_ENV["HYPHA_COTURN_SECRET"]
    assert environment["HYPHA_COTURN_URI"].rsplit(":", 1)[1] == flags["--listening-port"]
    assert hypha["network_mode"] == coturn["network_mode"] == "host"
    assert f"127.0.0.1:{environment['HYPHA_PORT']}/health/readiness" in " ".join(hypha["healthcheck"]["test"])
    assert any(v.endswith(":" + environment["HYPHA_DATA_DIR"]) for v in hypha["volumes"])
    assert hypha["build"] == "." and (ROOT / "Dockerfile").exists()
    assert {s for s, d in compose["services"].items() if "cluster" in d.get("profiles", [])} == {"redis", "postgres"}
    # Required settings fail loudly, as compose would.
    with pytest.raises(KeyError, match="HYPHA_COTURN_SECRET"):
        compose_service("hypha-rtc", {k: v for k, v in COMPOSE_ENV.items() if k != "HYPHA_COTURN_SECRET"})
    # The server takes exactly this environment (loopback and a temporary directory instead).
    data = tempfile.mkdtemp(prefix="hypha-rtc-compose-")
    port = free_port()
    environment.update(HYPHA_HOST="127.0.0.1", HYPHA_PORT=str(port), HYPHA_DATA_DIR=data, HYPHA_LOG_FORMAT="text")
    log = Path(data) / "log"
    proc = subprocess.Popen([BIN], env={"PATH": os.environ["PATH"], **environment}, stdout=subprocess.DEVNULL,
                            stderr=open(log, "wb"))
    try:
        wait_until(lambda: port_open(port) or proc.poll() is not None, 15, "the server with the compose environment")
        assert proc.poll() is None, log.read_text()
    finally:
        proc.kill()
        proc.wait(timeout=10)
    text = log.read_text()
    assert "unknown environment variable" not in text and "invalid settings" not in text, text
    assert COMPOSE_ENV["HYPHA_COTURN_SECRET"] not in text and COMPOSE_ENV["HYPHA_JWT_SECRET"] not in text


def test_dockerfile_builds_from_files_that_exist():
    lines = [l.strip() for l in (ROOT / "Dockerfile").read_text().splitlines() if l.strip() and not l.startswith("#")]
    stages = [l for l in lines if l.startswith("FROM ")]
    assert len(stages) == 2 and " AS build" in stages[0]
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    final = lines[lines.index(stages[1]):]
    user = next(l for l in final if l.startswith("USER ")).split()[1]
    assert user.split(":")[0] not in ("0", "root")
    assert "--bin hypha-rtc" in " ".join(lines) and 'name = "hypha-rtc"' in (ROOT / "Cargo.toml").read_text()
    copied = next(l for l in final if l.startswith("COPY --from=build")).split()[-1]
    assert copied == "/usr/local/bin/hypha-rtc" and 'ENTRYPOINT ["hypha-rtc"]' in final
    assert "EXPOSE 9527" in final and any("HYPHA_PORT=9527" in l for l in final)
    assert any("/health/readiness" in l for l in final)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "target" in ignored


def test_kubernetes_manifests_agree_with_the_server():
    docs = []
    for path in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    secret = by_kind[("Secret", "hypha-rtc")]
    deployment = by_kind[("Deployment", "hypha-rtc")]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert unknown_variables([*env, *secret["stringData"]]) == []
    assert container["envFrom"][0]["secretRef"]["name"] == "hypha-rtc"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(env["HYPHA_PORT"]) and ports["metrics"] == int(env["HYPHA_METRICS_PORT"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/readiness"
    assert pod["securityContext"]["runAsNonRoot"] is True
    service = by_kind[("Service", "hypha-rtc")]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    coturn = by_kind[("DaemonSet", "coturn")]["spec"]["template"]["spec"]
    assert coturn["hostNetwork"] is True
    turn = coturn["containers"][0]
    assert turn["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "hypha-rtc", "key": "HYPHA_COTURN_SECRET"}
    assert "--static-auth-secret=$(HYPHA_COTURN_SECRET)" in turn["args"]
    assert f"--listening-port={env['HYPHA_COTURN_URI'].rsplit(':', 1)[1]}" in turn["args"]
    # The probes' paths answer on a running server.
    server = Server().start()
    try:
        for probe in ("readinessProbe", "livenessProbe"):
            status, _, _ = server.http(container[probe]["httpGet"]["path"])
            assert status == 200, probe
    finally:
        server.stop()


def test_systemd_unit_is_valid_and_hardened():
    unit = (ROOT / "deploy" / "systemd" / "hypha-rtc.service").read_text()
    exec_start = next(l for l in unit.splitlines() if l.startswith("ExecStart="))
    flags = re.findall(r"--([a-z][a-z0-9-]+)", exec_start)
    assert flags and set(flags) <= known_options()
    for setting in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                    "DynamicUser=yes", "StateDirectory=hypha-rtc", "KillSignal=SIGTERM", "CapabilityBoundingSet="):
        assert setting in unit.splitlines(), setting
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "hypha-rtc.service"
        copy.write_text(unit.replace("/usr/local/bin/hypha-rtc", BIN))
        result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0 and str(copy) not in result.stderr, result.stderr


def test_nginx_example_carries_a_real_client_over_tls():
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    assert os.path.exists(nginx_bin), "nginx is not installed (Debian package nginx)"
    work = Path(tempfile.mkdtemp(prefix="hypha-rtc-nginx-"))
    cert, key, ca = make_certificate(work)
    server = Server("--trusted-proxies", "127.0.0.1").start()
    https_port, http_port = free_port(), free_port()
    site = (ROOT / "deploy" / "nginx" / "hypha-rtc.conf").read_text()
    site = (site.replace("/etc/letsencrypt/live/rtc.example.org/fullchain.pem", str(cert))
            .replace("/etc/letsencrypt/live/rtc.example.org/privkey.pem", str(key))
            .replace("server 127.0.0.1:9527;", f"server 127.0.0.1:{server.port};")
            .replace("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;")
            .replace("listen 80;", f"listen 127.0.0.1:{http_port};"))
    site = "\n".join(l for l in site.splitlines() if "listen [::]" not in l)
    (work / "site.conf").write_text(site)
    (work / "nginx.conf").write_text(
        f"pid {work}/nginx.pid;\nerror_log {work}/error.log;\ndaemon off;\nevents {{}}\n"
        f"http {{\n access_log off;\n client_body_temp_path {work};\n proxy_temp_path {work};\n"
        f" include {work}/site.conf;\n}}\n")
    checked = subprocess.run([nginx_bin, "-t", "-c", str(work / "nginx.conf")], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    nginx = subprocess.Popen([nginx_bin, "-c", str(work / "nginx.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(https_port), 15, "nginx to listen")
        context = ssl.create_default_context(cafile=str(ca))

        async def main():
            client = await connect_to_server({"server_url": f"https://localhost:{https_port}", "ssl": context,
                                              "token": hypha_token("tls")})
            assert await client.echo("through nginx") == "through nginx"
            await client.disconnect()

        run(main())
    finally:
        # SIGTERM: the master stops its workers too (SIGKILL would leave them running).
        nginx.terminate()
        nginx.wait(timeout=10)
        wait_until(lambda: not port_open(https_port), 10, "nginx's workers to stop")
        server.stop()
