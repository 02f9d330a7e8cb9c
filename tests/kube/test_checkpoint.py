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
import shutil
import subprocess
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

    # restore on the other node, in a new pod with the marker
    m = pod_manifest(dst, COUNTER, node="node-b", env={"MIGRT_RESTORE_FROM": image})
    m["spec"]["restartPolicy"] = "Never"
    p = kube.run_pod(m, timeout=120)
    rcid = container_id(p)
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
