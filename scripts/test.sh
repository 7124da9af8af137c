#!/usr/bin/env bash
# Runs every test of hypha-rtc: formatting, lints, the Rust unit and integration tests, and the
# conformance suites that drive the real hypha-rpc clients (PyPI and npm, pinned) against
# servers they start on loopback. Installs what it needs, idempotently; a missing
# prerequisite that cannot be installed fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/common.sh
source scripts/common.sh

step() { printf '\n== %s\n' "$*"; }


command -v cargo >/dev/null || { echo "missing prerequisite: cargo (Rust toolchain)" >&2; exit 1; }
command -v python3 >/dev/null || apt_install python3 python3-venv
command -v node >/dev/null || apt_install nodejs npm
command -v npm >/dev/null || apt_install npm
command -v turnserver >/dev/null || apt_install coturn
command -v chromium >/dev/null || apt_install chromium
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_install postgresql
command -v redis-server >/dev/null || apt_install redis-server
# The deployment checks: nginx validates and runs the reverse-proxy example, systemd-analyze the
# unit; the run command uses curl.
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || apt_install nginx
command -v systemd-analyze >/dev/null || apt_install systemd
command -v curl >/dev/null || apt_install curl
# openh264 builds its SIMD assembly only when nasm is present at build time (silently plain C
# without it); an encoder built before nasm came is rebuilt.
# VP8 (the vp8 feature, which the tests build) links Debian's libvpx through pkg-config.
command -v pkg-config >/dev/null || apt_install pkg-config
pkg-config --exists vpx 2>/dev/null || apt_install libvpx-dev
if ! command -v nasm >/dev/null; then
    apt_install nasm
    cargo clean -p openh264-sys2 >/dev/null 2>&1 || true
fi

step "Python environment (hypha-rpc, aiortc, numpy)"
VENV="$(venv_for tests/conformance/python/requirements.txt venv)"

step "npm packages (hypha-rpc, ws, playwright-core)"
JS=tests/conformance/js
STAMP="$JS/node_modules/.lock-$(sha256sum "$JS/package-lock.json" | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
    # playwright-core drives Debian's chromium; it never downloads a browser of its own.
    (cd "$JS" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
    touch "$STAMP"
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings (default features, and with vp8)"
cargo clippy --all-targets --locked -- -D warnings
cargo clippy --all-targets --locked --features vp8 -- -D warnings

step "cargo test (with vp8)"
cargo build --locked --bins --features vp8
cargo test --locked --features vp8

step "conformance suites (real hypha-rpc clients)"
HYPHA_RTC_BIN="$CARGO_TARGET_DIR/debug/hypha-rtc" \
    "$VENV/bin/python" -m pytest tests/conformance/python -q -p no:cacheprovider \
    -W ignore::jwt.warnings.InsecureKeyLengthWarning

step "the hypha-rpc client's own test suite (its PyPI source distribution, unchanged)"
SUITE_VENV="$(venv_for tests/conformance/client-suite/requirements.txt client-suite-venv)"
SDIST="$CACHE/hypha_rpc-0.21.47"
if [ ! -f "$SDIST/.complete" ]; then
    rm -rf "$SDIST" "$CACHE/sdist-download"
    "$SUITE_VENV/bin/pip" download -q --no-deps --no-binary :all: hypha-rpc==0.21.47 -d "$CACHE/sdist-download"
    tar -xzf "$CACHE/sdist-download/hypha_rpc-0.21.47.tar.gz" -C "$CACHE"
    touch "$SDIST/.complete"
fi
# The published tests, as they are, beside the fixtures that start hypha-rtc; run from a
# folder without the client's sources, so the installed client is the one tested.
SUITE_RUN="$(mktemp -d)"
trap 'rm -rf "$SUITE_RUN"' EXIT
mkdir "$SUITE_RUN/tests"
cp "$SDIST"/tests/test_*.py "$SUITE_RUN/tests/"
cp tests/conformance/client-suite/{__init__,conftest,known}.py "$SUITE_RUN/tests/"
(cd "$SUITE_RUN" && HYPHA_RTC_BIN="$CARGO_TARGET_DIR/debug/hypha-rtc" \
    "$SUITE_VENV/bin/python" -m pytest tests -q -p no:cacheprovider -o asyncio_mode=auto \
    -o asyncio_default_fixture_loop_scope=function --timeout 120 -rfEX)
