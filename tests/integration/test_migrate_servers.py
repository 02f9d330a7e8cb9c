"""Real servers move intact (issue 12): TCP connections, in-flight connections, file
locks, a source that never runs again after its dump and never sends a packet on the
connections the destination took over; lazy dumps that fail.

Real runc, real CRIU (4.2: 4.1 cannot dump an AF_INET socket on this kernel), real TCP.
The "pod network" is three network namespaces: the client's (a bridge), the source's
and the destination's, each of the latter two with an eth0 veth into the bridge, the
same MAC and (when the IP moves) the same address. Containers join them by path, as a
pod's containers join the sandbox's namespace. The address is handed over by moving the
bridge port from the source's veth to the destination's, as a node taking over an
address would; the source's veth stays up, so that a capture on it sees anything the
source's kernel still sends.
"""
import ctypes
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import ocitest
from test_migrate import two_nodes  # noqa: F401  (the fixture)

HERE = os.path.dirname(os.path.abspath(__file__))
CLONE_NEWNET = 0x40000000
PORT = 7000

# A child (the subshell) stamps a file every few ms with the uptime and the container's
# cgroup path, which differs between the source's bundle and the destination's.
STAMPER = ("(while :; do read u _ < /proc/uptime; "
           "while read l; do case $l in *:pids:*) c=$l;; esac; done < /proc/self/cgroup; "
           "echo \"$u $c\" >> /data/stamps; usleep 3000; done) & "
           "while :; do sleep 1; done")


def helper_binary(tmp):
    return ocitest.static_program(os.path.join(HERE, "servers_helper.c"), tmp)


def with_helper(n, tmp, name, args):
    """A bundle whose rootfs has the helper in /bin."""
    b = n.make_bundle(args, name=ocitest.uid(name))
    ocitest.put_program(b, helper_binary(tmp))
    return b


def helper_running(n, tmp, cid, args, ready, what):
    """servers_helper ARGS running as container cid on node A, its output showing
    `ready`; returns (the destination bundle for node B, its output)."""
    src = with_helper(n, tmp, f"{cid}-src", args)
    dst = with_helper(n, tmp, f"{cid}-dst", args)
    code, out, err = n.a.create(cid, src, start=True)
    assert code == 0, err.text
    ocitest.wait_for(lambda: ready in out.text, what=what)
    return dst, out


def ip(*args):
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    assert p.returncode == 0, (args, p.stderr)
    return p.stdout


def in_netns(path, fn):
    """fn() run in a thread that joined the network namespace at `path` (sockets it
    makes stay in that namespace)."""
    box = {}

    def run():
        try:
            fd = os.open(path, os.O_RDONLY)
            if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            os.close(fd)
            box["v"] = fn()
        except BaseException as e:
            box["e"] = e
    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["v"]


class PodNet:
    """client netns C (bridge br0, .1), source netns A (.2), destination netns B (.2 when
    the address moves, .3 when it does not)."""

    def __init__(self, same_ip=True):
        u = ocitest.uid("m")[2:]
        self.c, self.a, self.b = (f"migrt-{u}-{x}" for x in "cab")
        self.net = f"10.77.{int(u[:2], 16)}"
        self.server_ip = f"{self.net}.2"
        self.dest_ip = self.server_ip if same_ip else f"{self.net}.3"
        for ns in (self.c, self.a, self.b):
            ip("netns", "add", ns)
        c = ("-n", self.c)
        ip(*c, "link", "add", "br0", "type", "bridge")
        ip(*c, "addr", "add", f"{self.net}.1/24", "dev", "br0")
        ip(*c, "link", "set", "br0", "up")
        for port, ns, addr in (("ca", self.a, self.server_ip), ("cb", self.b, self.dest_ip)):
            ip(*c, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", ns, "link", "set", "eth0", "address", "02:77:00:00:00:02")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip(*c, "link", "set", port, "up")
        ip(*c, "link", "set", "ca", "master", "br0")      # the address is at the source

    def path(self, ns):
        return f"/var/run/netns/{ns}"

    def hand_over(self):
        """The destination takes the address over: the bridge now reaches B, not A (A's
        veth stays up, and captured)."""
        ip("-n", self.c, "link", "set", "ca", "nomaster")
        ip("-n", self.c, "link", "set", "cb", "master", "br0")

    def join(self, bundle, ns):
        from migrt.runtime import bundlekit
        spec = bundlekit.read_spec(bundle)
        for x in spec["linux"]["namespaces"]:
            if x["type"] == "network":
                x["path"] = self.path(ns)
        bundlekit.write_spec(bundle, spec)

    def connect(self, ip_addr, port=PORT, timeout=20):
        def mk():
            end = time.monotonic() + timeout
            while True:
                try:
                    return socket.create_connection((ip_addr, port), timeout=2)
                except OSError:
                    if time.monotonic() > end:
                        raise
                    time.sleep(0.1)
        return in_netns(self.path(self.c), mk)

    def remove(self):
        for ns in (self.c, self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class Capture:
    """Every IPv4 packet that comes in on interface `ifname` of the client's namespace
    (a raw AF_PACKET socket), as (time, src, dst, proto, tcp flags, payload length)."""

    def __init__(self, ns_path, ifname):
        def mk():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            s.bind((ifname, 0))
            return s
        self.sock = in_netns(ns_path, mk)
        self.sock.settimeout(0.2)
        self.packets = []
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            if addr[2] == socket.PACKET_OUTGOING or len(data) < 34 or data[12:14] != b"\x08\x00":
                continue
            iph = data[14:]
            ihl = (iph[0] & 0xF) * 4
            total = struct.unpack("!H", iph[2:4])[0]
            src, dst = socket.inet_ntoa(iph[12:16]), socket.inet_ntoa(iph[16:20])
            flags, payload = None, 0
            if iph[9] == 6:
                tcp = iph[ihl:]
                doff = (tcp[12] >> 4) * 4
                flags = "".join(n for bit, n in ((1, "F"), (2, "S"), (4, "R"), (8, "P"),
                                                 (16, "A")) if tcp[13] & bit)
                payload = total - ihl - doff
            self.packets.append((time.time(), src, dst, iph[9], flags, payload))

    def close(self):
        self.stop = True
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def podnet():
    nets = []

    def make(**kw):
        pn = PodNet(**kw)
        nets.append(pn)
        return pn
    yield make
    for pn in nets:
        pn.remove()


def echo(sock, data, timeout=30):
    sock.settimeout(timeout)
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {got!r}"
        got += chunk
    return got


# ---------------------------------------------------------------- the source is gone

def test_source_never_runs_after_its_dump(two_nodes):
    """A child stamping a file every 3 ms: after each migration the source's file holds
    what the destination's copy held when it was dumped and not a stamp more (a stamp
    the source wrote after its dump has a later uptime, which the destination's file
    never has). Not seen by this check: a source that only finishes the very line the
    frozen stamper had composed, identical to the one its restored copy writes."""
    n = two_nodes
    ag = n.agent()
    for i in range(4):
        cid = f"stamp{i}"
        # unique names: the bundle's name is its cgroup path (/migrt-test/<name>), and
        # two containers in one cgroup would be paused, dumped and killed together
        u = ocitest.uid("s")
        src = n.make_bundle(["sh", "-c", STAMPER], name=f"src{i}-{u}")
        code, out, err = n.a.create(cid, src, start=True)
        assert code == 0, err.text
        stamps = os.path.join(src, "rootfs", "data", "stamps")
        ocitest.wait_for(lambda: os.path.exists(stamps) and os.path.getsize(stamps) > 200,
                         what="stamps on the source")
        dst = n.make_bundle(["sh", "-c", STAMPER], name=f"dst{i}-{u}")
        p, rep = n.migrate(ag, cid, bundle=dst)
        assert p.returncode == 0, p.stderr + ag.log()
        assert n.a.state(cid) is None
        dstamps = os.path.join(dst, "rootfs", "data", "stamps")
        ocitest.wait_for(lambda: f"/dst{i}-{u}" in open(dstamps).read(),
                         what="stamps from the destination's copy")
        with open(stamps) as f:
            src_lines = f.read().splitlines()
        with open(dstamps) as f:
            dst_lines = f.read().splitlines()
        first = next(k for k, line in enumerate(dst_lines) if f"/dst{i}-{u}" in line)
        # what the dump saw, plus at most the one line the restored stamper had composed
        # (uptime and cgroup read) before the freeze and writes after its restore
        frozen = dst_lines[:first]
        extra = [ln for ln in src_lines[len(frozen) - 1:] if ln not in frozen]
        assert src_lines == frozen[:len(src_lines)] and len(frozen) - len(src_lines) <= 1, (
            f"run {i}: the source wrote after its dump: {extra[:3] or src_lines[-2:]}")
        n.b.run("delete", "--force", cid)


# ---------------------------------------------------------------- TCP

def _server_nodes(n, podnet, same_ip=True):
    pn = podnet(same_ip=same_ip)
    server = "while :; do nc -l -p 7000 -e cat; done"
    src = n.make_bundle(["sh", "-c", server], name=ocitest.uid("srv-src"))
    pn.join(src, pn.a)
    dst = n.make_bundle(["sh", "-c", server], name=ocitest.uid("srv-dst"))
    pn.join(dst, pn.b)
    code, out, err = n.a.create("srv", src, start=True)
    assert code == 0, err.text
    return pn, src, dst


def test_tcp_connection_moves_and_the_source_sends_nothing_after_the_handover(two_nodes, podnet,
                                                                               tmp_path):
    """An echo server with an established connection moves; the address moves with it.
    Data the client sends while the source is frozen and the destination already runs
    arrives at the destination (the source's kernel must not acknowledge it), and a
    capture on the source's veth sees no FIN, RST, data or ACK from the source after
    the migration began."""
    n = two_nodes
    ag = n.agent()
    pn, src, dst = _server_nodes(n, podnet)
    c = pn.connect(pn.server_ip)
    assert echo(c, b"before\n") == b"before\n"
    time.sleep(0.5)                           # delayed ACKs are out: the line is quiet
    cap = Capture(pn.path(pn.c), "ca")
    fp = tmp_path / "fp"
    fp.mkdir()
    result = {}

    def run():
        result["p"], result["rep"] = n.migrate(
            ag, "srv", bundle=dst, more_env={
                "MIGRT_FAILPOINTS": "migrate.before-release=pause(1)",
                "MIGRT_FAILPOINT_DIR": str(fp)})
    t0 = time.time()
    th = threading.Thread(target=run)
    th.start()
    try:
        # the destination runs it, the source is frozen: the client talks meanwhile
        ocitest.wait_for(lambda: os.listdir(fp) or not th.is_alive(), timeout=60,
                         what="the migration reaching its release")
        c.sendall(b"during\n")
        th.join(120)
        p, rep = result["p"], result["rep"]
        assert p.returncode == 0, p.stderr + ag.log()
        assert rep["tcp"]["mode"] == "established" and rep["tcp"]["ip_moves"], rep["tcp"]
        assert rep["tcp"]["established"] == 1, rep["tcp"]
        assert "does not move" not in p.stderr, p.stderr
        pn.hand_over()
        c.settimeout(60)
        got, broken = b"", None
        try:
            while len(got) < len(b"during\n"):
                chunk = c.recv(100)
                if not chunk:
                    broken = f"connection closed after {got!r}"
                    break
                got += chunk
            if not broken:
                got += echo(c, b"after\n")
        except OSError as e:
            broken = f"{e} after {got!r}"
        time.sleep(1.0)
    finally:
        cap.close()
    from_source = [pk for pk in cap.packets if pk[1] == pn.server_ip and pk[0] >= t0]
    assert not from_source, (f"the source sent after the migration began (time, src, dst, "
                             f"proto, TCP flags, payload): {from_source[:5]}; client: "
                             f"{broken or 'ok'}")
    assert broken is None and got == b"during\nafter\n", (broken, got)


def test_another_ip_on_the_destination_is_said_before_the_freeze(two_nodes, podnet):
    """The destination's namespace has another address (a new pod IP): one line says what
    happens to the connections, before anything is frozen (a failpoint stops migrate just
    before the freeze), and --json carries it; the migration itself then works."""
    n = two_nodes
    ag = n.agent()
    pn, src, dst = _server_nodes(n, podnet, same_ip=False)
    c = pn.connect(pn.server_ip)
    assert echo(c, b"x\n") == b"x\n"
    p, _ = n.migrate(ag, "srv", bundle=dst,
                     more_env={"MIGRT_FAILPOINTS": "migrate.before-freeze=exit(7)"})
    assert p.returncode == 7, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if "IP does not move" in ln]
    assert len(lines) == 1, p.stderr
    assert pn.server_ip in lines[0] and pn.dest_ip in lines[0] and "1 established" in lines[0]
    assert n.a.state("srv")["status"] == "running"
    c.close()
    ag.kill()
    ag = n.agent()
    c = pn.connect(pn.server_ip)
    assert echo(c, b"y\n") == b"y\n"
    p, rep = n.migrate(ag, "srv", bundle=dst)
    assert p.returncode == 0, p.stderr + ag.log()
    assert rep["tcp"]["ip_moves"] is False and rep["tcp"]["mode"] == "closed", rep["tcp"]
    assert rep["tcp"]["note"].count("IP does not move") == 1
    assert n.b.state("srv")["status"] == "running"
    pn.hand_over()
    # the server on its new address takes new connections
    c2 = pn.connect(pn.dest_ip, timeout=30)
    assert echo(c2, b"z\n") == b"z\n"


def test_in_flight_connection_does_not_stop_the_migration(two_nodes, podnet, tmp_path):
    """A connection the kernel completed but the server has not accepted (the listen
    queue) cannot be dumped (`inet: In-flight connection`): migrate skips it."""
    n = two_nodes
    ag = n.agent()
    pn = podnet()
    args = ["/bin/servers_helper", "backlog", str(PORT)]
    src = with_helper(n, str(tmp_path), "backlog-src", args)
    pn.join(src, pn.a)
    dst = with_helper(n, str(tmp_path), "backlog-dst", args)
    pn.join(dst, pn.b)
    code, out, err = n.a.create("bl", src, start=True)
    assert code == 0, err.text
    ocitest.wait_for(lambda: "listening" in out.text, what="helper listening")
    c = pn.connect(pn.server_ip)       # completed by the kernel, never accepted
    p, rep = n.migrate(ag, "bl", bundle=dst)
    assert p.returncode == 0, p.stderr + ag.log()
    assert n.b.state("bl")["status"] == "running"
    c.close()


def held_locks(pid):
    """The "lock:" lines of every descriptor of process pid (its fdinfo)."""
    held = []
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            held += [ln for ln in f if ln.startswith("lock:")]
    return held


def test_file_locks_are_found_and_kept(two_nodes, tmp_path):
    """A process holding a POSIX lock and a flock: migrate turns --file-locks on by
    itself (runc always tells CRIU, so only runc's flag can) and the locks arrive."""
    n = two_nodes
    ag = n.agent()
    args = ["/bin/servers_helper", "lock", "/data/lockfile"]
    src = with_helper(n, str(tmp_path), "lock-src", args)
    dst = with_helper(n, str(tmp_path), "lock-dst", args)
    code, out, err = n.a.create("lk", src, start=True)
    assert code == 0, err.text
    ocitest.wait_for(lambda: "locked" in out.text, what="helper holding its locks")
    p, rep = n.migrate(ag, "lk", bundle=dst)
    assert p.returncode == 0, p.stderr + ag.log()
    assert rep["file_locks"] == 2, rep
    held = held_locks(n.b.state("lk")["pid"])
    kinds = " ".join(held)
    assert "POSIX" in kinds and "FLOCK" in kinds, held


def test_file_locks_taken_after_the_dump_started_are_kept(two_nodes, tmp_path):
    """migrate starts `runc checkpoint` before the freeze (its CRIU waits at a gate:
    migrt.criu.gate) and so chooses runc's --file-locks before the freeze. A process
    that takes its locks after that, and before the freeze, still arrives with them:
    migrate looks again once frozen, stops that runc at its gate, untouched, and starts
    another with --file-locks. The destination's restore, armed before the freeze
    without --file-locks, differs from the restore those images need: it is stopped at
    its gate and the restore runs as usual (the report says why)."""
    n = two_nodes
    ag = n.agent()
    args = ["sh", "-c", "while [ ! -e /lock-now ]; do sleep 0.02; done; "
                        "exec /bin/servers_helper lock /lockfile"]
    src = with_helper(n, str(tmp_path), "late-src", args)
    dst = with_helper(n, str(tmp_path), "late-dst", args)
    code, out, err = n.a.create("late", src, start=True)
    assert code == 0, err.text
    fp = tmp_path / "fp"
    fp.mkdir()
    mig = n.migrate(ag, "late", bundle=dst, spawn=True, more_env={
        "MIGRT_FAILPOINTS": "migrate.dump-armed=pause(3)", "MIGRT_FAILPOINT_DIR": str(fp)})
    ocitest.wait_for(lambda: os.listdir(fp) or mig.poll() is not None, timeout=60,
                     what="migrate's dump started, at its gate")
    assert mig.poll() is None, mig.communicate()
    assert n.a.state("late")["status"] == "running"     # not frozen yet
    open(os.path.join(src, "rootfs", "lock-now"), "w").close()
    ocitest.wait_for(lambda: "locked" in out.text, timeout=2, what="locks taken")
    stdout, stderr = mig.communicate(timeout=120)
    assert mig.returncode == 0, stderr + ag.log()
    rep = json.loads(stdout)
    assert rep["file_locks"] == 2, rep
    assert "file lock" in rep["dump_restarted"], rep
    assert rep["restore_armed"] == "yes", rep.get("restore_armed")
    armed = rep["downtime"]["restore"]["armed"]
    assert armed.startswith("not used:") and "--file-locks" in armed, armed
    held = held_locks(n.b.state("late")["pid"])
    kinds = " ".join(held)
    assert "POSIX" in kinds and "FLOCK" in kinds, held


def test_lazy_dump_that_fails_rolls_back_and_says_the_dump_failed(two_nodes, tmp_path):
    """CRIU cannot dump an io_uring instance: in lazy mode its status pipe then closes
    without the page server ever being ready. That is a failed dump: nothing is
    committed or restored, the source resumes, and the message says the dump failed,
    with CRIU's own error."""
    n = two_nodes
    ag = n.agent()
    dst, _ = helper_running(n, str(tmp_path), "ur", ["/bin/servers_helper", "uring"],
                            "uring", "helper holding an io_uring")
    p, rep = n.migrate(ag, "ur", "--lazy", bundle=dst)
    assert p.returncode == 4, p.stdout + p.stderr + ag.log()
    msg = p.stderr.strip().splitlines()[-1]
    assert "the dump failed on this node" in msg and "CRIU log" in msg, msg
    assert "destination" not in msg.split("failed during", 1)[1].split("the dump failed")[0], msg
    # the restore armed before the freeze was stopped at CRIU's gate; none ran
    ocitest.wait_for(lambda: "armed restore stopped" in ag.log(), timeout=30,
                     what="the agent stopping the armed restore")
    log = ag.log()
    assert "restored as" not in log and "restore failed" not in log, log
    assert n.b.state("ur") is None
    assert n.a.state("ur")["status"] == "running"
    assert n.b.state("ur") is None
    ocitest.wait_for(lambda: not ag.staged(), timeout=10, what="staging emptied")


def test_checkpoint_passes_tcp_skip_in_flight_through(two_nodes, podnet, tmp_path):
    """`migrt checkpoint --tcp-skip-in-flight` works on runc 1.1 too (which lacks the flag:
    it becomes a line of CRIU's config file); without it CRIU refuses the in-flight
    connection."""
    n = two_nodes
    pn = podnet()
    src = with_helper(n, str(tmp_path), "ckpt-src", ["/bin/servers_helper", "backlog", str(PORT)])
    pn.join(src, pn.a)
    code, out, err = n.a.create("ck", src, start=True)
    assert code == 0, err.text
    ocitest.wait_for(lambda: "listening" in out.text, what="helper listening")
    c = pn.connect(pn.server_ip)
    base = ["checkpoint", "--leave-running", "--tcp-established"]
    p = n.a.run(*base, "--image-path", str(tmp_path / "i1"), "--work-path", str(tmp_path / "w1"),
                "ck")
    assert p.returncode != 0
    with open(tmp_path / "w1" / "dump.log") as f:
        assert "In-flight connection" in f.read()
    p = n.a.run(*base, "--tcp-skip-in-flight", "--image-path", str(tmp_path / "i2"),
                "--work-path", str(tmp_path / "w2"), "ck")
    assert p.returncode == 0, p.stderr
    assert n.a.state("ck")["status"] == "running"
    c.close()


def test_lazy_memory_locked_in_ram_goes_with_the_dump_and_says_so(two_nodes, tmp_path):
    """Memory locked in RAM (MAP_LOCKED) cannot be left lazy: CRIU writes it into the
    image, and it travels in the downtime. The lazy migration still works (the helper
    checks every byte each round on node B), and says how much went with the dump,
    keeping CRIU's log of it."""
    n = two_nodes
    ag = n.agent()
    dst, _ = helper_running(n, str(tmp_path), "ml", ["/bin/servers_helper", "mlocked", "4"],
                            "round 2", "helper checking its memory")
    p, rep = n.migrate(ag, "ml", "--lazy", bundle=dst)
    assert p.returncode == 0, p.stderr + ag.log()
    assert rep["mode"] == "lazy" and rep["lazy_pages_in_image"] >= 4 << 20, rep
    assert "4 MiB of the memory could not be left lazy" in p.stderr, p.stderr
    assert "(memory locked in RAM or in huge pages)" in p.stderr, p.stderr
    kept = rep["warning"].rsplit("CRIU log ", 1)[1]
    with open(kept, errors="replace") as f:
        assert "Pagemap generated" in f.read(), kept      # CRIU's own account of it

    def rounds():
        r = n.b.exec_out("ml", "cat", "/tmp/round").strip()
        return int(r) if r.isdigit() else 0
    r0 = rounds()
    ocitest.wait_for(lambda: rounds() >= r0 + 3, what="the memory checked on node B")
    assert n.b.state("ml")["status"] == "running"


def test_lazy_memory_the_process_cannot_read_arrives_intact(two_nodes, tmp_path):
    """8 MiB of private memory the process made PROT_NONE stays lazy: the page server
    serves it from the frozen source after the restore, where process_vm_readv cannot
    read it (install.sh's CRIU falls back to /proc/PID/mem for such pages). On node B
    the process makes it readable and finds every byte right."""
    n = two_nodes
    ag = n.agent()
    dst, _ = helper_running(n, str(tmp_path), "pn", ["/bin/servers_helper", "protnone", "8"],
                            "protnone", "helper filled its memory")
    p, rep = n.migrate(ag, "pn", "--lazy", bundle=dst)
    assert p.returncode == 0, p.stderr + ag.log()
    assert rep["mode"] == "lazy", rep
    assert rep["lazy_pages_in_image"] < 1 << 20, rep      # it went lazily, not in the dump
    n.b.exec_out("pn", "touch", "/tmp/check")

    def verdict():
        return n.b.exec_out("pn", "sh", "-c", "cat /tmp/verdict 2>/dev/null; true").strip()
    ocitest.wait_for(lambda: verdict() != "", what="the helper's check on node B")
    assert verdict().startswith("ok "), verdict()
    assert n.b.state("pn")["status"] == "running"


def _conntrack(pid):
    """The conntrack entries of pid's network namespace, as the kernel lists them."""
    with open(f"/proc/{pid}/net/nf_conntrack") as f:
        return f.read()


def test_conntrack_entries_move_with_the_namespace(two_nodes):
    """A container in a network namespace of its own, with connection tracking on in it
    and an entry in its table: the entry is in the table on node B. (install.sh's CRIU
    skips the conntrack dump, a walk of the kernel's whole table while frozen, only
    where the namespace holds no entry: here it holds one.)"""
    n = two_nodes
    ag = n.agent()
    code, out, err = n.a.create("ct", n.make_bundle(["sh", "-c", "while :; do sleep 1; done"],
                                                    name=ocitest.uid("ct-src")), start=True)
    assert code == 0, err.text
    pid = n.a.state("ct")["pid"]
    net = f"--net=/proc/{pid}/ns/net"
    subprocess.run(["nsenter", net, "iptables", "-w", "-A", "OUTPUT", "-m", "conntrack",
                    "--ctstate", "NEW", "-j", "ACCEPT"], check=True, capture_output=True)
    sport = 40000 + os.getpid() % 20000
    subprocess.run(["nsenter", net, sys.executable, "-c",
                    "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.sendto(b'x', ('127.0.0.1', 9))",
                    str(sport)], check=True)
    entry = f"sport={sport} dport=9"
    assert entry in _conntrack(pid)
    dst = n.make_bundle(["sh", "-c", "while :; do sleep 1; done"], name=ocitest.uid("ct-dst"))
    p, rep = n.migrate(ag, "ct", bundle=dst)
    assert p.returncode == 0, p.stderr + ag.log()
    assert n.b.state("ct")["status"] == "running"
    assert entry in _conntrack(n.b.state("ct")["pid"]), _conntrack(n.b.state("ct")["pid"])
