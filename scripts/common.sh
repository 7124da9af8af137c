# Sourced by every script after `cd` to the repository root: where builds and installed tools
# are kept between runs (HYPHA_RTC_CACHE, default ~/.cache/hypha-rtc; cargo's target directory
# inside it unless CARGO_TARGET_DIR says otherwise), and apt_install.
CACHE="${HYPHA_RTC_CACHE:-$HOME/.cache/hypha-rtc}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
mkdir -p "$CACHE"
# A script that stops on an error (set -e) says where, instead of ending without a word.
trap 'rc=$?; [[ $- == *e* ]] && echo "$0: stopped at line $LINENO ($BASH_COMMAND): exit $rc" >&2' ERR

# apt_install PACKAGE... installs Debian packages when running as root,
# and otherwise stops with a message naming what is missing.
apt_install() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        printf '\n== installing Debian packages: %s\n' "$*"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        echo "missing prerequisite: $* (install it with apt-get)" >&2
        exit 1
    fi
}

# ticks PID...: CPU clock ticks (user and system) the processes have spent so far (for the
# benchmarks' CPU figures; `getconf CLK_TCK` ticks make a second).
ticks() {
    local total=0 pid
    for pid in "$@"; do
        total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
    done
    echo "$total"
}

# venv_for REQUIREMENTS NAME: prints the path of a virtual environment under $CACHE holding
# exactly REQUIREMENTS (kept while the file is unchanged), creating it when needed.
venv_for() {
    local venv
    venv="$CACHE/$2-$(sha256sum "$1" | cut -c1-12)"
    if [ ! -f "$venv/.complete" ]; then
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q --upgrade pip >&2
        "$venv/bin/pip" install -q -r "$1" >&2
        touch "$venv/.complete"
    fi
    echo "$venv"
}
