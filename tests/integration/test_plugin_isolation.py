"""isolation plugin, real runc and CRIU: hostname and host-mounted files survive a move
to a bundle that mounts other files (or none); an incompatible node is refused."""
import json
import os

import pytest

from fakes import plugintest as pt
from migrt.plugins import nodefacts

LOOP = "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.05; done"


@pytest.fixture
def nodes(tmp_path, migrt_bin):
    n = pt.Nodes(tmp_path, migrt_bin)
    yield n
    n.cleanup()


def _bind(dest, src):
    return {"destination": dest, "type": "bind", "source": str(src),
            "options": ["rbind", "rprivate", "ro"]}


def _source(nodes, make_bundle, tmp_path):
    (tmp_path / "a-hosts").write_text("10.0.0.1 pod-a\n")
    (tmp_path / "a-resolv").write_text("nameserver 10.0.0.53\n")
    a = nodes("a")
    src = make_bundle(["sh", "-c", LOOP], name=pt.uniq("src"), hostname="pod-a",
                      mounts=[_bind("/etc/hosts", tmp_path / "a-hosts"),
                              _bind("/etc/resolv.conf", tmp_path / "a-resolv")])
    rc, out, err = a.create("c1", src, start=True)
    assert rc == 0, err.text
    pt.wait_lines(out, lambda x: x.startswith("tick 2"))
    img = tmp_path / "ckpt"
    p = pt.checkpoint(a, "c1", img)
    assert p.returncode == 0, p.stderr
    return img


def test_hostname_and_host_files_are_kept(nodes, make_bundle, tmp_path):
    img = _source(nodes, make_bundle, tmp_path)
    (tmp_path / "b-hosts").write_text("10.9.9.9 somewhere-else\n")
    b = nodes("b")
    dst = make_bundle(["sh", "-c", LOOP], name=pt.uniq("dst"), hostname="node-b-name",
                      mounts=[_bind("/etc/hosts", tmp_path / "b-hosts")])   # no resolv.conf
    rc, out, err = pt.restore(b, "c2", dst, img)
    assert rc == 0, err.text
    assert b.exec_out("c2", "hostname").strip() == "pod-a"
    assert b.exec_out("c2", "cat", "/etc/hosts") == "10.0.0.1 pod-a\n"
    assert b.exec_out("c2", "cat", "/etc/resolv.conf") == "nameserver 10.0.0.53\n"
    assert (tmp_path / "b-hosts").read_text() == "10.9.9.9 somewhere-else\n"   # node's own file untouched


def test_node_lacking_a_cpu_feature_is_refused(nodes, make_bundle, tmp_path):
    img = _source(nodes, make_bundle, tmp_path)
    facts = nodefacts.collect(use_cache=False)
    isa = [f for f in facts["cpu_flags"] if nodefacts.ISA_FLAG.match(f)]
    assert isa, facts["cpu_flags"]
    facts["cpu_flags"] = [f for f in facts["cpu_flags"] if f != isa[-1]]
    (tmp_path / "b-facts.json").write_text(json.dumps(facts))
    b = nodes("b", env={"MIGRT_NODE_FACTS": str(tmp_path / "b-facts.json")})
    dst = make_bundle(["sh", "-c", LOOP], name=pt.uniq("dst"))
    rc, out, err = pt.restore(b, "c2", dst, img)
    assert rc != 0
    assert f"isolation: this node cannot restore the checkpoint: CPU lacks {isa[-1]}" in err.text
    assert b.state("c2") is None
