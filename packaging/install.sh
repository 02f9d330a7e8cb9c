#!/bin/bash
# Install migrt and everything it drives (runc, CRIU 4.x, iptables) plus what the
# test suite uses (containerd, podman, busybox), on a fresh Debian 12 or 13, as root.
#
# Debian 12's criu (3.17) fails `criu check` on current kernels (rt vDSO bounds), so on
# bookworm criu, runc and iptables come together from trixie, pinned low so that nothing
# else moves to trixie. They must come in ONE apt command: trixie's criu with bookworm's
# iptables ends in a libxtables conflict.
#
# Idempotent: running it again only checks. Environment:
#   MIGRT_PREFIX   where the virtualenv goes (default /opt/migrt)
#   MIGRT_BIN      where the `migrt` launcher goes (default /usr/local/bin)
#   MIGRT_NO_TEST_DEPS=1  skip containerd/podman/pytest (node install only)
set -euo pipefail

PREFIX=${MIGRT_PREFIX:-/opt/migrt}
BIN=${MIGRT_BIN:-/usr/local/bin}
SRC=$(cd "$(dirname "$0")/.." && pwd)

log() { printf 'migrt-install: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (it installs packages and writes $PREFIX)"
    exit 1
fi

. /etc/os-release
export DEBIAN_FRONTEND=noninteractive

apt_updated=
apt_update() { [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }; }

have_good_criu() {
    command -v criu >/dev/null 2>&1 || return 1
    local v; v=$(criu --version 2>/dev/null | sed -n 's/^Version: *//p')
    [ "${v%%.*}" -ge 4 ] 2>/dev/null
}

base_pkgs="runc criu iptables"
test_pkgs="containerd podman busybox-static iproute2 ca-certificates"
# The compiler for the tests' fake libcuda and memory workload. On Debian 12 libc6 is
# trixie's by now (it came with criu), so its -dev package and gcc must be trixie's too.
build_pkgs="gcc libc6-dev"

# A Debian 12 that got criu from trixie (pinned low, below) reports trixie in
# /etc/os-release afterwards (base-files came along), but its default release is still
# bookworm: packages that must match trixie's libc are taken with -t trixie.
pinned_trixie() {
    [ -f /etc/apt/preferences.d/migrt-trixie ] && echo yes
}

missing_pkgs() {
    local p out=
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || out="$out $p"
    done
    echo $out
}

if ! have_good_criu || ! command -v runc >/dev/null || ! command -v iptables-restore >/dev/null; then
    case "$VERSION_CODENAME" in
    bookworm)
        log "Debian 12: taking criu, runc and iptables from trixie (pinned at priority 100)"
        if ! grep -rqs 'trixie' /etc/apt/sources.list /etc/apt/sources.list.d/; then
            cat > /etc/apt/sources.list.d/migrt-trixie.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        fi
        cat > /etc/apt/preferences.d/migrt-trixie <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 100
PIN
        apt_updated=; apt_update
        # python3-venv and pip's wheel come along: trixie's criu brings python3 3.13,
        # whose venv needs trixie's pip wheel.
        apt-get install -y -qq -t trixie $base_pkgs python3 python3-venv python3-pip-whl \
            python3-setuptools-whl >/dev/null
        ;;
    *)
        apt_update
        apt-get install -y -qq $base_pkgs >/dev/null
        ;;
    esac
fi
have_good_criu || { log "CRIU 4.x is required; got: $(criu --version 2>&1 | head -1)"; exit 1; }

# The venv's Python. On Debian 12 it is trixie's 3.13 (it came with criu), whose venv
# needs trixie's pip wheel.
pip_whl=$(dpkg-query -W -f='${Version}' python3-pip-whl 2>/dev/null || true)
if [ -n "$(missing_pkgs python3 python3-venv)" ] || ! dpkg --compare-versions "${pip_whl:-0}" ge 24; then
    apt_update
    if [ -n "$(pinned_trixie)" ]; then
        apt-get install -y -qq -t trixie python3 python3-venv python3-pip-whl \
            python3-setuptools-whl >/dev/null
    else
        apt-get install -y -qq python3 python3-venv >/dev/null
    fi
fi

if [ -z "${MIGRT_NO_TEST_DEPS:-}" ]; then
    missing=$(missing_pkgs $test_pkgs)
    if [ -n "$missing" ]; then
        apt_update
        log "installing: $missing"
        apt-get install -y -qq $missing >/dev/null
    fi
    missing=$(missing_pkgs $build_pkgs)
    if [ -n "$missing" ]; then
        apt_update
        log "installing: $missing"
        if [ -n "$(pinned_trixie)" ]; then
            apt-get install -y -qq -t trixie $missing >/dev/null
        else
            apt-get install -y -qq $missing >/dev/null
        fi
    fi
fi

# The e2e tests prove migrt's containerd drop-in on containerd 1.6 (Debian 12's) and 1.7
# (Debian 13's). Where the system's containerd is 1.6, 1.7 is unpacked privately under
# $PREFIX/test (its binaries need only libc, which trixie's criu brought along): the
# node's own containerd is not touched.
if [ -z "${MIGRT_NO_TEST_DEPS:-}" ] && containerd --version 2>/dev/null | grep -q ' 1\.6\.' \
        && [ ! -x "$PREFIX/test/containerd-1.7/usr/bin/containerd" ]; then
    log "unpacking Debian 13's containerd 1.7 into $PREFIX/test for the e2e tests"
    apt_update
    dl=$(mktemp -d); chmod 755 "$dl"
    if (cd "$dl" && apt-get download -qq containerd/trixie >/dev/null 2>&1); then
        mkdir -p "$PREFIX/test"
        rm -rf "$PREFIX/test/containerd-1.7.new"
        dpkg-deb -x "$dl"/containerd_*.deb "$PREFIX/test/containerd-1.7.new"
        rm -rf "$PREFIX/test/containerd-1.7"
        mv "$PREFIX/test/containerd-1.7.new" "$PREFIX/test/containerd-1.7"
    else
        log "could not download trixie's containerd: the e2e tests will cover 1.6 only"
    fi
    rm -rf "$dl"
fi

# The agent's network side runs as this user (migrt agent --user): no login, no home.
if ! getent passwd migrt-agent >/dev/null; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
        migrt-agent 2>/dev/null || log "could not create user migrt-agent (agent runs without --user)"
fi

# The virtualenv uses the system Python: the launcher runs it with -I -S so that the
# pass-through path starts in milliseconds.
PY=/usr/bin/python3
if [ ! -x "$PREFIX/venv/bin/python" ]; then
    log "creating $PREFIX/venv"
    mkdir -p "$PREFIX"
    "$PY" -m venv "$PREFIX/venv"
fi
"$PREFIX/venv/bin/pip" install -q --disable-pip-version-check -r "$SRC/packaging/requirements.txt"
if [ -z "${MIGRT_NO_TEST_DEPS:-}" ]; then
    "$PREFIX/venv/bin/pip" install -q --disable-pip-version-check -r "$SRC/packaging/requirements-test.txt"
fi
# The code itself is copied next to the venv; the launcher puts it first on sys.path.
rm -rf "$PREFIX/lib.new"; mkdir -p "$PREFIX/lib.new"
cp -a "$SRC/migrt" "$SRC/plugins" "$SRC/hooks" "$SRC/containerd-config" "$PREFIX/lib.new/"
mkdir -p "$PREFIX/lib.new/packaging"
cp -a "$SRC/packaging/containerd_register.py" "$SRC/packaging/uninstall.sh" \
    "$PREFIX/lib.new/packaging/"
find "$PREFIX/lib.new" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$PREFIX/lib.old"; [ -d "$PREFIX/lib" ] && mv "$PREFIX/lib" "$PREFIX/lib.old"
mv "$PREFIX/lib.new" "$PREFIX/lib"; rm -rf "$PREFIX/lib.old"
"$PREFIX/venv/bin/python" -m compileall -q "$PREFIX/lib" >/dev/null
"$PREFIX/venv/bin/python" -I -S "$PREFIX/lib/migrt/launcher.py" --source "$PREFIX/lib" \
    --python "$PREFIX/venv/bin/python" "$BIN/migrt"
# `kubectl migrt` (the kubectl plugin of migrt/kube: pod moves, drains, PodMigrations)
sed -e "s|@PYTHON@|$PREFIX/venv/bin/python|" -e "s|@LIB@|$PREFIX/lib|" \
    "$SRC/packaging/kubectl-migrt" > "$BIN/kubectl-migrt" && chmod 755 "$BIN/kubectl-migrt"
# Register migrt with the container managers on this node, as runtime handler "migrt"
# next to runc (which stays the default: nothing changes for pods without
# runtimeClassName: migrt). MIGRT_NO_REGISTER=1 skips this; MIGRT_RESTART_MANAGERS=1
# restarts containerd / CRI-O when their config changed (running containers keep running).
if [ -z "${MIGRT_NO_REGISTER:-}" ]; then
    ctrd_conf=${MIGRT_CONTAINERD_CONFIG:-/etc/containerd/config.toml}
    if command -v containerd >/dev/null 2>&1; then
        before=$( { cat "$ctrd_conf" 2>/dev/null || true; } | md5sum)
        "$PREFIX/venv/bin/python" -I "$PREFIX/lib/packaging/containerd_register.py" register \
            --config "$ctrd_conf" --binary "$BIN/migrt" >&2
        if [ "$before" != "$(md5sum < "$ctrd_conf")" ] && systemctl is-active -q containerd 2>/dev/null; then
            if [ -n "${MIGRT_RESTART_MANAGERS:-}" ]; then systemctl restart containerd
            else log "restart containerd to load the migrt runtime handler: systemctl restart containerd"; fi
        fi
    fi
    crio_dir=${MIGRT_CRIO_DROP_INS:-/etc/crio/crio.conf.d}
    if command -v crio >/dev/null 2>&1 || [ -d "$(dirname "$crio_dir")" ]; then
        mkdir -p "$crio_dir"
        sed "s|\"/usr/local/bin/migrt\"|\"$BIN/migrt\"|" "$SRC/containerd-config/crio-migrt.conf" \
            > "$crio_dir/50-migrt.conf.tmp"
        if ! cmp -s "$crio_dir/50-migrt.conf.tmp" "$crio_dir/50-migrt.conf" 2>/dev/null; then
            mv "$crio_dir/50-migrt.conf.tmp" "$crio_dir/50-migrt.conf"
            log "CRI-O: runtime handler migrt in $crio_dir/50-migrt.conf"
            if systemctl is-active -q crio 2>/dev/null; then
                if [ -n "${MIGRT_RESTART_MANAGERS:-}" ]; then systemctl restart crio
                else log "restart CRI-O to load it: systemctl restart crio"; fi
            fi
        else
            rm -f "$crio_dir/50-migrt.conf.tmp"
        fi
    fi
fi
# CRIU's page server (the source of a lazy migration) needs a 4 MiB pipe; root without
# CAP_SYS_RESOURCE (VMs, sandboxes) may not exceed fs.pipe-max-size (often 1 MiB): see
# migrt/criu/lazycheck.py. Raise the limit, persistently, only if it is lower.
if [ "$(cat /proc/sys/fs/pipe-max-size 2>/dev/null || echo 0)" -lt 4194304 ]; then
    mkdir -p /etc/sysctl.d
    printf '# migrt: CRIU lazy page server (migrt/criu/lazycheck.py)\nfs.pipe-max-size = 4194304\n' \
        > /etc/sysctl.d/90-migrt.conf
    if sysctl -q -p /etc/sysctl.d/90-migrt.conf 2>/dev/null \
            || echo 4194304 > /proc/sys/fs/pipe-max-size 2>/dev/null; then
        log "fs.pipe-max-size raised to 4194304 (/etc/sysctl.d/90-migrt.conf)"
    else
        log "could not raise fs.pipe-max-size: migrt migrate --lazy will refuse on this node"
    fi
fi
log "migrt installed: $BIN/migrt ($("$BIN/migrt" --version 2>&1 | head -1))"
log "runc: $(runc --version | head -1); criu: $(criu --version | head -1)"
