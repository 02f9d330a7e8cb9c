#!/bin/sh
# migrt's front door, installed as the `migrt` executable (see README, "Pass-through
# cost"): decide in the shell, in about a millisecond, whether a call is migrt's business at all.
# If it certainly is not, exec runc with the argv untouched; otherwise (and whenever this
# script is unsure) exec migrt's Python launcher, which decides exactly (migrt.front.fast).
#
# migrt's business: its own commands; `create`/`run` of a bundle whose config.json
# mentions MIGRT_RESTORE_FROM or an explicit plugin choice (MIGRT_PLUGINS,
# io.migrt.plugins), and every `create`/`run` on a node with a plugin config (plugins
# detect their bundles by devices, mounts, env: only migrt.plugins.gate can tell); `start`/`delete`
# of a container migrt restored (runc's state dir holds migrt.json); `checkpoint`;
# on a node where migrt moved a pod's container away, every `create`/`run`, and the
# `delete` of that pod's sandbox (migrt.runtime.podrules);
# anything this script does not parse with certainty (--help, --, unknown flags).
#
# Written by migrt/front/launcher.py with the Python launcher's path filled in. A malformed
# config.json that does not mention migrt is runc's to report, as with plain runc.
PY_LAUNCHER=@PY_LAUNCHER@

python() { exec "$PY_LAUNCHER" "$@"; }

find_runc() {                          # sets R; no subshell: this runs on every call
    R=${MIGRT_RUNC:-}
    [ -n "$R" ] && return
    _ifs=$IFS; IFS=:
    for _d in $PATH /usr/sbin /usr/bin /usr/local/sbin /usr/local/bin; do
        if [ -x "$_d/runc" ] && [ ! -d "$_d/runc" ] && ! [ "$_d/runc" -ef "$0" ]; then
            R=$_d/runc; break
        fi
    done
    IFS=$_ifs
}

runc() {
    find_runc
    [ -x "$R" ] || python "$@"        # migrt says "runc not found" in its own words
    # runc looks CRIU up on PATH (restore passes through here): install.sh's CRIU in
    # /usr/local/sbin goes first, and $MIGRT_CRIU's dir before it (as migrt.runc.sbin_path)
    case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="${PATH:+$PATH:}/usr/sbin:/sbin";; esac
    case $PATH in /usr/local/sbin:*) ;; *) PATH=/usr/local/sbin:$PATH;; esac
    case ${MIGRT_CRIU:-} in */criu) PATH=${MIGRT_CRIU%/criu}:$PATH;; esac
    export PATH
    exec "$R" "$@"
}

kube=${MIGRT_KUBE_STATE:-/run/migrt/kube}
root=/run/runc; cmd=; need=; bundle=; id=; n_pos=0; stage=global
for a in "$@"; do
    if [ -n "$need" ]; then
        case $need in root) root=$a;; bundle) bundle=$a;; esac
        need=; continue
    fi
    case $stage in
    global)
        case $a in
        --root=*|-root=*) root=${a#*=};;
        --root|-root) need=root;;
        --log|-log|--log-format|-log-format|--criu|-criu|--rootless|-rootless) need=skip;;
        --log=*|-log=*|--log-format=*|-log-format=*|--criu=*|-criu=*|--rootless=*|-rootless=*) ;;
        --debug|-debug|--systemd-cgroup|-systemd-cgroup) ;;
        --debug=*|-debug=*|--systemd-cgroup=*|-systemd-cgroup=*) ;;
        -*) python "$@";;
        *) cmd=$a; stage=args
           case $cmd in
           create|run|start|delete) ;;
           state|kill|exec|ps|pause|resume|update|events|list|spec|features|restore) runc "$@";;
           *) python "$@";;          # checkpoint, migrt's own commands, the unknown
           esac;;
        esac;;
    args)
        case $cmd:$a in
        *:--) python "$@";;
        create:--bundle=*|create:-bundle=*|create:-b=*|create:--b=*|run:--bundle=*|run:-bundle=*|run:-b=*|run:--b=*)
            bundle=${a#*=};;
        create:--bundle|create:-bundle|create:-b|create:--b|run:--bundle|run:-bundle|run:-b|run:--b)
            need=bundle;;
        create:--console-socket|create:-console-socket|create:--pid-file|create:-pid-file|create:--preserve-fds|create:-preserve-fds|run:--console-socket|run:-console-socket|run:--pid-file|run:-pid-file|run:--preserve-fds|run:-preserve-fds)
            need=skip;;
        create:--console-socket=*|create:-console-socket=*|create:--pid-file=*|create:-pid-file=*|create:--preserve-fds=*|create:-preserve-fds=*|run:--console-socket=*|run:-console-socket=*|run:--pid-file=*|run:-pid-file=*|run:--preserve-fds=*|run:-preserve-fds=*)
            ;;
        create:--no-pivot|create:-no-pivot|create:--no-new-keyring|create:-no-new-keyring|run:--no-pivot|run:-no-pivot|run:--no-new-keyring|run:-no-new-keyring|run:--detach|run:-detach|run:-d|run:--d|run:--keep|run:-keep|run:--no-subreaper|run:-no-subreaper)
            ;;
        delete:--force|delete:-force|delete:-f|delete:--f) ;;
        *:-*) python "$@";;
        *) n_pos=$((n_pos + 1)); id=$a;;
        esac;;
    esac
done
[ -z "$need" ] && [ "$n_pos" = 1 ] || python "$@"

case $cmd in
create|run)
    config=${bundle:-.}/config.json
    [ -r "$config" ] || python "$@"                  # migrt's own message for a bad bundle
    if grep -q -F -e MIGRT_RESTORE_FROM -e MIGRT_PLUGINS -e io.migrt.plugins "$config"; then
        python "$@"
    fi
    if [ -n "${MIGRT_PLUGIN_PATH:-}" ] || [ -e "${MIGRT_CONFIG:-/etc/migrt/config.yaml}" ]; then
        python "$@"
    fi
    # a pod container migrt moved away may not be created again (migrt.runtime.podrules)
    for _t in "$kube"/tomb/*; do [ -e "$_t" ] && python "$@"; break; done
    runc "$@";;
start)
    [ -e "$root/$id/migrt.json" ] && python "$@"
    runc "$@";;
delete)
    [ -e "$root/$id/migrt.json" ] && python "$@"
    [ -e "$kube/tomb/$id" ] || [ -e "$kube/restored/$id" ] && python "$@"
    runc "$@";;
esac
python "$@"
