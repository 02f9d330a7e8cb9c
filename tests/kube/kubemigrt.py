"""Set up migrt's Kubernetes side on a tests/kube cluster: the PodMigration CRD, the
controller's shipped RBAC and webhook configuration, a controller process with that ServiceAccount's token (not
cluster-admin), node annotations naming each node's agent, and the kubectl-migrt plugin
on a PATH the real kubectl searches; and what the tests of a pod move check (the
PodMigration, the pods, the containers each node's runc runs, the moved counter). Used by
tests/kube/test_kube_migrate.py, tests/kube/test_kube_faults.py and
tests/bench/bench_kube_migrate.py."""
import base64
import json
import os
import signal
import subprocess
import sys
import uuid

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
        if self.proc and self.proc.poll() is None:
            return      # running (a test's finally restarts one it may not have killed)
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


# --- what the tests of a move check ----------------------------------------------------
# a counter that prints each number, keeps it in a file it holds open, and in /tmp/count
COUNTER = ("trap 'exit 0' TERM; exec 3>>/data.log; i=0; while :; do i=$((i+1)); echo $i; echo $i >&3; "
           "echo $i > /tmp/count; sleep 0.2; done")


def name(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def numbers(text):
    return [int(x) for x in text.split() if x.isdigit()]


def podmigrations(kube):
    return kube.get("podmigrations")["items"]


def pm_for(kube, pod):
    items = [p for p in podmigrations(kube) if p["spec"]["pod"] == pod]
    return items[-1] if items else None


def new_podmigration(kube, pmn, pod, target="node-b", mode=None):
    spec = {"pod": pod, "targetNode": target}
    if mode:
        spec["mode"] = mode
    kube.apply({"apiVersion": "migrt.io/v1alpha1", "kind": "PodMigration",
                "metadata": {"name": pmn, "namespace": kube.namespace}, "spec": spec})


def wait_pm_end(kube, pmn, timeout=120):
    """The PodMigration once its phase is Succeeded or Failed."""
    return wait_for(lambda: (lambda x: x if x.get("status", {}).get("phase") in
                             ("Succeeded", "Failed") else None)(
        kube.get("podmigration", pmn)), timeout, f"the end of PodMigration {pmn}")


def runc_ids(node):
    """{container id: runc status} of every container of a node's CRI namespace."""
    p = subprocess.run(["runc", "--root", os.path.join(node.runc_root, "k8s.io"), "list",
                        "--format", "json"], capture_output=True, text=True)
    return {c["id"]: c["status"] for c in json.loads(p.stdout or "null") or []}


def dying(pid):
    """Is this process being killed (SIGKILL pending, exiting, or a zombie)? It runs no
    more code of its own. runc says `running` for a moment of a frozen container's
    kill (migrt's release of a migrated source: its cgroup v1 freezer reads FREEZING
    once its tasks wake up to die), which is no second copy."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/status") as f:
            st = dict(line.split(":", 1) for line in f if ":" in line)
    except (OSError, IndexError, ValueError):
        return True
    if fields[0] in ("Z", "X") or int(fields[6]) & 0x4:      # PF_EXITING
        return True
    return any(int(st.get(k, "0").strip(), 16) & (1 << 8) for k in ("SigPnd", "ShdPnd"))


def running_of(node, pod):
    """{container id: runc status} of a pod's app containers on a node (by the CRI's
    sandbox-name annotation), as the node's runc sees them; `dying` instead of
    `running` for one whose init is being killed (see dying)."""
    p = subprocess.run(["runc", "--root", os.path.join(node.runc_root, "k8s.io"), "list",
                        "--format", "json"], capture_output=True, text=True)
    out = {}
    for c in json.loads(p.stdout or "null") or []:
        ann = c.get("annotations") or {}
        if ann.get("io.kubernetes.cri.sandbox-name") == pod and \
                ann.get("io.kubernetes.cri.container-type") == "container":
            out[c["id"]] = "dying" if c["status"] == "running" and dying(c["pid"]) \
                else c["status"]
    return out


def events_of(kube, pod):
    ev = kube.get("events", "--field-selector", f"involvedObject.name={pod}")
    return [(e.get("reason"), e.get("message", "")) for e in ev["items"]]


def check_counter_moved(kube, new, before):
    """The new pod's counter goes on from the old one: its log starts after what the
    old pod printed, and the file the workload keeps open holds 1..n once each."""
    wait_for(lambda: len(numbers(kube.logs(new))) >= 5, 30, "the moved counter's log")
    after = numbers(kube.logs(new))
    assert after[0] > before[-1], (before[-3:], after[:3])
    assert after == list(range(after[0], after[0] + len(after))), after[:20]
    data = numbers(kube.exec(new, "cat", "/data.log").stdout)
    assert data == list(range(1, len(data) + 1)), data[-20:]
    assert data[-1] >= after[-1]
    assert int(kube.exec(new, "cat", "/tmp/count").stdout) >= after[-1]
    return after
