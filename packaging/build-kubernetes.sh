#!/bin/bash
# Build the real Kubernetes the tests/kube tier runs (kube-apiserver, kubelet,
# kube-controller-manager, kube-scheduler 1.20.2), offline, from Debian 12's own
# `kubernetes` source package, with Debian's Go. Next to them go etcd, kubectl and the
# CNI plugins, unpacked from Debian's packages (nothing of them is installed on the node).
#
# Once per machine: the result stays in $MIGRT_KUBE_DIR (default
# /opt/migrt/test/kubernetes-1.20.2) and a second run only checks it. The source comes
# through a private apt configuration: no deb-src entry is left in the node's sources.
# Takes about 14 minutes on 2 cores. Needs root (apt-get).
set -euo pipefail

KDIR=${MIGRT_KUBE_DIR:-/opt/migrt/test/kubernetes-1.20.2}
SRCVER=1.20.5+really1.20.2-1.1+deb12u1
BINS="kube-apiserver kubelet kube-controller-manager kube-scheduler kubectl etcd etcdctl bridge host-local loopback portmap"

log() { printf 'build-kubernetes: %s\n' "$*" >&2; }

complete() {
    local b
    [ -f "$KDIR/COMPLETE" ] || return 1
    grep -q "reflect2 1.0.2" "$KDIR/COMPLETE" || return 1       # see the vendor fix below
    for b in $BINS; do [ -x "$KDIR/bin/$b" ] || return 1; done
}

if complete; then
    log "already built in $KDIR"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    log "must run as root (it installs build tools and fetches Debian packages)"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
start=$(date +%s)
mkdir -p "$(dirname "$KDIR")"
# One build at a time on this machine.
exec 9>"$(dirname "$KDIR")/.build-kubernetes.lock"
flock 9
if complete; then
    log "already built in $KDIR (by a concurrent run)"
    exit 0
fi

# Go comes privately too (Debian 12's 1.19, unpacked under the build dir): Kubernetes 1.20
# does not build with the Go of newer releases, and the node keeps the Go it has.
need=
for p in rsync make dpkg-dev gcc libc6-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need="$need $p"
done
if [ -n "$need" ]; then
    log "installing build tools:$need"
    apt-get update -qq
    apt-get install -y -qq -t bookworm $need >/dev/null 2>&1 || apt-get install -y -qq $need >/dev/null
fi

work=$(mktemp -d /var/tmp/build-kubernetes.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"

# A private apt: its own source list (bookworm + security, deb and deb-src), its own
# lists directory; the node's configuration is read but never written.
mkdir -p "$work/apt/lists/partial" "$work/apt/archives/partial"
cat > "$work/apt/sources.list" <<'SRC'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
SRC
papt() {
    apt-get -q -o Dir::Etc::SourceList="$work/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null \
        -o Dir::State::Lists="$work/apt/lists" -o Dir::Cache::Archives="$work/apt/archives" \
        -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= \
        -o APT::Sandbox::User=root "$@"
}
log "fetching the source package kubernetes=$SRCVER and etcd, kubectl, CNI packages"
papt update >/dev/null
(cd "$work" && papt source --download-only "kubernetes=$SRCVER" >/dev/null)
(cd "$work" && papt download etcd-server etcd-client kubernetes-client containernetworking-plugins >/dev/null)
mkdir -p "$work/debs-go"
(cd "$work/debs-go" && papt download golang-1.19-go golang-1.19-src >/dev/null)
for d in "$work"/debs-go/*.deb; do dpkg-deb -x "$d" "$work/go"; done
export GOROOT="$work/go/usr/lib/go-1.19"
export PATH="$GOROOT/bin:$PATH"
"$GOROOT/bin/go" version >&2
(cd "$work" && dpkg-source --no-check -x kubernetes_*.dsc src >/dev/null)
# Kubernetes 1.20 vendors github.com/modern-go/reflect2 1.0.1, whose map iteration
# assumes the runtime's hash-iterator layout of Go <= 1.17; built with Debian 12's Go 1.19
# it corrupts memory: kube-apiserver died ("unexpected fault address", SIGSEGV in
# reflect2 UnsafeIterate under json-iterator) on the first custom resource it encoded.
# reflect2 1.0.2 is the upstream fix; Debian 12 packages it. Its source replaces the
# vendored one (the module's version label is left as is, so that vendor/modules.txt
# still matches go.mod for -mod=vendor).
mkdir -p "$work/reflect2"
(cd "$work/reflect2" && papt download golang-github-modern-go-reflect2-dev >/dev/null \
    && dpkg-deb -x golang-github-modern-go-reflect2-dev_*.deb x)
r2src="$work/reflect2/x/usr/share/gocode/src/github.com/modern-go/reflect2"
r2dst="$work/src/vendor/github.com/modern-go/reflect2"
[ -d "$r2src" ] && [ -d "$r2dst" ] || { log "reflect2 1.0.2 source not found"; exit 1; }
rm -f "$r2dst"/*.go "$r2dst"/*.s
for f in "$r2src"/*.go "$r2src"/*.s; do
    case $f in *_test.go|*'*'*) ;; *) cp "$f" "$r2dst/";; esac
done

new="$KDIR.new"
rm -rf "$new"
mkdir -p "$new/bin" "$new/debs"
for d in "$work"/*.deb; do dpkg-deb -x "$d" "$new/debs"; done
cp "$new/debs/usr/bin/etcd" "$new/debs/usr/bin/etcdctl" "$new/debs/usr/bin/kubectl" "$new/bin/"
for b in bridge host-local loopback portmap; do cp "$new/debs/usr/lib/cni/$b" "$new/bin/"; done
mkdir -p "$new/cni"
cp "$new/debs/usr/lib/cni/"* "$new/cni/"
rm -rf "$new/debs"

log "building kube-apiserver, kubelet, kube-controller-manager, kube-scheduler (~14 min)"
cd "$work/src"
# Offline: the tarball carries vendor/; Go must not reach for a module proxy.
export GOFLAGS=-mod=vendor GOPROXY=off GO111MODULE=on GOCACHE="$work/gocache" GOPATH="$work/gopath"
export KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_TREE_STATE=clean
make WHAT="cmd/kube-apiserver cmd/kubelet cmd/kube-controller-manager cmd/kube-scheduler" >"$work/make.log" 2>&1 || {
    tail -40 "$work/make.log" >&2
    log "make failed"
    exit 1
}
for b in kube-apiserver kubelet kube-controller-manager kube-scheduler; do
    cp "_output/local/bin/linux/amd64/$b" "$new/bin/"
done
cd /
"$new/bin/kube-apiserver" --version >/dev/null
"$new/bin/etcd" --version >/dev/null
echo "kubernetes $SRCVER (vendored reflect2 1.0.2) built $(date -u +%FT%TZ) in $(( $(date +%s) - start )) s" > "$new/COMPLETE"
rm -rf "$KDIR"
mv "$new" "$KDIR"
log "done in $(( $(date +%s) - start )) s: $KDIR/bin"
