"""Staging on a tmpfs wherever it is (issue 17): an agent whose staging dir is on a disk
mounts a private tmpfs there, migrations go through it, and the agent unmounts it when
it exits; if no tmpfs can be mounted, the agent says so in one line and does not start.
"""
import json
import os
import subprocess

import pytest

import migr
import ocitest
from migrt.agent import stagefs


@pytest.fixture
def nodes(tmp_path, migrt_launcher, make_bundle):
    n = migr.Nodes(migrt_launcher, tmp_path, make_bundle)
    yield n
    n.cleanup()
    migr.kill_tree_of(str(tmp_path))
    migr.umount_under(str(tmp_path))


def staging_finding(launcher, staging):
    p = subprocess.run([launcher, "doctor", "--json", "--staging", staging],
                       capture_output=True, text=True, timeout=60)
    found = {f["check"]: f for f in json.loads(p.stdout)["findings"]}
    return found["staging room"]


def test_disk_staging_gets_a_tmpfs_that_migrations_use_and_exit_unmounts(nodes, tmp_path):
    ag = migr.Agent(nodes.launcher, str(tmp_path), "disk", nodes.b.root, nodes.secret_file)
    os.makedirs(ag.staging)
    # something a disk-staging agent left: hidden by the tmpfs, back after the unmount
    with open(os.path.join(ag.staging, "left-on-disk"), "w") as f:
        f.write("x")
    assert stagefs.mount_of(ag.staging)[1] != "tmpfs"
    before = staging_finding(nodes.launcher, ag.staging)
    assert before["status"] == "ok" and "mounts a private tmpfs there" in before["detail"], before

    ag.start()
    nodes.agents.append(ag)
    assert stagefs.mount_of(ag.staging) == (os.path.realpath(ag.staging), "tmpfs")
    assert ocitest.staging_mounts(ag.staging) == [os.path.realpath(ag.staging)]
    assert "mounted a private tmpfs there" in ag.log() and "1 entries left" in ag.log()
    assert not os.path.exists(os.path.join(ag.staging, "left-on-disk"))
    during = staging_finding(nodes.launcher, ag.staging)
    assert during["status"] == "ok" and "a tmpfs the migrt agent mounted" in during["detail"]

    cid, bundle, dest, out = nodes.counter()
    p, report = nodes.migrate(cid, dest, ag)
    assert p.returncode == 0, p.stderr
    migr.wait_dest_counting(ag, cid, 0)
    assert migr.copies(nodes, cid) == {"a": None, "b": "running"}

    ag.kill(migr.signal.SIGTERM)
    assert ag.proc.returncode == 0, ag.log()
    assert stagefs.mount_of(ag.staging)[1] != "tmpfs", ag.log()
    assert not ocitest.staging_mounts(ag.staging)
    assert "private tmpfs unmounted" in ag.log()
    assert os.path.exists(os.path.join(ag.staging, "left-on-disk"))


def test_agent_killed_leaves_its_tmpfs_to_the_next_agent(nodes, tmp_path):
    ag = nodes.agent()
    assert ocitest.staging_mounts(ag.staging) == [os.path.realpath(ag.staging)]
    ag.kill()                                   # SIGKILL: no chance to unmount
    assert ocitest.staging_mounts(ag.staging) == [os.path.realpath(ag.staging)]
    ag.restart()
    assert "taken over" in ag.log()
    # taken over, not a second tmpfs stacked on the first
    assert ocitest.staging_mounts(ag.staging) == [os.path.realpath(ag.staging)]
    cid, bundle, dest, out = nodes.counter()
    p, _ = nodes.migrate(cid, dest, ag)
    assert p.returncode == 0, p.stderr
    migr.wait_dest_counting(ag, cid, 0)
    ag.stop()
    assert not ocitest.staging_mounts(ag.staging), ag.log()


def test_no_tmpfs_possible_is_one_line_and_no_agent(tmp_path, migrt_launcher):
    """Without CAP_SYS_ADMIN the agent cannot mount one: it refuses, never stages on disk."""
    staging = tmp_path / "staging"
    secret = migr.write_secret(str(tmp_path / "secret"))
    p = subprocess.run(["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", "--",
                        migrt_launcher, "agent", "--listen", f"127.0.0.1:{migr.free_port()}",
                        "--secret-file", secret, "--staging", str(staging),
                        "--disk", str(tmp_path / "disk")],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode != 0 and "listening" not in p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "not a tmpfs" in lines[0] and str(staging) in lines[0] \
        and "Operation not permitted" in lines[0], lines[0]
    assert not ocitest.staging_mounts(str(tmp_path))
    assert not os.listdir(staging)
