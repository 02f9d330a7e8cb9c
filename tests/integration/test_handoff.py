"""The node side of a StatefulSet pod's move (migrt.kube.statefulset), without a kubelet:
`migrt migrate --handoff` through the source agent's `migrate` operation. The target's
agent keeps the staged copy (`keep`) and the source container goes; nothing waits for
the copy yet. A create with the marker that fails leaves the copy as it was, says so in
the agent's status (attempts, last error), and the next create restores it; the kept
image is read, not consumed (no pages punched out); the source's pod container is
refused in its sandbox; the release removes the copy.
"""
import os
import uuid

import ocitest
from test_podrules import counter, numbers, pod_annotations


def test_handoff_keeps_the_copy_until_a_create_restores_it(tmp_path, make_bundle,
                                                           migrt_launcher):
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
    b = ocitest.Runtime(migrt_launcher, b_root, env=dict(env, MIGRT_STAGING=ag_b.staging,
                                                         MIGRT_STAGED_WAIT="1"))
    image = away = None
    try:
        old_sandbox, new_sandbox = uuid.uuid4().hex, uuid.uuid4().hex
        cid, _, rc, out, err = counter(a, make_bundle, old_sandbox)
        assert rc == 0, err.text
        ocitest.wait_for(lambda: ocitest.last_count(out) >= 10, what="source counter")
        mid = "m-" + uuid.uuid4().hex[:16]
        key = wire.load_secret(secret)

        res = agents.migrate(ag_a.address, key, cid, mid, ag_b.address, "full", handoff=True)
        assert res["ok"] and res["report"]["handoff"], res
        assert a.state(cid) is None                     # the source went
        before = ocitest.last_count(out)
        q = agents.status_reply(ag_b.address, key, mid)
        assert q["state"] == "staged" and q["retain"] and q["attempts"] == 0, q
        pages = [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(ag_b.staging, mid))
                 for f in fs if f.startswith("pages-")]
        assert pages
        blocks = {p: os.stat(p).st_blocks for p in pages}

        # a failed create (the image away for a moment): the copy stays, status says it
        image = os.path.join(ag_b.staging, mid, "image")
        away = image + ".away"
        os.rename(image, away)
        bad = make_bundle(["sh", "-c", ocitest.COUNTER], name="new-pod-1",
                          env=[f"MIGRT_RESTORE_FROM=staged:{mid}"],
                          annotations=pod_annotations(new_sandbox, pod="web-0"))
        rc, _, err1 = b.create("new1", bad, start=True)
        assert rc != 0, err1.text
        os.rename(away, image)
        image = None
        q = agents.status_reply(ag_b.address, key, mid)
        assert q["state"] == "staged" and q["attempts"] == 1 and "missing" in q["last_error"], q
        assert b.state("new1") is None

        # the next create restores it: the counter goes on
        good = make_bundle(["sh", "-c", ocitest.COUNTER], name="new-pod-2",
                           env=[f"MIGRT_RESTORE_FROM=staged:{mid}"],
                           annotations=pod_annotations(new_sandbox, pod="web-0"))
        rc, out2, err2 = b.create("new2", good, start=True)
        assert rc == 0, err2.text
        ocitest.wait_for(lambda: numbers(out2), what="restored counter")
        assert numbers(out2)[0] == before + 1, (before, numbers(out2)[:3])
        q = agents.status_reply(ag_b.address, key, mid)
        assert q["state"] == "restored" and q["attempts"] == 2, q
        # read, not consumed: every page still there
        assert {p: os.stat(p).st_blocks for p in pages} == blocks

        # the source's pod container is refused in its old sandbox
        _, _, rc, _, err3 = counter(a, make_bundle, old_sandbox)
        assert rc == 1 and "was migrated to" in err3.text, err3.text

        # released: the kept copy goes
        agents.status_reply(ag_b.address, key, mid, release=True)
        assert not os.path.exists(os.path.join(ag_b.staging, mid))
    finally:
        if image and away and os.path.exists(away):
            os.rename(away, image)
        for ag in (ag_a, ag_b):
            ag.kill()
        a.cleanup()
        b.cleanup()
        ocitest.remove_state(state)
