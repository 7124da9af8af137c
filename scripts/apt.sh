# Sourced by the scripts: apt_install PACKAGE... installs Debian packages when running as root,
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
