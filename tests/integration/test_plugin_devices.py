"""devices plugin, real runc and CRIU: a device the checkpoint holds open is remapped to
the one the destination grants, at the same path; a missing one is refused."""
import os
import time

import pytest

from fakes import plugintest as pt

# fd 4 stays open on /dev/accel0; every line shows the fd's major:minor and 2 bytes read
# from it (/dev/null-like gives nothing, /dev/zero-like gives 0000).
HOLDER = ("exec 4</dev/accel0; while :; do "
          "echo \"dev $(stat -L -c %t:%T /proc/self/fd/4) $(stat -c %t:%T /dev/accel0) "
          "$(head -c 2 <&4 | od -An -tx1 | tr -d ' ')\"; sleep 0.1; done")


@pytest.fixture
def nodes(tmp_path, migrt_bin):
    n = pt.Nodes(tmp_path, migrt_bin)
    yield n
    n.cleanup()


def _source(nodes, make_bundle, tmp_path):
    a = nodes("a")
    src = make_bundle(["sh", "-c", HOLDER], name=pt.uniq("src"))
    pt.grant(src, "/dev/accel0", 1, 3)          # a null-like device
    rc, out, err = a.create("c1", src, start=True)
    assert rc == 0, err.text
    pt.wait_lines(out, lambda x: x.startswith("dev 1:3"))
    img = tmp_path / "ckpt"
    p = pt.checkpoint(a, "c1", img)
    assert p.returncode == 0, p.stderr
    return a, img


def test_held_device_is_remapped_to_the_destination_grant(nodes, make_bundle, tmp_path):
    a, img = _source(nodes, make_bundle, tmp_path)
    b = nodes("b")
    dst = make_bundle(["sh", "-c", HOLDER], name=pt.uniq("dst"))
    pt.grant(dst, "/dev/accel1", 1, 5)          # this node's device: zero-like, other name
    rc, out, err = pt.restore(b, "c2", dst, img)
    assert rc == 0, err.text
    # Same path for the workload, the destination's device behind it, held fd included.
    # (A line the shell had half computed when it was checkpointed may still come out
    # with the source's numbers: every line after the first new one must be new.)
    want = ["dev", "1:5", "1:5", "0000"]
    pt.wait_lines(out, lambda x: x.split() == want)
    time.sleep(0.3)
    devs = [x.split() for x in out.lines() if x.startswith("dev ")]
    assert all(d == want for d in devs[devs.index(want):]), devs
    assert b.exec_out("c2", "stat", "-c", "%t:%T", "/dev/accel0").strip() == "1:5"
    assert not os.path.exists("/dev/accel0") or os.stat("/dev/accel0")   # host untouched


def test_missing_device_is_refused_before_restore(nodes, make_bundle, tmp_path):
    a, img = _source(nodes, make_bundle, tmp_path)
    b = nodes("b")
    dst = make_bundle(["sh", "-c", HOLDER], name=pt.uniq("dst"))
    pt.grant(dst, "/dev/other0", 1, 7)
    rc, out, err = pt.restore(b, "c2", dst, img)
    assert rc != 0
    assert "devices: the checkpoint holds /dev/accel0 (c 1:3) open" in err.text
    assert "grants /dev/other0 (c 1:7)" in err.text
    assert b.state("c2") is None


def test_explicit_map_in_the_bundle(nodes, make_bundle, tmp_path):
    a, img = _source(nodes, make_bundle, tmp_path)
    b = nodes("b")
    dst = make_bundle(["sh", "-c", HOLDER], name=pt.uniq("dst"),
                      annotations={"io.migrt.devices.map": "/dev/accel0=/dev/other0"})
    pt.grant(dst, "/dev/other0", 1, 5)
    rc, out, err = pt.restore(b, "c2", dst, img)
    assert rc == 0, err.text
    # The held fd is the mapped device's. As above, a line half computed at the
    # checkpoint may still show the source's numbers; every one after the first new one
    # must be new.
    pt.wait_lines(out, lambda x: x.startswith("dev 1:5 "))
    time.sleep(0.3)
    fds = [x.split()[1] for x in out.lines() if x.startswith("dev ")]
    assert set(fds[fds.index("1:5"):]) == {"1:5"}, fds
