"""The two pod rules (migrt.runtime.podrules) with real runc and CRIU, without a kubelet.

Bundles carry the annotations containerd's CRI gives a pod's container
(io.kubernetes.cri.container-type/sandbox-id/container-name/...): what a kubelet's
restart looks like to the runtime is a new container id with the same sandbox id and
container name. The Kubernetes tier (tests/kube/test_kube_migrate.py) checks the same rules
under real kubelets.
"""
import os
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


def test_pod_move_between_two_agents_as_the_controller_drives_it(tmp_path, make_bundle,
                                                                 migrt_launcher):
    """The node side of a pod move, without a kubelet: the new pod's container is
    created first and waits for a migration id chosen by the caller (its agent says
    `awaited`); the source node's agent is asked to migrate the container with that id
    (agent operation `migrate`, as migrt.kube does it); the waiting create restores it.
    Then the source's pod container is refused in its sandbox, a second `migrate` with
    the same id only reports the outcome again, and the restored container, killed and
    created again in its sandbox, starts from its image."""
    import threading
    import time
    from test_migrate import Agent, secret_file
    from migrt.kube import agents
    from migrt.transfer import wire

    state = f"/dev/shm/migrt-it-{ocitest.uid('s')}"
    kube_state = str(tmp_path / "kube-state")
    env = dict(os.environ, MIGRT_STATE_DIR=state, MIGRT_KUBE_STATE=kube_state)
    secret = secret_file(tmp_path / "secret")
    a = ocitest.Runtime(migrt_launcher, str(tmp_path / "root-a"), env=env)
    b_root = str(tmp_path / "root-b")
    ag_a = Agent(migrt_launcher, str(tmp_path / "a"), a.root, secret, env,
                 staging=str(tmp_path / "staging-a")).start()
    ag_b = Agent(migrt_launcher, str(tmp_path / "b"), b_root, secret, env,
                 staging=str(tmp_path / "staging-b")).start()
    b = ocitest.Runtime(migrt_launcher, b_root, env=dict(env, MIGRT_STAGING=ag_b.staging))
    try:
        old_sandbox, new_sandbox = uuid.uuid4().hex, uuid.uuid4().hex
        cid, _, rc, out, err = counter(a, make_bundle, old_sandbox)
        assert rc == 0, err.text
        ocitest.wait_for(lambda: ocitest.last_count(out) >= 10, what="source counter")
        mid = "m-" + uuid.uuid4().hex[:16]
        key = wire.load_secret(secret)
        assert agents.status(ag_b.address, key, mid) == "unknown"

        made = {}
        bundle = make_bundle(["sh", "-c", ocitest.COUNTER], name="new-pod",
                             env=[f"MIGRT_RESTORE_FROM=staged:{mid}"],
                             annotations=pod_annotations(new_sandbox))

        def create():
            made["rc"], made["out"], made["err"] = b.create("new", bundle, start=True)
        t = threading.Thread(target=create)
        t.start()
        ocitest.wait_for(lambda: agents.status(ag_b.address, key, mid) == "awaited",
                         timeout=20, what="the new container waiting for its migration")
        assert a.state(cid)["status"] == "running"        # nothing frozen yet
        assert agents.addresses(ag_b.address, key, mid)[0] == "awaited"

        t0 = time.monotonic()
        seen = []

        def restored(note):        # the agent's frame once the copy runs, before the outcome
            seen.append((note, (b.state("new") or {}).get("status"),
                         agents.addresses(ag_b.address, key, mid)))
        res = agents.migrate(ag_a.address, key, cid, mid, ag_b.address, restored=restored)
        t.join(60)
        assert res["ok"], (res, time.monotonic() - t0, made["err"].text)
        assert made["rc"] == 0, made["err"].text
        rep = res["report"]
        assert rep["migration"] == mid and rep["phases"]["downtime"] > 0
        assert len(seen) == 1, seen
        note, there, (status, ips) = seen[0]     # not `state`: the finally removes it
        assert note["event"] == "restored" and note["mode"] == "full"
        assert 0 < note["downtime"] <= rep["phases"]["downtime"]
        # the copy ran when the event came (the migration goes on meanwhile: by the time
        # the target is asked, it may have been released already)
        assert there == "running" and status not in ("awaited", "failed"), seen
        assert isinstance(ips, list)
        assert a.state(cid) is None
        ocitest.wait_for(lambda: numbers(made["out"]), what="restored counter")
        before = ocitest.last_count(out)
        assert numbers(made["out"])[0] == before + 1
        # asked again: the same outcome, nothing run twice
        again = agents.migrate(ag_a.address, key, cid, mid, ag_b.address)
        assert again["ok"] and again["report"]["migration"] == mid
        # a caller asking for the event once the outcome is known gets the outcome only
        again = agents.migrate(ag_a.address, key, cid, mid, ag_b.address,
                               restored=lambda n: seen.append(n))
        assert again["ok"] and len(seen) == 1

        # the source's pod container is not created again in its sandbox
        back, _, rc, _, err2 = counter(a, make_bundle, old_sandbox)
        assert rc == 1 and "was migrated to" in err2.text and mid in err2.text, err2.text

        # the restored container, killed and made again by its kubelet: from its image
        b.run("kill", "new", "KILL")
        ocitest.wait_for(lambda: (b.state("new") or {}).get("status") == "stopped",
                         what="stopped")
        b.run("delete", "new")
        r2 = make_bundle(["sh", "-c", ocitest.COUNTER], name="new-pod-2",
                         env=[f"MIGRT_RESTORE_FROM=staged:{mid}"],
                         annotations=pod_annotations(new_sandbox))
        rc, out2, err3 = b.create("new2", r2, start=True)
        assert rc == 0, err3.text
        ocitest.wait_for(lambda: ocitest.last_count(out2) >= 2, what="restarted counter")
        assert numbers(out2)[:2] == [1, 2]
    finally:
        for ag in (ag_a, ag_b):
            ag.kill()
        a.cleanup()
        b.cleanup()
        ocitest.remove_state(state)


def test_agent_migrate_refuses_bad_requests(tmp_path, migrt_launcher):
    from test_migrate import Agent, secret_file
    from migrt.kube import agents
    from migrt.transfer import wire
    state = f"/dev/shm/migrt-it-{ocitest.uid('s')}"
    env = dict(os.environ, MIGRT_STATE_DIR=state)
    secret = secret_file(tmp_path / "secret")
    ag = Agent(migrt_launcher, str(tmp_path / "a"), str(tmp_path / "root"), secret, env,
               staging=str(tmp_path / "staging")).start()
    key = wire.load_secret(secret)
    try:
        r = agents.migrate(ag.address, key, "../etc", "m-0123456789abcdef", "127.0.0.1:1")
        assert not r["ok"] and "needs a container id" in r["error"]
        r = agents.migrate(ag.address, key, "nothere", "m-0123456789abcdef", "127.0.0.1:1")
        assert not r["ok"] and "no container nothere on this node" in r["error"]
        r = agents.migrate(ag.address, key, "nothere", "m-0123456789abcdef", "127.0.0.1:1",
                           start=False)
        assert not r["ok"] and "no migration m-0123456789abcdef was started" in r["error"]
        assert not os.path.exists(os.path.join(state, "out", "m-0123456789abcdef.pid"))
    finally:
        ag.kill()
        ocitest.remove_state(state)


def test_cancelled_move_stops_the_waiting_create_at_once(tmp_path, make_bundle, migrt_launcher):
    """The caller gives the move up before the migration started (agent op `drop`): the
    new pod's waiting create fails at once, saying why, and that id cannot be used after."""
    import threading
    import time
    from test_migrate import Agent, secret_file
    from migrt.kube import agents
    from migrt.transfer import wire
    state = f"/dev/shm/migrt-it-{ocitest.uid('s')}"
    env = dict(os.environ, MIGRT_STATE_DIR=state, MIGRT_KUBE_STATE=str(tmp_path / "ks"))
    secret = secret_file(tmp_path / "secret")
    ag = Agent(migrt_launcher, str(tmp_path / "b"), str(tmp_path / "root"), secret, env,
               staging=str(tmp_path / "staging")).start()
    b = ocitest.Runtime(migrt_launcher, str(tmp_path / "root"),
                        env=dict(env, MIGRT_STAGING=ag.staging, MIGRT_STAGED_WAIT="60"))
    key = wire.load_secret(secret)
    try:
        mid = "m-" + uuid.uuid4().hex[:16]
        bundle = make_bundle(["sh", "-c", ocitest.COUNTER], name="new-pod",
                             env=[f"MIGRT_RESTORE_FROM=staged:{mid}"],
                             annotations=pod_annotations(uuid.uuid4().hex))
        made = {}
        t = threading.Thread(target=lambda: made.update(zip(("rc", "out", "err"),
                                                            b.create("new", bundle))))
        t.start()
        ocitest.wait_for(lambda: agents.status(ag.address, key, mid) == "awaited", timeout=20,
                         what="waiting")
        t0 = time.monotonic()
        assert agents.drop(ag.address, key, mid, "the move was cancelled")
        t.join(30)
        assert time.monotonic() - t0 < 10
        assert made["rc"] == 1
        assert (f"staged:{mid}: the migration was dropped before it arrived "
                f"(the move was cancelled)") in made["err"].text, made["err"].text
        assert b.state("new") is None
    finally:
        ag.kill()
        b.cleanup()
        ocitest.remove_state(state)


def test_held_source_stays_frozen_until_go_or_its_hold_ends(tmp_path, make_bundle,
                                                            migrt_launcher):
    """`migrate` with `hold` (a Job pod with restartPolicy Never, migrt.kube): once the
    copy runs on the target, the source stays frozen (runc: paused, its counter still)
    and the outcome waits, until the caller says `go`; then the source goes. Without a
    `go`, it goes when the hold ends. One copy runs at a time all along."""
    import threading
    import time
    from test_migrate import Agent, secret_file
    from migrt.kube import agents
    from migrt.transfer import wire

    state = f"/dev/shm/migrt-it-{ocitest.uid('s')}"
    env = dict(os.environ, MIGRT_STATE_DIR=state, MIGRT_KUBE_STATE=str(tmp_path / "ks"))
    secret = secret_file(tmp_path / "secret")
    a = ocitest.Runtime(migrt_launcher, str(tmp_path / "root-a"), env=env)
    b_root = str(tmp_path / "root-b")
    ag_a = Agent(migrt_launcher, str(tmp_path / "a"), a.root, secret, env,
                 staging=str(tmp_path / "staging-a")).start()
    ag_b = Agent(migrt_launcher, str(tmp_path / "b"), b_root, secret, env,
                 staging=str(tmp_path / "staging-b")).start()
    b = ocitest.Runtime(migrt_launcher, b_root, env=dict(env, MIGRT_STAGING=ag_b.staging))
    key = wire.load_secret(secret)

    def move(new, hold, say_go):
        cid, _, rc, out, err = counter(a, make_bundle, uuid.uuid4().hex)
        assert rc == 0, err.text
        ocitest.wait_for(lambda: ocitest.last_count(out) >= 5, what="source counter")
        mid = "m-" + uuid.uuid4().hex[:16]
        made = {}
        bundle = make_bundle(["sh", "-c", ocitest.COUNTER], name=f"{new}-pod",
                             env=[f"MIGRT_RESTORE_FROM=staged:{mid}"],
                             annotations=pod_annotations(uuid.uuid4().hex))

        def create():
            made["rc"], made["out"], made["err"] = b.create(new, bundle, start=True)
        t = threading.Thread(target=create)
        t.start()
        ocitest.wait_for(lambda: agents.status(ag_b.address, key, mid) == "awaited",
                         timeout=20, what="the new container waiting for its migration")
        held = []

        def restored(note):
            # the copy runs there; the source is frozen here and stays so
            for _ in range(10):
                sa, sb = (a.state(cid) or {}).get("status"), (b.state(new) or {}).get("status")
                held.append((sa, sb, ocitest.last_count(out)))
                time.sleep(0.1)
            if say_go:
                assert agents.go(ag_a.address, key, cid, mid, ag_b.address)
        t0 = time.monotonic()
        res = agents.migrate(ag_a.address, key, cid, mid, ag_b.address, restored=restored,
                             hold=hold)
        took = time.monotonic() - t0
        t.join(60)
        assert res["ok"], (res, made.get("err") and made["err"].text)
        assert made["rc"] == 0, made["err"].text
        assert len(held) == 10 and all(h[:2] == ("paused", "running") for h in held), held
        assert len({h[2] for h in held}) == 1, held          # the source's counter stood
        assert a.state(cid) is None                          # gone once let go
        ocitest.wait_for(lambda: numbers(made["out"]), what="restored counter")
        assert numbers(made["out"])[0] == held[0][2] + 1
        return res["report"], took

    try:
        rep, _ = move("new-go", 60, True)
        assert rep["source_held"] == "released" and rep["phases"]["source_held"] < 30, rep
        rep, took = move("new-timeout", 5, False)
        assert rep["source_held"] == "timeout" and rep["phases"]["source_held"] >= 4.9, rep
    finally:
        for ag in (ag_a, ag_b):
            ag.kill()
        a.cleanup()
        b.cleanup()
        ocitest.remove_state(state)
