"""Plugins during `migrt migrate` (real runc, CRIU, agent on loopback): the migration
notice reaches the workload before the freeze; a workload that does not acknowledge it
makes the migration refused before anything is frozen, and the source keeps running."""
import ocitest
from test_migrate import two_nodes  # noqa: F401  (fixture)
from test_plugin_notify import ACKER, IGNORER


def ticks(out):
    return [int(x.split()[1]) for x in out.lines() if x.startswith("tick ")]


def start(n, make_bundle, script, cid="ctr"):
    b = make_bundle(["sh", "-c", script], name=ocitest.uid("src"),
                    env=["MIGRT_NOTIFY=/dev/shm/notify", "MIGRT_RDMA_TIMEOUT=1"])
    code, out, err = n.a.create(cid, b, start=True)
    assert code == 0, err.text
    ocitest.wait_for(lambda: len(ticks(out)) >= 3, what="ticks")
    return out


def test_unacknowledged_notice_refuses_migration_before_freeze(two_nodes, make_bundle):
    n = two_nodes
    ag = n.agent()
    out = start(n, make_bundle, IGNORER)
    dst = make_bundle(["sh", "-c", IGNORER], name=ocitest.uid("dst"),
                      env=["MIGRT_NOTIFY=/dev/shm/notify"])
    p, _ = n.migrate(ag, bundle=dst)
    assert p.returncode == 3, p.stderr              # refused: nothing was changed
    assert "rdma: the workload did not acknowledge the migration notice" in p.stderr
    assert n.a.state("ctr")["status"] == "running"
    last = ticks(out)[-1]
    ocitest.wait_for(lambda: ticks(out)[-1] >= last + 5, what="source still counting")
    assert n.b.state("ctr") is None
    ocitest.wait_for(lambda: not ag.staged(), timeout=10, what="staging emptied")


def test_acknowledged_notice_then_migration(two_nodes, make_bundle):
    n = two_nodes
    ag = n.agent()
    out = start(n, make_bundle, ACKER)
    dst = make_bundle(["sh", "-c", ACKER], name=ocitest.uid("dst"),
                      env=["MIGRT_NOTIFY=/dev/shm/notify"])
    p, rep = n.migrate(ag, bundle=dst)
    assert p.returncode == 0, p.stderr
    assert len([x for x in out.lines() if x.startswith("drained ")]) == 1
    assert n.a.state("ctr") is None                 # the source is gone...
    assert n.b.state("ctr")["status"] == "running"  # ...and runs on the destination
