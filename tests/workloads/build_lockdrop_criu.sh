#!/bin/bash
# Build CRIU as Debian sid ships it, WITHOUT migrt's patches (packaging/criu-patches), for
# the test that migrate still refuses a container whose locks such a CRIU would drop
# (test_programs.py::test_sqlite_wal_is_refused_with_a_criu_that_drops_the_lock).
# Usage: build_lockdrop_criu.sh DEST   (about 2 min; the tests keep DEST between runs)
# It fetches and checks the source exactly as packaging/install.sh does (its functions
# are taken from it) and installs the build packages it lacks (left installed: a test
# machine).
set -euo pipefail
DEST=$1
SRC=$(cd "$(dirname "$0")/../.." && pwd)
MIRROR=${MIGRT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
CRIU_SOURCE=${MIGRT_CRIU_SOURCE:-4.2.1-1}
log() { printf 'build_lockdrop_criu: %s\n' "$*" >&2; }
eval "$(sed -n '/^private_apt_init()/,/^private_apt_cache()/p;/^sid_source()/,/^}/p;/^criu_build_deps=/,/uuid-dev/p' \
    "$SRC/packaging/install.sh")"
# shellcheck disable=SC2086,SC2154
apt-get install -y -qq --no-install-recommends $criu_build_deps >/dev/null
w=$(mktemp -d /var/tmp/migrt-lockdrop-criu.XXXXXX)
trap 'rm -rf "$w"' EXIT
dir=$(sid_source "$w" criu "$CRIU_SOURCE")
make -C "$dir" -j"$(nproc)" criu >"$w/build.log" 2>&1 || { tail -20 "$w/build.log" >&2; exit 1; }
mkdir -p "$(dirname "$DEST")"
install -m 0755 "$dir/criu/criu" "$DEST.new"
mv -f "$DEST.new" "$DEST"
log "built $DEST (criu $CRIU_SOURCE without migrt's patches)"
