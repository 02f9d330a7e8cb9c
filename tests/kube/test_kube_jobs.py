"""Moving a Job's pod with restartPolicy Never on the real two-node Kubernetes (1.20.2).

With Never, the old pod turns Failed once its container goes, and the Job controller
counts every Failed pod it claims as a failure (with backoffLimit 0 the Job fails) and
starts a replacement. The controller therefore holds the source frozen once its copy runs
on the target, hands the new pod to the Job, takes the old pod out of it, and only then
lets the source go (migrt.kube.controller.Mover.swap_job_pods).

What a user checks, all along the move: the Job's status (kubectl get job --watch) never
counts a failure, never fails, never completes because of the move; no pod but the old
and the new one ever matches the Job's selector, and none of those is ever Failed; the
process goes on in the new pod (its counter), one copy at a time (runc on both nodes);
the old pod goes; and when the moved process exits 0 later, the Job is Complete with one
success, from the new pod.
"""
import json
import subprocess
import threading
import time
import uuid

import pytest

import cluster as kc
import kubemigrt
from cluster import pod_manifest, restart_count, wait_for

# the workload counts to N (0.2 s apart: 80 s at least, so that on a loaded machine the
# move is long over before it ends), says job-done and exits 0
N = 400
JOB_COUNTER = (f"trap 'exit 0' TERM; exec 3>>/data.log; i=0; while [ $i -lt {N} ]; do "
               "i=$((i+1)); echo $i; echo $i >&3; echo $i > /tmp/count; sleep 0.2; done; "
               "echo job-done")


def name(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def numbers(text):
    return [int(x) for x in text.split() if x.isdigit()]


@pytest.fixture(scope="module")
def migrt_kube(kube, workdir):
    ctl = kubemigrt.setup(kube, workdir, env={"MIGRT_KUBE_SCHEDULE_TIMEOUT": "30"})
    yield ctl
    ctl.kill()


class Watch:
    """`kubectl get --watch --output-watch-events -o json`: every version the API server
    sends, as it sends it (not sampled)."""

    def __init__(self, kube, *args):
        self.events = []
        self.proc = subprocess.Popen(
            kube.kubectl_argv("get", *args, "--watch", "--output-watch-events", "-o", "json"),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        dec, buf = json.JSONDecoder(), ""
        for line in self.proc.stdout:
            buf += line
            while True:
                s = buf.lstrip()
                try:
                    obj, end = dec.raw_decode(s)
                except ValueError:
                    break
                self.events.append((time.time(), obj))
                buf = s[end:]

    def stop(self):
        self.proc.kill()
        self.proc.wait(10)
        self.thread.join(5)


def test_never_job_pod_moves_without_a_failure_a_replacement_or_a_completion(kube, migrt_kube):
    job = name("never")
    tmpl = pod_manifest("x", JOB_COUNTER, node="node-a")["spec"]
    tmpl["restartPolicy"] = "Never"
    # backoffLimit 0: one failure counted would fail the Job at once
    kube.apply({"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": job, "namespace": kube.namespace},
                "spec": {"backoffLimit": 0, "template": {"spec": tmpl}}})
    uid = kube.get("job", job)["metadata"]["uid"]
    sel = f"controller-uid={uid}"           # the Job's own selector
    pods = wait_for(lambda: [p for p in kube.get("pods", "-l", sel)["items"]
                             if kc._cond(p, "Ready")] or None, 90, "the Job's pod")
    assert len(pods) == 1
    old = pods[0]["metadata"]["name"]
    wait_for(lambda: len(numbers(kube.logs(old))) >= 5, 30, "counter")
    jobs_w = Watch(kube, "job", job)
    pods_w = Watch(kube, "pods", "-l", sel)
    a, b = kube.nodes["node-a"], kube.nodes["node-b"]
    stop, samples = threading.Event(), []

    def sample():
        while not stop.is_set():
            new = [p["metadata"]["name"] for _, e in list(pods_w.events)
                   for p in [e.get("object") or {}]
                   if p.get("metadata", {}).get("name", old) != old]
            samples.append((kubemigrt.running_of(a, old),
                            kubemigrt.running_of(b, new[-1]) if new else {}))
            time.sleep(0.05)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    before = numbers(kube.logs(old))
    try:
        r = migrt_kube.kubectl_migrt("pod", old, "--to", "node-b", timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr + migrt_kube.tail()
        pm = [p for p in kube.get("podmigrations")["items"] if p["spec"]["pod"] == old][-1]
        st = pm["status"]
        assert st["phase"] == "Succeeded", st
        new = st["targetPod"]
        assert st.get("jobHandOver", "").startswith(f"pod {new} joined Job {job}"), \
            (st, migrt_kube.tail())
        # the source was held frozen (its copy running) until the old pod left the Job
        assert isinstance(st["phases"].get("source_held"), (int, float)), st["phases"]
        print(f"downtime {st['phases'].get('downtime')} s, source held "
              f"{st['phases']['source_held']} s after the restore")
        kube.wait_gone(old)
        moved_at = time.time()
        time.sleep(3)           # would the Job add a pod now?
        mid = kube.get("job", job)["status"]
        assert numbers(kube.logs(new))[-1] < N, "the work ended before the move was checked"
        assert mid.get("active") == 1 and not mid.get("failed") \
            and not mid.get("succeeded") and not mid.get("conditions"), mid
        p = kube.pod(new)
        assert p["spec"]["nodeName"] == "node-b" and p["status"]["phase"] == "Running"
        assert [(x["kind"], x["uid"], x.get("controller"))
                for x in p["metadata"]["ownerReferences"]] == [("Job", uid, True)]
        assert p["metadata"]["labels"]["controller-uid"] == uid
        assert p["metadata"]["labels"]["job-name"] == job
        assert restart_count(p) == 0
        # the process went on: the new pod's log starts after the old one's, its open
        # file holds every number once, in order
        wait_for(lambda: len(numbers(kube.logs(new))) >= 5, 30, "the moved counter's log")
        after = numbers(kube.logs(new))
        assert after[0] > before[-1], (before[-3:], after[:3])
        assert after == list(range(after[0], after[0] + len(after))), after[:20]
        data = numbers(kube.exec(new, "cat", "/data.log").stdout)
        assert data == list(range(1, len(data) + 1)), data[-20:]
        stop.set()
        t.join(10)
        # the work ends in the new pod (exit 0), and the Job completes from it
        done = wait_for(lambda: (lambda s: s if s.get("conditions") else None)(
            kube.get("job", job)["status"]), N * 0.2 + 90, "the Job finished")
        time.sleep(1)
    finally:
        stop.set()
        jobs_w.stop()
        pods_w.stop()
    print(kube.kubectl("get", "pods", "-o", "wide").stdout)
    print(kube.kubectl("get", "job", job, "-o", "wide").stdout)
    assert [c["type"] for c in done["conditions"]] == ["Complete"], done
    assert done.get("succeeded") == 1 and not done.get("failed") and not done.get("active"), done
    out = kube.logs(new)
    assert out.split()[-1] == "job-done" and numbers(out)[-1] == N, out[-40:]
    # all along: the Job's status as the API server sent each version of it
    statuses = [e["object"].get("status") or {} for _, e in jobs_w.events]
    assert statuses, "no Job status watched"
    for s in statuses:
        assert not s.get("failed"), statuses
        assert (s.get("active") or 0) <= 1, statuses
        assert all(c["type"] != "Failed" for c in s.get("conditions") or []), statuses
    for ts, e in jobs_w.events:
        s = e["object"].get("status") or {}
        if s.get("succeeded") or s.get("conditions"):
            assert ts > moved_at, (ts, moved_at, s)     # not because of the move
    # every pod that matched the Job's selector: the old and the new one, neither Failed
    # while it matched (a pod leaving the selector comes as a DELETED event)
    matched = set()
    for _, e in pods_w.events:
        o = e["object"]
        if (o["metadata"].get("labels") or {}).get("controller-uid") != uid:
            continue
        matched.add(o["metadata"]["name"])
        assert o["status"].get("phase") != "Failed", (e["type"], o["metadata"]["name"],
                                                       o["status"])
    assert matched == {old, new}, matched
    # the old pod left the Job's selector while Running (its container frozen, not yet
    # gone): the selector's watch ends it with a DELETED event of a Running pod
    last = [(e["type"], e["object"]["status"].get("phase")) for _, e in pods_w.events
            if e["object"]["metadata"]["name"] == old][-1]
    assert last == ("DELETED", "Running"), last
    # one copy at a time: never both containers running (the source is paused while held)
    assert samples and any(sb for _, sb in samples), samples[-3:]
    for sa, sb in samples:
        assert not ("running" in sa.values() and "running" in sb.values()), (sa, sb)
    pods_now = kube.get("pods", "-l", f"job-name={job}")["items"]
    assert [p["metadata"]["name"] for p in pods_now] == [new], \
        [(p["metadata"]["name"], p["status"].get("phase")) for p in pods_now]
    assert pods_now[0]["status"]["phase"] == "Succeeded"
    kube.kubectl("delete", "job", job, "--wait=false")
