#!/bin/bash
# Remove migrt from this node: what packaging/install.sh (or the DaemonSet) added, and
# nothing else. runc, CRIU and iptables stay installed (runc users depend on them), and so
# do checkpoints and staged migrations unless --purge is given.
#
# Usage: uninstall.sh [--purge]     as root; then restart containerd / CRI-O
# Environment (as for install.sh): MIGRT_PREFIX (/opt/migrt), MIGRT_BIN (/usr/local/bin),
#   MIGRT_CONTAINERD_CONFIG (/etc/containerd/config.toml), MIGRT_CRIO_DROP_INS
#   (/etc/crio/crio.conf.d), MIGRT_SYSTEMD_DIR (/etc/systemd/system), MIGRT_DATA_DIRS
#   (what --purge removes: /var/lib/migrt /run/migrt /var/log/migrt /etc/migrt).
#
# Containers still running under the migrt runtime handler are stopped by their shim
# calling /usr/local/bin/migrt. If any container shim or conmon is running, the migrt
# command is replaced by a link to runc (what migrt does for them anyway) instead of being
# deleted, so that those containers can still be stopped; --purge removes it regardless.
set -euo pipefail

PREFIX=${MIGRT_PREFIX:-/opt/migrt}
BIN=${MIGRT_BIN:-/usr/local/bin}
CTRD_CONF=${MIGRT_CONTAINERD_CONFIG:-/etc/containerd/config.toml}
CRIO_DIR=${MIGRT_CRIO_DROP_INS:-/etc/crio/crio.conf.d}
UNIT_DIR=${MIGRT_SYSTEMD_DIR:-/etc/systemd/system}
SYSCTL_DIR=${MIGRT_SYSCTL_DIR:-/etc/sysctl.d}
DATA_DIRS=${MIGRT_DATA_DIRS:-/var/lib/migrt /run/migrt /var/log/migrt /etc/migrt}
HERE=$(cd "$(dirname "$0")" && pwd)
PURGE=
[ "${1:-}" = "--purge" ] && PURGE=1

log() { printf 'migrt-uninstall: %s\n' "$*" >&2; }

# 1. the node agent
if [ -f "$UNIT_DIR/migrt-agent.service" ]; then
    if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
        systemctl disable --now migrt-agent.service >/dev/null 2>&1 || true
    fi
    rm -f "$UNIT_DIR/migrt-agent.service"
    command -v systemctl >/dev/null && systemctl daemon-reload >/dev/null 2>&1 || true
    log "removed the migrt-agent service"
fi

# 2. the runtime handler in containerd's config (only the block install.sh wrote)
register=
for cand in "$HERE/containerd_register.py" "$PREFIX/lib/packaging/containerd_register.py"; do
    [ -f "$cand" ] && { register=$cand; break; }
done
if [ -f "$CTRD_CONF" ] && grep -q '^# BEGIN migrt' "$CTRD_CONF"; then
    py=$(command -v python3 || true)
    [ -x "$PREFIX/venv/bin/python" ] && py="$PREFIX/venv/bin/python"
    if [ -n "$register" ] && [ -n "$py" ] && "$py" -c 'import tomllib' 2>/dev/null; then
        # it says what it did and that containerd needs a restart
        "$py" -I "$register" unregister --config "$CTRD_CONF" >&2
    else    # no Python 3.11 left: cut the block with sed
        sed -i '/^# BEGIN migrt/,/^# END migrt/d' "$CTRD_CONF"
        log "removed migrt from $CTRD_CONF; now: systemctl restart containerd"
    fi
fi
for f in /etc/containerd/conf.d/migrt.toml; do
    [ "$CTRD_CONF" = /etc/containerd/config.toml ] && [ -f "$f" ] && rm -f "$f" && log "removed $f"
done

# 3. CRI-O's drop-in
if [ -f "$CRIO_DIR/50-migrt.conf" ] && grep -q 'runtimes.migrt' "$CRIO_DIR/50-migrt.conf"; then
    rm -f "$CRIO_DIR/50-migrt.conf"
    log "removed $CRIO_DIR/50-migrt.conf; now: systemctl restart crio"
fi

# 4. the command, if it is migrt's
cmd="$BIN/migrt"
if [ -e "$cmd" ] && ! [ -L "$cmd" ]; then
    if head -c 4096 "$cmd" | grep -aq "migrt launcher\|migrt zipapp\|migrt/fast\|migrt's front door"; then
        busy=
        # a process may exit between the glob and the read: its error goes to /dev/null
        # (redirections apply left to right, so 2>/dev/null must come first)
        for p in "${MIGRT_PROC:-/proc}"/[0-9]*/cmdline; do
            case "$(tr '\0' ' ' 2>/dev/null < "$p")" in
                *containerd-shim*|*conmon*) busy=1; break;;
            esac
        done
        runc=$(command -v runc || echo /usr/sbin/runc)
        if [ -n "$busy" ] && [ -z "$PURGE" ]; then
            ln -sfn "$runc" "$cmd"
            log "$cmd now links to $runc: containers started under the migrt handler can still be stopped; remove it when they are gone"
        else
            rm -f "$cmd"
            log "removed $cmd"
        fi
    else
        log "$cmd is not migrt's: left alone"
    fi
elif [ -L "$cmd" ] && [ -n "$PURGE" ]; then
    rm -f "$cmd"
fi
# the Python launcher behind the front door
if [ -f "$BIN/migrt-python" ] && head -c 4096 "$BIN/migrt-python" | grep -aq 'migrt launcher'; then
    rm -f "$BIN/migrt-python"
    log "removed $BIN/migrt-python"
fi
# the kubectl plugin (install.sh)
if [ -f "$BIN/kubectl-migrt" ] && grep -q 'migrt.kube.cli' "$BIN/kubectl-migrt"; then
    rm -f "$BIN/kubectl-migrt"
    log "removed $BIN/kubectl-migrt"
fi

# the page server's pipe limit (install.sh); the running value stays until reboot
if [ -f "$SYSCTL_DIR/90-migrt.conf" ] && grep -q '^# migrt:' "$SYSCTL_DIR/90-migrt.conf"; then
    rm -f "$SYSCTL_DIR/90-migrt.conf"
    log "removed $SYSCTL_DIR/90-migrt.conf"
fi

# 5. the code and its virtualenv
if [ -d "$PREFIX" ]; then
    rm -rf "$PREFIX"
    log "removed $PREFIX"
fi

# 6. data, only when asked
if [ -n "$PURGE" ]; then
    for d in $DATA_DIRS; do
        if [ -e "$d" ]; then rm -rf "$d"; log "removed $d"; fi
    done
else
    log "kept checkpoints and staged migrations ($DATA_DIRS); --purge removes them"
fi
log "runc, criu and iptables are still installed (runc users need them)"
