"""Fixtures: a real hypha-rtc process per test module, Hypha-style tokens, raw websocket helpers."""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import jwt
import pytest
from aioice.turn import create_turn_endpoint

ROOT = Path(__file__).resolve().parents[3]
BIN = os.environ.get("HYPHA_RTC_BIN", str(ROOT / "target" / "debug" / "hypha-rtc"))
JS_DIR = ROOT / "tests" / "conformance" / "js"
SECRET = "conformance-secret-of-at-least-64-bytes-0123456789abcdef0123456789abcdef"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout, what):
    """Polls `predicate` until it is true or `timeout` seconds pass; returns its value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last error
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})")


async def wait_for(predicate, timeout, what):
    """Awaits `predicate()` until it is true or `timeout` seconds pass, letting the event loop
    (and the clients on it) run in between."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


COTURN_SECRET = "coturn-shared-secret-for-tests"


def stun_binding_ok(port):
    request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        s.sendto(request, ("127.0.0.1", port))
        data, _ = s.recvfrom(2048)
        return data[:2] == b"\x01\x01" and data[8:20] == request[8:20]


class Coturn:
    def __init__(self, secret=COTURN_SECRET, *extra, tls=None):
        """`tls`: (certificate, key) paths: coturn also speaks TLS, on `self.tls_port`."""
        assert shutil.which("turnserver"), "coturn (turnserver) is not installed"
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        tls_args = [f"--tls-listening-port={self.tls_port}", f"--cert={tls[0]}", f"--pkey={tls[1]}"] if tls else ["--no-tls"]
        relay = 40000 + (self.port % 2000) * 10
        self.proc = subprocess.Popen(
            ["turnserver", "-c", str(ROOT / "turnserver.conf"),
             "--listening-ip=127.0.0.1", f"--listening-port={self.port}", "--relay-ip=127.0.0.1",
             f"--static-auth-secret={secret}", "--realm=hypha-rtc.test", *tls_args, "--no-dtls",
             f"--min-port={relay}", f"--max-port={relay + 9}", f"--pidfile=/tmp/turnserver-{self.port}.pid", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: stun_binding_ok(self.port), 15, "coturn to answer STUN")

    def stop(self):
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def coturn():
    c = Coturn()
    yield c
    c.stop()


async def allocate(entry, port):
    """A TURN Allocate with aioice's client; returns the relayed address."""
    transport, _ = await create_turn_endpoint(
        asyncio.DatagramProtocol, ("127.0.0.1", port), entry["username"], entry["credential"], lifetime=60
    )
    try:
        return transport.get_extra_info("sockname")
    finally:
        transport.close()



def make_certificate(directory):
    """A test CA and a certificate it signed for localhost and 127.0.0.1; returns the paths of
    the certificate, its key and the CA certificate."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    period = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def build(subject, issuer, public_key, signer, extensions):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(period[0]).not_valid_after(period[1]))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hypha-rtc test CA")])
    ca = build(ca_name, ca_name, ca_key.public_key(), ca_key, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    key = ec.generate_private_key(ec.SECP256R1())
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    leaf = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), ca_name, key.public_key(), ca_key,
                 [(names, False), (x509.BasicConstraints(ca=False, path_length=None), True)])
    directory = Path(directory)
    paths = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    paths[0].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return paths


class Postgres:
    """A private PostgreSQL cluster from Debian's packages, on a loopback port, for the tests."""

    def __init__(self):
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        assert bins, "PostgreSQL is not installed (Debian package postgresql)"
        self.bin = bins[-1].parent
        self.dir = Path(tempfile.mkdtemp(prefix="hypha-rtc-pg-"))
        self.port = free_port()
        self.password = "pg-test-password"
        shutil.chown(self.dir, "postgres", "postgres")
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password)
        shutil.chown(pwfile, "postgres", "postgres")
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-U", "hypha",
                          f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=trust")
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w",
                          "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")

    def _as_postgres(self, *args):
        result = subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr + result.stdout

    def psql(self, database, sql):
        result = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "hypha", "-d", database, "-v", "ON_ERROR_STOP=1", "-tAc", sql],
            capture_output=True, text=True, timeout=30, env={**os.environ, "PGPASSWORD": self.password},
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def new_database(self):
        name = f"t_{free_port()}_{int(time.monotonic() * 1000) % 100000}"
        self.psql("postgres", f"CREATE DATABASE {name}")
        return name, f"postgres://hypha:{self.password}@127.0.0.1:{self.port}/{name}"

    def stop(self):
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


_postgres = None


@pytest.fixture(scope="session")
def postgres():
    global _postgres
    _postgres = Postgres()
    yield _postgres
    _postgres.stop()


class Server:
    """A hypha-rtc process on a loopback port, on SQLite or, with `postgres`, on a fresh
    PostgreSQL database."""

    def __init__(self, *extra, port=None, secret=SECRET, postgres=None, tls=None):
        """`tls`: (certificate, key, CA) paths from make_certificate: the server speaks TLS."""
        self.port = port or free_port()
        self.ssl = None
        if tls:
            import ssl

            extra = (*extra, "--cert-file", str(tls[0]), "--key-file", str(tls[1]))
            self.ssl = ssl.create_default_context(cafile=str(tls[2]))
        self.secret = secret
        self.extra = list(extra)
        self.postgres = postgres
        if postgres:
            self.database, url = postgres.new_database()
            self.extra += ["--database-url", url]
        self.proc = None
        # Its own log file: another server may have had the same port earlier in the run.
        handle, log = tempfile.mkstemp(prefix=f"hypha-rtc-{self.port}-", suffix=".log")
        os.close(handle)
        self.log = Path(log)
        self.data_dir = Path(tempfile.mkdtemp(prefix="hypha-rtc-data-"))

    @property
    def url(self):
        return f"{'https' if self.ssl else 'http'}://127.0.0.1:{self.port}"

    @property
    def ws_url(self):
        return f"{'wss' if self.ssl else 'ws'}://127.0.0.1:{self.port}/ws"

    def start(self):
        assert Path(BIN).exists(), f"server binary missing: {BIN} (build it first)"
        self.proc = subprocess.Popen(
            [BIN, "--port", str(self.port), "--jwt-secret", self.secret, "--data-dir", str(self.data_dir), *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"),
            # The test's own variable is not the server's (it would warn about it).
            env={k: v for k, v in os.environ.items() if k != "HYPHA_RTC_BIN"},
        )
        wait_until(self.alive, 15, "the server to answer /health/liveness")
        return self

    def alive(self):
        with urllib.request.urlopen(f"{self.url}/health/liveness", timeout=1, context=self.ssl) as r:
            return r.status == 200

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        assert self.proc is None or self.proc.returncode is not None

    def sql(self, statement):
        """Runs SQL against this server's database (for tests that need to age a row)."""
        if self.postgres:
            return self.postgres.psql(self.database, statement)
        import sqlite3

        with sqlite3.connect(self.data_dir / "hypha-rtc.db") as db:
            return db.execute(statement).fetchall()

    def http_text(self, path):
        """Returns (status, body text, headers)."""
        with urllib.request.urlopen(self.url + path, timeout=10, context=self.ssl) as r:
            return r.status, r.read().decode(), r.headers

    def http_text_status(self, path):
        """Like http_text, with error statuses returned instead of raised."""
        try:
            return self.http_text(path)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), e.headers

    def http(self, path, token=None, data=None, method=None):
        """Returns (status, parsed JSON body, headers)."""
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        body = json.dumps(data).encode() if data is not None else None
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.ssl) as r:
                return r.status, json.loads(r.read() or b"null"), r.headers
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null"), e.headers


@pytest.fixture(scope="module")
def server():
    s = Server().start()
    yield s
    s.stop()


def hypha_token(user_id, workspaces=None, secret=SECRET, expires_in=3600, roles=None, wid=None, cid=None, alg="HS256",
                issued_ago=0):
    """A token exactly as Hypha's `_generate_presigned_token` mints it (HS256, Hypha's claims);
    `issued_ago`: seconds its `iat` lies in the past."""
    now = int(time.time())
    scope = [f"ws:{ws}#{perm}" for ws, perm in (workspaces or {}).items()]
    if wid:
        scope.append(f"wid:{wid}")
    if cid:
        scope.append(f"cid:{cid}")
    claims = {
        "iss": "https://amun.ai/",
        "sub": user_id,
        "aud": "https://amun-ai.eu.auth0.com/api/v2/",
        "iat": now - issued_ago,
        "exp": now + expires_in,
        "scope": " ".join(scope),
        "gty": "client-credentials",
        "https://amun.ai/roles": roles or [],
        "https://amun.ai/email": f"{user_id}@example.org",
    }
    return jwt.encode(claims, secret, algorithm=alg)


async def announce_body(url, path, length, headers=None):
    """Sends only the head of a POST whose body would be `length` bytes and returns the
    answer's status and text: a refusal of an oversized body is then read without the race
    between the server closing and the client still writing the body."""
    host, port = url.split("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: {length}\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    size = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")))
    body = await asyncio.wait_for(reader.readexactly(size), 10)
    writer.close()
    return int(head.split()[1]), body.decode()


def run(coro, timeout=120):
    """Runs a coroutine with a deadline."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def node(script, *args, timeout=60, stdin=None):
    """Runs one of the JS helper scripts with the real npm hypha-rpc client."""
    proc = subprocess.run(
        ["node", str(JS_DIR / script), *args],
        cwd=JS_DIR,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def node_background(script, *args):
    return subprocess.Popen(
        ["node", str(JS_DIR / script), *args],
        cwd=JS_DIR,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result_of(output):
    """The JSON after `RESULT ` in a helper script's output."""
    line = next(l for l in output.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def json_line(stream, prefix, timeout=30):
    """Reads lines until one starts with `prefix`; returns the JSON after it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        if line.startswith(prefix):
            return json.loads(line[len(prefix):])
    raise AssertionError(f"no line starting with {prefix!r}")
