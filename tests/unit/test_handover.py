"""migrt.migration.handover: migrate's hold on the source's network (real nftables in a
namespace of the test's own), the source's TCP connections and file locks as /proc shows
them, and `migrt checkpoint --tcp-skip-in-flight` on a runc that lacks the flag."""
import fcntl
import os
import socket
import subprocess

import pytest

from migrt.migration import handover, migrate
from test_netlock import in_ns, needs_tools, netns, reachable  # noqa: F401  (fixture)


def test_proc_net_addresses():
    assert handover._hex_addr("0100007F:1F40") == ("127.0.0.1", 8000)
    assert handover._hex_addr("00000000000000000000000001000000:0050") == ("::1", 80)
    # an IPv4 peer of a dual-stack socket reads as its IPv4 address
    assert handover._hex_addr("0000000000000000FFFF00000100007F:1F40") == ("127.0.0.1", 8000)


def test_external_netns_is_the_path_a_bundle_joins():
    spec = {"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/p"}]}}
    assert handover.external_netns(spec) == "/run/netns/p"
    spec["linux"]["namespaces"][1].pop("path")
    assert handover.external_netns(spec) is None
    assert handover.external_netns({}) is None


def test_tcp_connections_of_a_process():
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    try:
        conns = handover.tcp_connections(os.getpid(), ("01",))
        port = srv.getsockname()[1]
        assert ("127.0.0.1", c.getsockname()[1], "127.0.0.1", port) in conns
        assert ("127.0.0.1", port, "127.0.0.1", c.getsockname()[1]) in conns
        # the listening socket is not a connection
        assert not [x for x in handover.tcp_connections(os.getpid()) if x[3] == 0]
    finally:
        for s in (a, c, srv):
            s.close()


def test_file_locks_are_counted(tmp_path):
    before = migrate.held_file_locks([os.getpid()])
    with open(tmp_path / "f", "w") as f, open(tmp_path / "g", "w") as g:
        fcntl.flock(f, fcntl.LOCK_EX)
        fcntl.lockf(g, fcntl.LOCK_EX)
        assert migrate.held_file_locks([os.getpid()]) == before + 2
    assert migrate.held_file_locks([os.getpid()]) == before
    assert migrate.held_file_locks([2 ** 22 + 7]) == 0      # no such process


@needs_tools
@pytest.mark.parametrize("where", ["thread", "child"])
def test_hold_cuts_the_namespace_off_until_dropped(netns, where, monkeypatch):
    """The hold is added from a thread that joins the namespace (no interpreter started
    in the downtime), or by a child (MIGRT_HOLD_IN_CHILD=1, and where the thread cannot);
    either way this process itself stays in its own namespace."""
    monkeypatch.setenv("MIGRT_HOLD_IN_CHILD", "1" if where == "child" else "0")
    mine = os.stat("/proc/thread-self/ns/net").st_ino
    assert reachable(netns)
    h = handover.Hold.take(netns, external=False)
    assert h.method == "nftables"
    assert not reachable(netns)
    assert os.stat("/proc/thread-self/ns/net").st_ino == mine
    assert os.stat("/proc/self/ns/net").st_ino == mine
    assert h.drop() == ["nftables:migrt-hold"]
    assert reachable(netns)


@needs_tools
def test_hold_of_a_namespace_that_outlives_the_container(netns):
    """after_release destroys the recorded connections while still locked, then unlocks."""
    h = handover.Hold.take(netns, external=True)
    assert not reachable(netns)
    h.after_release()
    assert h.fd is None
    assert reachable(netns)


@needs_tools
def test_netlock_clear_removes_a_hold_a_dead_migrate_left(netns):
    from migrt.criu import netlock
    handover.Hold.take(netns, external=False).close()     # the fd goes, the lock stays
    assert not reachable(netns)
    assert "migrt-hold" in netlock.clear(netns)
    assert reachable(netns)


def test_the_host_namespace_is_never_held():
    assert handover.Hold.take(os.getpid(), external=True) is None


def test_checkpoint_skip_in_flight_on_a_runc_without_the_flag(tmp_path, monkeypatch):
    from migrt.front.argv import Call
    from migrt.runtime import lifecycle
    has = "--tcp-skip-in-flight" in subprocess.run(
        ["runc", "checkpoint", "--help"], capture_output=True, text=True).stdout.split()
    # the function sets CRIU_CONFIG_FILE in this process: a value set for the test is
    # removed by monkeypatch at the end (delenv of an absent name records nothing)
    monkeypatch.setenv("CRIU_CONFIG_FILE", "")
    monkeypatch.delenv("CRIU_CONFIG_FILE")
    argv = ["--root", "/r", "checkpoint", "--tcp-skip-in-flight", "--image-path", "x", "c1"]
    call = Call(argv)
    flags, _ = call.command_flags()
    work = str(tmp_path / "work")
    out = lifecycle.skip_in_flight_argv(call, flags, work)
    if has:
        assert out == argv
        return
    assert out == ["--root", "/r", "checkpoint", "--image-path", "x", "c1"]
    with open(os.environ["CRIU_CONFIG_FILE"]) as f:
        assert f.read().split() == ["skip-in-flight"]
    os.environ.pop("CRIU_CONFIG_FILE")
    call = Call(["checkpoint", "--image-path", "x", "c1"])
    assert lifecycle.skip_in_flight_argv(call, call.command_flags()[0], work) == call.argv
    assert "CRIU_CONFIG_FILE" not in os.environ


def test_no_criu_config_leaks_from_the_test_above():
    assert "CRIU_CONFIG_FILE" not in os.environ
