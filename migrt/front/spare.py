"""A restorer started ahead of time, so that a migration's downtime does not pay for it.

The agent restores a migrated container by running `migrt create` on the marker; a fresh
interpreter and migrt's restore-side imports cost about 0.1 s, all of it inside the
downtime. So the agent keeps one spare: the Python launcher started with
MIGRT_SPARE_FD, which imports the restore path and then waits on a unix socket. When a
restore comes, the agent sends the argv, the environment and the working directory as
JSON with the three stdio descriptors attached (SCM_RIGHTS); the spare takes them as its
own and runs the call exactly as a freshly started `migrt` would (migrt.front.fast.main). If
the socket closes first, the spare exits without doing anything.

The agent side is `Spare`; the waiting side is `wait()`, called by migrt.front.fast.main.
"""
import json
import os
import socket
import subprocess
import sys

# what a marker restore imports after the launcher's own modules
PRELOAD = ("migrt.errors", "migrt.runtime.lifecycle", "migrt.runtime.checkpoints", "migrt.runtime.sources.staged",
           "migrt.agent.staging", "migrt.image", "migrt.plugins", "migrt.plugins.registry",
           "migrt.plugins.config", "migrt.plugins.gate", "migrt.plugins.nodefacts",
           "migrt.plugins.options", "migrt.plugins.proc", "migrt.plugins.record",
           "migrt.runtime.podrules", "migrt.criu.cgyard", "migrt.criu.config", "psutil",
           "shlex", "base64", "resource")
MAX_REQUEST = 1 << 20


def wait(fd):
    """In the spare: preload, block for the request, become that call. Returns its argv."""
    import importlib
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:       # the real call reports whatever is wrong, in its own words
            pass
    try:
        from migrt.plugins import registry
        registry.preload()
    except Exception:
        pass
    try:
        from migrt.criu import features
        features.has(features.LAZY_SOCKET_WAIT)       # a look through CRIU's binary, kept
    except Exception:
        pass
    sock = socket.socket(fileno=fd)
    try:
        msg, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, 3)
    except OSError:
        os._exit(0)
    finally:
        sock.close()
    if not msg or len(fds) != 3:
        os._exit(0)             # the agent discarded this spare
    req = json.loads(msg)
    for target, f in enumerate(fds):
        os.dup2(f, target)
        os.close(f)
    os.chdir(req.get("cwd") or "/")
    os.environ.clear()
    os.environ.update(req["env"])
    sys.argv[1:] = req["argv"]
    return list(req["argv"])


def launcher_for(runtime):
    """The Python launcher behind a `migrt` executable (None if there is none)."""
    for cand in ((runtime + "-python", runtime) if runtime else ()):
        try:
            with open(cand, "rb") as f:
                head = f.read(4096)
        except OSError:
            continue
        if head.startswith(b"#!") and b"python" in head.split(b"\n", 1)[0] \
                and b"from migrt.front.fast import main" in head:
            return cand
    return None


class Spare:
    """The agent's side: one pre-started launcher, used once."""

    def __init__(self, launcher):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = dict(os.environ, MIGRT_SPARE_FD=str(theirs.fileno()))
            self.proc = subprocess.Popen([launcher], pass_fds=(theirs.fileno(),), env=env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            mine.close()
            raise
        finally:
            theirs.close()
        self.sock = mine

    def alive(self):
        return self.proc.poll() is None

    def run(self, argv, env, stdio, cwd="/"):
        """Hand over the call; returns the Popen of the process now running it."""
        req = json.dumps({"argv": list(argv), "env": dict(env), "cwd": cwd}).encode()
        try:
            socket.send_fds(self.sock, [req], list(stdio))
        finally:
            self.sock.close()
        return self.proc

    def discard(self):
        self.sock.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
