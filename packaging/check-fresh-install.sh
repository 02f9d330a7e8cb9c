#!/bin/bash
# Prove packaging/install.sh on a fresh Debian, and show what it changes there: unpack a
# pristine minbase root of RELEASE (debootstrapped once per machine and kept as a tarball
# under $MIGRT_ROOTS, default /opt/migrt/test/roots), copy this checkout in, run
# `MIGRT_NO_TEST_DEPS=1 bash packaging/install.sh` (what a node operator runs) in a chroot,
# and compare `dpkg-query -W` and /etc/os-release before and after.
#
# Fails (exit 1) if install.sh failed, if any package was upgraded, downgraded or
# removed, if /etc/os-release changed, if no CRIU 4.2.1 answers at /usr/local/sbin/criu,
# or if apt's sources name another release afterwards. Packages ADDED are the point of an
# install and are listed. Run by tests/e2e/test_fresh_install.py; by hand:
#
#   packaging/check-fresh-install.sh bookworm [REPORT.json]
#   packaging/check-fresh-install.sh trixie
#
# /proc, /sys and a private /dev/pts are mounted in the chroot (CRIU's build and `criu
# check` use them) and always unmounted; the work dir is removed unless MIGRT_KEEP_ROOT=1.
# install.sh's output is kept next to REPORT.json (REPORT.json.install.log).
set -euo pipefail
release=${1:-bookworm}
report=${2:-}
src=$(cd "$(dirname "$0")/.." && pwd)
roots=${MIGRT_ROOTS:-/opt/migrt/test/roots}
mirror=${MIGRT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
pristine=$roots/$release-minbase.tar

log() { printf 'check-fresh-install[%s]: %s\n' "$release" "$*" >&2; }
t0=$(date +%s)

if [ ! -f "$pristine" ]; then
    command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
    mkdir -p "$roots"
    build=$(mktemp -d "$roots/.debootstrap-$release.XXXXXX")
    log "debootstrapping a minbase $release (once per machine) into $pristine"
    if ! debootstrap --variant=minbase "$release" "$build/root" "$mirror" >"$build/log" 2>&1; then
        tail -20 "$build/log" >&2; rm -rf "$build"; exit 1
    fi
    tar -C "$build/root" --numeric-owner -cf "$build/root.tar" .
    mv "$build/root.tar" "$pristine"
    rm -rf "$build"
fi
t_root=$(date +%s)

dir=$(mktemp -d "/var/tmp/migrt-fresh-$release.XXXXXX")
mounted=()
cleanup() {
    local i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" 2>/dev/null || true
    done
    if [ -z "${MIGRT_KEEP_ROOT:-}" ]; then
        # never delete through a mount that did not go away
        if ! grep -q " $dir/" /proc/self/mounts; then rm -rf "$dir"; fi
    else
        log "kept $dir"
    fi
}
trap cleanup EXIT
tar -C "$dir" --numeric-owner -xf "$pristine"
mkdir -p "$dir/src"
tar -C "$src" --exclude=.git --exclude=__pycache__ -cf - . | tar -C "$dir/src" -xf -
cp /etc/resolv.conf "$dir/etc/"
# the host's CA bundle and pip settings, for sites that reach PyPI through a proxy
cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/" 2>/dev/null || true
# (and the site's own CAs, which update-ca-certificates keeps when ca-certificates comes in)
if [ -d /usr/local/share/ca-certificates ]; then
    mkdir -p "$dir/usr/local/share/ca-certificates"
    cp -a /usr/local/share/ca-certificates/. "$dir/usr/local/share/ca-certificates/"
fi
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$dir/etc/"
# and the host's apt policy on stale indexes (a site whose mirror is a snapshot turns
# Acquire::Check-Valid-Until off; the fresh root must see the mirror as the host does)
if apt-config dump 2>/dev/null | grep -qi '^Acquire::Check-Valid-Until "\(false\|0\|no\)"'; then
    echo 'Acquire::Check-Valid-Until "false";' > "$dir/etc/apt/apt.conf.d/99migrt-check-host-policy"
fi
# the root's own /dev holds the device nodes debootstrap made; apt wants a pty too
mount -t proc proc "$dir/proc" && mounted+=("$dir/proc")
mount -t sysfs sysfs "$dir/sys" && mounted+=("$dir/sys")
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$dir/dev/pts" && mounted+=("$dir/dev/pts")

in_root() { chroot "$dir" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 "$@"; }
pkgs() { in_root dpkg-query -W -f='${db:Status-Abbrev} ${Package}:${Architecture} ${Version}\n' \
    | awk '$1 == "ii" {print $2, $3}' | sort; }

pkgs > "$dir/.before"
cp "$dir/etc/os-release" "$dir/.os-release.before"
t_inst=$(date +%s)
rc=0
in_root /bin/bash -c 'cd /src && MIGRT_NO_TEST_DEPS=1 bash packaging/install.sh' \
    > "$dir/.install.log" 2>&1 || rc=$?
t_done=$(date +%s)
pkgs > "$dir/.after"

added=$(join -v2 "$dir/.before" "$dir/.after" | awk '{print $1 "=" $2}')
removed=$(join -v1 "$dir/.before" "$dir/.after" | awk '{print $1 "=" $2}')
changed=$(join "$dir/.before" "$dir/.after" | awk '$2 != $3 {print $1 "=" $2 "->" $3}')
os_same=yes
cmp -s "$dir/.os-release.before" "$dir/etc/os-release" || os_same=no
criu_v=$(in_root /usr/local/sbin/criu --version 2>/dev/null | sed -n 's/^Version: *//p' || true)
criu_check=$(in_root /usr/local/sbin/criu check 2>&1 | tail -1 || true)
migrt_v=$(in_root /usr/local/bin/migrt --version 2>/dev/null | sed -n 's/^migrt: *//p' || true)
py_v=$(in_root /opt/migrt/venv/bin/python -c 'import platform; print(platform.python_version())' 2>/dev/null || true)
other_suites=$(in_root sh -c 'cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null' \
    | grep -Ev '^\s*(#|$)' | grep -Eow 'bookworm|trixie|forky|sid|unstable|testing' \
    | grep -vx "$release" | sort -u | tr '\n' ' ' || true)
leftover=$( (ls -d "$dir"/var/tmp/migrt-* 2>/dev/null || true) | wc -l)

n() { [ -z "$1" ] && echo 0 || echo "$1" | wc -l; }
log "debootstrap/unpack $((t_inst - t0)) s (cached root: $([ "$t_root" = "$t0" ] && echo yes || echo no)), install.sh $((t_done - t_inst)) s, exit $rc"
log "packages: $(n "$added") added, $(n "$changed") upgraded/downgraded, $(n "$removed") removed; os-release unchanged: $os_same"
log "criu $criu_v ($criu_check); migrt $migrt_v; venv Python $py_v"
[ -z "$changed" ] || { log "changed:"; echo "$changed" | sed 's/^/  /' >&2; }
[ -z "$removed" ] || { log "removed:"; echo "$removed" | sed 's/^/  /' >&2; }

fail=()
[ "$rc" = 0 ] || fail+=("install.sh exited $rc")
[ -z "$changed" ] || fail+=("packages upgraded or downgraded")
[ -z "$removed" ] || fail+=("packages removed")
[ "$os_same" = yes ] || fail+=("/etc/os-release changed")
[ "$criu_v" = 4.2.1 ] || fail+=("no CRIU 4.2.1 at /usr/local/sbin/criu (got '$criu_v')")
[ -n "$migrt_v" ] || fail+=("/usr/local/bin/migrt --version failed")
[ -z "$other_suites" ] || fail+=("apt sources name $other_suites")
[ "$leftover" = 0 ] || fail+=("install.sh left $leftover temporary dirs in /var/tmp")

if [ -n "$report" ]; then
    cp "$dir/.install.log" "$report.install.log"
    printf '%s\n' "${fail[@]+"${fail[@]}"}" > "$dir/.failures"
    echo "$added" > "$dir/.added"; echo "$changed" > "$dir/.changed"
    echo "$removed" > "$dir/.removed"
    R_RELEASE=$release R_RC=$rc R_ROOT_S=$((t_inst - t0)) R_INSTALL_S=$((t_done - t_inst)) \
    R_CACHED=$([ "$t_root" = "$t0" ] && echo 1 || echo 0) R_OS_SAME=$os_same \
    R_CRIU=$criu_v R_CRIU_CHECK=$criu_check R_MIGRT=$migrt_v R_PY=$py_v \
    R_OTHER=$other_suites R_DIR=$dir /usr/bin/python3 - "$report" <<'PY'
import json, os, sys
e = os.environ
def lines(name):
    with open(os.path.join(e["R_DIR"], name)) as f:
        return [l for l in f.read().splitlines() if l]
json.dump({"release": e["R_RELEASE"], "install_exit": int(e["R_RC"]),
           "seconds": {"root": int(e["R_ROOT_S"]), "install": int(e["R_INSTALL_S"])},
           "root_cached": e["R_CACHED"] == "1",
           "added": lines(".added"), "changed": lines(".changed"), "removed": lines(".removed"),
           "os_release_unchanged": e["R_OS_SAME"] == "yes",
           "criu_version": e["R_CRIU"], "criu_check": e["R_CRIU_CHECK"],
           "migrt_version": e["R_MIGRT"], "venv_python": e["R_PY"],
           "other_suites": e["R_OTHER"].split(), "failures": lines(".failures")},
          open(sys.argv[1], "w"), indent=1)
PY
fi
if [ ${#fail[@]} -gt 0 ]; then
    [ "$rc" = 0 ] || tail -30 "$dir/.install.log" | sed 's/^/  | /' >&2
    log "FAILED: $(IFS=';'; echo "${fail[*]}")"
    exit 1
fi
log "OK"
