#!/bin/bash
# Prove packaging/install.sh on a fresh Debian: debootstrap a minbase system of the
# given release into a directory, copy this checkout in, run the install step in a
# chroot and check that migrt, runc and CRIU 4.x answer. Not part of CI (it downloads
# a whole base system); run it by hand after changing install.sh:
#
#   packaging/check-fresh-install.sh bookworm /var/tmp/fresh12
#   packaging/check-fresh-install.sh trixie /var/tmp/fresh13
set -euo pipefail
release=${1:-bookworm}
dir=${2:-/var/tmp/migrt-fresh-$release}
src=$(cd "$(dirname "$0")/.." && pwd)
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap
[ -x "$dir/bin/bash" ] || debootstrap --variant=minbase "$release" "$dir" http://deb.debian.org/debian
rm -rf "$dir/src"; mkdir -p "$dir/src"
tar -C "$src" --exclude=.git -cf - . | tar -C "$dir/src" -xf -
cp /etc/resolv.conf "$dir/etc/"
# the host's CA bundle and pip settings, for sites that reach PyPI through a proxy
cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/" 2>/dev/null || true
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$dir/etc/"
mountpoint -q "$dir/proc" || mount -t proc proc "$dir/proc"
trap 'umount "$dir/proc" 2>/dev/null || true' EXIT
chroot "$dir" /bin/bash -c 'cd /src && bash packaging/install.sh &&
    /usr/local/bin/migrt --version && criu --version && runc --version | head -1 &&
    command -v iptables-restore containerd podman'
echo "fresh $release install: OK"
