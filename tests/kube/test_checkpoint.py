"""`migrt checkpoint` of a pod's container under a real kubelet, and a pod that restores it.

The checkpoint goes through the node's containerd runc root (the runc v2 shim's
<Root>/k8s.io), as an operator would run it on the node. Once the checkpointed task has
exited, containerd deletes the task and removes its bundle (config.json, the rootfs
mount): migrt must have taken what it needs from the bundle before that.

A second pod, on the other node, carries MIGRT_RESTORE_FROM=<checkpoint dir>: its
container is restored instead of started fresh; it is Ready, its log goes on from where
the first one stopped, and `kubectl exec` works in it.
"""
import json
import os
import re
import shutil
import subprocess
import threading
import uuid

import pytest

from cluster import pod_manifest, container_id, restart_count, wait_for

COUNTER = ("trap 'exit 0' TERM; exec 3>>/data.log; i=0; while :; do i=$((i+1)); echo $i; echo $i >&3; "
           "echo $i > /tmp/count; sleep 0.2; done")


def numbers(text):
    return [int(x) for x in text.split() if x.isdigit()]


@pytest.fixture
def ckpt_dir():
    d = os.path.join("/run/migrt", "kube-" + uuid.uuid4().hex[:8])
    os.makedirs(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def migrt(kube, node, *args, timeout=120):
    env = dict(os.environ, MIGRT_STATE_DIR=node.containerd.migrt_state)
    return subprocess.run([kube.migrt, "--root", os.path.join(node.runc_root, "k8s.io"), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def terminated(kube, pod):
    p = kube.pod(pod)
    for s in p.get("status", {}).get("containerStatuses", []):
        if s.get("state", {}).get("terminated"):
            return p
    return None


def test_checkpoint_then_restore_in_a_new_pod(kube, ckpt_dir, migrt_calls_log):
    src, dst = f"ckpt-{uuid.uuid4().hex[:6]}", f"restored-{uuid.uuid4().hex[:6]}"
    m = pod_manifest(src, COUNTER, node="node-a")
    m["spec"]["restartPolicy"] = "Never"      # the kubelet must not start it again afresh
    p = kube.run_pod(m)
    cid = container_id(p)
    node = kube.nodes["node-a"]
    wait_for(lambda: len(numbers(kube.logs(src))) >= 10, 30, "counter running")
    # `kubectl logs -f` of the source, following while it is checkpointed
    src_follow, src_lines = kube.follow_logs(src)

    image = os.path.join(ckpt_dir, "image")
    r = migrt(kube, node, "checkpoint", "--image-path", image, "--work-path",
              os.path.join(ckpt_dir, "work"), cid)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr
    # the image is complete and sealed: migrt's manifest covers the spec and rootfs
    v = subprocess.run([kube.migrt, "image", "verify", image], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    with open(os.path.join(image, "migrt", "config.json")) as f:
        spec = json.load(f)
    assert spec["process"]["args"][-1] == COUNTER
    # the source container is stopped, not restarted
    p = wait_for(lambda: terminated(kube, src), 30, "the checkpointed container terminated")
    assert restart_count(p) == 0
    before = numbers(kube.logs(src))
    assert before[:3] == [1, 2, 3]
    # the source's `logs -f` ended by itself with the container, at its last line
    try:
        src_follow.wait(30)
    finally:
        if src_follow.poll() is None:
            src_follow.kill()
    assert numbers("\n".join(src_lines)) == before, (src_lines[-3:], before[-3:])

    # a pod of another namespace naming this checkpoint is refused (the namespace comes
    # from the kubelet's sandbox annotations): one line in its events, nothing runs
    check_other_namespace_refused(kube, image)

    # restore on the other node, in a new pod with the marker (the same namespace)
    m = pod_manifest(dst, COUNTER, node="node-b", env={"MIGRT_RESTORE_FROM": image})
    m["spec"]["restartPolicy"] = "Never"
    p = kube.run_pod(m, timeout=120)
    rcid = container_id(p)
    # `kubectl logs -f` of the restored pod goes on from the checkpointed number
    dst_follow, dst_lines = kube.follow_logs(dst)
    try:
        wait_for(lambda: len(numbers("\n".join(dst_lines))) >= 10, 30,
                 "kubectl logs -f of the restored pod following")
        assert dst_follow.poll() is None
    finally:
        dst_follow.kill()
        dst_follow.wait(5)
    followed = numbers("\n".join(dst_lines))
    assert followed[0] == before[-1] + 1, (before[-3:], followed[:3])
    assert followed == list(range(followed[0], followed[0] + len(followed))), followed[:20]
    wait_for(lambda: len(numbers(kube.logs(dst))) >= 5, 30, "the restored counter's log")
    after = numbers(kube.logs(dst))
    # the counter goes on from where it was checkpointed: not from 1
    assert after[0] == before[-1] + 1, (before[-5:], after[:5])
    assert after == list(range(after[0], after[0] + len(after)))
    out = kube.exec(dst, "cat", "/tmp/count").stdout
    assert int(out) >= after[-1]
    # the file it keeps open (fd 3) came along in the image's rootfs changes
    data = numbers(kube.exec(dst, "cat", "/data.log").stdout)
    assert data[:3] == [1, 2, 3] and data[-1] >= after[-1]
    assert restart_count(kube.pod(dst)) == 0
    with open(migrt_calls_log) as f:
        assert any(rcid in line and " create " in f" {line} " for line in f)
    for pod in (src, dst):
        kube.delete_pod(pod, "--grace-period=0", "--force")
    for pod in (src, dst):
        kube.wait_gone(pod)


def check_other_namespace_refused(kube, image):
    ns = f"{kube.namespace}-other"
    pod = f"otherns-{uuid.uuid4().hex[:6]}"
    kube.kubectl("create", "namespace", ns)
    try:
        # the ServiceAccount admission wants the namespace's default account first
        wait_for(lambda: kube.kubectl("get", "serviceaccount", "default", "-n", ns,
                                      check=False).returncode == 0, 60,
                 "the new namespace's default ServiceAccount")
        m = pod_manifest(pod, COUNTER, node="node-b", env={"MIGRT_RESTORE_FROM": image})
        m["metadata"]["namespace"] = ns
        m["spec"]["restartPolicy"] = "Never"
        kube.apply(m)

        def refused():
            ev = kube.get("events", "-n", ns, "--field-selector", f"involvedObject.name={pod}")
            return [e["message"] for e in ev["items"]
                    if "was taken from a pod in namespace" in e.get("message", "")] or None
        msgs = wait_for(refused, 60, "the refusal in the pod's events")
        assert f"namespace '{kube.namespace}'" in msgs[0] and f"is in '{ns}'" in msgs[0], msgs
        assert "migrt" in msgs[0], msgs
        # `kubectl describe pod` shows it too, and the pod does not run
        desc = kube.kubectl("describe", "pod", pod, "-n", ns).stdout
        assert "was taken from a pod in namespace" in desc, desc[-2000:]
        p = kube.get("pod", pod, "-n", ns)
        assert p["status"].get("phase") != "Running", p["status"]
        assert not any(s.get("state", {}).get("running")
                       for s in p["status"].get("containerStatuses", []))
        assert not kc_running_in(kube.nodes["node-b"], pod)
    finally:
        kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def kc_running_in(node, pod):
    """Running runc containers of this pod (by the CRI's sandbox-name annotation)."""
    p = subprocess.run(["runc", "--root", os.path.join(node.runc_root, "k8s.io"), "list",
                        "--format", "json"], capture_output=True, text=True)
    out = []
    for c in json.loads(p.stdout or "null") or []:
        ann = c.get("annotations") or {}
        if ann.get("io.kubernetes.cri.sandbox-name") == pod and c["status"] == "running" \
                and ann.get("io.kubernetes.cri.container-type") == "container":
            out.append(c["id"])
    return out


def test_restore_from_a_bad_checkpoint_says_so(kube, ckpt_dir):
    """A marker naming no checkpoint: the container fails to be created, with migrt's one
    line in the pod's events, and nothing runs."""
    pod = f"badrestore-{uuid.uuid4().hex[:6]}"
    missing = os.path.join(ckpt_dir, "nothing-here")
    m = pod_manifest(pod, COUNTER, node="node-b", env={"MIGRT_RESTORE_FROM": missing})
    m["spec"]["restartPolicy"] = "Never"
    kube.apply(m)

    def failed():
        ev = kube.kubectl("get", "events", "--field-selector",
                          f"involvedObject.name={pod}", "-o", "json").stdout
        msgs = [e.get("message", "") for e in json.loads(ev)["items"]]
        return [x for x in msgs if missing in x] or None
    msgs = wait_for(failed, 60, "an event naming the missing checkpoint")
    assert any("migrt" in x for x in msgs), msgs
    p = kube.pod(pod)
    assert not any(s.get("state", {}).get("running")
                   for s in p["status"].get("containerStatuses", []))
    kube.delete_pod(pod, "--grace-period=0", "--force")
    kube.wait_gone(pod)


def test_migrate_a_pod_to_the_other_node(kube):
    """`migrt migrate` of a pod's container on node-a to node-b's agent; the new pod on
    node-b carries the marker migrate prints (as a controller would make it): it goes on
    from the next number, and the source container is gone, not restarted."""
    src, dst = f"mig-{uuid.uuid4().hex[:6]}", f"moved-{uuid.uuid4().hex[:6]}"
    a, b = kube.nodes["node-a"], kube.nodes["node-b"]
    m = pod_manifest(src, COUNTER, node="node-a")
    m["spec"]["restartPolicy"] = "Never"
    cid = container_id(kube.run_pod(m))
    wait_for(lambda: len(numbers(kube.logs(src))) >= 10, 30, "counter running")

    mig = subprocess.Popen(
        [kube.migrt, "--root", os.path.join(a.runc_root, "k8s.io"), "migrate", cid,
         "--to", b.agent_address, "--secret-file", kube.secret, "--wait", "90", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=dict(os.environ, MIGRT_STATE_DIR=a.containerd.migrt_state))
    err, marker = [], {}

    def read():
        for line in mig.stderr:
            err.append(line)
            found = re.search(r"MIGRT_RESTORE_FROM=(staged:\S+)", line)
            if found:
                marker["value"] = found.group(1)
    t = threading.Thread(target=read, daemon=True)
    t.start()
    try:
        wait_for(lambda: marker.get("value") or mig.poll() is not None, 60,
                 "migrate staging the container and printing the marker")
        assert "value" in marker, f"migrate exited {mig.returncode}: {''.join(err)}"
        # the source is dumped by now (frozen or gone): its log is complete
        before = numbers(kube.logs(src))
        m = pod_manifest(dst, COUNTER, node="node-b", env={"MIGRT_RESTORE_FROM": marker["value"]})
        m["spec"]["restartPolicy"] = "Never"
        p = kube.run_pod(m, timeout=120)
        out, _ = mig.communicate(timeout=120)
    finally:
        if mig.poll() is None:
            mig.kill()
            mig.wait(5)
    t.join(5)
    assert mig.returncode == 0, "".join(err)
    report = json.loads(out)
    assert report.get("destination_id"), report
    assert p["spec"]["nodeName"] == "node-b"
    wait_for(lambda: len(numbers(kube.logs(dst))) >= 5, 30, "the moved counter's log")
    # the source stopped, and stays stopped
    s = wait_for(lambda: terminated(kube, src), 30, "the source container terminated")
    assert restart_count(s) == 0
    after = numbers(kube.logs(dst))
    assert before[:3] == [1, 2, 3], before[:3]
    assert after[0] == before[-1] + 1, (before[-3:], after[:3])
    # nothing more came from the source
    late = numbers(kube.logs(src))
    assert late == before, (before[-3:], late[-3:])
    assert kube.exec(dst, "cat", "/tmp/count").returncode == 0
    for pod in (src, dst):
        kube.delete_pod(pod, "--grace-period=0", "--force")
    for pod in (src, dst):
        kube.wait_gone(pod)
