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
                 env=None, port=None):
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
        self.err = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.err, env=self.env, start_new_session=True)
        line = self.proc.stdout.readline().decode()
        assert "listening" in line, f"agent did not start: {line!r} {self.log()}"
        return self

    def log(self):
        try:
            return open(self.stderr_path, errors="replace").read()
        except OSError:
            return ""

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(30)

    def stop(self):
        self.kill(signal.SIGTERM)
        if self.proc and self.proc.poll() is None:
            self.kill()

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

    def counter(self, extra_env=()):
        """A running counter on node A and an empty destination bundle for node B."""
        cid = ocitest.uid("mg")
        bundle = self.make_bundle(["sh", "-c", ocitest.COUNTER], name=cid, env=list(extra_env))
        dest = self.make_bundle(["sh", "-c", ocitest.COUNTER], name=cid + "-dst",
                                env=list(extra_env))
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

    def spawn_migrate(self, cid, dest, agent, *extra):
        p = subprocess.Popen(self.migrate_argv(cid, dest, agent, *extra),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, start_new_session=True)
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
