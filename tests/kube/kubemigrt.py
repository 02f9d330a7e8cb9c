"""Set up migrt's Kubernetes side on a tests/kube cluster: the PodMigration CRD, the
controller's shipped RBAC and webhook configuration, a controller process with that ServiceAccount's token (not
cluster-admin), node annotations naming each node's agent, and the kubectl-migrt plugin
on a PATH the real kubectl searches. Used by tests/kube/test_kube_migrate.py and
tests/bench/bench_kube_migrate.py."""
import base64
import json
import os
import signal
import subprocess
import sys

import cluster as kc
from cluster import wait_for

REPO = kc.REPO
CRD = os.path.join(REPO, "packaging", "kube", "podmigration-crd.yaml")
RBAC = os.path.join(REPO, "packaging", "kube", "controller-rbac.yaml")
PLUGIN = os.path.join(REPO, "packaging", "kubectl-migrt")
WEBHOOK = os.path.join(REPO, "packaging", "kube", "controller-webhook.yaml")


class Controller:
    """The controller as a process, with the shipped role's credentials."""

    def __init__(self, kube, kubeconfig, log, env=None):
        self.kube, self.kubeconfig, self.log = kube, kubeconfig, log
        self.env = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
        self.proc = None
        self.plugin_env = None
        # its admission webhook (StatefulSet moves), on an address of this host the API
        # server reaches (it runs on this host; there is no kube-proxy for a Service)
        self.webhook_port = kc.free_port()

    def start(self):
        f = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "migrt.kube", "controller", "--kubeconfig", self.kubeconfig,
             "--secret-file", self.kube.secret,
             "--webhook-listen", f"127.0.0.1:{self.webhook_port}",
             "--webhook-url", f"https://127.0.0.1:{self.webhook_port}/mutate-pods"], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        f.close()

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def tail(self, n=40):
        with open(self.log, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def kubectl_migrt(self, *args, timeout=180):
        return subprocess.run([os.path.join(self.kube.bin, "kubectl"), "migrt", *args],
                              capture_output=True, text=True, env=self.plugin_env,
                              timeout=timeout)


def setup(kube, workdir, env=None):
    workdir = str(workdir)
    kube.kubectl("apply", "-f", CRD)
    kube.kubectl("create", "namespace", "migrt-system", check=False)
    kube.kubectl("apply", "-f", RBAC)
    # made again: a controller before this one wrote a url into it, which a plain apply
    # of the shipped service-based one cannot merge with (both would be set)
    kube.kubectl("delete", "--ignore-not-found", "-f", WEBHOOK)
    kube.kubectl("apply", "-f", WEBHOOK)
    kube.kubectl("wait", "--for", "condition=established", "--timeout=60s",
                 "crd/podmigrations.migrt.io")

    def token():        # 1.20's token controller makes the ServiceAccount's secret
        sa = kube.get("serviceaccount", "migrt-controller", "-n", "migrt-system")
        for s in sa.get("secrets") or []:
            sec = kube.get("secret", s["name"], "-n", "migrt-system")
            if sec.get("data", {}).get("token"):
                return base64.b64decode(sec["data"]["token"]).decode()
        return None
    tok = wait_for(token, 60, "the controller's service account token")
    kc_path = os.path.join(workdir, "migrt-controller.kubeconfig")
    with open(kube.pki.ca, "rb") as f:
        ca = base64.b64encode(f.read()).decode()
    with open(os.open(kc_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump({"apiVersion": "v1", "kind": "Config",
                   "clusters": [{"name": "c", "cluster": {"server": kube.server,
                                                          "certificate-authority-data": ca}}],
                   "users": [{"name": "sa", "user": {"token": tok}}],
                   "contexts": [{"name": "c", "context": {"cluster": "c", "user": "sa"}}],
                   "current-context": "c"}, f)
    for n in kube.nodes.values():
        kube.kubectl("annotate", "node", n.name, f"migrt.io/agent={n.agent_address}",
                     "--overwrite")
    bindir = os.path.join(workdir, "kubectl-plugins")
    os.makedirs(bindir, exist_ok=True)
    if not os.path.exists(os.path.join(bindir, "kubectl-migrt")):
        os.symlink(PLUGIN, os.path.join(bindir, "kubectl-migrt"))
    ctl = Controller(kube, kc_path, os.path.join(workdir, "migrt-controller.log"), env=env)
    ctl.plugin_env = dict(os.environ, KUBECONFIG=kube.kubeconfig, MIGRT_PYTHON=sys.executable,
                          MIGRT_LIB=REPO, PATH=f"{bindir}:{os.environ['PATH']}")
    ctl.start()
    return ctl
