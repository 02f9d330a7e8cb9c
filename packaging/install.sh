#!/bin/bash
# Install migrt and everything it drives (runc, CRIU 4.2, iptables) plus what the
# test suite uses (containerd, podman, busybox, real workloads), on a fresh Debian 12 or
# 13, as root. It never moves the operating system: every package comes from the node's
# own release, with its own apt sources.
#
# CRIU: Debian 12's criu (3.17) fails `criu check` on current kernels, and Debian 13's
# (4.1.1) cannot dump any AF_INET socket on kernels >= 6.16 (fixed in CRIU 4.2). So CRIU
# is built from Debian sid's own source package (criu 4.2.1-1), fetched with apt-get
# source through a private sources list and state dir under a temporary directory (the
# node's apt sources never mention sid; apt checks the files against sid's signed
# Sources index), compiled with the release's gcc and -dev packages (about 20 s on two
# cores), and installed as /usr/local/sbin/criu, ahead of /usr/sbin on every standard
# PATH and where migrt always looks first (migrt/runc.py criu_path). The build-only
# packages it added are purged again; the libraries criu links to stay, marked manually
# installed. Debian's own criu package, if installed, is left alone and not used.
# Where the release's python3 is older than 3.13 (Debian 12), CPython 3.13 is built the
# same way from sid's python3.13 source into $PREFIX/python for migrt's venv (see
# build_python: the wire needs TLS-PSK).
# CRIU is built with migrt's patches to it, packaging/criu-patches/*.patch (each says at
# its top what it fixes; their SHA-256s are checked against SHA256SUMS there first).
#
# Idempotent: running it again only checks. The CRIU build is keyed on the source
# version, the patch set's hash and the binary's own hash, recorded in
# /usr/local/share/migrt/criu-build: a CRIU built without the current patch set (an
# older install's), or replaced since, is built again.
# Environment:
#   MIGRT_PREFIX   where the virtualenv goes (default /opt/migrt)
#   MIGRT_BIN      where the `migrt` launcher goes (default /usr/local/bin)
#   MIGRT_NO_TEST_DEPS=1  skip containerd/podman/pytest/workloads (node install only)
#   MIGRT_CRIU_SOURCE     Debian source version of criu to build (default 4.2.1-1)
#   MIGRT_PYTHON_SOURCE   ... of python3.13, where one is built (default 3.13.15-1)
#   MIGRT_DEBIAN_MIRROR   where sid's (and trixie's) indexes come from
#                         (default http://deb.debian.org/debian)
set -euo pipefail

PREFIX=${MIGRT_PREFIX:-/opt/migrt}
BIN=${MIGRT_BIN:-/usr/local/bin}
SRC=$(cd "$(dirname "$0")/.." && pwd)
CRIU_SOURCE=${MIGRT_CRIU_SOURCE:-4.2.1-1}
CRIU_VERSION=${CRIU_SOURCE%-*}             # upstream version, as `criu --version` says it
CRIU=/usr/local/sbin/criu
CRIU_PATCHES=$SRC/packaging/criu-patches
CRIU_STAMP=/usr/local/share/migrt/criu-build
# where that CRIU keeps its kernel-feature cache (only on a tmpfs, which migrt makes sure
# of: migrt/criu/kdat.py), instead of /run, which is not a tmpfs on every node
CRIU_RUNDIR=/run/migrt/criu
MIRROR=${MIGRT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

log() { printf 'migrt-install: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (it installs packages and writes $PREFIX)"
    exit 1
fi

. /etc/os-release
export DEBIAN_FRONTEND=noninteractive

apt_updated=
apt_update() { [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }; }

missing_pkgs() {
    local p out=
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || out="$out $p"
    done
    echo $out
}

installed_pkgs() { dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' | awk '$1 == "ii" {print $2}' | sort; }

tmpdirs=()
cleanup() { local d; for d in "${tmpdirs[@]}"; do rm -rf "$d"; done; }
trap cleanup EXIT

# An earlier install.sh added Debian 13 to a Debian 12 node's apt sources, pinned at
# priority 100. Stop that: remove the source file it wrote, and its pin with it unless
# some other source still names trixie (without the pin that source would take over the
# node at apt's default priority). Nothing is downgraded: packages that already came from
# trixie stay as they are (see README, "What the install does to a node").
if [ -f /etc/apt/sources.list.d/migrt-trixie.sources ]; then
    rm -f /etc/apt/sources.list.d/migrt-trixie.sources
    log "removed /etc/apt/sources.list.d/migrt-trixie.sources (an older install's trixie source)"
fi
if [ -f /etc/apt/preferences.d/migrt-trixie ] && [ "$VERSION_CODENAME" != trixie ]; then
    if grep -rqsw 'trixie' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        log "kept /etc/apt/preferences.d/migrt-trixie: another apt source names trixie"
    else
        rm -f /etc/apt/preferences.d/migrt-trixie
        log "removed /etc/apt/preferences.d/migrt-trixie (an older install's trixie pin)"
    fi
fi

# apt-get with a private sources list, index dir and cache under DIR: for one suite the
# node does not use (sid's sources, trixie's containerd). Nothing of it outlives DIR.
private_apt_init() {    # DIR "deb-src|deb" SUITE
    local d=$1
    mkdir -p "$d/lists/partial" "$d/cache/archives/partial" "$d/parts"
    chmod 755 "$d"
    chown -R _apt "$d/lists/partial" "$d/cache/archives/partial" 2>/dev/null || true
    echo "$2 [signed-by=$KEYRING] $MIRROR $3 main" > "$d/sources.list"
}
# Valid-Until is not checked for these private indexes: a dated mirror (a snapshot)
# serves a sid or trixie Release whose validity has run out; its signature and the
# tarballs' hashes are still checked.
private_apt() {         # DIR apt-get-args...   (private_apt_cache: the same for apt-cache)
    local d=$1; shift
    ${private_tool:-apt-get} -o Dir::Etc::SourceList="$d/sources.list" \
        -o Dir::Etc::SourceParts="$d/parts" -o Dir::State::Lists="$d/lists" \
        -o Dir::Cache="$d/cache" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= \
        -o Acquire::Check-Valid-Until=false "$@"
}
private_apt_cache() { private_tool=apt-cache private_apt "$@"; }

criu_version() { "${1:-$CRIU}" --version 2>/dev/null | sed -n 's/^Version: *//p'; }

# (set -e does not reach into a function called as `x=$(f) || ...`: sid_source checks
# each step itself.)
# sid_source WORKDIR PACKAGE VERSION: fetch the upstream tarball of Debian sid's source
# package PACKAGE=VERSION (sid's newest PACKAGE if VERSION is gone from sid) into
# WORKDIR/src, unpack it there and print the directory it made. Only the upstream
# tarball is used (the builds here need none of Debian's packaging). apt-get source
# checks the file's size and hashes against sid's Sources index, whose InRelease apt
# verified with Debian's archive keyring; the SHA-256 is checked once more here against
# that same index.
sid_source() {
    local w=$1 pkg=$2 ver=$3 want= v tarball= sum= dir
    if [ ! -d "$w/apt" ]; then
        private_apt_init "$w/apt" deb-src sid
        chmod 755 "$w"
        if ! private_apt "$w/apt" update -qq >"$w/update.log" 2>&1 \
                || ! ls "$w/apt/lists/"*_sid_main_source_Sources* >/dev/null 2>&1; then
            sed 's/^/  /' "$w/update.log" >&2
            log "could not read sid's source index from $MIRROR (see above)"
            return 1
        fi
    fi
    mkdir -p "$w/src/$pkg.dl" "$w/empty" || return 1
    chmod 755 "$w/src" "$w/src/$pkg.dl"
    # VERSION first, then the other versions sid's index lists, newest first (sid moves
    # on; a mirror may lack a file the index still names)
    for v in $( { echo "$ver"; private_apt_cache "$w/apt" showsrc "$pkg" 2>/dev/null \
                    | sed -n 's/^Version: *//p' | sort -rV; } | awk '!seen[$0]++'); do
        # --print-uris leaves out files already in the current directory: ask from an empty one
        read -r tarball sum < <(cd "$w/empty" && private_apt "$w/apt" -qq --print-uris source --tar-only \
            "$pkg=$v" 2>/dev/null | awk '$2 ~ /\.orig\.tar\.[a-z0-9]+$/ && $4 ~ /^SHA256:/ \
            {sub(/^SHA256:/, "", $4); print $2, $4; exit}') || true
        if [ -z "${tarball:-}" ]; then
            log "sid's index has no $pkg $v"
            continue
        fi
        if (cd "$w/src/$pkg.dl" && private_apt "$w/apt" source -qq --download-only --tar-only "$pkg=$v" \
                >"$w/source-$pkg.log" 2>&1); then
            want=$v
            break
        fi
        sed 's/^/  /' "$w/source-$pkg.log" >&2
        log "could not fetch $pkg $v's source from $MIRROR; trying another version sid lists"
        rm -f "$w/src/$pkg.dl/"*
    done
    [ -n "$want" ] || { log "no source of $pkg could be fetched from sid ($MIRROR)"; return 1; }
    [ "$want" = "$ver" ] || log "building $pkg $want (sid's), not $ver"
    if ! (cd "$w/src/$pkg.dl" && echo "$sum  $tarball" | sha256sum -c --quiet - >&2); then
        log "$pkg's source tarball $tarball does not match sid's signed index (sha256 $sum)"
        return 1
    fi
    mkdir "$w/src/$pkg" && tar -C "$w/src/$pkg" -xf "$w/src/$pkg.dl/$tarball" || return 1
    dir=$(find "$w/src/$pkg" -mindepth 1 -maxdepth 1 -type d | head -1)
    [ -n "$dir" ] || { log "no directory in $tarball"; return 1; }
    echo "$dir"
}

# build_deps_install PKGS...: install what a build needs from the node's own release and
# remember what was new in build_added. build_deps_cleanup FILES...: keep the packages
# whose libraries FILES load (marked manually installed, so that autoremove leaves them)
# and purge the rest of build_added, if apt agrees that purging them removes nothing else.
build_added=
build_deps_install() {
    local before
    apt_update
    before=$(installed_pkgs)
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    build_added=$(comm -13 <(echo "$before") <(installed_pkgs))
}
build_deps_cleanup() {
    local keep purge unwanted
    keep=$(for f in "$@"; do ldd "$f" 2>/dev/null; done | awk '$2 == "=>" && $3 ~ /^\// {print $3}' \
        | sort -u | while read -r lib; do
            dpkg -S "*/$(basename "$(readlink -f "$lib")")" 2>/dev/null | cut -d: -f1 | tr ', ' '\n\n'
        done | grep -v '^$' | sort -u || true)
    # shellcheck disable=SC2086
    [ -z "$keep" ] || apt-mark manual $keep >/dev/null
    # and what those packages need in turn (bookworm's libnet1 depends on sgml-base,
    # which came with the build's packages: purging it would take libnet1 along)
    # shellcheck disable=SC2086
    [ -z "$keep" ] || keep=$(apt-cache depends --recurse --installed --no-recommends \
        --no-suggests --no-conflicts --no-breaks --no-replaces --no-enhances $keep 2>/dev/null \
        | grep -v '^ ' | tr -d '<>' | sort -u)
    purge=$(comm -23 <(echo "$build_added" | grep -v '^$' | sort) <(echo "$keep"))
    build_added=
    [ -n "$purge" ] || return 0
    # shellcheck disable=SC2086
    unwanted=$(apt-get -s purge $purge 2>/dev/null | awk '$1 == "Purg" {print $2}' \
        | sort | comm -23 - <(echo "$purge"))
    if [ -z "$unwanted" ]; then
        # shellcheck disable=SC2086
        apt-get purge -y -qq $purge >/dev/null
        log "purged the $(echo "$purge" | wc -l) build-only packages this build added"
    else
        # shellcheck disable=SC2086
        apt-mark auto $purge >/dev/null
        log "kept the build-only packages (purging them would also remove: $(echo $unwanted));"\
            "they are marked automatic"
    fi
}

# What the CRIU build needs, all from the node's own release.
criu_build_deps="gcc libc6-dev make pkgconf xz-utils libbsd-dev libcap-dev libgnutls28-dev libssl-dev
    libnet1-dev libnftables-dev libnl-3-dev libprotobuf-c-dev libprotobuf-dev
    protobuf-c-compiler protobuf-compiler uuid-dev patch"

# The patch set: every packaging/criu-patches/*.patch, each listed with its SHA-256 in
# SHA256SUMS there (a patch that is not listed, or whose hash differs, stops the
# install). criu_patches_id prints one hash of the whole set (names and contents).
criu_patches_check() {
    local p
    for p in "$CRIU_PATCHES"/*.patch; do
        [ -e "$p" ] || continue
        grep -q "  $(basename "$p")\$" "$CRIU_PATCHES/SHA256SUMS" \
            || { log "$p is not listed in $CRIU_PATCHES/SHA256SUMS"; exit 1; }
    done
    (cd "$CRIU_PATCHES" && sha256sum -c --quiet --strict SHA256SUMS >&2) \
        || { log "a CRIU patch does not match $CRIU_PATCHES/SHA256SUMS"; exit 1; }
}
criu_patches_id() { (cd "$CRIU_PATCHES" && cat SHA256SUMS) | sha256sum | cut -c1-16; }
criu_build_key() { echo "source=$CRIU_SOURCE patches=$(criu_patches_id) rundir=$CRIU_RUNDIR"; }
# Is $CRIU the build this install makes (stamp written by build_criu, binary unchanged)?
criu_is_current() {
    [ -x "$CRIU" ] && [ -f "$CRIU_STAMP" ] || return 1
    [ "$(cat "$CRIU_STAMP")" = "$(criu_build_key) criu=$(sha256sum <"$CRIU" | cut -d' ' -f1)" ]
}

build_criu() {
    local w dir got p out
    w=$(mktemp -d /var/tmp/migrt-criu.XXXXXX); tmpdirs+=("$w")
    log "building CRIU $CRIU_VERSION from Debian sid's source package criu $CRIU_SOURCE"
    dir=$(sid_source "$w" criu "$CRIU_SOURCE") || exit 1
    # A patch that does not apply cleanly (sid moved on to a CRIU it was not written
    # for) is left out with a warning, never half applied: what it fixes is then checked
    # where it matters (the lock patch: migrate's CRIU probe, `migrt doctor`).
    for p in "$CRIU_PATCHES"/*.patch; do
        [ -e "$p" ] || continue
        if ! patch -d "$dir" -p1 --forward --batch --dry-run <"$p" >"$w/patch.log" 2>&1 \
                || ! patch -d "$dir" -p1 --forward --batch <"$p" >"$w/patch.log" 2>&1; then
            sed 's/^/  /' "$w/patch.log" >&2
            log "warning: migrt's CRIU patch $(basename "$p") does not apply to this criu"\
                "source ($dir); building without it (see the patch's top for what that loses)"
            continue
        fi
        log "applied $(basename "$p")"
    done
    if ! make -C "$dir" -j"$(nproc)" RUNDIR="$CRIU_RUNDIR" criu >"$w/build.log" 2>&1; then
        tail -30 "$w/build.log" | sed 's/^/  /' >&2
        log "the CRIU build failed"
        exit 1
    fi
    got=$(criu_version "$dir/criu/criu")
    if ! dpkg --compare-versions "${got:-0}" ge "$CRIU_VERSION"; then
        log "the built criu says version '$got', not $CRIU_VERSION or later"; exit 1
    fi
    # the running CRIU (other users of the node may be in the middle of a dump) is
    # replaced only by a build that passes `criu check`, and in one rename
    if ! out=$("$dir/criu/criu" check 2>&1) && [ -x "$CRIU" ]; then
        log "warning: the new CRIU build fails \`criu check\` (last line: $(echo "$out" | tail -1));"\
            "$CRIU is left as it was (without migrt's patches: see packaging/criu-patches)"
        return 0
    fi
    install -D -m 0755 "$dir/criu/criu" "$CRIU.new"
    mv -f "$CRIU.new" "$CRIU"
    mkdir -p "$(dirname "$CRIU_STAMP")"
    echo "$(criu_build_key) criu=$(sha256sum <"$CRIU" | cut -d' ' -f1)" >"$CRIU_STAMP.new"
    mv -f "$CRIU_STAMP.new" "$CRIU_STAMP"
    built+=("$CRIU")
    log "CRIU $got installed as $CRIU"
}

# migrt's wire between nodes is TLS 1.3 with the agents' shared secret as external PSK,
# which Python's ssl module has from 3.13 on (Debian 13's python3). Where the release's
# Python lacks it (Debian 12: 3.11), CPython 3.13 is built from sid's python3.13 source
# into $PREFIX/python (private to migrt: nothing else on the node uses it), with the
# release's gcc and -dev packages, and the venv is made from it.
PY_SOURCE=${MIGRT_PYTHON_SOURCE:-3.13.15-1}
PY_PRIVATE=$PREFIX/python/bin/python3.13
py_has_psk() { "$1" -I -c 'import ssl, sys; sys.exit(0 if getattr(ssl, "HAS_PSK", False) and sys.version_info >= (3, 13) else 1)' 2>/dev/null; }
py_build_deps="gcc libc6-dev make pkgconf xz-utils libssl-dev zlib1g-dev libffi-dev libbz2-dev
    liblzma-dev libsqlite3-dev uuid-dev"

build_python() {
    local w dir
    w=$(mktemp -d /var/tmp/migrt-python.XXXXXX); tmpdirs+=("$w")
    log "building Python 3.13 from Debian sid's source package python3.13 $PY_SOURCE into" \
        "$PREFIX/python (this release's python3 has no TLS-PSK; a few minutes)"
    dir=$(sid_source "$w" python3.13 "$PY_SOURCE") || exit 1
    rm -rf "$PREFIX/python.new"
    if ! (cd "$dir" && ./configure -q --prefix="$PREFIX/python" --with-ensurepip=no \
              --disable-test-modules && make -s -j"$(nproc)" && \
              make -s altinstall DESTDIR="$PREFIX/python.new.d") >"$w/build.log" 2>&1; then
        tail -30 "$w/build.log" | sed 's/^/  /' >&2
        log "the Python build failed"
        exit 1
    fi
    rm -rf "$PREFIX/python.old"
    [ ! -d "$PREFIX/python" ] || mv "$PREFIX/python" "$PREFIX/python.old"
    mv "$PREFIX/python.new.d$PREFIX/python" "$PREFIX/python"
    rm -rf "$PREFIX/python.new.d" "$PREFIX/python.old"
    py_has_psk "$PY_PRIVATE" || { log "the Python built has no ssl.HAS_PSK"; exit 1; }
    built+=("$PY_PRIVATE" "$PREFIX"/python/lib/python3.13/lib-dynload/*.so)
    log "Python $("$PY_PRIVATE" -c 'import platform; print(platform.python_version())') installed in $PREFIX/python"
}

# runc and iptables (CRIU's network lock runs iptables-restore; it saves a network
# namespace's routes with ip) from the node's own release. Without recommends: Debian
# 13's runc recommends its criu (4.1.1), which migrt does not use. ca-certificates:
# pip takes migrt's libraries from PyPI over TLS (a minimal Debian has no CA bundle).
base_pkgs="runc iptables iproute2 ca-certificates"
missing=$(missing_pkgs $base_pkgs)
if [ -n "$missing" ]; then
    apt_update
    log "installing: $missing"
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# The venv's Python: the release's own where it is 3.13 or later (Debian 13), else a
# private build (see build_python).
py_candidate() { apt-cache show --no-all-versions python3 2>/dev/null | sed -n 's/^Version: *//p' | head -1; }
py_candidate=$(py_candidate)
[ -n "$py_candidate" ] || { apt_update; py_candidate=$(py_candidate); }
if dpkg --compare-versions "${py_candidate:-0}" ge 3.13; then
    missing=$(missing_pkgs python3 python3-venv)
    if [ -n "$missing" ]; then
        log "installing: $missing"
        apt-get install -y -qq $missing >/dev/null
    fi
fi

# Test packages: the container managers, the compiler for the tests' fake libcuda and
# memory workload, the real workloads and tcpdump. Their services are not started (the
# tests start their own instances): a policy-rc.d refuses that while they install.
test_pkgs="containerd podman busybox-static ca-certificates gcc libc6-dev
    redis-server nginx postgresql sqlite3 default-jre-headless tcpdump"
if [ -z "${MIGRT_NO_TEST_DEPS:-}" ]; then
    # shellcheck disable=SC2086
    missing=$(missing_pkgs $test_pkgs)
    if [ -n "$missing" ]; then
        apt_update
        log "installing: $missing"
        policy=
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d
            policy=1
        fi
        # shellcheck disable=SC2086
        apt-get install -y -qq $missing >/dev/null || { [ -z "$policy" ] || rm -f /usr/sbin/policy-rc.d; exit 1; }
        [ -z "$policy" ] || rm -f /usr/sbin/policy-rc.d
    fi
fi

# The builds (CRIU always, Python where needed) share one install of build packages and
# one clean-up. Keyed on versions (and CRIU's patch set): a second run builds nothing.
need_criu=; need_python=
criu_patches_check
criu_is_current || need_criu=1
if ! py_has_psk /usr/bin/python3 && ! { [ -x "$PY_PRIVATE" ] && py_has_psk "$PY_PRIVATE"; }; then
    need_python=1
fi
built=()
if [ -n "$need_criu$need_python" ]; then
    # shellcheck disable=SC2086
    build_deps_install ${need_criu:+$criu_build_deps} ${need_python:+$py_build_deps}
    if [ -n "$need_criu" ]; then
        if [ -x "$CRIU" ]; then
            log "replacing $CRIU (version $(criu_version); not built by this install with"\
                "the current patch set, $CRIU_PATCHES)"
        fi
        build_criu
    fi
    [ -z "$need_python" ] || build_python
    build_deps_cleanup "${built[@]}"
fi
if [ "$(command -v criu)" != "$CRIU" ]; then
    log "note: 'criu' on this shell's PATH is $(command -v criu || echo none); migrt and the"\
        "runc it starts use $CRIU"
fi
if ! out=$("$CRIU" check 2>&1); then
    log "warning: '$CRIU check' failed on this node (last line: $(echo "$out" | tail -1))"
fi

# The e2e tests prove migrt's containerd drop-in on containerd 1.6 (Debian 12's) and 1.7
# (Debian 13's). Where the system's containerd is 1.6, Debian 13's 1.7 is unpacked
# privately under $PREFIX/test (a Go binary that needs only glibc 2.34, which Debian 12
# has), downloaded through a private trixie sources list: the node's apt sources and its
# own containerd are not touched.
if [ -z "${MIGRT_NO_TEST_DEPS:-}" ] && containerd --version 2>/dev/null | grep -q ' 1\.6\.' \
        && [ ! -x "$PREFIX/test/containerd-1.7/usr/bin/containerd" ]; then
    log "unpacking Debian 13's containerd 1.7 into $PREFIX/test for the e2e tests"
    dl=$(mktemp -d /var/tmp/migrt-ctrd.XXXXXX); tmpdirs+=("$dl"); chmod 755 "$dl"
    private_apt_init "$dl/apt" deb trixie
    mkdir "$dl/deb"; chmod 755 "$dl/deb"
    if private_apt "$dl/apt" update -qq && (cd "$dl/deb" && private_apt "$dl/apt" download -qq containerd >/dev/null 2>&1); then
        mkdir -p "$PREFIX/test"
        rm -rf "$PREFIX/test/containerd-1.7.new"
        dpkg-deb -x "$dl"/deb/containerd_*.deb "$PREFIX/test/containerd-1.7.new"
        rm -rf "$PREFIX/test/containerd-1.7"
        mv "$PREFIX/test/containerd-1.7.new" "$PREFIX/test/containerd-1.7"
        "$PREFIX/test/containerd-1.7/usr/bin/containerd" --version >/dev/null \
            || log "warning: the unpacked containerd 1.7 does not run on this node"
    else
        log "could not download trixie's containerd: the e2e tests will cover 1.6 only"
    fi
fi

# The agent's network side runs as this user (migrt agent --user): no login, no home.
if ! getent passwd migrt-agent >/dev/null; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
        migrt-agent 2>/dev/null || log "could not create user migrt-agent (agent runs without --user)"
fi

# The virtualenv uses the system Python where it has TLS-PSK (3.13, Debian 13), else the
# private build above: the launcher runs it with -I -S so that the pass-through path
# starts in milliseconds. A venv made from a Python without TLS-PSK is made again.
if py_has_psk /usr/bin/python3; then
    PY=/usr/bin/python3
else
    PY=$PY_PRIVATE
fi
if [ -x "$PREFIX/venv/bin/python" ] && ! py_has_psk "$PREFIX/venv/bin/python"; then
    log "making $PREFIX/venv again: its Python ($("$PREFIX/venv/bin/python" -V 2>&1)) has no TLS-PSK"
    rm -rf "$PREFIX/venv"
fi
if [ ! -x "$PREFIX/venv/bin/python" ]; then
    log "creating $PREFIX/venv ($("$PY" -V))"
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
"$PREFIX/venv/bin/python" -I -S "$PREFIX/lib/migrt/front/launcher.py" --source "$PREFIX/lib" \
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
log "runc: $(runc --version | head -1); criu: $CRIU $(criu_version)"
