"""Moving a StatefulSet's pod on a real two-node Kubernetes (migrt.kube.statefulset).

The pod keeps its name: the controller hands the workload off to the target node's
agent (dump, transfer, the copy kept there, the source released), deletes the old pod,
and its admission webhook puts the StatefulSet's re-created pod on the target node with
the restore marker. What a user checks: `web-0` runs on the target node, its counter
goes on (its log, and a file it keeps open holding every number once, in order),
`kubectl logs` and `kubectl exec` work, the StatefulSet never had two `web-0` nor one
started afresh, and at no moment did two copies run. With the controller down when the
old pod is deleted, no copy starts afresh: the re-creation waits for it.
"""
import os
import threading
import time

import pytest

import cluster as kc
import kubemigrt
from cluster import container_id, restart_count, wait_for
from kubemigrt import COUNTER, numbers, running_of, name as uname


@pytest.fixture(scope="module")
def sts_kube(kube, workdir):
    ctl = kubemigrt.setup(kube, workdir)
    yield ctl
    ctl.kill()


class Watch:
    """Samples, every 0.1 s until stopped: the containers of `pod` running on each node
    (never on both at once), and the uids of the pods of that name (the API)."""

    def __init__(self, kube, pod):
        self.kube, self.pod = kube, pod
        self.both = []
        self.uids = []
        self.samples = 0
        self.seen_on = set()        # the nodes any sample saw it running on
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def sample(self):
        run = {n: [c for c, s in running_of(node, self.pod).items() if s == "running"]
               for n, node in self.kube.nodes.items()}
        if all(run.values()):
            self.both.append(run)
        self.seen_on.update(n for n, cs in run.items() if cs)
        p = self.kube.kubectl("get", "pod", self.pod, "-o",
                              "jsonpath={.metadata.uid}", check=False)
        if p.returncode == 0 and p.stdout and (not self.uids or self.uids[-1] != p.stdout):
            self.uids.append(p.stdout)
        self.samples += 1

    def run(self):
        while not self.stop.is_set():
            self.sample()
            time.sleep(0.1)

    def end(self):
        """Stop, with one last sample once the caller has seen the move end."""
        self.stop.set()
        self.t.join(10)
        self.sample()


def statefulset(kube, name, cmd=COUNTER):
    tmpl = kc.pod_manifest("x", cmd)["spec"]
    kube.apply({"apiVersion": "apps/v1", "kind": "StatefulSet",
                "metadata": {"name": name, "namespace": kube.namespace},
                "spec": {"replicas": 1, "serviceName": name,
                         "selector": {"matchLabels": {"app": name}},
                         "template": {"metadata": {"labels": {"app": name}}, "spec": tmpl}}})
    pod = kube.wait_pod(f"{name}-0")
    wait_for(lambda: len(numbers(kube.logs(f"{name}-0"))) >= 8, 30, "the counter running")
    return pod


def other(node):
    return "node-b" if node == "node-a" else "node-a"


def pm_of(kube, pod):
    items = [p for p in kube.get("podmigrations")["items"] if p["spec"]["pod"] == pod]
    return items[-1] if items else None


def check_moved(kube, pod, old, before, target, restarts=0):
    """`restarts`: the kubelet's failed tries of the container (a failed restore is one:
    its start failed) before the one that restored it."""
    p = kube.wait_pod(pod)
    assert p["spec"]["nodeName"] == target, p["spec"]
    assert p["metadata"]["uid"] != old["metadata"]["uid"]
    assert restart_count(p) == restarts, p["status"]
    env = {e["name"]: e.get("value") for e in p["spec"]["containers"][0].get("env") or []}
    assert env.get("MIGRT_RESTORE_FROM", "").startswith("staged:m-"), env
    # its counter went on: not restarted from 1, no gap, no number twice in its file
    wait_for(lambda: len(numbers(kube.logs(pod))) >= 5, 30, "the moved counter's log")
    after = numbers(kube.logs(pod))
    assert after[0] > before[-1], (before[-3:], after[:3])
    assert after == list(range(after[0], after[0] + len(after))), after[:20]
    data = numbers(kube.exec(pod, "cat", "/data.log").stdout)
    assert data == list(range(1, len(data) + 1)), data[-20:]
    assert data[-1] >= after[-1]
    assert int(kube.exec(pod, "cat", "/tmp/count").stdout) >= after[-1]
    return p, after


def webhook_selector(kube):
    mwc = kube.get("mutatingwebhookconfiguration", "migrt-controller")
    return mwc["webhooks"][0]["objectSelector"]


def test_statefulset_pod_moves_and_keeps_its_name(kube, sts_kube):
    sts = uname("web")
    pod = f"{sts}-0"
    old = statefulset(kube, sts)
    source = old["spec"]["nodeName"]
    target = other(source)
    before = numbers(kube.logs(pod))
    w = Watch(kube, pod)
    try:
        r = sts_kube.kubectl_migrt("pod", pod, "--to", target)
        p = kube.wait_pod(pod)
    finally:
        w.end()
    try:
        assert r.returncode == 0, r.stdout + r.stderr + sts_kube.tail()
        assert f"moved {kube.namespace}/{pod} from {source} to {target} as pod {pod}" \
            in r.stdout, r.stdout
        st = pm_of(kube, pod)["status"]
        assert st["phase"] == "Succeeded" and st["workload"] == "StatefulSet", st
        assert 0 < st["downtimeSeconds"] < 30, st
        assert (st.get("handoff") or {}).get("attempts") == 1, st
        p, after = check_moved(kube, pod, old, before, target)
        # one copy at every sample, and the samples saw it run on the source, then on the
        # target (however fast the move); the API had the old pod, then the new one
        assert not w.both, w.both[:3]
        assert w.seen_on == {source, target}, (w.seen_on, w.samples)
        assert w.uids[0] == old["metadata"]["uid"] and w.uids[-1] == p["metadata"]["uid"]
        assert len(w.uids) == 2, w.uids
        s = kube.get("statefulset", sts)["status"]
        wait_for(lambda: kube.get("statefulset", sts)["status"].get("readyReplicas") == 1, 30,
                 "the StatefulSet ready")
        assert s.get("replicas") == 1, s
        # the old container is gone from the source, and not started again
        assert not [c for c, s in running_of(kube.nodes[source], pod).items()
                    if s == "running"]
        assert container_id(old) not in running_of(kube.nodes[source], pod)
        # the kept copy released on the target; the webhook selects no pod again
        staged = os.path.join(kube.nodes[target].staging, st["migrationID"])
        wait_for(lambda: not os.path.exists(staged), 30, "the kept copy released")
        assert webhook_selector(kube)["matchExpressions"][0]["key"] == \
            "migrt.io/no-move-waiting"
        ev = kube.get("events", "--field-selector", f"involvedObject.name={pod}")["items"]
        assert "Migrated" in [e.get("reason") for e in ev]
    finally:
        kube.kubectl("delete", "statefulset", sts, "--wait=false")


def test_statefulset_move_waits_for_a_killed_controller(kube, sts_kube):
    """The controller killed (-9) once the workload is handed off to the target node
    (the source container released, the old pod not deleted yet), and the old pod then
    deleted while it is down: the StatefulSet's re-creation of the pod is refused by the
    API server (the webhook's failurePolicy), so no copy starts afresh anywhere; the
    restarted controller finishes the move from the copy kept on the target node."""
    sts = uname("webk")
    pod = f"{sts}-0"
    old = statefulset(kube, sts)
    source = old["spec"]["nodeName"]
    target = other(source)
    before = numbers(kube.logs(pod))
    sts_kube.kill()
    sts_kube.env["MIGRT_FAILPOINTS"] = "kube.sts-before-delete=kill"
    sts_kube.start()
    restarted = False
    try:
        pmn = uname("pm")
        kube.apply({"apiVersion": "migrt.io/v1alpha1", "kind": "PodMigration",
                    "metadata": {"name": pmn, "namespace": kube.namespace},
                    "spec": {"pod": pod, "targetNode": target}})
        wait_for(lambda: sts_kube.proc.poll() is not None, 90, "the controller killed at "
                 "its failpoint")
        st = kube.get("podmigration", pmn)["status"]
        assert st["step"] == "deleting source pod" and st["phase"] == "Running", st
        # handed off: the source container is gone and not started again
        wait_for(lambda: "running" not in running_of(kube.nodes[source], pod).values(), 30,
                 "the source container released")
        assert kube.pod(pod)["metadata"]["uid"] == old["metadata"]["uid"]
        kube.kubectl("delete", "pod", pod, "--grace-period=0", "--force", "--wait=false")
        # while the controller is down: no pod of that name is made, no copy runs
        end = time.monotonic() + 6
        while time.monotonic() < end:
            for n, node in kube.nodes.items():
                assert "running" not in running_of(node, pod).values(), n
            p = kube.kubectl("get", "pod", pod, check=False)
            assert p.returncode != 0, p.stdout
            time.sleep(0.3)
        ev = kube.get("events", "--field-selector", f"involvedObject.name={sts}")["items"]
        assert any(e.get("reason") == "FailedCreate" and "migrt" in e.get("message", "")
                   for e in ev), [(e.get("reason"), e.get("message")) for e in ev]
        sts_kube.env.pop("MIGRT_FAILPOINTS")
        sts_kube.start()
        restarted = True
        pm = wait_for(lambda: (lambda x: x if x.get("status", {}).get("phase") in
                               ("Succeeded", "Failed") else None)(
            kube.get("podmigration", pmn)), 240, "the PodMigration's end")
        assert pm["status"]["phase"] == "Succeeded", (pm["status"], sts_kube.tail())
        check_moved(kube, pod, old, before, target)
    finally:
        sts_kube.env.pop("MIGRT_FAILPOINTS", None)
        if not restarted:
            sts_kube.kill()
            sts_kube.start()
        kube.kubectl("delete", "statefulset", sts, "--wait=false")


def test_statefulset_failed_restore_is_tried_again_from_the_kept_copy(kube, sts_kube,
                                                                      tmp_path):
    """After the handoff the kept copy is the only one: a restore that fails on the
    target (here: the copy's image dir moved away for a moment, as a failing disk
    would) is said in the PodMigration, leaves no copy running anywhere, keeps the copy,
    and the kubelet's next try restores from it: the counter goes on."""
    sts = uname("webr")
    pod = f"{sts}-0"
    old = statefulset(kube, sts)
    source = old["spec"]["nodeName"]
    target = other(source)
    before = numbers(kube.logs(pod))
    fpdir = tmp_path / "failpoints"
    fpdir.mkdir()
    sts_kube.kill()
    sts_kube.env.update(MIGRT_FAILPOINTS="kube.sts-before-delete=pause(4)",
                        MIGRT_FAILPOINT_DIR=str(fpdir))
    sts_kube.start()
    image = away = None
    try:
        pmn = uname("pm")
        kube.apply({"apiVersion": "migrt.io/v1alpha1", "kind": "PodMigration",
                    "metadata": {"name": pmn, "namespace": kube.namespace},
                    "spec": {"pod": pod, "targetNode": target}})
        wait_for(lambda: os.listdir(fpdir), 90, "the handoff done", interval=0.05)
        mid = kube.get("podmigration", pmn)["status"]["migrationID"]
        image = os.path.join(kube.nodes[target].staging, mid, "image")
        away = image + ".away"
        os.rename(image, away)
        st = wait_for(lambda: (lambda x: x if "restore attempt 1 on" in x.get("message", "")
                               else None)(kube.get("podmigration", pmn)["status"]), 90,
                      "the failed restore said")
        assert st["phase"] == "Running", st
        for n, node in kube.nodes.items():
            assert "running" not in running_of(node, pod).values(), n
        os.rename(away, image)
        image = None
        pm = wait_for(lambda: (lambda x: x if x.get("status", {}).get("phase") in
                               ("Succeeded", "Failed") else None)(
            kube.get("podmigration", pmn)), 180, "the PodMigration's end")
        assert pm["status"]["phase"] == "Succeeded", (pm["status"], sts_kube.tail())
        attempts = pm["status"]["handoff"]["attempts"]
        assert attempts >= 2, pm["status"]
        check_moved(kube, pod, old, before, target, restarts=attempts - 1)
        ev = kube.get("events", "--field-selector", f"involvedObject.name={pod}")["items"]
        assert "MigrationRestoreFailed" in [e.get("reason") for e in ev]
    finally:
        if image and away and os.path.exists(away):
            os.rename(away, image)
        for k in ("MIGRT_FAILPOINTS", "MIGRT_FAILPOINT_DIR"):
            sts_kube.env.pop(k, None)
        sts_kube.kill()
        sts_kube.start()
        kube.kubectl("delete", "statefulset", sts, "--wait=false")


def test_statefulset_pod_not_moved_where_it_cannot_run(kube, sts_kube):
    """A cordoned target (the webhook would bypass the scheduler, so the controller
    checks first): Failed with one line before anything is frozen; the pod runs on."""
    sts = uname("webc")
    pod = f"{sts}-0"
    old = statefulset(kube, sts)
    target = other(old["spec"]["nodeName"])
    kube.kubectl("cordon", target)
    try:
        pmn = uname("pm")
        kube.apply({"apiVersion": "migrt.io/v1alpha1", "kind": "PodMigration",
                    "metadata": {"name": pmn, "namespace": kube.namespace},
                    "spec": {"pod": pod, "targetNode": target}})
        pm = wait_for(lambda: (lambda x: x if x.get("status", {}).get("phase") in
                               ("Succeeded", "Failed") else None)(
            kube.get("podmigration", pmn)), 60, "the PodMigration's end")
        assert pm["status"]["phase"] == "Failed", pm["status"]
        assert f"cannot be moved to {target}: node {target} is cordoned" in pm["status"]["message"], pm["status"]
        p = kube.pod(pod)
        assert p["metadata"]["uid"] == old["metadata"]["uid"]
        assert container_id(p) == container_id(old) and restart_count(p) == 0
        assert kc._cond(p, "Ready")
    finally:
        kube.kubectl("uncordon", target)
        kube.kubectl("delete", "statefulset", sts, "--wait=false")
