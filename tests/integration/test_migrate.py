"""`migrt migrate` between two simulated nodes (two runc roots) over real TCP on loopback.

Every test checks what a user would: the counter goes on at the destination, or, when
something fails, the source is still running (not paused, not gone) and the destination
holds neither a container nor staged files.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import ocitest
from migrt.criu import features


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def secret_file(path, value=None):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write((value or os.urandom(24).hex()) + "\n")
    return str(path)


class Proxy:
    """A TCP relay between migrate and the agent that can damage or slow the data."""

    def __init__(self, target, flip_at=None, rate=None, flip_conn=1, flip_down=False,
                 mark=None):
        self.target = target
        self.flip_at = flip_at       # flip one byte at this offset of connection flip_conn
        self.flip_conn = flip_conn   # (the 2nd by default), client to server unless
        self.flip_down = flip_down   # flip_down: server to client
        self.flipped = False
        self.mark = mark             # SO_MARK of the connections onward (iptables)
        self.rate = rate             # bytes per second, client to server
        self.forwarded = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.n = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            host, port = self.target.rsplit(":", 1)
            u = socket.socket()
            if self.mark is not None:
                u.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            u.connect((host, int(port)))
            idx = self.n
            self.n += 1
            threading.Thread(target=self._pump, args=(c, u, idx, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, idx, False), daemon=True).start()

    def _pump(self, a, b, idx, up):
        pos = 0
        try:
            while True:
                data = a.recv(16384)
                if not data:
                    break
                if up != self.flip_down and self.flip_at is not None and idx == self.flip_conn \
                        and pos <= self.flip_at < pos + len(data):
                    i = self.flip_at - pos
                    data = data[:i] + bytes([data[i] ^ 0x55]) + data[i + 1:]
                    self.flipped = True
                pos += len(data)
                if up:
                    self.forwarded += len(data)
                    if self.rate:
                        time.sleep(len(data) / self.rate)
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.sock.close()


class Agent:
    def __init__(self, binary, tmp, root, secret, env, quota=None, staging=None):
        self.dir = os.path.join(tmp, "agent")
        self.staging = staging or os.path.join(env["MIGRT_STATE_DIR"], "staged")
        self.disk = os.path.join(self.dir, "disk")
        self.address = f"127.0.0.1:{free_port()}"
        self.argv = [binary, "--root", root, "agent", "--listen", self.address,
                     "--secret-file", secret, "--staging", self.staging, "--disk", self.disk,
                     "--log-dir", os.path.join(self.dir, "logs")]
        if quota:
            self.argv += ["--quota", str(quota)]
        self.env = env
        self.proc = None
        os.makedirs(self.dir, exist_ok=True)

    def start(self):
        self.err = open(os.path.join(self.dir, "stderr"), "ab")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self.err,
                                     stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        line = self.proc.stdout.readline().decode()
        assert "listening" in line, self.log()
        return self

    def log(self):
        with open(os.path.join(self.dir, "stderr"), errors="replace") as f:
            return f.read()

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(30)

    def staged(self):
        out = []
        for d in (self.staging, self.disk):
            if os.path.isdir(d):
                out += [os.path.join(d, n) for n in os.listdir(d)]
        return out


@pytest.fixture
def two_nodes(tmp_path, node, make_bundle, migrt_launcher):
    state = f"/dev/shm/migrt-it-{ocitest.uid('s')}"
    env = dict(os.environ, MIGRT_STATE_DIR=state)
    secret = secret_file(tmp_path / "secret")
    a = ocitest.Runtime(migrt_launcher, str(tmp_path / "root-a"), env=env)
    b = ocitest.Runtime(migrt_launcher, str(tmp_path / "root-b"), env=env)
    agents = []

    class Nodes:
        pass
    n = Nodes()
    n.a, n.b, n.env, n.secret, n.tmp = a, b, env, secret, str(tmp_path)

    def agent(extra_env=None, **kw):
        ag = Agent(migrt_launcher, str(tmp_path), b.root, kw.pop("secret", secret),
                   dict(env, **(extra_env or {})), **kw)
        agents.append(ag)
        return ag.start()
    n.agent = agent

    def source(cid="ctr"):
        bundle = make_bundle(["sh", "-c", ocitest.COUNTER], name=ocitest.uid("src"))
        code, out, err = a.create(cid, bundle, start=True)
        assert code == 0, err.text
        ocitest.wait_for(lambda: ocitest.last_count(out) >= 5, what="counter on the source")
        return bundle, out
    n.source = source

    def dest_bundle():
        return make_bundle(["sh", "-c", ocitest.COUNTER], name=ocitest.uid("dst"))
    n.dest_bundle = dest_bundle
    n.make_bundle = make_bundle

    def migrate(ag_or_addr, cid="ctr", *extra, bundle=None, secret=None, timeout=120,
                more_env=None, spawn=False):
        """Run `migrt migrate` to its end: (process, report or None); with spawn, start
        it and return the Popen (stdout and stderr piped)."""
        addr = ag_or_addr if isinstance(ag_or_addr, str) else ag_or_addr.address
        argv = [migrt_launcher, "--root", a.root, "migrate", cid, "--to", addr,
                "--secret-file", secret or n.secret, "--json"]
        if bundle:
            argv += ["--bundle", bundle, "--dest-root", b.root]
        if spawn:
            return subprocess.Popen(argv + list(extra), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True,
                                    env=dict(env, **(more_env or {})))
        p = subprocess.run(argv + list(extra), capture_output=True, text=True,
                           env=dict(env, **(more_env or {})), timeout=timeout)
        rep = json.loads(p.stdout) if p.returncode == 0 else None
        return p, rep
    n.migrate = migrate
    yield n
    for ag in agents:
        ag.kill()
    a.cleanup()
    b.cleanup()
    ocitest.remove_state(state)


def assert_source_running(n, out, cid="ctr"):
    st = n.a.state(cid)
    assert st is not None and st["status"] == "running", st
    before = ocitest.last_count(out)
    ocitest.wait_for(lambda: ocitest.last_count(out) > before + 2, what="source counter going on")


def assert_destination_clean(n, ag, cid="ctr"):
    assert n.b.state(cid) is None
    ocitest.wait_for(lambda: not ag.staged(), timeout=10, what=f"staging emptied: {ag.staged()}")


def dest_count(n, cid="ctr"):
    # the workload rewrites the file (truncate, then write): a read may catch it empty
    def read():
        v = n.b.exec_out(cid, "cat", "/tmp/count").strip()
        return int(v) if v.isdigit() else None
    return ocitest.wait_for(read, timeout=5, what="a count on the destination")


@pytest.mark.parametrize("mode", ["full", "precopy"])
def test_migrate_counter_continues(two_nodes, mode):
    n = two_nodes
    ag = n.agent()
    bundle, out = n.source()
    extra = ["--precopy"] if mode == "precopy" else []
    p, rep = n.migrate(ag, "ctr", *extra, bundle=n.dest_bundle())
    assert p.returncode == 0, p.stderr + ag.log()
    last_src = ocitest.last_count(out)
    assert n.a.state("ctr") is None, "source must be gone after a successful migration"
    assert n.b.state("ctr")["status"] == "running"
    c1 = dest_count(n)
    assert c1 >= last_src, (c1, last_src)
    ocitest.wait_for(lambda: dest_count(n) > c1 + 2, what="counter going on at the destination")
    ph = rep["phases"]
    for k in ("freeze", "dump", "transfer", "restore", "downtime"):
        assert ph[k] >= 0
    assert rep["bytes"]["image"] > 0 and rep["bytes"]["wire"] > 0
    assert rep["mode"] == mode
    if mode == "precopy":
        # the pre-dump froze the counter too, briefly: shown apart from the downtime
        assert 0 < ph["precopy_frozen"] <= ph["precopy"], ph
        assert rep["downtime"]["precopy_frozen_s"] == ph["precopy_frozen"]
    # --zstd-level auto: no compression for an agent on this very machine
    assert rep["zstd_level"] == 0
    # the restore ran in the restorer the agent had started ahead of time
    assert "in a pre-started restorer" in ag.log(), ag.log()
    # the file the counter keeps open on fd 3 came along (rootfs writable layer)
    log = n.b.exec_out("ctr", "cat", "/data/counter.log").split()
    assert int(log[0]) == 1 and int(log[-1]) >= last_src
    assert_destination_staging_empty = not ag.staged()
    assert assert_destination_staging_empty, ag.staged()


def test_criu_breakpoints_still_work(two_nodes, tmp_path):
    """install.sh's CRIU steps a dumped task's parasite, and a restored task's restorer,
    out through their last syscalls instead of setting a hardware breakpoint (about
    12 ms of perf set-up in the kernel while frozen: packaging/criu-patches,
    without-hw-breakpoints.patch). MIGRT_CRIU_BREAKPOINTS=1 asks for breakpoints, to
    compare: it reaches CRIU at both ends (a `criu` wrapper notes what it was given) and
    the counter goes on at the destination."""
    import shutil
    n = two_nodes
    real = os.path.realpath(shutil.which("criu"))
    seen = tmp_path / "seen"
    wrapper = tmp_path / "bp" / "criu"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$1 $MIGRT_CRIU_BREAKPOINTS" >> {seen}\n'
                       f'exec {real} "$@"\n')
    wrapper.chmod(0o755)
    env = {"MIGRT_CRIU": str(wrapper), "MIGRT_CRIU_BREAKPOINTS": "1"}
    ag = n.agent(env)
    bundle, out = n.source()
    p, rep = n.migrate(ag, "ctr", bundle=n.dest_bundle(), more_env=env)
    assert p.returncode == 0, p.stderr + ag.log()
    calls = seen.read_text().split("\n")
    assert calls.count("swrk 1") >= 2, calls     # runc drives CRIU over its RPC, at both ends
    assert all(c.endswith(" 1") for c in calls if c), calls
    last_src = ocitest.last_count(out)
    c1 = dest_count(n)
    assert c1 >= last_src, (c1, last_src)
    ocitest.wait_for(lambda: dest_count(n) > c1 + 2, what="counter going on at the destination")


def criu_logs(n, cid="ctr"):
    """The CRIU logs node A's runtime keeps for the container (`migrt logs`)."""
    from migrt.plugins import record
    return set(record.criu_logs(cid, root=n.a.root))


def new_dump_log(n, before, cid="ctr"):
    """The one dump log kept since `before` (criu_logs)."""
    dumps = [f for f in criu_logs(n, cid) - before if f.endswith("-dump.log")]
    assert len(dumps) == 1, dumps
    return dumps[0]


@pytest.mark.parametrize("mode", ["full", "lazy"])
def test_gate_script_at_pre_dump_only_and_users_scripts_at_every_action(two_nodes, tmp_path,
                                                                         mode):
    """migrate's dump gate is a CRIU action script that acts at pre-dump only
    (migrt.criu.gate). install.sh's CRIU runs it for that action only
    (MIGRT_CRIU_PRE_DUMP_SCRIPT; packaging/criu-patches,
    gate-script-at-pre-dump-only.patch): for network lock and unlock and post-dump,
    while the tasks are frozen, it cost a fork and an exec each. A user's own action
    script (their CRIU_CONFIG_FILE) still runs at every action, and the dump's CRIU log
    (kept for the container: `migrt logs`) says the gate was left out of the others."""
    from migrt.criu import gate as dumpgate
    n = two_nodes
    seen = tmp_path / "actions"
    script = tmp_path / "user-action.sh"
    script.write_text(f'#!/bin/sh\necho "$CRTOOLS_SCRIPT_ACTION" >> {seen}\n')
    script.chmod(0o755)
    conf = tmp_path / "user-criu.conf"
    conf.write_text(f"action-script {script}\n")
    ag = n.agent()
    bundle, out = n.source()
    before = criu_logs(n)
    p, rep = n.migrate(ag, "ctr", *(["--lazy"] if mode == "lazy" else []),
                       bundle=n.dest_bundle(), more_env={"CRIU_CONFIG_FILE": str(conf)})
    assert p.returncode == 0, p.stderr + ag.log()
    actions = seen.read_text().split()
    assert {"pre-dump", "network-lock", "post-dump"} <= set(actions), actions
    with open(new_dump_log(n, before)) as f:
        gate = [ln for ln in f if f"/{dumpgate.SCRIPT}]" in ln]
    assert len(gate) == len(actions), (gate, actions)     # listed at each action
    skipped = [ln for ln in gate if ln.rstrip().endswith("(pre-dump only)")]
    assert len(skipped) == len(actions) - 1, gate          # run at pre-dump alone
    ocitest.wait_for(lambda: dest_count(n) > ocitest.last_count(out),
                     what="counter going on at the destination")


@pytest.mark.parametrize("priority,cipher", [(None, "AES-128-GCM"), ("NORMAL", "AES-256-GCM")],
                         ids=["default", "gnutls-order"])
def test_lazy_page_traffic_cipher(two_nodes, priority, cipher):
    """The lazy page stream's TLS (CRIU's page server and lazy-pages daemon, GnuTLS)
    prefers AES-128-GCM (packaging/criu-patches, tls-aes-128-gcm-first.patch: the cipher
    is most of the busiest thread's work at each end); MIGRT_CRIU_TLS_PRIORITY, in
    migrate's and the agent's environment, sets CRIU's priority string instead. The
    suite both ends agreed on is in the dump's CRIU log, kept for the container."""
    n = two_nodes
    env = {"MIGRT_CRIU_TLS_PRIORITY": priority} if priority else {}
    ag = n.agent(env)
    bundle, out = n.source()
    before = criu_logs(n)
    p, rep = n.migrate(ag, "ctr", "--lazy", bundle=n.dest_bundle(), more_env=env)
    assert p.returncode == 0, p.stderr + ag.log()
    with open(new_dump_log(n, before)) as f:
        said = [ln.strip() for ln in f if "TLS handshake completed" in ln]
    assert len(said) == 1 and said[0].endswith(f": {cipher}"), said
    ocitest.wait_for(lambda: dest_count(n) > ocitest.last_count(out),
                     what="counter going on at the destination")


@pytest.mark.parametrize("mode", ["full", "lazy"])
def test_report_says_where_the_downtime_went(two_nodes, mode):
    """--json's "downtime": the source's phases add up to the downtime (what none covers
    is small), and inside the checkpoint and the restore CRIU's own figures (its stats
    images) fit in the time runc and migrt measured around them."""
    n = two_nodes
    ag = n.agent()
    bundle, out = n.source()
    p, rep = n.migrate(ag, "ctr", *(["--lazy"] if mode == "lazy" else []),
                       bundle=n.dest_bundle())
    assert p.returncode == 0, p.stderr + ag.log()
    dt = rep["downtime"]
    total = dt["total_s"]
    assert total == rep["phases"]["downtime"] > 0
    ph = dt["phases"]
    assert set(ph) >= {"freeze_s", "checkpoint_s", "restore_s", "migrt_between_s"}, ph
    assert all(v >= 0 for v in ph.values()), ph
    assert sum(ph.values()) == pytest.approx(total, abs=0.002)
    # measured phases cover the downtime: what falls between them is small
    assert ph["migrt_between_s"] <= max(0.05, 0.15 * total), dt
    ck, rs = dt["checkpoint"], dt["restore"]
    tol = 0.002
    if mode == "full":       # the lazy dump's runc goes on as the page server
        assert ck["runc_s"] + ck["criu_s"] + ck["migrt_s"] == pytest.approx(ck["total_s"], abs=tol)
        c = ck["criu"]
        assert c["freezing_s"] + c["frozen_s"] <= ck["criu_s"] + tol, ck
        assert 0 < c["memdump_s"] <= c["frozen_s"], ck
        assert c["pages_written"] > 0 and c["pages_scanned"] >= c["pages_written"], ck
    assert rs["agent_s"] <= rs["total_s"] + tol and rs["migrt_run_s"] <= rs["agent_s"] + tol, rs
    assert rs["lifecycle_s"] <= rs["migrt_run_s"] + tol, rs
    assert rs["prepare_s"] + rs["runc_s"] + rs["criu_s"] <= rs["lifecycle_s"] + tol, rs
    r = rs["criu"]
    # forking one task can take less than the 0.1 ms the figures are rounded to
    assert 0 <= r["forking_s"] <= r["restore_s"] <= rs["criu_s"] + tol, rs
    assert r["restore_s"] > 0, rs
    if mode == "full":
        assert r["pages_restored"] > 0, rs
    else:
        assert "criu" not in ck and "no usable figures" in ck["note"], ck
    # the dump read the cgroups through migrt's yard (no hierarchy mounted in the
    # downtime): a bind mount of each of the node's hierarchies, named as CRIU names them
    yard = rep["criu_cgroup_yard"]
    assert yard == "/run/migrt/criu/cgyard", rep
    with open("/proc/self/cgroup") as f:
        ours = [ln.split(":", 2)[1] for ln in f.read().splitlines()]
    for ctrls in ours:
        name = "unified" if not ctrls else ctrls.replace("name=", "")
        d = os.path.join(yard, name)
        assert os.path.ismount(d), (d, os.listdir(yard))
        node = "/sys/fs/cgroup" if not ctrls and not os.path.isdir("/sys/fs/cgroup/unified") \
            else os.path.join("/sys/fs/cgroup", name)
        if os.path.isdir(node):
            assert os.stat(d).st_dev == os.stat(node).st_dev, (d, node)


def _cgroup2_mount():
    """(mount point, super options) of this node's cgroup2 mount, or None."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            i = parts.index("-")
            if parts[i + 1] == "cgroup2":
                return parts[4], parts[i + 3].split(",")
    return None


@pytest.mark.parametrize("mode", ["full", "lazy"])
def test_a_restore_leaves_the_nodes_cgroup2_options_alone(two_nodes, mode):
    """cgroup2 has one set of mount options for the whole node, and a fresh cgroup2 mount
    without options clears them: CRIU's restore made one (its cgroup yard), so every
    restore turned off a node's `favordynmods` (which spares each move of a task between
    cgroups an RCU grace period). The restore now reads the cgroups through migrt's
    yard of bind mounts: the node's options are what they were."""
    n = two_nodes
    cg2 = _cgroup2_mount()
    assert cg2 is not None, "no cgroup2 mount on this node"
    point, before = cg2
    subprocess.run(["mount", "-o", "remount,favordynmods", point], check=True)
    try:
        assert "favordynmods" in _cgroup2_mount()[1]
        ag = n.agent()
        n.source()
        p, rep = n.migrate(ag, "ctr", *(["--lazy"] if mode == "lazy" else []),
                           bundle=n.dest_bundle())
        assert p.returncode == 0, p.stderr + ag.log()
        assert n.b.state("ctr")["status"] == "running"
        assert "favordynmods" in _cgroup2_mount()[1], _cgroup2_mount()
    finally:
        if "favordynmods" not in before:
            # `mount -o remount` keeps the options it finds: only a fresh mount clears them
            with tempfile.TemporaryDirectory() as d:
                subprocess.run(["mount", "-t", "cgroup2", "none", d], check=True)
                subprocess.run(["umount", d], check=True)


@pytest.mark.parametrize("lock", ["auto", "nftables", "iptables"])
def test_network_lock_and_the_network_after(two_nodes, lock):
    """Left to itself, a migration's dump has CRIU skip its network lock: migrt's own
    hold already drops every packet of the source's namespace (no lock to lift at the
    end of the dump nor of the restore, in the downtime). MIGRT_NETWORK_LOCK=nftables or
    iptables has CRIU lock with it as asked. Either way the container's network works
    on the destination, and none of the locks is left on the source's side."""
    n = two_nodes
    ag = n.agent()
    bundle, out = n.source()
    ocitest.lo_up(n.a.state("ctr")["pid"])
    assert ocitest.net_works(n.a.state("ctr")["pid"])
    p, rep = n.migrate(ag, "ctr", bundle=n.dest_bundle(),
                       more_env={"MIGRT_NETWORK_LOCK": lock})
    assert p.returncode == 0, p.stderr + ag.log()
    assert rep["network_lock"] == ("skip" if lock == "auto" else lock), rep
    assert rep["source_network_held"] in ("nftables", "iptables"), rep
    # runc restores into a network namespace of its own making, lo down (in a pod the
    # namespace is the sandbox's): with lo up, only a lock left in place can stop TCP
    pid = n.b.state("ctr")["pid"]
    ocitest.lo_up(pid)
    assert ocitest.net_works(pid), "the restored container's network stays locked"
    c1 = dest_count(n)
    ocitest.wait_for(lambda: dest_count(n) > c1 + 2, what="counter going on at the destination")


def test_bad_network_lock_setting_refused_before_freezing(two_nodes):
    n = two_nodes
    ag = n.agent()
    bundle, out = n.source()
    p, rep = n.migrate(ag, "ctr", bundle=n.dest_bundle(), more_env={"MIGRT_NETWORK_LOCK": "pf"})
    assert p.returncode != 0
    assert "MIGRT_NETWORK_LOCK='pf'" in p.stderr and "nothing was frozen" in p.stderr, p.stderr
    assert_source_running(n, out)
    assert_destination_clean(n, ag)


def test_processes_with_their_own_memory_all_arrive(two_nodes):
    """Five processes, each holding its own random bytes (one page file each, through
    one FIFO each): every one of them runs on the destination with its bytes intact."""
    n = two_nodes
    ag = n.agent()
    holder = ('x=$(head -c 200000 /dev/urandom | od -An -tx1 | tr -d " \\n"); '
              'echo "$x" | md5sum > /tmp/sum.$$; while :; do '
              '[ "$(echo "$x" | md5sum)" = "$(cat /tmp/sum.$$)" ] || echo BAD > /tmp/bad; '
              'sleep 0.2; done')
    script = f"for i in 1 2 3 4; do sh -c '{holder}' & done; " + ocitest.COUNTER
    bundle = n.dest_bundle()
    code, out, err = n.a.create("ctr", n.make_bundle(["sh", "-c", script], name=ocitest.uid("src")),
                                start=True)
    assert code == 0, err.text
    ocitest.wait_for(lambda: ocitest.last_count(out) >= 10, what="counter on the source")
    ocitest.wait_for(lambda: len(n.a.exec_out("ctr", "sh", "-c", "ls /tmp/sum.*").split()) == 4,
                     what="four holders ready")
    p, rep = n.migrate(ag, "ctr", bundle=bundle)
    assert p.returncode == 0, p.stderr + ag.log()
    assert rep["page_fifos"] >= 5, rep      # each process's pages came through a FIFO
    sums = n.b.exec_out("ctr", "sh", "-c", "ls /tmp/sum.*").split()
    assert len(sums) == 4, sums
    c1 = dest_count(n)
    ocitest.wait_for(lambda: dest_count(n) > c1 + 2, what="counter going on at the destination")
    time.sleep(0.5)                    # each holder has re-checked its bytes since
    assert n.b.exec_out("ctr", "sh", "-c", "cat /tmp/bad 2>/dev/null; true").strip() == ""
    procs = n.b.exec_out("ctr", "ps").splitlines()
    assert sum(" sh -c x=" in line for line in procs) >= 4, procs


def test_migrate_staged_then_created_from_marker(two_nodes):
    """Without --bundle: the agent stages, the user creates with the marker, the source waits."""
    n = two_nodes
    ag = n.agent()
    bundle, out = n.source()
    dst = n.dest_bundle()
    argv = [n.a.binary, "--root", n.a.root, "migrate", "ctr", "--to", ag.address,
            "--secret-file", n.secret, "--json", "--wait", "60"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=n.env)
    marker = None
    for line in proc.stderr:
        if "MIGRT_RESTORE_FROM=" in line:
            marker = line.split("with ", 1)[1].split(" ")[0]
            break
    assert marker and marker.startswith("MIGRT_RESTORE_FROM=staged:m-")
    ocitest.bundlekit.set_env(dst, "MIGRT_RESTORE_FROM", marker.split("=", 1)[1])
    env_b = dict(n.env, MIGRT_STAGING=ag.staging)
    rb = ocitest.Runtime(n.b.binary, n.b.root, env=env_b)
    code, dout, derr = rb.create("ctr", dst, start=True)
    assert code == 0, derr.text
    rep = json.loads(proc.stdout.read())
    assert proc.wait(60) == 0
    assert rep["destination_id"] == "ctr"
    assert n.a.state("ctr") is None
    c1 = dest_count(n)
    ocitest.wait_for(lambda: dest_count(n) > c1 + 2, what="destination counter")


def test_wrong_secret_refused_before_freezing(two_nodes, tmp_path):
    n = two_nodes
    ag = n.agent()
    bundle, out = n.source()
    p, _ = n.migrate(ag, "ctr", bundle=n.dest_bundle(),
                     secret=secret_file(tmp_path / "other", "not-the-same-secret-at-all"))
    assert p.returncode == 3, p.stderr
    assert "authentication" in p.stderr and "nothing was frozen" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert_source_running(n, out)
    assert_destination_clean(n, ag)
    assert "authentication failed" in ag.log()


def test_corrupted_chunk_rolls_back(two_nodes):
    n = two_nodes
    ag = n.agent()
    bundle, out = n.source()
    proxy = Proxy(ag.address, flip_at=30000)
    try:
        p, _ = n.migrate(proxy.address, "ctr", "--zstd-level", "0", "--streams", "1",
                         bundle=n.dest_bundle())
    finally:
        proxy.close()
    assert p.returncode == 4, p.stderr
    # byte 30000 of the data connection is past its TLS handshake, in a sealed record:
    # its AES-GCM tag catches it before the chunk's xxhash would
    assert "failed its check" in p.stderr, p.stderr
    assert "source was resumed" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert_source_running(n, out)
    assert_destination_clean(n, ag)


def test_no_room_on_destination_refused(two_nodes, tmp_path):
    n = two_nodes
    small = tmp_path / "small-tmpfs"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        ag = n.agent(staging=str(small / "staged"))
        bundle, out = n.source()
        p, _ = n.migrate(ag, "ctr", bundle=n.dest_bundle())
        assert p.returncode == 3, p.stderr
        assert "no room on the destination" in p.stderr and "nothing was frozen" in p.stderr
        assert_source_running(n, out)
        assert_destination_clean(n, ag)
    finally:
        for ag in []:
            pass
        subprocess.run(["umount", "-l", str(small)])


def test_quota_exceeded_during_transfer_rolls_back(two_nodes):
    n = two_nodes
    ag = n.agent(quota=64 << 10)
    bundle, out = n.source()
    # the pre-check estimate (several MiB) already exceeds a 64 KiB quota
    p, _ = n.migrate(ag, "ctr", bundle=n.dest_bundle())
    assert p.returncode == 3 and "staging quota" in p.stderr, p.stderr
    assert_source_running(n, out)
    assert_destination_clean(n, ag)


def test_agent_killed_mid_transfer(two_nodes):
    n = two_nodes
    ag = n.agent()
    bundle, out = n.source()
    proxy = Proxy(ag.address, rate=200_000)   # ~1 s for the image: time to kill the agent
    result = {}

    def run():
        result["p"], _ = n.migrate(proxy.address, "ctr", "--zstd-level", "0",
                                   bundle=n.dest_bundle())
    t = threading.Thread(target=run)
    t.start()
    ocitest.wait_for(lambda: proxy.forwarded > 40_000 and n.a.state("ctr")["status"] == "paused",
                     timeout=30, what="transfer under way")
    ag.kill()
    t.join(120)
    proxy.close()
    p = result["p"]
    assert p.returncode == 4, p.stderr
    assert "source was resumed" in p.stderr
    assert_source_running(n, out)
    assert n.b.state("ctr") is None
    # a restarted agent removes what its dead predecessor half-received
    ag.start()
    assert_destination_clean(n, ag)


def test_restore_failing_on_destination_rolls_back(two_nodes):
    n = two_nodes
    ag = n.agent()
    bundle, out = n.source()
    dst = n.dest_bundle()
    spec = ocitest.bundlekit.read_spec(dst)
    spec["root"]["path"] = "/nonexistent-rootfs"
    ocitest.bundlekit.write_spec(dst, spec)
    p, _ = n.migrate(ag, "ctr", bundle=dst)
    assert p.returncode == 4, p.stderr
    assert "restore failed on the destination" in p.stderr and "source was resumed" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert_source_running(n, out)
    assert_destination_clean(n, ag)


@pytest.mark.parametrize("eager", [False, True])
def test_full_mode_runs_before_its_memory_is_back_and_the_source_waits_for_it(two_nodes,
                                                                             eager):
    """A staged full migration is restored with lazy-pages from the staged image: the
    downtime ends when the container runs, its memory comes in from the destination's
    tmpfs after that, and the source goes only once all of it is there (the report
    says how long that took). MIGRT_EAGER_RESTORE=1 on the destination restores all of
    it first. (A busybox's memory is below MIGRT_LOCAL_FILL_MIN, under which the
    destination restores it whole: 0 here, to fill even this one in.)"""
    n = two_nodes
    ag = n.agent({"MIGRT_EAGER_RESTORE": "1"} if eager else {"MIGRT_LOCAL_FILL_MIN": "0"})
    bundle, out = n.source()
    p, rep = n.migrate(ag, "ctr", bundle=n.dest_bundle())
    assert p.returncode == 0, p.stderr + ag.log()
    assert ("fill_after_restore" in rep["phases"]) is (not eager), rep["phases"]
    assert n.a.state("ctr") is None
    c1 = dest_count(n)
    ocitest.wait_for(lambda: dest_count(n) > c1 + 2, what="counter going on at the destination")
    log = n.b.exec_out("ctr", "cat", "/data/counter.log").split()
    assert [int(x) for x in log] == list(range(1, len(log) + 1))
    assert not ag.staged(), ag.staged()


def test_failed_memory_fill_stops_the_destination_and_resumes_the_source(two_nodes, tmp_path):
    """The destination runs the container before its memory is all back; if the fill
    then fails (here: criu lazy-pages reports failure once it is done), that copy may be
    missing pages, so it is stopped and the source, still frozen, resumes: one copy."""
    n = two_nodes
    wrapper = tmp_path / "criu-fails-fill"
    wrapper.write_text('#!/bin/sh\nif [ "$1" = lazy-pages ]; then criu "$@"; exit 7; fi\n'
                       'exec criu "$@"\n')
    wrapper.chmod(0o755)
    ag = n.agent({"MIGRT_CRIU": str(wrapper), "MIGRT_LOCAL_FILL_MIN": "0"})
    bundle, out = n.source()
    p, _ = n.migrate(ag, "ctr", bundle=n.dest_bundle())
    assert p.returncode == 4, p.stderr + ag.log()
    # the daemon's failure is seen after the restore (the agent's fill check) or, when
    # a small image is all filled before CRIU's restore ends, during it (the restore's
    # watchdog): either way the migration fails on it and the source resumes
    assert "memory fill from the staged image failed (criu lazy-pages exited 7" in p.stderr \
        or "the lazy-pages daemon exited 7" in p.stderr, p.stderr
    assert "source was resumed" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert_source_running(n, out)
    assert_destination_clean(n, ag)


def waiting_criu(tmp_path, name, on_lazy_pages):
    """A `criu` that runs the node's own (install.sh's) for everything, and for
    `lazy-pages` runs the shell line `on_lazy_pages` first; it carries the marker of a
    CRIU whose restore waits for the daemon's socket (migrt.criu.features), as the CRIU
    it runs does. Returns (the wrapper, the real CRIU)."""
    import shutil
    real = os.path.realpath(shutil.which("criu"))
    wrapper = tmp_path / name / "criu"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\n# {features.MARKER.decode()}{features.LAZY_SOCKET_WAIT} "
                       f"(as {real})\n"
                       f'[ "$1" = lazy-pages ] && {on_lazy_pages}\n'
                       f'exec {real} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, real


@pytest.mark.parametrize("together", [True, False], ids=["together", "daemon-first"])
def test_lazy_restore_waits_for_a_daemon_that_starts_late(two_nodes, tmp_path, together):
    """A lazy restore starts runc together with `criu lazy-pages` when the node's CRIU
    waits for the daemon's socket (packaging/criu-patches, marker found by
    migrt.criu.features), so the daemon's start-up is not in the downtime before runc.
    Here the daemon starts 1 s late (a `criu` wrapper that carries the marker: the CRIU
    it runs must really wait, or the restore fails): runc went ahead at once and CRIU's
    restore waited for the daemon; the container runs there with its memory.
    MIGRT_LAZY_SOCKET_WAIT=0 starts runc only once the daemon listens, as before."""
    n = two_nodes
    wrapper, real = waiting_criu(tmp_path, "late", "sleep 1")
    assert features.has(features.LAZY_SOCKET_WAIT, real), f"{real}: not install.sh's CRIU"
    ag = n.agent({"MIGRT_CRIU": str(wrapper),
                  "MIGRT_LAZY_SOCKET_WAIT": "1" if together else "0"})
    bundle, out = n.source()
    p, rep = n.migrate(ag, "ctr", "--lazy", bundle=n.dest_bundle())
    assert p.returncode == 0, p.stderr + ag.log()
    rs = rep["downtime"]["restore"]
    if together:
        assert rs["before_runc_s"] < 0.5 and rs["criu_s"] >= 0.9, json.dumps(rs)
    else:
        assert rs["before_runc_s"] >= 0.9, rs
    assert n.a.state("ctr") is None
    c1 = dest_count(n)
    ocitest.wait_for(lambda: dest_count(n) > c1 + 2, what="counter going on at the destination")
    log = n.b.exec_out("ctr", "cat", "/data/counter.log").split()
    assert [int(x) for x in log] == list(range(1, len(log) + 1))


def test_lazy_daemon_that_fails_at_start_fails_the_restore_at_once(two_nodes, tmp_path):
    """With runc started together with `criu lazy-pages`, a daemon that exits before it
    listens would leave CRIU's restore waiting for its socket: migrt's watchdog stops
    the restore as soon as the daemon is gone, the caller gets one line with the
    daemon's exit, and the source resumes."""
    n = two_nodes
    wrapper, _ = waiting_criu(tmp_path, "dies", "exit 3")
    ag = n.agent({"MIGRT_CRIU": str(wrapper)})
    bundle, out = n.source()
    t0 = time.monotonic()
    p, _ = n.migrate(ag, "ctr", "--lazy", bundle=n.dest_bundle())
    took = time.monotonic() - t0
    assert p.returncode == 4, p.stderr + ag.log()
    assert "the lazy-pages daemon exited 3" in p.stderr, p.stderr
    assert "source was resumed" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert took < 8, took           # not CRIU's 10 s wait for a socket that never comes
    assert_source_running(n, out)
    assert_destination_clean(n, ag)


def test_lazy_restores_at_once_and_pages_follow(two_nodes):
    """--lazy: only the non-memory state moves while frozen; the destination runs at once
    and takes its memory from the source's page server; the source goes when all is served."""
    n = two_nodes
    ag = n.agent()
    bundle, out = n.source()
    p, rep = n.migrate(ag, "ctr", "--lazy", bundle=n.dest_bundle())
    assert p.returncode == 0, p.stderr + ag.log()
    assert rep["mode"] == "lazy"
    last_src = ocitest.last_count(out)
    assert n.a.state("ctr") is None, "the source must be gone once every page was served"
    assert "pages_served_after_restore" in rep["phases"]
    # the source was released after its last page was served, and the report says when
    ph = rep["phases"]
    assert ph["source_released_after_restore"] >= ph["pages_served_after_restore"], ph
    # the memory did not move during the freeze: only CRIU's small images went
    assert rep["bytes"]["image"] < 4 << 20, rep["bytes"]
    c1 = dest_count(n)
    assert c1 >= last_src, (c1, last_src)
    ocitest.wait_for(lambda: dest_count(n) > c1 + 2, what="counter going on at the destination")
    log = n.b.exec_out("ctr", "cat", "/data/counter.log").split()
    assert int(log[0]) == 1 and int(log[-1]) >= last_src
    assert not ag.staged(), ag.staged()


def sparse_bundle(n, tmp):
    """A bundle running sparse_holder.c (a 1 GiB mapping, about 80 MiB of it written,
    which checks all of it every 100 ms) as its process 1."""
    binary = ocitest.static_program(os.path.join(os.path.dirname(__file__), "sparse_holder.c"), tmp)
    b = n.make_bundle(["/bin/sparse_holder"], name=ocitest.uid("sparse"))
    ocitest.put_program(b, binary)
    return b


def sparse_status(rt, cid="ctr"):
    """(round, VmRSS in KiB, has a guard page) of sparse_holder, after failing on any
    wrong byte (or a guard page gone) it saw."""
    bad = rt.exec_out(cid, "sh", "-c", "cat /tmp/sparse.bad 2>/dev/null; true").strip()
    assert not bad, bad
    v = rt.exec_out(cid, "sh", "-c", "cat /tmp/sparse.status 2>/dev/null; true").split()
    return (int(v[0]), int(v[1]), v[2] == "1") if len(v) == 3 else None


def _comm(d):
    with open(f"{d}/comm") as f:
        return f.read().strip()


class CriuThreads(ocitest.Sampler):
    """Names of the threads seen in any `criu` process, looked at every few ms while
    active (a with block)."""

    interval = 0.003

    def __init__(self):
        super().__init__()
        self.names = set()

    def sample(self):
        for pid in os.listdir("/proc"):
            try:
                if not pid.isdigit() or _comm(f"/proc/{pid}") != "criu":
                    continue
                for tid in os.listdir(f"/proc/{pid}/task"):
                    self.names.add(_comm(f"/proc/{pid}/task/{tid}"))
            except OSError:
                pass


@pytest.mark.parametrize("ranges,threads", [(True, True), (False, True), (True, False)],
                         ids=["ranges", "scanned", "one-thread"])
def test_lazy_memory_with_holes_arrives_as_it_was(two_nodes, tmp_path, ranges, threads):
    """Lazy mode leaves a private anonymous mapping lazy whole, without reading its page
    tables while the source is frozen (packaging/criu-patches: lazy-ranges); the source's
    page server then says which pages are holes when asked. A 1 GiB mapping with 80 MiB
    written (pages here and there, a block, a block given back with MADV_DONTNEED):
    on the destination every written page holds what was last written there, every other
    page reads zero (also while the memory is still coming: the workload reads holes
    each round), its guard page (MADV_GUARD_INSTALL, kernel 6.13 on) is one there too,
    and the holes took no memory there. MIGRT_LAZY_RANGES=0 scans the page tables at
    the dump, as before: the same result.

    The page server reads the pages from the task in a thread of its own
    (criu-pages-read) while its main thread encrypts and sends them, and the
    lazy-pages daemon receives them in one (criu-pages-recv) while its main thread puts
    them in place (packaging/criu-patches, worker-threads-for-lazy-pages.patch);
    MIGRT_CRIU_STREAM_THREADS=0 at both ends: one thread each, the same result."""
    n = two_nodes
    env = {} if threads else {"MIGRT_CRIU_STREAM_THREADS": "0"}
    ag = n.agent(env)
    code, _, err = n.a.create("ctr", sparse_bundle(n, n.tmp), start=True)
    assert code == 0, err.text
    ocitest.wait_for(lambda: (sparse_status(n.a) or (0,))[0] >= 3, what="sparse_holder's rounds")
    src_round, src_rss, src_guard = sparse_status(n.a)
    with CriuThreads() as seen:
        p, rep = n.migrate(ag, "ctr", "--lazy", bundle=sparse_bundle(n, n.tmp),
                           more_env={"MIGRT_LAZY_RANGES": "1" if ranges else "0", **env})
    assert p.returncode == 0, p.stderr + ag.log()
    assert rep["lazy_ranges"] is ranges, rep.get("lazy_ranges")
    stream = {"criu-pages-read", "criu-pages-recv"}
    assert seen.names & stream == (stream if threads else set()), seen.names
    assert rep["bytes"]["image"] < 4 << 20, rep["bytes"]      # the memory was not dumped
    assert n.a.state("ctr") is None
    # every page was served before the source went: the workload's own checks after that
    r0 = ocitest.wait_for(lambda: sparse_status(n.b), what="sparse_holder on the destination")[0]
    assert r0 >= src_round
    ocitest.wait_for(lambda: sparse_status(n.b)[0] >= r0 + 3, what="rounds going on there")
    rnd, rss, guard = sparse_status(n.b)
    assert guard == src_guard
    # 80 MiB written on the source (VmRSS there src_rss): the 944 MiB of holes stayed holes
    assert 60 << 10 < rss < 200 << 10, (rss, src_rss)


def test_lazy_with_a_precopy_sends_only_what_changed(two_nodes, tmp_path):
    """`migrate --precopy --lazy`: a pre-copy round sends the memory while the
    container runs, into the destination's images dir as parent/; after the restore
    the source's page server compares each page it is asked for with the pre-copy's and
    sends only those that changed (packaging/criu-patches, written-pages-only-after-a-
    precopy). sparse_holder rewrites nine pages a round, one of them inside its 16 MiB
    block (a reply then has pages of both kinds). On the destination every written page
    holds what was last written there and the holes read zero (the workload checks all
    of it every round, also while the memory comes in); most pages came from the
    pre-copy, few over the wire after the restore."""
    n = two_nodes
    ag = n.agent()
    code, _, err = n.a.create("ctr", sparse_bundle(n, n.tmp), start=True)
    assert code == 0, err.text
    ocitest.wait_for(lambda: (sparse_status(n.a) or (0,))[0] >= 3, what="sparse_holder's rounds")
    src_round, _, src_guard = sparse_status(n.a)
    p, rep = n.migrate(ag, "ctr", "--precopy", "--lazy", bundle=sparse_bundle(n, n.tmp))
    assert p.returncode == 0, p.stderr + ag.log()
    assert rep["lazy_precopy"] == "used", rep.get("lazy_precopy")
    assert rep["bytes"]["image_precopy"] > 70 << 20, rep["bytes"]   # the memory, early
    assert rep["bytes"]["image"] < 4 << 20, rep["bytes"]            # not in the dump
    same, sent = rep["lazy_pages_from_precopy"], rep["lazy_pages_sent"]
    # about 20,500 pages written; nine rewritten per 100 ms round between the
    # pre-copy and the freeze, and the rest the same
    assert same > 18000 and sent < same / 10, (same, sent)
    assert rep["lazy_replies_mixed"] >= 1, rep
    assert n.a.state("ctr") is None
    r0 = ocitest.wait_for(lambda: sparse_status(n.b), what="sparse_holder on the destination")[0]
    assert r0 >= src_round
    ocitest.wait_for(lambda: sparse_status(n.b)[0] >= r0 + 3, what="rounds going on there")
    assert sparse_status(n.b)[2] == src_guard


class FlipOnTheWay(Proxy):
    """A relay on the page stream's way (iptables REDIRECTs the lazy-pages daemon's
    connection to the page server's port here; its own connection onwards carries a
    mark the rule leaves alone) that flips one byte of what the page server sends,
    `after` bytes in: what an attacker on the network between the nodes, or a bad link
    that fooled TCP's checksum, would do."""

    MARK = 0x4d7274

    def __init__(self, target_port, after):
        super().__init__(f"127.0.0.1:{target_port}", flip_at=after, flip_conn=0,
                         flip_down=True, mark=self.MARK)
        self.rule = ["OUTPUT", "-t", "nat", "-p", "tcp", "--dport", str(target_port), "-m",
                     "mark", "!", "--mark", str(self.MARK), "-j", "REDIRECT", "--to-ports",
                     self.address.rsplit(":", 1)[1]]
        subprocess.run(["iptables", "-I", *self.rule], check=True, capture_output=True)

    def close(self):
        subprocess.run(["iptables", "-D", *self.rule], capture_output=True)
        super().close()


@pytest.mark.parametrize("frames", [True, False], ids=["frames", "tls-records"])
def test_lazy_page_stream_that_was_tampered_with_fails(two_nodes, tmp_path, frames):
    """One bit of the page stream flipped on its way, after 8 MiB of pages, once the
    container runs on the destination: the lazy-pages daemon finds the frame (or, with
    MIGRT_PAGE_FRAMES=0, the TLS record) fails its check and uses none of it; the
    destination's copy, missing part of its memory, is stopped there and the source,
    which has it all, resumes (exit 4, one line). No page that did not come from the
    source is ever put in place (sparse_holder checks all its memory every round,
    and goes on at the source)."""
    n = two_nodes
    env = {} if frames else {"MIGRT_PAGE_FRAMES": "0"}
    ag = n.agent(env)
    code, _, err = n.a.create("ctr", sparse_bundle(n, n.tmp), start=True)
    assert code == 0, err.text
    ocitest.wait_for(lambda: (sparse_status(n.a) or (0,))[0] >= 3, what="sparse_holder's rounds")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fw = FlipOnTheWay(port, after=8 << 20)
    try:
        p, rep = n.migrate(ag, "ctr", "--lazy", "--page-server-port", str(port),
                           bundle=sparse_bundle(n, n.tmp), more_env=env)
    finally:
        fw.close()
    assert fw.n == 1 and fw.flipped, (fw.n, fw.flipped)
    assert p.returncode == 4, p.stdout + p.stderr + ag.log()
    msg = p.stderr.strip()
    assert len(msg.splitlines()) == 1, msg
    assert "missing part of its memory, was stopped there" in msg, msg
    assert "the source was resumed" in msg, msg
    # the source's page server failed: sending to a daemon that had gone (broken pipe),
    # or, waiting for its next request, seeing the daemon leave without saying it had
    # every page (frames end without an alert; before the xfer-ends patch that looked
    # like success: exit 0 here), or GnuTLS's missing close_notify (TLS records)
    assert "Lazy pages transfer FAILED" in msg, msg
    said = [ln for ln in ag.log().splitlines() if "the container here was stopped" in ln]
    assert len(said) == 1, ag.log()[-3000:]
    assert ("failed its check (tampered, or not from the peer)" if frames else
            "Decryption has failed") in said[0], said
    # one copy: the source, going on with all of its memory as it was
    assert n.b.state("ctr") is None, n.b.state("ctr")
    assert n.a.state("ctr")["status"] == "running"
    r0 = sparse_status(n.a)[0]
    ocitest.wait_for(lambda: sparse_status(n.a)[0] >= r0 + 3, what="rounds going on at the source")


def test_lazy_with_a_precopy_of_two_processes(two_nodes, tmp_path):
    """`migrate --precopy --lazy` of a container of two processes that both hold memory
    (sparse_holder, and memtouch beside it): the page server keeps a page_read of the
    pre-copy for each task, and the second one must not move the first (CRIU patch
    written-pages-only-after-a-precopy: they were kept in one array grown by realloc,
    whose list heads then pointed at freed memory: "Can't read async pr bytes"). Both
    processes' unchanged pages come from the pre-copy; sparse_holder checks all of its
    memory on the destination."""
    n = two_nodes
    ag = n.agent()
    here = os.path.dirname(__file__)
    sparse = ocitest.static_program(os.path.join(here, "sparse_holder.c"), n.tmp)
    touch = ocitest.static_program(os.path.join(here, "..", "bench", "memtouch.c"), n.tmp)

    def bundle():
        b = n.make_bundle(["sh", "-c", "/bin/memtouch 64 1 >/dev/null & exec /bin/sparse_holder"],
                          name=ocitest.uid("two"))
        ocitest.put_program(b, sparse)
        ocitest.put_program(b, touch)
        return b
    code, _, err = n.a.create("ctr", bundle(), start=True)
    assert code == 0, err.text
    ocitest.wait_for(lambda: (sparse_status(n.a) or (0,))[0] >= 3, what="sparse_holder's rounds")
    p, rep = n.migrate(ag, "ctr", "--precopy", "--lazy", bundle=bundle())
    assert p.returncode == 0, p.stderr + ag.log()
    assert rep["lazy_precopy"] == "used", rep.get("lazy_precopy")
    # sparse_holder's ~20,500 written pages and memtouch's 16,384, nearly all unchanged
    same, sent = rep["lazy_pages_from_precopy"], rep["lazy_pages_sent"]
    assert same > 18000 + 14000 and sent < same / 10, (same, sent)
    r0 = ocitest.wait_for(lambda: sparse_status(n.b), what="sparse_holder on the destination")[0]
    ocitest.wait_for(lambda: sparse_status(n.b)[0] >= r0 + 3, what="rounds going on there")
    pid = n.b.state("ctr")["pid"]
    kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
    assert len(kids) == 1 and b"memtouch" in open(f"/proc/{kids[0]}/cmdline", "rb").read(), kids


def test_lazy_without_a_precopy_sends_every_page(two_nodes, tmp_path):
    """Plain --lazy: no pre-copy round, nothing compared; every page is sent."""
    n = two_nodes
    ag = n.agent()
    code, _, err = n.a.create("ctr", sparse_bundle(n, n.tmp), start=True)
    assert code == 0, err.text
    ocitest.wait_for(lambda: (sparse_status(n.a) or (0,))[0] >= 3, what="sparse_holder's rounds")
    p, rep = n.migrate(ag, "ctr", "--lazy", bundle=sparse_bundle(n, n.tmp))
    assert p.returncode == 0, p.stderr + ag.log()
    assert "lazy_precopy" not in rep and "lazy_pages_from_precopy" not in rep, rep
    assert "image_precopy" not in rep["bytes"], rep["bytes"]
    r0 = ocitest.wait_for(lambda: sparse_status(n.b), what="sparse_holder on the destination")[0]
    ocitest.wait_for(lambda: sparse_status(n.b)[0] >= r0 + 2, what="rounds going on there")


def vmflags(pid, start):
    """The VmFlags of pid's VMA that starts at `start` (hex, as in /proc/PID/maps)."""
    with open(f"/proc/{pid}/smaps") as f:
        text = f.read()
    block = text.split(f"\n{start}-", 1)[1] if f"\n{start}-" in text else text
    return block.split("VmFlags:", 1)[1].split("\n", 1)[0].split()


def test_lazy_flags_changed_while_freezing_roll_back(two_nodes, tmp_path):
    """A lazy dump reads the tasks' smaps before the freeze (CRIU waits at migrt's gate
    meanwhile) and uses that copy when the VMAs are the same once frozen
    (packaging/criu-patches, early-smaps). A VMA's flags can change in place in between:
    here the process marks its 1 GiB mapping MADV_DONTFORK while migrate holds at the
    gate. The copy read early lacks that flag, so when the page server is done CRIU
    finds the flags changed and fails: the destination's copy is stopped, the source
    resumes with its flag, and the one line says why."""
    n = two_nodes
    ag = n.agent()
    src = sparse_bundle(n, n.tmp)
    code, _, err = n.a.create("ctr", src, start=True)
    assert code == 0, err.text
    ocitest.wait_for(lambda: (sparse_status(n.a) or (0,))[0] >= 3, what="sparse_holder's rounds")
    pid = n.a.state("ctr")["pid"]
    with open(f"/proc/{pid}/maps") as f:
        big = [ln.split("-")[0] for ln in f if int(ln.split()[0].split("-")[1], 16)
               - int(ln.split()[0].split("-")[0], 16) == 1 << 30][0]
    assert "dc" not in vmflags(pid, big)
    fp = tmp_path / "fp"
    fp.mkdir()
    mig = n.migrate(ag, "ctr", "--lazy", bundle=sparse_bundle(n, n.tmp), spawn=True, more_env={
        "MIGRT_FAILPOINTS": "migrate.dump-armed=pause(2)", "MIGRT_FAILPOINT_DIR": str(fp)})
    ocitest.wait_for(lambda: os.listdir(fp) or mig.poll() is not None, timeout=60,
                     what="migrate's dump started, at its gate")
    assert mig.poll() is None, mig.communicate()
    os.kill(pid, signal.SIGUSR1)           # not frozen yet: the mapping becomes DONTFORK
    ocitest.wait_for(lambda: "dc" in vmflags(pid, big), timeout=1, what="the flag set")
    stdout, stderr = mig.communicate(timeout=120)
    assert mig.returncode == 4, stdout + stderr + ag.log()
    line = stderr.strip().splitlines()[-1]
    assert "changed while it was being frozen" in line and "source was resumed" in line, line
    r0 = sparse_status(n.a)[0]
    ocitest.wait_for(lambda: sparse_status(n.a)[0] > r0 + 2, what="the source going on")
    assert n.a.state("ctr")["status"] == "running"
    assert "dc" in vmflags(pid, big)
    assert_destination_clean(n, ag)


def test_lazy_ranges_only_with_a_destination_that_knows_them(two_nodes, tmp_path):
    """A destination whose CRIU lacks the lazy-ranges marker (an older build: its
    lazy-pages daemon would not understand the page server's holes) is sent a dump whose
    page tables were scanned, and the memory arrives all the same."""
    n = two_nodes
    wrapper, real = waiting_criu(tmp_path, "older", "true")     # carries one marker only
    assert features.has(features.LAZY_RANGES, real), f"{real}: not install.sh's CRIU"
    assert not features.has(features.LAZY_RANGES, str(wrapper))
    ag = n.agent({"MIGRT_CRIU": str(wrapper)})
    code, _, err = n.a.create("ctr", sparse_bundle(n, n.tmp), start=True)
    assert code == 0, err.text
    ocitest.wait_for(lambda: (sparse_status(n.a) or (0,))[0] >= 3, what="sparse_holder's rounds")
    p, rep = n.migrate(ag, "ctr", "--lazy", bundle=sparse_bundle(n, n.tmp))
    assert p.returncode == 0, p.stderr + ag.log()
    assert rep["lazy_ranges"] is False, rep.get("lazy_ranges")
    r0 = ocitest.wait_for(lambda: sparse_status(n.b), what="sparse_holder on the destination")[0]
    ocitest.wait_for(lambda: sparse_status(n.b)[0] >= r0 + 3, what="rounds going on there")


def _steal_pages(port, pid_in_ns, vaddr, nr_pages):
    """What anyone who reaches a lazy migration's page server can try: CRIU's own
    request for pages (page-xfer.c: struct page_server_iov, PS_IOV_GET with the task's
    pid in its namespace), in the clear. Returns every byte that came back. Against a
    plain page server this returns the pages themselves."""
    import struct
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    got = b""
    try:
        s.sendall(struct.pack("<IIQQ", 7, nr_pages, vaddr, pid_in_ns))
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            got += b
    except OSError:
        pass
    finally:
        s.close()
    return got


def test_lazy_page_server_gives_nothing_to_a_peer_without_the_migrations_key(two_nodes):
    """The lazy page server holds the container's memory until the destination has taken
    it. Someone who connects to it first, asking for pages as CRIU's lazy-pages daemon
    does, must get none of them: it speaks TLS and serves only the certificate swapped in
    the authenticated precheck (migrt.criu.pagetls). The migration then ends with one copy."""
    n = two_nodes
    fpdir = os.path.join(n.tmp, "fp")
    os.makedirs(fpdir)
    ag = n.agent({"MIGRT_FAILPOINT_DIR": fpdir, "MIGRT_FAILPOINTS": "agent.before-restore=pause(3)"})
    secret = os.urandom(16).hex()
    prog = f"S={secret}; " + ocitest.COUNTER
    code, out, err = n.a.create("ctr", n.make_bundle(["sh", "-c", prog], name=ocitest.uid("src")),
                                start=True)
    assert code == 0, err.text
    ocitest.wait_for(lambda: ocitest.last_count(out) >= 5, what="counter on the source")
    pid = n.a.state("ctr")["pid"]
    with open(f"/proc/{pid}/maps") as f:
        heap = [ln.split()[0] for ln in f if ln.rstrip().endswith("[heap]")]
    lo, hi = (int(x, 16) for x in heap[0].split("-"))
    with open(f"/proc/{pid}/mem", "rb") as f:        # the secret is there to be taken
        f.seek(lo)
        assert secret.encode() in f.read(hi - lo)
    port = free_port()
    argv = [n.a.binary, "--root", n.a.root, "migrate", "ctr", "--to", ag.address,
            "--secret-file", n.secret, "--json", "--lazy", "--page-server-port", str(port),
            "--bundle", n.dest_bundle(), "--dest-root", n.b.root]
    mig = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=n.env)
    try:
        # the source is dumped and its page server listens once the agent is asked to
        # restore: the destination's lazy-pages daemon has not connected yet
        ocitest.wait_for(lambda: any(f.startswith("agent.before-restore") for f in
                                     os.listdir(fpdir)), timeout=60, what="restore request")
        got = _steal_pages(port, 1, lo, (hi - lo) >> 12)
        mig.wait(120)
    finally:
        if mig.poll() is None:
            mig.kill()
    assert secret.encode() not in got, "the page server served the container's memory"
    assert b"\0" * 4096 not in got                    # nor any page at all
    copies = [n.a.state("ctr"), n.b.state("ctr")]
    running = [c for c in copies if c and c["status"] == "running"]
    assert len(running) == 1, (copies, mig.stderr.read().decode()[-600:])


def test_lazy_refused_before_freezing_when_the_page_server_cannot_work(two_nodes):
    """Without CAP_SYS_RESOURCE (as here) and with fs.pipe-max-size below 4 MiB, CRIU's
    page server fails on the first page (splice EBADF): --lazy says so before freezing."""
    from migrt.criu import lazycheck
    n = two_nodes
    ag = n.agent()
    bundle, out = n.source()
    with open(lazycheck.PIPE_MAX) as f:
        saved = f.read().strip()
    try:
        with open(lazycheck.PIPE_MAX, "w") as f:
            f.write("1048576")
        if lazycheck.problem() is None:
            pytest.skip("root has CAP_SYS_RESOURCE here: the page server works at any limit")
        p, _ = n.migrate(ag, "ctr", "--lazy", bundle=n.dest_bundle())
    finally:
        with open(lazycheck.PIPE_MAX, "w") as f:
            f.write(saved)
    assert p.returncode == 3, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "fs.pipe-max-size" in p.stderr and "nothing was frozen" in p.stderr
    assert_source_running(n, out)
    assert_destination_clean(n, ag)


def test_memory_moves_rather_than_doubles(two_nodes, tmp_path):
    """The source's pages go from CRIU through FIFOs into the stream, and the
    destination's restore frees each page of the staged image as CRIU restores it
    (--auto-dedup): neither node holds a second full copy of the container's memory
    once it has been used."""
    n = two_nodes
    fp = tmp_path / "fp"
    fp.mkdir()
    ag = n.agent(extra_env={"MIGRT_FAILPOINTS": "agent.after-create=pause(4)",
                            "MIGRT_FAILPOINT_DIR": str(fp)})
    bundle, out = n.source()
    env = dict(n.env, MIGRT_FAILPOINTS="migrate.after-dump=pause(4)",
               MIGRT_FAILPOINT_DIR=str(fp))
    argv = [n.a.binary, "--root", n.a.root, "migrate", "ctr", "--to", ag.address,
            "--secret-file", n.secret, "--json", "--bundle", n.dest_bundle(),
            "--dest-root", n.b.root]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)

    def pages(top):
        found = []
        for d, _, files in os.walk(top):
            found += [os.path.join(d, f) for f in files if f.startswith("pages-")]
        return found

    def held(paths):         # bytes actually allocated, against the files' sizes
        st = [os.stat(p) for p in paths]
        return sum(s.st_blocks * 512 for s in st), sum(s.st_size for s in st)

    try:
        ocitest.wait_for(lambda: any(f.name.startswith("migrate.after-dump") for f in fp.iterdir()),
                         timeout=60, what="the source's dump sent")
        src = pages(os.path.join(n.env["MIGRT_STATE_DIR"], "migrate"))
        used, _ = held(src)
        assert used < 64 << 10, f"the source holds {used} bytes of pages: {src}"
        ocitest.wait_for(lambda: any(f.name.startswith("agent.after-create") for f in fp.iterdir()),
                         timeout=60, what="the destination's restore done")
        dst = pages(ag.staging)
        assert dst, "no staged image on the destination"
        used, size = held(dst)
        assert size > 64 << 10 and used < size // 4, (used, size)
    finally:
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr + ag.log()
    c1 = dest_count(n)
    ocitest.wait_for(lambda: dest_count(n) > c1 + 2, what="counter going on at the destination")


@pytest.mark.parametrize("size", ["64k", "512k"])
def test_full_disk_on_the_source_rolls_back(two_nodes, size):
    """The source's own dump space runs out (a small tmpfs under its work dir): at 64 KiB
    while the plugins write their part of the image, at 512 KiB while CRIU dumps (the
    pages do not land there, they go through FIFOs; the container's /dev/shm holds a
    MiB that does not compress, which CRIU archives into the image). The source keeps
    running, the destination is clean, one line says what and where."""
    n = two_nodes
    ag = n.agent()
    bundle, out = n.source()
    if size == "512k":
        n.a.exec_out("ctr", "dd", "if=/dev/urandom", "of=/dev/shm/blob", "bs=1024",
                     "count=1024")
    work = os.path.join(n.env["MIGRT_STATE_DIR"], "migrate")
    os.makedirs(work, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", work],
                   check=True)
    try:
        p, _ = n.migrate(ag, "ctr", bundle=n.dest_bundle())
    finally:
        subprocess.run(["umount", "-l", work], check=True)
    assert p.returncode == 4, (p.returncode, p.stdout, p.stderr)
    line = p.stderr.strip()
    assert len(line.splitlines()) == 1, (p.stdout, p.stderr)
    assert "No space left on device" in line and work in line, line
    assert "keeps running" in line, line
    if "CRIU log " in line:       # the work dir went with the rollback; its log is kept
        kept = line.split("CRIU log ")[1].split(":")[0]
        assert os.path.isfile(kept) and "No space left" in open(kept).read(), kept
    assert_source_running(n, out)
    assert_destination_clean(n, ag)


TMPFS_MOUNTS = [
    # empty, its root as its options make it: CRIU (packaging/criu-patches) saves it
    # without tar
    {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
     "options": ["nosuid", "nodev", "mode=0710", "uid=12", "gid=34", "size=1m"]},
    # empty, but its root chmod-ed after the mount: not saved as the empty archive (a
    # small one instead, as tar would make it), its mode must come back
    {"destination": "/chmodded", "type": "tmpfs", "source": "tmpfs",
     "options": ["nosuid", "nodev", "mode=0755", "size=1m"]},
]
# runc's /dev and /dev/shm, the read-only tmpfs masking /proc/acpi and /sys/firmware,
# the bundle's two: the mount's options, its root's mode and owner, its entries
TMPFS_LOOK = ("for m in /dev /dev/shm /proc/acpi /sys/firmware /scratch /chmodded; do "
              "echo \"== $m $(stat -c '%a %u %g' $m) "
              "$(awk -v m=$m '$5 == m {print $6, $(NF-2), $NF}' /proc/self/mountinfo)\"; "
              "ls -lan $m | sed 1d | awk '{print $1, $3, $4, $5, $NF}'; done; "
              "cat /dev/shm/kept/note")


@pytest.mark.parametrize("mode", ["full", "lazy"])
def test_tmpfs_mounts_arrive_as_they_were(two_nodes, mode):
    """Every tmpfs of the container, empty or not (runc's /dev, /dev/shm, the read-only
    ones masking /proc and /sys paths, the bundle's own), is on the destination with the
    same options, the same root mode and owner and the same entries; masked paths stay
    masked; /dev/shm's file arrives."""
    n = two_nodes
    ag = n.agent()
    args = ["sh", "-c", ocitest.COUNTER]
    src = n.make_bundle(args, name=ocitest.uid("src"), mounts=TMPFS_MOUNTS)
    code, out, err = n.a.create("ctr", src, start=True)
    assert code == 0, err.text
    ocitest.wait_for(lambda: ocitest.last_count(out) >= 3, what="counter on the source")
    n.a.exec_out("ctr", "sh", "-c", "chmod 0701 /chmodded && mkdir /dev/shm/kept && "
                 "echo from-the-source > /dev/shm/kept/note")
    before = n.a.exec_out("ctr", "sh", "-c", TMPFS_LOOK)
    assert "== /scratch 710 12 34" in before and "== /chmodded 701 0 0" in before, before
    assert "== /sys/firmware 1777 0 0 ro" in before, before   # runc's mask: an empty tmpfs
    extra = ["--lazy"] if mode == "lazy" else []
    p, rep = n.migrate(ag, "ctr", *extra,
                       bundle=n.make_bundle(args, name=ocitest.uid("dst"), mounts=TMPFS_MOUNTS))
    assert p.returncode == 0, p.stderr + ag.log()
    assert n.b.state("ctr")["status"] == "running"
    after = n.b.exec_out("ctr", "sh", "-c", TMPFS_LOOK)
    import difflib
    assert after == before, "\n".join(difflib.unified_diff(before.splitlines(),
                                                           after.splitlines(), lineterm=""))
    assert after.rstrip().endswith("from-the-source")
    # still masked: read-only, nothing of the host's /sys/firmware shows
    r = n.b.exec_out("ctr", "sh", "-c", "touch /sys/firmware/x 2>&1; ls -A /sys/firmware | wc -l;"
                     "wc -c < /proc/keys")
    assert r.split()[-2:] == ["0", "0"] and "Read-only" in r, r
    # and the empty ones are usable
    n.b.exec_out("ctr", "sh", "-c", "echo ok > /chmodded/f && echo ok > /dev/shm/f && "
                 "test -s /chmodded/f && test -s /dev/shm/f")
    # both CRIUs (dump and restore) kept their kernel probes on migrt's tmpfs instead of
    # probing again next time (install.sh builds CRIU with RUNDIR=/run/migrt/criu)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    d = subprocess.run([sys.executable, "-m", "migrt", "doctor", "--json"],
                       capture_output=True, text=True, cwd=repo, timeout=120)
    found = {f["check"]: f for f in json.loads(d.stdout)["findings"]}
    kd = found["CRIU kernel cache"]
    assert kd["status"] == "ok" and "on a tmpfs, cache present" in kd["detail"], kd


# ---------------------------------------------------------------- restore armed before the freeze

def restore_log_of(n, cid="ctr"):
    """CRIU's restore.log of the container restored on node B (its work dir, from
    migrt's record in node B's runc state dir)."""
    with open(os.path.join(n.b.root, cid, "migrt.json")) as f:
        rec = json.load(f)
    with open(os.path.join(rec["work"], "restore.log"), errors="replace") as f:
        return rec, f.read()


@pytest.mark.parametrize("mode", ["full", "lazy"])
def test_restore_armed_before_the_freeze_is_used(two_nodes, mode):
    """The destination starts runc restore while the source still runs (the agent's
    `arm`): its CRIU waits at the restore gate (packaging/criu-patches/restore-gate.patch)
    and reads the images only once they are there. The container then runs on node B
    from the images this migration sent, and the report says the armed restore was used,
    with runc's start-up out of the downtime."""
    n = two_nodes
    ag = n.agent()
    bundle, out = n.source()
    p, rep = n.migrate(ag, "ctr", *(["--lazy"] if mode == "lazy" else []), bundle=n.dest_bundle())
    assert p.returncode == 0, p.stderr + ag.log()
    assert rep["restore_armed"] == "yes", rep.get("restore_armed")
    rs = rep["downtime"]["restore"]
    assert rs["armed"] == "used", rs
    assert rs["armed_before_s"] > 0, rs
    assert "restore armed as ctr" in ag.log()
    rec, log = restore_log_of(n)
    assert "restore gate: waiting" in log and "restore gate open" in log, log[:2000]
    # the images' first line ("Dump CRIU run id", from inventory.img) comes after the gate
    assert log.index("restore gate open") < log.index("Dump CRIU run id"), log[:3000]
    assert "restore gate: images in" in log
    # runc's own share of the restore (runc restore minus CRIU's part after its gate) is
    # what the arming took out: no Go start-up, no CRIU version run, no cgroups in it
    assert rs["runc_s"] < rs["criu_s"] + 0.05, rs
    last_src = ocitest.last_count(out)
    assert n.a.state("ctr") is None
    assert n.b.state("ctr")["status"] == "running"
    c1 = dest_count(n)
    assert c1 >= last_src, (c1, last_src)
    ocitest.wait_for(lambda: dest_count(n) > c1 + 1, what="the counter going on on node B")


def test_restore_not_armed_when_asked_not_to(two_nodes):
    """MIGRT_RESTORE_ARM=0: the destination starts runc restore once the images are
    there, as before (the comparison the benchmark makes)."""
    n = two_nodes
    ag = n.agent()
    n.source()
    p, rep = n.migrate(ag, "ctr", bundle=n.dest_bundle(), more_env={"MIGRT_RESTORE_ARM": "0"})
    assert p.returncode == 0, p.stderr + ag.log()
    assert "restore_armed" not in rep
    assert "armed" not in rep["downtime"]["restore"]
    assert "restore gate" not in restore_log_of(n)[1]
    assert n.b.state("ctr")["status"] == "running"


def test_migration_ended_before_the_freeze_stops_the_armed_restore(two_nodes, tmp_path):
    """migrate dies after the destination armed its restore and before the freeze: the
    agent stops that restore at CRIU's gate. Node B has no container, its bundle's
    config.json is byte for byte what it was, no work dir or staged copy is left, and
    the source runs on."""
    n = two_nodes
    fp = tmp_path / "fp"
    fp.mkdir()
    ag = n.agent()
    _, out = n.source()
    dest = n.dest_bundle()
    with open(os.path.join(dest, "config.json"), "rb") as f:
        before = f.read()
    mig = n.migrate(ag, "ctr", bundle=dest, spawn=True, more_env={
        "MIGRT_FAILPOINTS": "migrate.dump-armed=kill", "MIGRT_FAILPOINT_DIR": str(fp)})
    mig.communicate(timeout=120)
    assert mig.returncode == -signal.SIGKILL, mig.returncode
    assert "restore armed as ctr" in ag.log()
    ocitest.wait_for(lambda: "armed restore stopped" in ag.log(), timeout=30,
                     what="the agent stopping the armed restore")
    assert_destination_clean(n, ag)
    import psutil
    with open(os.path.join(dest, "config.json"), "rb") as f:
        assert f.read() == before
    assert not os.path.exists(os.path.join(n.b.root, "ctr"))
    assert not [p for p in psutil.process_iter(["cmdline"])
                if "restore" in " ".join(p.info["cmdline"] or []) and n.b.root in
                " ".join(p.info["cmdline"] or [])], "a runc restore left behind"
    assert_source_running(n, out)


def test_armed_restorer_killed_before_the_freeze_restores_as_usual(two_nodes, tmp_path):
    """The destination's armed restorer (`migrt run` waiting for its go, its runc and
    CRIU at CRIU's gate) is killed while the source still runs: CRIU stops at its gate
    (its holder is gone), and on `restore` the agent restores as if nothing had been
    armed. The migration completes, one copy runs, on node B."""
    n = two_nodes
    fp = tmp_path / "fp"
    fp.mkdir()
    ag = n.agent()
    _, out = n.source()
    mig = n.migrate(ag, "ctr", bundle=n.dest_bundle(), spawn=True, more_env={
        "MIGRT_FAILPOINTS": "migrate.dump-armed=pause(3)", "MIGRT_FAILPOINT_DIR": str(fp)})
    ocitest.wait_for(lambda: os.listdir(fp) or mig.poll() is not None, timeout=60,
                     what="the dump armed (and the restore before it)")
    assert mig.poll() is None, mig.communicate()
    assert "restore armed as ctr" in ag.log()
    import psutil
    # the armed runc restore (its stand-in images dir) and its parent, the restorer
    runcs = [p for p in psutil.process_iter(["cmdline"])
             if "images-to-come" in " ".join(p.info["cmdline"] or [])
             and n.b.root in " ".join(p.info["cmdline"] or [])]
    assert len(runcs) == 1, runcs
    restorer = runcs[0].parent()
    assert "run" in restorer.cmdline() or "migrt" in " ".join(restorer.cmdline())
    restorer.kill()
    stdout, stderr = mig.communicate(timeout=120)
    assert mig.returncode == 0, stdout + stderr + ag.log()
    rep = json.loads(stdout)
    assert rep["restore_armed"] == "yes"
    assert "armed" not in rep["downtime"]["restore"], rep["downtime"]["restore"]
    assert "armed restore not used (its restorer is gone)" in ag.log()
    assert n.a.state("ctr") is None
    assert n.b.state("ctr")["status"] == "running"
    last = ocitest.last_count(out)
    assert dest_count(n) >= last
