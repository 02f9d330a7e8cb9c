"""Least privilege: `migrt agent --user nobody` serves the network without root.

The process that listens, speaks TLS, parses frames and writes staging runs as
`nobody`, without capabilities and with no_new_privs; the root parent holds no network
socket; a migration through it still works end to end; and the narrow root path
(migrt.agent.privsep.RootHelper) refuses every request outside what a restore needs.
"""
import json
import os
import shutil
import socket

import psutil
import pytest

import migr
import ocitest
from migrt.agent import privsep


def status_of(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


@pytest.fixture
def shared_dir():
    """Staging dirs the unprivileged side can reach (pytest's temp root is 0700)."""
    d = f"/tmp/migrt-privsep-{os.urandom(4).hex()}"
    os.makedirs(d, mode=0o711)
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_network_side_runs_as_nobody(tmp_path, migrt_launcher, make_bundle, shared_dir):
    nodes = migr.Nodes(migrt_launcher, tmp_path, make_bundle)
    try:
        ag = migr.Agent(migrt_launcher, str(tmp_path), "priv", nodes.b.root, nodes.secret_file,
                        user="nobody")
        ag.staging = os.path.join(shared_dir, "staging")
        ag.disk = os.path.join(shared_dir, "disk")
        ag.env["MIGRT_STAGING"] = ag.staging
        ag.start()
        nodes.agents.append(ag)
        parent = psutil.Process(ag.proc.pid)
        listeners = [c for c in psutil.net_connections("tcp")
                     if c.status == "LISTEN" and c.laddr.port == ag.port]
        assert len(listeners) == 1
        net = psutil.Process(listeners[0].pid)
        nobody = 65534
        assert net.pid != parent.pid and net.ppid() == parent.pid
        assert net.uids().real == net.uids().effective == net.uids().saved == nobody
        st = status_of(net.pid)
        assert st["CapEff"] == "0000000000000000" and st["CapPrm"] == "0000000000000000"
        assert st["NoNewPrivs"] == "1" and st["Groups"] == ""
        # the root side has no network socket at all
        assert [c for c in parent.net_connections("inet")] == []
        assert os.stat(ag.staging).st_uid == nobody
        assert oct(os.stat(ag.staging).st_mode & 0o777) == "0o700"

        # and a migration through it works: the counter carries on at node B
        cid, bundle, dest, out = nodes.counter()
        p, report = nodes.migrate(cid, dest, ag)
        assert p.returncode == 0, p.stderr + ag.log()
        out.thread.join(15)
        last = ocitest.last_count(out)
        nums = migr.wait_dest_counting(ag, cid, last)
        assert nums[0] == last + 1
        assert migr.copies(nodes, cid) == {"a": None, "b": "running"}
        # its restore was started by the root side before the freeze (`arm`), and used
        assert report.get("restore_armed") == "yes", report.get("restore_armed")
        assert report["downtime"]["restore"]["armed"] == "used", report["downtime"]["restore"]
        # what it staged was written by nobody and is gone
        assert ag.staged_data() == []
        print(f"\nPRIVILEGE network side pid {net.pid} uid {nobody} caps 0 no_new_privs; "
              f"root side pid {parent.pid} without sockets; migration downtime "
              f"{report['phases']['downtime']:.2f}s")
    finally:
        nodes.cleanup()


class StubAgent:
    def __init__(self, staging, root):
        self.staging = staging
        self.disk = os.path.join(os.path.dirname(staging), "disk")
        self.root = root
        self.secret = b"x" * 32
        self.calls = []

    def restore(self, staged, msg):
        self.calls.append((staged.mid, msg))
        return 4242

    def arm(self, staged, msg):
        self.calls.append(("arm", staged.mid, msg))
        return True, None


def test_root_helper_refuses_everything_else(tmp_path):
    from migrt.agent import staging as stg
    staging = tmp_path / "staging"
    staging.mkdir()
    root = str(tmp_path / "runc-root")
    agent = StubAgent(str(staging), root)
    helper = privsep.RootHelper(agent, 65534, 65534)
    good = stg.Staged("m-00112233aabbccdd", str(staging), str(tmp_path / "disk"))
    good.create()
    good.update(state="staged")
    receiving = stg.Staged("m-99887766aabbccdd", str(staging), str(tmp_path / "disk"))
    receiving.create()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(bundle)
    other = tmp_path / "other-owner"
    other.mkdir()
    (other / "config.json").write_text("{}")
    os.chown(other, 65534, 65534)
    cfglink = tmp_path / "cfglink"
    cfglink.mkdir()
    (cfglink / "config.json").symlink_to("/etc/passwd")
    ok = {"op": "restore", "mid": good.mid, "bundle": str(bundle), "id": "c1"}
    bad = [
        dict(ok, mid="../../etc"), dict(ok, mid=receiving.mid), dict(ok, mid="m-0000000000000001"),
        dict(ok, id="../x"), dict(ok, id=""), dict(ok, root="/run/runc"),
        dict(ok, bundle="relative"), dict(ok, bundle=str(link)), dict(ok, bundle=str(other)),
        dict(ok, bundle=str(cfglink)), dict(ok, bundle="/nonexistent"),
        {"op": "exec", "argv": ["/bin/sh"]}, {"op": "exists", "id": "../../etc"}, None, [],
    ]
    for req in bad:
        r = helper.handle(req)
        assert "error" in r, (req, r)
    assert agent.calls == []                      # none of them reached a restore
    r = helper.handle(ok)
    assert r == {"ok": True, "pid": 4242} and agent.calls == [(good.mid, {
        "bundle": str(bundle), "id": "c1", "root": root})]
    # `arm`: a migration still arriving, the same bundle and id checks, a plan of runc
    # flags of a fixed set, nothing else reaches the agent
    agent.calls.clear()
    arm = {"op": "arm", "mid": receiving.mid, "bundle": str(bundle), "id": "c1",
           "restore_flags": ["--tcp-established", "--auto-dedup"], "lazy": False,
           "criu_conf": [], "descriptors": ["/dev/null", "pipe:[1]", "pipe:[2]"],
           "memory": 1 << 20}
    bad_arms = [
        dict(arm, mid=good.mid), dict(arm, mid="../../etc"), dict(arm, id="../x"),
        dict(arm, root="/run/runc"), dict(arm, bundle=str(link)), dict(arm, bundle=str(other)),
        dict(arm, bundle=str(cfglink)), dict(arm, restore_flags=["--exec-cmd"]),
        dict(arm, restore_flags=["--tcp-established", "--tcp-established"]),
        dict(arm, restore_flags="--shell-job"), dict(arm, criu_conf=["action-script /x"]),
        dict(arm, descriptors=[1, 2]), dict(arm, descriptors="/dev/null"),
        dict(arm, descriptors=["x"] * 65), {"op": "disarm", "mid": "../../etc"},
    ]
    for req in bad_arms:
        r = helper.handle(req)
        if req["op"] == "disarm":
            continue                # an invalid mid: nothing to stop, nothing done
        assert "error" in r, (req, r)
    assert agent.calls == []
    assert helper.handle(arm) == {"ok": True, "armed": True, "why": None}
    assert agent.calls == [("arm", receiving.mid, {
        "restore_flags": ["--tcp-established", "--auto-dedup"], "lazy": False,
        "criu_conf": [], "descriptors": ["/dev/null", "pipe:[1]", "pipe:[2]"],
        "memory": 1 << 20, "bundle": str(bundle), "id": "c1", "root": root})]
    assert helper.handle({"op": "exists", "id": "c1"}) == {"ok": True, "exists": False}
    assert helper.handle({"op": "check", "bundle": str(bundle), "id": "c1"}) == {"ok": True}
    assert "error" in helper.handle({"op": "check", "bundle": str(link), "id": "c1"})


def test_root_helper_answers_the_map_locks_question_with_its_own_criu(tmp_path):
    """The sixth request: does this node's CRIU keep a POSIX lock on a mapped file (the
    real probe, migrt.criu.probe)? It takes no arguments: a CRIU named in the request is
    not the one asked."""
    agent = StubAgent(str(tmp_path), str(tmp_path / "runc-root"))
    helper = privsep.RootHelper(agent, 65534, 65534)
    r = helper.handle({"op": "map_locks"})
    assert r == {"ok": True, "kept": True, "why": ""}, r      # install.sh's patched CRIU
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    assert helper.handle({"op": "map_locks", "criu": str(fake)}) == r
