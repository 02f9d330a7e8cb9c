#!/bin/bash
# What packaging/daemonset.yaml runs on every node, from its privileged pod (hostPID).
#
#   daemonset-node.sh install     copy migrt's source to the node (/opt/migrt/src), run
#                                 install.sh there in the node's namespaces (runc, CRIU 4,
#                                 iptables, the venv, /usr/local/bin/migrt, the containerd
#                                 and CRI-O handler "migrt"; containerd is restarted only if
#                                 its config changed), copy the agent's secret, label the node
#   daemonset-node.sh agent       run `migrt agent` in the node's namespaces
#   daemonset-node.sh uninstall   run uninstall.sh in the node's namespaces, unlabel the node
set -euo pipefail
SRC=/usr/share/migrt/src
HOST=${MIGRT_HOST_ROOT:-/host}
on_node() { nsenter --target 1 --mount --uts --ipc --net --pid -- "$@"; }
label() {   # label NAME VALUE|-   via the API server, with the pod's service account
    [ -n "${NODE_NAME:-}" ] || return 0
    python3 "$SRC/packaging/label_node.py" "$NODE_NAME" migrt.io/runtime "$1"
}

case "${1:-}" in
install)
    rm -rf "$HOST/opt/migrt/src.new" && mkdir -p "$HOST/opt/migrt"
    cp -a "$SRC" "$HOST/opt/migrt/src.new"
    rm -rf "$HOST/opt/migrt/src" && mv "$HOST/opt/migrt/src.new" "$HOST/opt/migrt/src"
    on_node env MIGRT_NO_TEST_DEPS=1 MIGRT_RESTART_MANAGERS=1 \
        bash /opt/migrt/src/packaging/install.sh
    if [ -s /secret/secret ]; then
        install -d -m 700 "$HOST/etc/migrt"
        install -m 600 /secret/secret "$HOST/etc/migrt/secret"
    fi
    on_node /usr/local/bin/migrt doctor || true
    label ready
    ;;
agent)
    exec nsenter --target 1 --mount --uts --ipc --net --pid -- /usr/local/bin/migrt \
        --root "${MIGRT_RUNC_ROOT:-/run/containerd/runc/k8s.io}" agent \
        --listen "${MIGRT_LISTEN:?set MIGRT_LISTEN to the node address:port}" \
        --secret-file /etc/migrt/secret
    ;;
uninstall)
    label -
    on_node bash /opt/migrt/lib/packaging/uninstall.sh
    on_node rm -rf /opt/migrt/src
    exec sleep infinity      # a DaemonSet pod must keep running; delete the DaemonSet now
    ;;
*)
    echo "usage: $0 install|agent|uninstall" >&2
    exit 2
    ;;
esac
