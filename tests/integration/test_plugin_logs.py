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
