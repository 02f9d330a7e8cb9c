"""logs plugin, real runc and CRIU: the output log continues on the destination, and
`migrt logs` there shows the container's checkpoint and restore with CRIU's logs."""
import json
import subprocess

import pytest

from fakes import plugintest as pt

LOOP = "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.05; done"


@pytest.fixture
def nodes(tmp_path, migrt_bin):
    n = pt.Nodes(tmp_path, migrt_bin)
    yield n
    n.cleanup()


def test_output_log_and_record_follow_the_container(nodes, make_bundle, tmp_path):
    a = nodes("a")
    src_log = tmp_path / "pods" / "a" / "0.log"
    src_log.parent.mkdir(parents=True)
    src_log.write_text("2026-11-23T10:00:00Z stdout F written before the move\n")
    src = make_bundle(["sh", "-c", LOOP], name=pt.uniq("src"),
                      annotations={"io.kubernetes.cri-o.LogPath": str(src_log)})
    rc, out, err = a.create("c1", src, start=True)
    assert rc == 0, err.text
    pt.wait_lines(out, lambda x: x.startswith("tick 2"))
    img = tmp_path / "ckpt"
    assert pt.checkpoint(a, "c1", img).returncode == 0

    b = nodes("b")
    dst_log = tmp_path / "pods" / "b" / "0.log"
    dst = make_bundle(["sh", "-c", LOOP], name=pt.uniq("dst"),
                      annotations={"io.kubernetes.cri-o.LogPath": str(dst_log)})
    rc, out2, err2 = pt.restore(b, "c2", dst, img)
    assert rc == 0, err2.text
    assert dst_log.read_text().startswith("2026-11-23T10:00:00Z stdout F written before the move\n")

    shown = b.run("logs", "c2")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert any(" checkpoint  dump" in x for x in lines), lines
    assert any(" restore  " in x and x.rstrip().endswith("ok") for x in lines), lines
    events = [json.loads(x) for x in b.run("logs", "c2", "--json").stdout.splitlines()]
    assert [e["event"] for e in events] == ["checkpoint", "restore"]
    assert events[1]["seconds"] > 0
    criu = b.run("logs", "c2", "--criu")
    assert "Restore finished successfully" in criu.stdout
    # on the source, the record has the dump log
    assert "Dumping finished successfully" in a.run("logs", "c1", "--criu").stdout


def test_records_keyed_by_runtime_root_listed_and_followed(nodes, make_bundle, tmp_path):
    """The same id under two runtime roots (two containerd namespaces, say) is two
    containers: their records do not merge. `migrt logs` lists them, a short id finds
    one, --root picks one, -f follows one as events arrive."""
    import os
    import threading
    import ocitest
    a = nodes("a")
    other = ocitest.Runtime(a.binary, str(tmp_path / "other-root"), env=a.env)
    nodes.rts.append(other)
    cid = "c1-" + pt.uniq("x").replace("_", "")
    images = {}
    for rt, tag in ((a, "a"), (other, "o")):
        b = make_bundle(["sh", "-c", LOOP], name=pt.uniq("b" + tag))
        rc, out, err = rt.create(cid, b, start=True)
        assert rc == 0, err.text
        pt.wait_lines(out, lambda x: x.startswith("tick 2"))
        images[tag] = tmp_path / f"ckpt-{tag}"
        assert pt.checkpoint(rt, cid, images[tag]).returncode == 0
    listed = a.run("logs")
    assert listed.returncode == 0, listed.stderr
    rows = [x for x in listed.stdout.splitlines() if x.startswith(cid)]
    assert len(rows) == 2, listed.stdout
    assert any(os.path.realpath(a.root) in x for x in rows)
    assert any(os.path.realpath(other.root) in x for x in rows)
    one = [json.loads(x) for x in a.run("logs", "--root", a.root, "--json", cid).stdout.splitlines()]
    assert [e["event"] for e in one] == ["checkpoint"]
    both = a.run("logs", cid)
    assert both.stdout.count("== ") == 2, both.stdout
    assert a.run("logs", cid[:6], "--root", other.root).returncode == 0
    assert a.run("logs", "--json").stdout.count(cid) == 2

    follow = subprocess.Popen(a.cmd("logs", "-f", "--json", "--root", a.root, cid),
                              stdout=subprocess.PIPE, text=True, env=a.env)
    lines = []
    reader = threading.Thread(target=lambda: [lines.append(x) for x in follow.stdout])
    reader.start()
    try:
        ocitest.wait_for(lambda: len(lines) >= 1, timeout=20, what="the record so far")
        dst = make_bundle(["sh", "-c", LOOP], name=pt.uniq("dst"))
        rc, out2, err2 = pt.restore(a, cid, dst, images["a"])
        assert rc == 0, err2.text
        ocitest.wait_for(lambda: any('"restore"' in x for x in lines), timeout=20,
                         what="the restore event in the followed record")
    finally:
        follow.terminate()
        follow.wait(10)
        reader.join(10)
    assert [json.loads(x)["event"] for x in lines] == ["checkpoint", "restore"]
