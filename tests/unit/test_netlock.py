"""migrt.criu.netlock: which network lock a migration's dump asks CRIU for, and clearing a
lock a killed CRIU left in a network namespace (real nftables and iptables, in a
namespace of the test's own)."""
import os
import shutil
import subprocess
import sys
import time

import pytest

from migrt.criu import netlock
from migrt.plugins import nodefacts

NFT = {"criu_features": {"network_lock_nftables": True}}
NO_NFT = {"criu_features": {"network_lock_nftables": False}}


def test_nftables_only_when_both_nodes_have_it(monkeypatch):
    monkeypatch.delenv(netlock.ENV, raising=False)
    assert netlock.choose(NFT, NFT) == "nftables"
    assert netlock.choose(NFT, NO_NFT) == "iptables"
    assert netlock.choose(NO_NFT, NFT) == "iptables"
    # an older agent reports no facts: CRIU's default, which every CRIU restores
    assert netlock.choose(NFT, None) == "iptables"


def test_the_node_setting_wins(monkeypatch):
    monkeypatch.setenv(netlock.ENV, "iptables")
    assert netlock.choose(NFT, NFT) == "iptables"
    monkeypatch.setenv(netlock.ENV, "nftables")
    assert netlock.choose(NO_NFT, None) == "nftables"
    monkeypatch.setenv(netlock.ENV, "pf")
    with pytest.raises(ValueError, match="MIGRT_NETWORK_LOCK='pf'"):
        netlock.choose(NFT, NFT)


def test_conf_lines():
    assert netlock.conf_lines("nftables") == ["network-lock nftables"]
    assert netlock.conf_lines("iptables") == []
    assert netlock.conf_lines(None) == []


def test_an_optional_feature_the_destination_lacks_refuses_nothing():
    src = {"criu_features": {"timens": True, "network_lock_nftables": True}}
    dst = {"criu_features": {"timens": True, "network_lock_nftables": False}}
    assert nodefacts.incompatible(src, dst) == []
    dst["criu_features"]["timens"] = False
    assert nodefacts.incompatible(src, dst) == ["kernel/CRIU lack timens"]


needs_tools = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "nsenter", "iptables")),
    reason="needs root, unshare, nsenter and iptables")


@pytest.fixture
def netns():
    """A process in a network namespace of its own, with lo up."""
    p = subprocess.Popen(["unshare", "-n", "sh", "-c", "ip link set lo up; exec sleep 600"])
    ns = f"/proc/{p.pid}/ns/net"
    end = time.monotonic() + 10
    while True:
        try:
            if os.readlink(ns) != os.readlink("/proc/self/ns/net") and \
                    os.readlink(f"/proc/{p.pid}/exe").endswith("sleep"):
                break
        except OSError:
            pass
        assert time.monotonic() < end, "namespace never came up"
        time.sleep(0.01)
    yield p.pid
    p.kill()
    p.wait()


def in_ns(pid, *argv):
    return subprocess.run(["nsenter", "-t", str(pid), "-n", *argv], capture_output=True,
                          text=True, timeout=20)


# nftables commands through libnftables, the library CRIU locks with (the nft program
# is not part of what the install step puts on a node)
NFT_PROG = """
import ctypes, sys
lib = ctypes.CDLL("libnftables.so.1")
lib.nft_ctx_new.restype = ctypes.c_void_p
lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
ctx = ctypes.c_void_p(lib.nft_ctx_new(0))
lib.nft_ctx_buffer_output(ctx)
rc = lib.nft_run_cmd_from_buffer(ctx, sys.argv[1].encode())
print((lib.nft_ctx_get_output_buffer(ctx) or b"").decode())
sys.exit(rc)
"""


def nft(pid, cmd):
    return in_ns(pid, sys.executable, "-I", "-c", NFT_PROG, cmd)


def reachable(pid):
    """A TCP connection over lo inside the namespace: what a locked namespace drops."""
    prog = ("import socket; s = socket.create_server(('127.0.0.1', 0)); "
            "c = socket.create_connection(s.getsockname(), timeout=1); print('ok')")
    return in_ns(pid, sys.executable, "-I", "-c", prog).stdout.strip() == "ok"


@needs_tools
def test_clear_removes_what_a_killed_criu_left(netns):
    assert reachable(netns)
    # what CRIU's two lock methods put in place (net.c: a CRIU chain jumped to from
    # INPUT and OUTPUT; an inet CRIU-<run id> table whose chains drop by default)
    for tool in ("iptables", "ip6tables"):
        for cmd in (["-N", "CRIU"], ["-A", "CRIU", "-j", "DROP"], ["-I", "INPUT", "-j", "CRIU"],
                    ["-I", "OUTPUT", "-j", "CRIU"]):
            assert in_ns(netns, tool, "-w", *cmd).returncode == 0
    t = "inet CRIU-5b8c0f1e"
    for cmd in (f"add table {t}",
                f"add chain {t} output {{ type filter hook output priority 0; policy drop; }}",
                f"add chain {t} input {{ type filter hook input priority 0; policy drop; }}",
                "add table inet mine"):
        assert nft(netns, cmd).returncode == 0, cmd
    assert not reachable(netns)
    removed = netlock.clear(netns)
    assert sorted(removed) == ["CRIU-5b8c0f1e", "ip6tables:CRIU", "iptables:CRIU"]
    assert reachable(netns)
    # nothing else is touched, and a second look finds nothing to do
    tables = nft(netns, "list tables").stdout
    assert "table inet mine" in tables and "CRIU" not in tables
    assert netlock.clear(netns) == []


def test_clear_never_touches_the_hosts_namespace():
    # there, CRIU locks single connections of its own run: not ours to undo
    assert netlock.clear(os.getpid()) == []


def test_clear_of_a_gone_process_says_so():
    with pytest.raises(OSError, match="network namespace of 999999999"):
        netlock.clear(999999999)
