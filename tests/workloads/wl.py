"""Harness of the real-workload tier: Debian's own programs in containers, two nodes on
one machine, a test-owned network, and an address that moves with the container.

Nodes. Node A and node B are two runc roots; node B has a `migrt agent` on loopback
(tests/reliability/migr.py's Agent). Source and destination bundles have their own
cgroup paths.

Containers. The rootfs is a small private dir (writable: data, tmp, run, var) with
read-only bind mounts of the host's /usr and /etc; /bin, /sbin, /lib and /lib64 are the
same symlinks into usr/ as on this (merged-usr) Debian. Each workload prepares its files
(config, data) in a base rootfs that both bundles copy, as two nodes would unpack one
image; what the container changes travels with the migration as its rootfs changes.
Workloads run as uid 0: this machine's root lacks CAP_SYS_RESOURCE, and without it CRIU
cannot dump a process of another uid ("Can't get rlimit": prlimit on another user's
process needs that capability). Real nodes have it.

Network. Everything lives in network namespaces the test makes, and only private
addresses inside them are used; no packet leaves for any outside address:
  - a hub namespace holding a bridge;
  - a client namespace (10.213.0.1/24) with a veth port on the bridge;
  - per service address, TWO namespaces, A (the source node's view) and B (the
    destination's), each with an eth0 of the SAME address and the SAME MAC, each with its
    peer port in the hub. A's port is on the bridge; B's port is up but on no bridge.
The source container joins A's namespace (linux.namespaces network path) and the
destination bundle names B's. The handover is what a node taking over an address does:
once node B's runc has the restored container (its state.json appears), A's port leaves
the bridge and B's joins it, in one `ip -batch`. Same MAC, so the client's ARP entry stays
right; leaving the bridge flushes the bridge's forwarding entries for A's port, so frames
go to B's port at once. Until then, the client's packets reach the frozen source, whose
network CRIU has locked (dropped, so TCP retransmits them); after it, the source's kernel
is cut off, so nothing it sends after the migration (a reset of a moved connection) can
reach the client. Two namespaces rather than one shared one: the source keeps its sockets
(frozen) until the destination runs, and the destination's restored sockets need the
same address and ports, which one namespace cannot hold twice.
"""
import contextlib
import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "reliability"))

import ocitest  # noqa: E402
import migr  # noqa: E402
from migrt.runtime import bundlekit  # noqa: E402

CLIENT_IP = "10.213.0.1"
PREFIX = 24
MODES = {"full": [], "precopy": ["--precopy"], "lazy": ["--lazy"]}

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def sh(*argv, check=True, input=None):
    p = subprocess.run(list(argv), capture_output=True, text=True, input=input, timeout=60)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def _setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@contextlib.contextmanager
def in_netns(name):
    """Switch the calling thread (only) into network namespace `name`."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)


class Net:
    """The test's namespaces: hub with bridge br0, client, and address pairs."""

    def __init__(self, tag):
        self.tag = tag
        self.hub = f"{tag}-hub"
        self.client = f"{tag}-cli"
        self.made = []
        self.n = 0
        for ns in (self.hub, self.client):
            self._netns(ns)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge", "stp_state", "0")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        self._port("pc", self.client, CLIENT_IP, "02:00:0a:d5:00:01", bridged=True)

    def _netns(self, name):
        sh("ip", "netns", "add", name)
        self.made.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def _port(self, port, ns, ip, mac, bridged):
        sh("ip", "-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0",
           "netns", ns)
        sh("ip", "-n", ns, "link", "set", "eth0", "address", mac)
        sh("ip", "-n", ns, "addr", "add", f"{ip}/{PREFIX}", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        if bridged:
            sh("ip", "-n", self.hub, "link", "set", port, "master", "br0")
        sh("ip", "-n", self.hub, "link", "set", port, "up")

    def address(self):
        """A service address: (ip, netns of node A, netns of node B, handover())."""
        i = self.n
        self.n += 1
        ip = f"10.213.0.{10 + i}"
        mac = f"02:00:0a:d5:00:{10 + i:02x}"
        a, b = f"{self.tag}-a{i}", f"{self.tag}-b{i}"
        self._netns(a)
        self._netns(b)
        self._port(f"pa{i}", a, ip, mac, bridged=True)
        self._port(f"pb{i}", b, ip, mac, bridged=False)
        return Address(self, ip, a, b, f"pa{i}", f"pb{i}")

    def cleanup(self):
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made = []


class Address:
    def __init__(self, net, ip, ns_a, ns_b, port_a, port_b):
        self.net, self.ip, self.ns_a, self.ns_b = net, ip, ns_a, ns_b
        self.port_a, self.port_b = port_a, port_b
        self.handed_over_at = None

    def handover(self):
        sh("ip", "-n", self.net.hub, "-batch", "-",
           input=f"link set {self.port_a} nomaster\nlink set {self.port_b} master br0\n")
        self.handed_over_at = time.monotonic()


# ---------------------------------------------------------------- client sockets

def connect(net, ip, port, timeout=10.0):
    """A TCP connection from the client namespace."""
    with in_netns(net.client):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
    except BaseException:
        s.close()
        raise
    return s


def wait_port(net, ip, port, timeout=60, what="server", alive=None):
    def ok():
        if alive and not alive():
            raise AssertionError(f"{what} stopped")
        try:
            connect(net, ip, port, timeout=1).close()
            return True
        except OSError:
            return False
    ocitest.wait_for(ok, timeout=timeout, interval=0.2, what=f"{what} on {ip}:{port}")


def client_run(net, *argv, timeout=60, input=None):
    """A program run in the client namespace."""
    return subprocess.run(["ip", "netns", "exec", net.client, *argv], capture_output=True,
                          text=True, timeout=timeout, input=input)


# ---------------------------------------------------------------- rootfs and bundles

def make_base(path):
    """The rootfs skeleton: private writable dirs, symlinks into the bound /usr."""
    os.makedirs(path)
    for d in ("dev", "proc", "sys", "tmp", "run", "var/tmp", "var/lib", "var/log",
              "data", "root", "usr", "etc"):
        os.makedirs(os.path.join(path, d), exist_ok=True)
    os.chmod(os.path.join(path, "tmp"), 0o1777)
    os.chmod(os.path.join(path, "var/tmp"), 0o1777)
    for name in ("bin", "sbin", "lib", "lib64"):
        os.symlink(f"usr/{name}", os.path.join(path, name))
    return path


DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
                "SETPCAP", "NET_BIND_SERVICE", "NET_RAW", "SYS_CHROOT", "MKNOD", "AUDIT_WRITE",
                "SETFCAP")

HOST_BINDS = [{"destination": d, "type": "bind", "source": d, "options": ["rbind", "ro"]}
              for d in ("/usr", "/etc")]


def _same_owners(src, dst):
    """copytree does not keep owners: give each copied file its original's."""
    for dirpath, dirs, files in os.walk(src):
        for n in dirs + files:
            st = os.lstat(os.path.join(dirpath, n))
            if st.st_uid or st.st_gid:
                os.lchown(os.path.join(dst, os.path.relpath(dirpath, src), n),
                          st.st_uid, st.st_gid)


def make_bundle(dest, base, args, netns, cgroups_path, env=(), user=None, mounts=(),
                shm_size=None):
    bundlekit.make_bundle(dest, args, rootfs=base, cgroups_path=cgroups_path,
                          mounts=HOST_BINDS + list(mounts))
    _same_owners(base, os.path.join(dest, "rootfs"))
    spec = bundlekit.read_spec(dest)
    spec["process"]["env"] = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
                              "LANG=C.UTF-8"] + list(env)
    spec["process"]["cwd"] = "/"
    # the capabilities container engines give by default (runc spec's three are fewer)
    caps = ["CAP_" + c for c in DEFAULT_CAPS]
    spec["process"]["capabilities"] = {k: list(caps) for k in
                                       ("bounding", "effective", "permitted")}
    if user:
        spec["process"]["user"] = user
    nss = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
    nss.append({"type": "network", "path": f"/var/run/netns/{netns}"})
    spec["linux"]["namespaces"] = nss
    if shm_size:
        for m in spec["mounts"]:
            if m["destination"] == "/dev/shm":
                m["options"] = [o for o in m["options"] if not o.startswith("size=")] + \
                    [f"size={shm_size}"]
    bundlekit.write_spec(dest, spec)
    return dest


# ---------------------------------------------------------------- the two nodes

class Migration:
    """What one `migrt migrate` did: the report, when it ran, the handover."""

    def __init__(self, proc, report, t0, t1, handed_over_at):
        self.proc, self.report, self.t0, self.t1 = proc, report, t0, t1
        self.handed_over_at = handed_over_at

    @property
    def ok(self):
        return self.proc.returncode == 0

    def why(self):
        return f"migrate exit {self.proc.returncode}: {self.proc.stderr.strip()[-2000:]}"

    def phases(self):
        return (self.report or {}).get("phases", {})

    def frozen_window(self, slack=1.0):
        """(start, end) in time.monotonic(): from the freeze (the report's downtime before
        the address moved, which was when node B's runc had the container) to the
        handover, widened by `slack` seconds each side."""
        down = self.phases().get("downtime") or (self.t1 - self.t0)
        end = self.handed_over_at or self.t1
        return end - down - slack, end + slack


class Cluster:
    """Node A (runc root), node B (runc root + agent), the network, one workload."""

    def __init__(self, launcher, tmp):
        self.launcher = launcher
        self.tmp = str(tmp)
        self.tag = ocitest.uid("mw")
        self.net = Net(self.tag)
        self.state = f"/dev/shm/{self.tag}"
        env = {"MIGRT_STATE_DIR": self.state}
        self.a = ocitest.Runtime(launcher, os.path.join(self.tmp, "root-a"), env=env)
        self.b = ocitest.Runtime(launcher, os.path.join(self.tmp, "root-b"), env=env)
        self.secret = migr.write_secret(os.path.join(self.tmp, "secret"))
        self.agent_env = env
        self.agent = None
        self.outs = {}

    def start_agent(self):
        self.agent = migr.Agent(self.launcher, self.tmp, "b", self.b.root, self.secret,
                                env=self.agent_env).start()
        return self.agent

    def container(self, name, base_builder, args, **kw):
        """Source bundle (node A, address's A netns) and destination bundle (B netns),
        both from one base rootfs; the source is created and started on node A."""
        addr = self.net.address()
        cid = f"{self.tag}-{name}"
        base = make_base(os.path.join(self.tmp, f"base-{name}"))
        if base_builder:
            base_builder(base)
        src = make_bundle(os.path.join(self.tmp, f"{name}-src"), base, args, addr.ns_a,
                          f"/migrt-wl/{cid}", **kw)
        dst = make_bundle(os.path.join(self.tmp, f"{name}-dst"), base, args, addr.ns_b,
                          f"/migrt-wl/{cid}-dst", **kw)
        rc, out, err = self.a.create(cid, src, start=True)
        assert rc == 0, f"create {cid}: {err.text}"
        self.outs[cid] = (out, err)
        return cid, addr, dst

    def wait_serving(self, cid, addr, port, timeout=60):
        """Wait until the source container accepts connections on port; show its output
        if it does not."""
        try:
            wait_port(self.net, addr.ip, port, timeout=timeout, what=cid,
                      alive=lambda: (self.a.state(cid) or {}).get("status") == "running")
        except AssertionError:
            out, err = self.source_output(cid)
            raise AssertionError(f"{cid} does not answer on {addr.ip}:{port}; "
                                 f"state {self.a.state(cid)}; stdout {out[-1500:]!r}; "
                                 f"stderr {err[-1500:]!r}") from None

    def source_output(self, cid):
        out, err = self.outs[cid]
        return out.text, err.text

    def dest_output(self, cid):
        try:
            with open(os.path.join(self.agent.logs, f"{cid}.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def migrate(self, cid, addr, dst, mode, extra=(), timeout=300):
        """`migrt migrate` to node B, with no flag but the mode: migrate itself finds that
        the address moves (node B's namespace has it) and keeps TCP connections then.
        The address moves when node B's runc has the container."""
        argv = [self.launcher, "--root", self.a.root, "migrate", cid, "--to",
                self.agent.address, "--secret-file", self.secret, "--bundle", dst,
                "--dest-root", self.b.root, "--json", *MODES[mode], *extra]
        state_b = os.path.join(self.b.root, cid, "state.json")
        done = threading.Event()
        handed = []

        def watch():
            while not done.is_set():
                if os.path.exists(state_b):
                    addr.handover()
                    handed.append(addr.handed_over_at)
                    return
                time.sleep(0.002)
        w = threading.Thread(target=watch, daemon=True)
        w.start()
        t0 = time.monotonic()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, env=dict(os.environ, **self.agent_env))
        t1 = time.monotonic()
        done.set()
        w.join(5)
        report = json.loads(p.stdout) if p.returncode == 0 else None
        if p.returncode != 0:
            self.keep_logs()
        return Migration(p, report, t0, t1, handed[0] if handed else None)

    def keep_logs(self):
        """CRIU's and migrt's logs of a failed migration, kept in the test's tmp dir
        (the state dir goes at cleanup)."""
        for dirpath, _, names in os.walk(self.state):
            for n in names:
                if n.endswith((".log", ".json")):
                    src = os.path.join(dirpath, n)
                    dst = os.path.join(self.tmp, "failed-logs", os.path.relpath(src, self.state))
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    shutil.copy(src, dst)

    def dest_pids(self, cid):
        p = self.b.run("ps", "--format", "json", cid)
        return json.loads(p.stdout) if p.returncode == 0 else []

    def cleanup(self):
        if self.agent:
            self.agent.stop()
        for rt in (self.a, self.b):
            for cid in rt.ids() if os.path.isdir(rt.root) else []:
                rt.run("resume", cid)
                rt.run("delete", "--force", cid)
            rt.cleanup()
        self.net.cleanup()
        shutil.rmtree(self.state, ignore_errors=True)


def assert_moved(cl, cid, mig):
    """The migration succeeded, exactly one copy runs, on node B."""
    assert mig.ok, mig.why()
    st_b = cl.b.state(cid)
    if not (st_b and st_b["status"] == "running"):
        cl.keep_logs()      # the restore's and the memory fill's logs, for the report
    assert st_b and st_b["status"] == "running", (st_b, cl.dest_output(cid)[-2000:])
    ocitest.wait_for(lambda: cl.a.state(cid) is None, timeout=30,
                     what="the source gone from node A")
    assert mig.handed_over_at is not None, "node B's runc never had the container"
    tcp = mig.report.get("tcp") or {}
    assert tcp.get("ip_moves") is True, f"migrate did not see the address move: {tcp}"
