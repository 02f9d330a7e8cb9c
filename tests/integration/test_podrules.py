"""The two pod rules (migrt.runtime.podrules) with real runc and CRIU, without a kubelet.

Bundles carry the annotations containerd's CRI gives a pod's container
(io.kubernetes.cri.container-type/sandbox-id/container-name/...): what a kubelet's
restart looks like to the runtime is a new container id with the same sandbox id and
container name. The Kubernetes tier (tests/kube/test_migrate.py) checks the same rules
under real kubelets.
"""
import os
import shutil
import uuid

import pytest

import ocitest


@pytest.fixture
def kube_state(tmp_path):
    return str(tmp_path / "kube-state")


@pytest.fixture
def rt(tmp_path, migrt_launcher, kube_state):
    r = ocitest.Runtime(migrt_launcher, str(tmp_path / "root"),
                        env={"MIGRT_KUBE_STATE": kube_state, "MIGRT_STAGED_WAIT": "1",
                             "MIGRT_STAGING": str(tmp_path / "staging")})
    yield r
    r.cleanup()


def pod_annotations(sandbox, name="main", ns="team", pod="web-1"):
    return {"io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": sandbox,
            "io.kubernetes.cri.container-name": name,
            "io.kubernetes.cri.sandbox-namespace": ns,
            "io.kubernetes.cri.sandbox-name": pod}


def counter(rt, make_bundle, sandbox, name="main", env=()):
    cid = ocitest.uid("ctr")
    bundle = make_bundle(["sh", "-c", ocitest.COUNTER], name=cid, env=list(env),
                         annotations=pod_annotations(sandbox, name))
    rc, out, err = rt.create(cid, bundle, start=True)
    return cid, bundle, rc, out, err


def numbers(out):
    return [int(x) for x in out.lines() if x.strip().isdigit()]


def test_checkpointed_pod_container_is_not_created_again_in_its_sandbox(rt, make_bundle,
                                                                         tmp_path, kube_state):
    sandbox = uuid.uuid4().hex
    cid, bundle, rc, out, err = counter(rt, make_bundle, sandbox)
    assert rc == 0, err.text
    ocitest.wait_for(lambda: ocitest.last_count(out) >= 3, what="counter")
    image = str(tmp_path / "ckpt")
    p = rt.run("checkpoint", "--image-path", image, cid)
    assert p.returncode == 0, p.stderr
    assert rt.state(cid) is None
    rt.run("delete", cid)

    # the kubelet's restart: same sandbox, same container name, a new id and bundle
    again, _, rc, out2, err2 = counter(rt, make_bundle, sandbox)
    assert rc == 1
    line = err2.text.strip()
    assert line.count("\n") == 0, line
    assert line.startswith("migrt: container main of pod team/web-1 was checkpointed to "
                           f"{image}; migrt does not start it again in this pod sandbox"), line
    assert rt.state(again) is None
    # the same error is the last json line of runc's --log, which containerd shows

    # another container of that pod, and the same name in another sandbox, start as usual
    other, _, rc, out3, err3 = counter(rt, make_bundle, sandbox, name="sidecar")
    assert rc == 0, err3.text
    fresh, _, rc, out4, err4 = counter(rt, make_bundle, uuid.uuid4().hex)
    assert rc == 0, err4.text
    ocitest.wait_for(lambda: ocitest.last_count(out4) >= 1, what="fresh counter")
    assert numbers(out4)[0] == 1

    # the sandbox goes (its pause container's delete, id = sandbox id): its records too
    pause = make_bundle(["sleep", "1000"], name="pause-" + sandbox[:8])
    rc, _, e = rt.create(sandbox, pause)
    assert rc == 0, e.text
    assert os.path.exists(os.path.join(kube_state, "tomb", sandbox))
    assert rt.run("delete", "--force", sandbox).returncode == 0
    assert not os.path.exists(os.path.join(kube_state, "tomb", sandbox))
    later, _, rc, _, err5 = counter(rt, make_bundle, sandbox)
    assert rc == 0, err5.text


def test_failed_checkpoint_leaves_no_tombstone(rt, make_bundle, tmp_path, kube_state):
    sandbox = uuid.uuid4().hex
    cid, bundle, rc, out, err = counter(rt, make_bundle, sandbox)
    assert rc == 0, err.text
    # an image path that cannot be made (a file in the way): CRIU never runs
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = rt.run("checkpoint", "--image-path", str(blocker / "img"), cid)
    assert p.returncode != 0
    assert rt.state(cid)["status"] == "running"
    assert not os.path.exists(os.path.join(kube_state, "tomb", sandbox, "main"))


def test_restored_pod_container_restarts_from_its_image(rt, make_bundle, tmp_path):
    """A container restored from the marker, killed, and created again by its kubelet
    in the same sandbox (the marker still in its spec) starts from scratch: it never
    rewinds to the checkpoint."""
    image = str(tmp_path / "ckpt")
    cid, bundle, rc, out, err = counter(rt, make_bundle, uuid.uuid4().hex)
    assert rc == 0, err.text
    ocitest.wait_for(lambda: ocitest.last_count(out) >= 20, timeout=20, what="counter")
    assert rt.run("checkpoint", "--image-path", image, cid).returncode == 0
    before = ocitest.last_count(out)

    sandbox = uuid.uuid4().hex            # the new pod
    marker = [f"MIGRT_RESTORE_FROM={image}"]
    r1, b1, rc, out1, err1 = counter(rt, make_bundle, sandbox, env=marker)
    assert rc == 0, err1.text
    ocitest.wait_for(lambda: numbers(out1), what="restored counter")
    assert numbers(out1)[0] == before + 1

    rt.run("kill", r1, "KILL")
    ocitest.wait_for(lambda: (rt.state(r1) or {}).get("status") == "stopped", what="stopped")
    rt.run("delete", r1)
    r2, b2, rc, out2, err2 = counter(rt, make_bundle, sandbox, env=marker)
    assert rc == 0, err2.text
    ocitest.wait_for(lambda: ocitest.last_count(out2) >= 2, what="restarted counter")
    assert numbers(out2)[:2] == [1, 2]            # from its image, not from the checkpoint
    # the checkpoint is still there: only this sandbox has used it up
    other, _, rc, out3, err3 = counter(rt, make_bundle, uuid.uuid4().hex, env=marker)
    assert rc == 0, err3.text
    ocitest.wait_for(lambda: numbers(out3), what="second restore")
    assert numbers(out3)[0] == before + 1


def test_pod_container_waits_for_its_staged_migration_then_says_so(rt, make_bundle):
    """staged:<mid> named before the migration arrives: a pod's container waits
    (MIGRT_STAGED_WAIT, 1 s here) and then fails with one line; a container that is not
    a pod's fails at once."""
    import time
    mid = "m-" + uuid.uuid4().hex[:16]
    t0 = time.monotonic()
    cid, _, rc, out, err = counter(rt, make_bundle, uuid.uuid4().hex,
                                   env=[f"MIGRT_RESTORE_FROM=staged:{mid}"])
    took = time.monotonic() - t0
    assert rc == 1
    assert f"staged:{mid}: no such migration arrived in" in err.text, err.text
    assert took >= 1.0
    assert rt.state(cid) is None
    plain = ocitest.uid("ctr")
    b = make_bundle(["sh", "-c", "echo hi"], name=plain,
                    env=[f"MIGRT_RESTORE_FROM=staged:{mid}"])
    rc, _, err = rt.create(plain, b)
    assert rc == 1 and "no such staged migration" in err.text, err.text
