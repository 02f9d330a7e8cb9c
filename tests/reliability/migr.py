"""Two simulated nodes on one machine and an agent between them, for migration tests.

Node A and node B are runc roots of their own; the agent of node B listens on loopback
with a shared secret, stages into the test's own dirs and restores into node B's root.
Everything a test starts is tracked and killed at the end.
"""
import json
import os
import signal
import socket
import subprocess
import time

import ocitest


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def write_secret(path, value=None):
    value = value or os.urandom(24).hex()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return path


class Agent:
    """`migrt agent` as a child process, on 127.0.0.1 and a free port."""

    def __init__(self, launcher, tmp, name, restore_root, secret_file, quota=None, ttl=600,
                 env=None, port=None, user=None):
        self.launcher = launcher
        self.dir = os.path.join(tmp, f"agent-{name}")
        self.staging = os.path.join(self.dir, "staging")
        self.disk = os.path.join(self.dir, "disk")
        self.logs = os.path.join(self.dir, "logs")
        self.restore_root = restore_root
        self.secret_file = secret_file
        self.quota = quota
        self.ttl = ttl
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = dict(os.environ, MIGRT_STAGING=self.staging, **(env or {}))
        self.user = user
        self.proc = None
        self.stderr_path = os.path.join(self.dir, "agent.stderr")
        os.makedirs(self.dir, exist_ok=True)

    def start(self):
        argv = [self.launcher, "agent", "--listen", self.address, "--secret-file",
                self.secret_file, "--staging", self.staging, "--disk", self.disk,
                "--restore-root", self.restore_root, "--log-dir", self.logs,
                "--ttl", str(self.ttl)]
        if self.quota:
            argv += ["--quota", str(self.quota)]
        if self.user:
            argv += ["--user", self.user]
        self.err = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.err, env=self.env, start_new_session=True)
        line = self.proc.stdout.readline().decode()
        assert "listening" in line, f"agent did not start: {line!r} {self.log()}"
        return self

    def log(self):
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(30)
        if self.proc and self.proc.poll() is not None:
            self.proc.stdout.close()
            self.err.close()

    def stop(self):
        self.kill(signal.SIGTERM)
        if self.proc and self.proc.poll() is None:
            self.kill()
        ocitest.unmount_staging(self.staging)     # what a SIGKILL left (migrt.agent.stagefs)

    def restart(self, env=None):
        """Start again on the same port and dirs (after a kill)."""
        self.kill()
        if env is not None:
            self.env = dict(os.environ, MIGRT_STAGING=self.staging, **env)
        return self.start()

    def staged_data(self):
        """Staged image and rootfs files (the small migration records do not count)."""
        return [p for p in self.staged_files()
                if os.path.basename(p) not in ("migration.json", "create.log")]

    def staged_files(self):
        out = []
        for top in (self.staging, self.disk):
            for dirpath, _, names in os.walk(top):
                out += [os.path.join(dirpath, n) for n in names]
        return out


class Nodes:
    """Node A (source) and node B (destination, with an agent)."""

    def __init__(self, launcher, tmp, make_bundle):
        self.launcher = launcher
        self.tmp = str(tmp)
        self.make_bundle = make_bundle
        self.a = ocitest.Runtime(launcher, os.path.join(self.tmp, "root-a"))
        self.b = ocitest.Runtime(launcher, os.path.join(self.tmp, "root-b"))
        self.a._stdin, self.b._stdin = [], []
        self.secret_file = write_secret(os.path.join(self.tmp, "secret"))
        self.agents = []
        self.procs = []

    def agent(self, **kw):
        ag = Agent(self.launcher, self.tmp, f"b{len(self.agents)}", self.b.root,
                   self.secret_file, **kw).start()
        self.agents.append(ag)
        return ag

    def counter(self, extra_env=(), src_annotations=None, dest_annotations=None):
        """A running counter on node A and an empty destination bundle for node B."""
        cid = ocitest.uid("mg")
        bundle = self.make_bundle(["sh", "-c", ocitest.COUNTER], name=cid, env=list(extra_env),
                                  annotations=src_annotations)
        dest = self.make_bundle(["sh", "-c", ocitest.COUNTER], name=cid + "-dst",
                                env=list(extra_env), annotations=dest_annotations)
        rc, out, err = self.a.create(cid, bundle, start=True)
        assert rc == 0, err.text
        ocitest.wait_for(lambda: ocitest.last_count(out) >= 3, what="counter on node A")
        return cid, bundle, dest, out

    def migrate_argv(self, cid, dest, agent, *extra, secret_file=None):
        return [self.launcher, "--root", self.a.root, "migrate", cid, "--to", agent.address,
                "--secret-file", secret_file or self.secret_file, "--bundle", dest,
                "--dest-root", self.b.root, "--json", *extra]

    def migrate(self, cid, dest, agent, *extra, timeout=120, **kw):
        p = subprocess.run(self.migrate_argv(cid, dest, agent, *extra, **kw),
                           capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        report = None
        if p.returncode == 0:
            report = json.loads(p.stdout)
        return p, report

    def spawn_migrate(self, cid, dest, agent, *extra, env=None, to=None):
        argv = self.migrate_argv(cid, dest, agent, *extra)
        if to:
            argv[argv.index("--to") + 1] = to
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, start_new_session=True,
                             env=dict(os.environ, **(env or {})))
        self.procs.append(p)
        return p

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for ag in self.agents:
            ag.stop()
        for rt in (self.a, self.b):
            for cid in rt.ids():
                rt.run("resume", cid)
                rt.run("delete", "--force", cid)
            rt.cleanup()


def copies(nodes, cid):
    """{"a": status or None, "b": status or None}."""
    return {"a": (nodes.a.state(cid) or {}).get("status"),
            "b": (nodes.b.state(cid) or {}).get("status")}


def dest_numbers(agent, cid):
    """What the restored container printed on node B (the agent keeps its stdout)."""
    try:
        with open(os.path.join(agent.logs, f"{cid}.log")) as f:
            return [int(x) for x in f.read().split() if x.isdigit()]
    except OSError:
        return []


def wait_dest_counting(agent, cid, after, timeout=15):
    ocitest.wait_for(lambda: len([n for n in dest_numbers(agent, cid) if n > after]) >= 3,
                     timeout=timeout, what=f"{cid} counting on node B")
    nums = dest_numbers(agent, cid)
    return nums


class Proxy:
    """A TCP forwarder between `migrt migrate` and the agent that a test can cut.

    cut() resets every connection through it (RST, as a dead link or a firewall would);
    block(True) resets new connections until block(False); cut_after(n) cuts everything
    once n bytes have gone from the source to the agent.
    """

    def __init__(self, target_port):
        import threading
        self.target = ("127.0.0.1", target_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.conns = []
        self.blocked = False
        self.limit = None
        self.forwarded = 0
        self.cuts = 0
        self.closed = False
        self.captured = None           # bytearray(): keep what the source sends
        self.flip = None               # upstream offset of one byte to flip (flip_at)
        self.flipped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading
        while not self.closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            if self.blocked:
                _reset(c)
                continue
            try:
                t = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(c)
                continue
            with self.lock:
                self.conns += [c, t]
            threading.Thread(target=self._pump, args=(c, t, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(t, c, False), daemon=True).start()

    def _pump(self, a, b, upstream):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                if upstream:
                    with self.lock:
                        start = self.forwarded
                        self.forwarded += len(data)
                        if self.flip is not None and start <= self.flip < self.forwarded:
                            data = bytearray(data)
                            data[self.flip - start] ^= 0x01
                            data = bytes(data)
                            self.flip, self.flipped = None, True
                        if self.captured is not None and len(self.captured) < 256 << 20:
                            self.captured += data
                        over = self.limit is not None and self.forwarded >= self.limit
                    if over:
                        self.cut()
                        return
                b.sendall(data)
        except OSError:
            pass
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self):
        with self.lock:
            conns, self.conns = self.conns, []
            self.cuts += 1
        for c in conns:
            _reset(c)

    def cut_after(self, nbytes):
        with self.lock:
            self.limit = self.forwarded + nbytes

    def flip_at(self, nbytes):
        """Flip one bit of the byte nbytes further on in what the source sends (a
        damaged packet that TCP's checksum let through)."""
        with self.lock:
            self.flip = self.forwarded + nbytes

    def block(self, on=True):
        self.blocked = on

    def close(self):
        self.closed = True
        self.sock.close()
        self.cut()


def _reset(s):
    """Reset a connection. shutdown() first: close() alone does not interrupt a pump
    thread blocked in recv() on it, and the socket would stay open."""
    import struct
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


ACTION_SCRIPT = """#!/bin/sh
# CRIU action script of the fault tests: at the action named in $DIR/want, the first
# time, record CRIU's pid and wait, so that the test can kill CRIU at exactly that step.
DIR=%s
if [ "$CRTOOLS_SCRIPT_ACTION" = "$(cat $DIR/want 2>/dev/null)" ] && \
        mkdir $DIR/fired 2>/dev/null; then
    echo $$ > $DIR/script.pid
    echo $PPID > $DIR/criu.pid
    exec sleep 30
fi
exit 0
"""


def criu_hook(tmp, action):
    """An org.criu.config annotation whose action script stops CRIU at `action`."""
    d = os.path.join(str(tmp), "criu-hook")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "want"), "w") as f:
        f.write(action)
    script = os.path.join(d, "script.sh")
    with open(script, "w") as f:
        f.write(ACTION_SCRIPT % d)
    os.chmod(script, 0o755)
    conf = os.path.join(d, "criu.conf")
    with open(conf, "w") as f:
        f.write(f"action-script {script}\n")
    return d, {"org.criu.config": conf}


def leaks_processes(cid, word=None):
    """Processes whose command line names the container (runc checkpoint, migrate...),
    and `word` too if given (b"checkpoint": the container's runc checkpoint)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if cid.encode() in args and b"migrate" not in args[:4] and \
                (word is None or word in args):
            out.append(int(d))
    return out


def kill_tree_of(path):
    """SIGKILL every process whose command line names `path`, and its descendants."""
    import psutil
    victims = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and any(path in a for a in p.info["cmdline"] or []):
                victims += [p] + p.children(recursive=True)
        except psutil.Error:
            continue
    for p in victims:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=10)
    return [p.pid for p in victims]


def umount_under(path):
    """Unmount what is mounted under path (deepest first); returns what was."""
    import leaks
    found = sorted(leaks.mounts(path, staging=True), key=len, reverse=True)
    for mp in found:
        subprocess.run(["umount", "-l", mp], capture_output=True)
    return found
