"""rdma: the migration notification protocol (wait-before-stop), for RDMA workloads
and any workload that asks for it.

An RDMA NIC holds a process's queue pairs and registered memory; CRIU cannot dump
them. So before the freeze migrt tells the workload a migration is coming and waits,
bounded, until it says it has drained its in-flight work and released the device;
after restore it tells the workload where it now runs so it can reconnect. Without an
acknowledgement the checkpoint is refused and the source keeps running.

The protocol (docs/plugins.md has the workload's side): the workload names a directory
inside its container with MIGRT_NOTIFY=<dir> in process.env (or the annotation
io.migrt.rdma.notify). migrt writes <dir>/event atomically (rename), as KEY=VALUE lines
that a shell can source:
    seq=<number>  event=prepare|resumed|restored  node=<host name>  ...
`prepare` must be answered by writing the same seq into <dir>/ack within the timeout;
`resumed` means the checkpoint or migration did not happen (or left the container
running): carry on here; `restored` means the container now runs on node=<name>.
"""
import atexit
import os
import socket
import time

from migrt.errors import MigrtError, RefusedError
from migrt.plugins import Plugin, proc

EVENT = "event"
ACK = "ack"


def _clean(v):
    return "".join(c for c in str(v) if c.isalnum() or c in "._:-/@,[]") or "-"


def _lines(event, fields):
    seq = time.time_ns() // 1000
    return seq, [f"seq={seq}", f"event={event}"] + [f"{k}={_clean(v)}" for k, v in fields.items()
                                                   if v is not None]


def post_event(d, lines):
    """Write <d>/event atomically. Runs in the container's root (proc.in_root)."""
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, ".event.migrt-tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(d, EVENT))
    return True


def prepare_and_wait(d, lines, seq, timeout):
    """Post `prepare`, wait for <d>/ack to hold its seq: the seconds it took, or None."""
    try:
        os.unlink(os.path.join(d, ACK))
    except FileNotFoundError:
        pass
    post_event(d, lines)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            with open(os.path.join(d, ACK)) as f:
                if f.read().strip() == str(seq):
                    return round(time.monotonic() - t0, 3)
        except OSError:
            pass
        time.sleep(0.02)
    return None


def write_event(pid, d, event, **fields):
    """Tell the workload `event` (in its own root: its links cannot point us out)."""
    seq, lines = _lines(event, fields)
    if pid is None:            # a plain directory (tests, tools)
        post_event(d, lines)
    else:
        proc.in_root(pid, post_event, d, lines)
    return seq


def _dir(ctx):
    d = ctx["options"].get("notify")
    if d and not d.startswith("/"):
        raise RefusedError(f"rdma: MIGRT_NOTIFY={d} must be an absolute path in the container")
    return d


def _rdma_devices(spec):
    out = []
    for d in ((spec or {}).get("linux") or {}).get("devices") or []:
        if isinstance(d, dict) and str(d.get("path", "")).startswith("/dev/infiniband/"):
            out.append(d["path"])
    return out


class Rdma(Plugin):
    name = "rdma"
    description = "tell the workload before the freeze and after restore (MIGRT_NOTIFY)"
    order = 40
    detect = {"devices": ["/dev/infiniband/*"], "env": ["MIGRT_NOTIFY"],
              "annotations": ["io.migrt.rdma.notify"]}
    options = {
        "notify": {"type": "string", "default": "",
                   "description": "directory in the container for the notification files "
                                  "(MIGRT_NOTIFY)"},
        "timeout": {"type": "number", "default": 10, "minimum": 0.1,
                    "description": "seconds to wait for the workload's acknowledgement"},
        "require": {"type": "boolean", "default": True,
                    "description": "refuse when the workload does not acknowledge"},
    }

    def __init__(self):
        self._pending = {}

    def _notify_opt(self, ctx):
        if not ctx["options"].get("notify"):
            env = proc.spec_env(ctx.get("spec"))
            if env.get("MIGRT_NOTIFY"):
                ctx["options"]["notify"] = env["MIGRT_NOTIFY"]
        return ctx["options"].get("notify")

    def _check_listening(self, ctx):
        if not self._notify_opt(ctx):
            devs = _rdma_devices(ctx.get("spec"))
            raise RefusedError(
                f"rdma: the container uses {', '.join(devs) or 'RDMA devices'} but does not "
                f"take migration notices (set MIGRT_NOTIFY=<dir> in its env and acknowledge "
                f"them); nothing was frozen")

    def pre_migrate(self, ctx):
        self._check_listening(ctx)

    def pre_checkpoint(self, ctx):
        if ctx.get("mode") == "pre-dump":
            return
        self._check_listening(ctx)
        pid = proc.init_pid(ctx)
        if not pid:
            raise RefusedError(f"rdma: cannot find the init process of {ctx['cid']}")
        d = _dir(ctx)
        timeout = float(ctx["options"]["timeout"])
        dest = ctx.get("destination")
        if isinstance(dest, dict):
            dest = dest.get("address")
        seq, lines = _lines("prepare", {"node": socket.gethostname(), "mode": ctx.get("mode"),
                                        "timeout": timeout, "destination": dest})
        try:
            took = proc.in_root(pid, prepare_and_wait, d, lines, seq, timeout)
        except OSError as e:
            raise RefusedError(f"rdma: cannot post the migration notice in {d}: "
                               f"{e.strerror or e}; nothing was frozen")
        if took is not None:
            ctx["rdma_ack_seconds"] = took
            # Should the checkpoint fail without a post-checkpoint from the core, the
            # drained workload still hears that it may carry on.
            self._pending[ctx["cid"]] = d
            atexit.register(self._resume_if_pending, ctx["cid"], pid)
            return
        if not ctx["options"].get("require"):
            return
        write_event(pid, d, "resumed", node=socket.gethostname(), reason="no-ack")
        raise RefusedError(
            f"rdma: the workload did not acknowledge the migration notice in "
            f"{d} within {timeout:g} s; nothing was frozen and "
            f"{ctx['cid']} keeps running here")

    def _resume_if_pending(self, cid, pid):
        d = self._pending.pop(cid, None)
        if d and os.path.exists(f"/proc/{pid}"):
            try:
                write_event(pid, d, "resumed", node=socket.gethostname(), reason="failed")
            except Exception:
                pass

    def post_checkpoint(self, ctx):
        self._pending.pop(ctx["cid"], None)
        if ctx.get("mode") == "pre-dump" or not self._notify_opt(ctx):
            return
        if ctx.get("mode") == "dump" and not ctx.get("error"):
            return     # the container is gone; its next word comes after restore
        pid = proc.init_pid(ctx)
        if pid:
            try:
                write_event(pid, _dir(ctx), "resumed", node=socket.gethostname(),
                            reason="failed" if ctx.get("error") else "left-running")
            except Exception:
                pass

    def post_restore(self, ctx):
        if not self._notify_opt(ctx):
            return
        pid = proc.init_pid(ctx)
        try:
            write_event(pid, _dir(ctx), "restored", node=socket.gethostname(),
                        devices=",".join(_rdma_devices(ctx.get("spec"))) or None)
        except (OSError, MigrtError) as e:
            raise MigrtError(f"rdma: cannot tell the restored workload where it runs: {e}")


plugin = Rdma
