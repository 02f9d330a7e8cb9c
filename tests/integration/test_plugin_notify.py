"""The migration notification protocol (rdma plugin), real runc and CRIU: a workload
that acknowledges is told before the freeze and after restore; one that ignores the
notice is refused and keeps running."""
import time

import pytest

from fakes import plugintest as pt

# Acknowledges `prepare` by writing its seq into ack; reports `restored`.
ACKER = ("n=$MIGRT_NOTIFY; mkdir -p $n; i=0; acked=; seen=; "
         "while :; do i=$((i+1)); echo tick $i; "
         "if [ -f $n/event ]; then . $n/event; "
         "if [ \"$event\" = prepare ] && [ \"$seq\" != \"$acked\" ]; then "
         "echo drained $seq; echo $seq > $n/ack; acked=$seq; fi; "
         "if [ \"$event\" = restored ] && [ \"$seq\" != \"$seen\" ]; then "
         "echo restored on $node; seen=$seq; fi; fi; sleep 0.05; done")

IGNORER = "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.05; done"


@pytest.fixture
def nodes(tmp_path, migrt_bin):
    n = pt.Nodes(tmp_path, migrt_bin)
    yield n
    n.cleanup()


def _ticks(out):
    return [int(x.split()[1]) for x in out.lines() if x.startswith("tick ")]


def test_acknowledging_workload_is_told_before_freeze_and_after_restore(
        nodes, make_bundle, tmp_path):
    a = nodes("a")
    src = make_bundle(["sh", "-c", ACKER], name=pt.uniq("src"), env=["MIGRT_NOTIFY=/dev/shm/notify"])
    rc, out, err = a.create("c1", src, start=True)
    assert rc == 0, err.text
    pt.wait_lines(out, lambda x: x.startswith("tick 3"))
    img = tmp_path / "ckpt"
    p = pt.checkpoint(a, "c1", img)
    assert p.returncode == 0, p.stderr
    drained = [x for x in out.lines() if x.startswith("drained ")]
    assert len(drained) == 1               # it drained once, before it was frozen
    before = _ticks(out)[-1]
    b = nodes("b")
    dst = make_bundle(["sh", "-c", ACKER], name=pt.uniq("dst"), env=["MIGRT_NOTIFY=/dev/shm/notify"])
    rc, out2, err2 = pt.restore(b, "c2", dst, img)
    assert rc == 0, err2.text
    lines = pt.wait_lines(out2, lambda x: x.startswith("restored on "))
    import socket
    assert lines[0] == f"restored on {socket.gethostname()}"
    pt.wait_lines(out2, lambda x: x.startswith("tick "))
    assert _ticks(out2)[0] == before + 1   # the same loop goes on


def test_workload_that_ignores_the_notice_is_refused_and_keeps_running(
        nodes, make_bundle, tmp_path):
    a = nodes("a")
    src = make_bundle(["sh", "-c", IGNORER], name=pt.uniq("src"),
                      env=["MIGRT_NOTIFY=/dev/shm/notify", "MIGRT_RDMA_TIMEOUT=1"])
    rc, out, err = a.create("c1", src, start=True)
    assert rc == 0, err.text
    pt.wait_lines(out, lambda x: x.startswith("tick 3"))
    t0 = time.monotonic()
    p = pt.checkpoint(a, "c1", tmp_path / "ckpt")
    waited = time.monotonic() - t0
    assert p.returncode != 0
    assert "rdma: the workload did not acknowledge the migration notice in " \
           "/dev/shm/notify within 1 s" in p.stderr
    assert waited < 5
    assert a.state("c1")["status"] == "running"
    n = _ticks(out)[-1]
    pt.wait_lines(out, lambda x: x == f"tick {n + 5}")   # never frozen, still counting
    # it was told the migration is off
    assert "event=resumed" in a.exec_out("c1", "cat", "/dev/shm/notify/event")


def test_rdma_device_without_notification_is_refused(nodes, make_bundle, tmp_path):
    a = nodes("a")
    src = make_bundle(["sh", "-c", IGNORER], name=pt.uniq("src"))
    pt.grant(src, "/dev/infiniband/uverbs0", 1, 7)   # stands in for an RDMA device
    rc, out, err = a.create("c1", src, start=True)
    assert rc == 0, err.text
    p = pt.checkpoint(a, "c1", tmp_path / "ckpt")
    assert p.returncode != 0
    assert "rdma: the container uses /dev/infiniband/uverbs0 but does not take migration " \
           "notices" in p.stderr
    assert a.state("c1")["status"] == "running"


def test_failed_dump_tells_the_drained_workload_to_resume(nodes, make_bundle, tmp_path):
    # /dev/vcs0 (c 7:0) is a device CRIU cannot dump: the checkpoint fails after the ack.
    a = nodes("a")
    src = make_bundle(["sh", "-c", "exec 5</dev/vcs0; " + ACKER], name=pt.uniq("src"),
                      env=["MIGRT_NOTIFY=/dev/shm/notify"])
    pt.grant(src, "/dev/vcs0", 7, 0)
    rc, out, err = a.create("c1", src, start=True)
    assert rc == 0, err.text
    pt.wait_lines(out, lambda x: x.startswith("tick 3"))
    p = pt.checkpoint(a, "c1", tmp_path / "ckpt")
    assert p.returncode != 0
    assert [x for x in out.lines() if x.startswith("drained ")]
    event = a.exec_out("c1", "cat", "/dev/shm/notify/event")
    assert "event=resumed" in event and "reason=failed" in event
    assert a.state("c1")["status"] == "running"
