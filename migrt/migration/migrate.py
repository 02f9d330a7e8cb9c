"""`migrt migrate`: move a running container to another node's agent, losing nothing.

The source is frozen (`runc pause`, the cgroup freezer), dumped with `--leave-running`
(so the frozen processes stay, and cannot change anything after the dump), streamed to
the agent while the dump is written, restored there, and only then deleted here. Any
failure before the destination confirms resumes the source (`runc resume`) and drops
the staged copy: never both copies running, never neither.

Modes: full (one dump during the freeze), precopy (a first dump while running, then
only the blocks that changed), lazy (memory served on demand by a CRIU page server
here after the destination already runs; a failure after that point cannot be rolled
back).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from migrt.criu import config as criuconf
from migrt.criu import failpoints
from migrt.criu import gate as dumpgate
from migrt.criu import netlock
from migrt.migration import handover, recovery
from migrt.errors import EXIT_ROLLED_BACK, MigrtError, RefusedError
from migrt.image import manifest as mf
from migrt.transfer import wire
from migrt.transfer.sender import PagePipes, Sender, TransferError, manifest_files
from migrt.runc import quick_pids
from migrt.safeio import makedirs_private


class MigrationFailed(MigrtError):
    """The migration failed and the source was resumed."""

    exit_code = EXIT_ROLLED_BACK


class MigrationInDoubt(MigrtError):
    """The destination's outcome is unknown; the source is left frozen, not resumed."""

    exit_code = 5


class MigrationUnfinished(MigrtError):
    """Interrupted once the destination ran the container: it stays there, and the
    source's release is left to recovery (its journal)."""

    exit_code = 6


class Interrupted(BaseException):
    """SIGTERM or SIGHUP during a migration: unwound like Ctrl-C, so that the source is
    resumed, or the migration finished if the destination already runs the container."""


def _interrupt(signum, frame):
    raise Interrupted(f"interrupted ({signal.Signals(signum).name})")


def _interruption(e):
    """The reason an interrupt gives (Ctrl-C or a signal), None for other exceptions."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (SIGINT)"
    return str(e) if isinstance(e, Interrupted) else None


MAX_PAGE_FIFOS = 128
# a lazy dump with more page images than this says so (a stack's few pages stay below)
LAZY_PAGED_WARN = 1 << 20

RESTORE_FLAGS = ("--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks")


class Options:
    def __init__(self, to, secret, streams=4, level=1, mode="full", bundle=None,
                 dest_root=None, new_id=None, wait=300.0, progress=False,
                 page_server_port=0, criu_flags=(), rootfs_base=None, keep_image=False,
                 tcp_established=None, file_locks=None, skip_in_flight=True,
                 mid=None, restored_file=None, handoff=False, hold_source=None,
                 hold_timeout=120.0, precopy=False):
        self.to = to
        # lazy mode only: a pre-copy round first (the memory sent while the container
        # runs); after the restore only the pages that changed since come over the wire
        self.precopy = precopy
        # once the copy runs on the destination, the source stays frozen until this file
        # exists (at most hold_timeout seconds), then goes: the caller (migrt.kube, a Job
        # pod with restartPolicy Never) takes the old pod out of its Job meanwhile
        self.hold_source = hold_source
        self.hold_timeout = hold_timeout
        # stage only: once the destination keeps the staged copy, the source goes; the
        # restore comes later, from a create with the marker (a StatefulSet pod's
        # replacement, migrt.kube.statefulset), and a failed one can be tried again
        self.handoff = handoff
        self.mid = mid          # chosen by the caller (a pod on the destination waits for it)
        # written once the copy runs on the destination, before the source is released
        # (lazy mode: before its page server has sent the memory); the agent passes it
        # on to its caller (migrt.kube switches a Service's endpoints on it)
        self.restored_file = restored_file
        self.secret = secret
        self.streams = streams
        self.level = level
        self.mode = mode
        self.bundle = bundle
        self.dest_root = dest_root
        self.new_id = new_id
        self.wait = wait
        self.progress = progress
        self.page_server_port = page_server_port
        self.criu_flags = list(criu_flags)
        self.rootfs_base = rootfs_base
        self.keep_image = keep_image
        # None: decided per migration (tcp: whether the container's IP moves with it;
        # file locks: whether its processes hold any, read once they are frozen)
        self.tcp_established = tcp_established
        self.file_locks = file_locks
        self.skip_in_flight = skip_in_flight


class Progress:
    """A one-line progress bar on stderr (only on a terminal) while bytes move.

    The total is the memory estimate, not the image's size, which is only known at the
    end: done() draws the bar full with what was really sent, so that it does not stop
    short (27 of 30 marks at 1 GiB) when the image came out smaller than estimated."""

    def __init__(self, total, enabled, stream=None, status=None):
        self.stream = stream or sys.stderr
        self.total = max(total, 1)
        self.enabled = enabled and self.stream.isatty()
        self.t0 = time.monotonic()
        self.last = 0.0
        self.phase = ""
        self.stats = None
        self.status = status
        if status is not None and self.enabled:
            status.hold(True)

    def _draw(self, stats, frac):
        now = time.monotonic()
        bar = "#" * int(frac * 30)
        rate = stats.raw / max(now - self.t0, 1e-3) / 1e6
        self.stream.write(f"\r{self.phase:<9} [{bar:<30}] {stats.raw >> 20:>6} MiB "
                          f"({stats.wire >> 20} MiB on the wire) {rate:7.1f} MB/s ")
        self.stream.flush()

    def __call__(self, stats):
        if not self.enabled:
            return
        self.stats = stats
        now = time.monotonic()
        if now - self.last < 0.1:
            return
        self.last = now
        self._draw(stats, min(1.0, stats.raw / self.total))

    def done(self, ok=True):
        if not self.enabled:
            return
        if ok and self.stats is not None:
            self._draw(self.stats, 1.0)
            self.stream.write(f"{time.monotonic() - self.t0:6.2f}s\n")
        else:
            self.stream.write("\r" + " " * 100 + "\r")
        self.stream.flush()
        if self.status is not None:
            self.status.hold(False)


class Status:
    """The phase a migration is in, on one line of a terminal, with its running time:
    the phases that move no bytes (pre-checks, freeze, verification, restore on the
    destination, memory fill, release) show too. Each finished phase keeps its line."""

    def __init__(self, enabled, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.lock = threading.Lock()
        self.phase = None
        self.t0 = 0.0
        self.held = False
        self.stopped = threading.Event()
        if self.enabled:
            threading.Thread(target=self._tick, daemon=True).start()

    def _line(self, end=""):
        self.stream.write(f"\r{self.phase:<34} {time.monotonic() - self.t0:6.2f}s{end}")
        self.stream.flush()

    def set(self, phase):
        if not self.enabled:
            return
        with self.lock:
            if phase == self.phase:
                return
            if self.phase and not self.held:
                self._line("\n")
            self.phase, self.t0 = phase, time.monotonic()
            if not self.held:
                self._line()

    def hold(self, on):
        """A byte progress bar owns the line meanwhile."""
        with self.lock:
            if on and not self.held and self.phase:
                self._line("\n")
            self.held = on
            if not on:
                self.phase = None

    def close(self):
        if not self.enabled:
            return
        self.stopped.set()
        with self.lock:
            if self.phase and not self.held:
                self._line("\n")
            self.phase = None

    def _tick(self):
        while not self.stopped.wait(0.2):
            with self.lock:
                if self.phase and not self.held:
                    self._line()


class Source:
    """The container on this node, driven through runc."""

    nprocs = 1      # processes, as counted by memory_estimate()

    def __init__(self, runc, root, cid):
        self.runc = runc
        self.root = root
        self.cid = cid

    def run(self, *args, timeout=600):
        return subprocess.run([self.runc, "--root", self.root, *args], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=timeout)

    def state(self):
        p = self.run("state", self.cid)
        if p.returncode != 0:
            raise RefusedError(f"container {self.cid}: {p.stderr.strip() or 'not found'}")
        return json.loads(p.stdout)

    def pids(self):
        quick = quick_pids(self.root, self.cid)     # a runc start-up less, in the downtime
        if quick is not None:
            return quick
        p = self.run("ps", "--format", "json", self.cid)
        try:
            return json.loads(p.stdout) or []
        except ValueError:
            return []

    def memory_estimate(self):
        """USS of the container's processes; also counts them (self.nprocs)."""
        import psutil
        total = 0
        pids = self.pids()
        self.nprocs = len(pids)
        for pid in pids:
            try:
                mi = psutil.Process(pid).memory_full_info()
                total += getattr(mi, "uss", 0) or mi.rss
            except (psutil.Error, OSError):
                pass
        return total


def runc_binary():
    from migrt.runc import runc_path
    return runc_path()


def _restore_record(root, cid):
    """migrt's record of a container it restored (migrt.runtime.lifecycle), or None."""
    from migrt.runc import RECORD
    try:
        with open(os.path.join(root, cid, RECORD)) as f:
            rec = json.load(f)
        return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):
        return None


def _state_dir():
    return os.environ.get("MIGRT_STATE_DIR", "/run/migrt")


def _work_base():
    return os.path.join(_state_dir(), "migrate")


KEPT_LOGS = 40           # CRIU logs of failed migrations kept in <state>/failed


def _kept_dir():
    return os.path.join(_state_dir(), "failed")


def _kept_log(mid, name):
    """Where the CRIU log `name` of a failed migration is kept once its work dir goes."""
    return os.path.join(_kept_dir(), f"{mid}-{name}")


def _keep_logs(work, mid):
    """Read the CRIU logs of a failed migration's work dir (before it is removed)."""
    logs = {}
    for sub in ("work", "work1"):            # the dump, and pre-copy's first round
        try:
            with open(os.path.join(work, sub, "dump.log"), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - (1 << 20)))
                logs[_kept_name(sub)] = f.read()
        except OSError:
            pass
    return logs


def _kept_name(sub):
    return "dump.log" if sub == "work" else f"{sub}-dump.log"


def _write_kept_logs(mid, logs):
    if not logs:
        return
    d = _kept_dir()
    try:
        makedirs_private(d)
        for name, data in logs.items():
            with open(os.open(_kept_log(mid, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                              0o600), "wb") as f:
                f.write(data)
        old = sorted(os.listdir(d), key=lambda n: os.path.getmtime(os.path.join(d, n)))
        for n in old[:-KEPT_LOGS]:
            os.unlink(os.path.join(d, n))
    except OSError:
        pass                  # the disk that failed the dump may still be full


def _full_disk(path, errs):
    """Say so when the dump's filesystem is full: CRIU's own log, on the same disk, may
    not have been able to record it, or only part of its line (cut where the disk
    filled: "No space left on devi")."""
    if any("No space left on device" in e for e in errs):
        return ""
    try:
        st = os.statvfs(path)
    except OSError:
        return ""
    if st.f_bavail * st.f_frsize < (1 << 20):
        return f"; {path}: No space left on device (its filesystem is full)"
    return ""


def _criu_log_errors(path):
    try:
        from migrt.runtime.lifecycle import criu_errors
        return criu_errors(path)
    except ImportError:
        return []


class Migration:
    @property
    def phase(self):
        return self._phase

    @phase.setter
    def phase(self, value):
        self._phase = value
        status = getattr(self, "status", None)
        if status is not None:
            status.set(value)

    def __init__(self, root, cid, opts):
        self.opts = opts
        self.status = Status(opts.progress)
        self.src = Source(runc_binary(), root, cid)
        self.cid = cid
        self.report = {"container": cid, "to": opts.to, "mode": opts.mode,
                       "streams": opts.streams, "zstd_level": opts.level, "phases": {},
                       "bytes": {}}
        self.phases = self.report["phases"]
        self.paused = False
        self.ctl = None
        self.mid = None
        self.work = None
        self.phase = "pre-checks"
        self.restore_sent = False
        self.restore_confirmed = False
        self.lazy_proc = None
        self.lazy_ranges = False
        self.lazy_criu_env = {}         # CRIU's own switches for the lazy dump (precheck)
        self.lazy_precopy = False       # --precopy --lazy, both CRIUs able (precheck)
        self.precopy_files = {}         # what that pre-copy sent, in parent/
        self.netlock = None             # CRIU's default until the precheck chooses
        self.dump_started = False
        self.dump_thread = None
        self.filling = False
        self.hold = None                # migrt's lock on the source's network (handover)
        self.criu_conf = []             # CRIU options runc has no flag for (criu.config)
        self.armed = None               # runc checkpoint started before the freeze (_arm_dump)
        self.will_hold = False          # freeze() will take a hold (known before it does)

    # ------------------------------------------------------------ helpers
    def _t(self, name, t0):
        self.phases[name] = round(time.monotonic() - t0, 4)

    def _request(self, msg):
        self.ctl.send_json(msg)
        return self.ctl.read_json()

    def _fail(self, reason):
        """Resume the source, drop the staged copy, raise one clear line."""
        where = self.phase
        resumed = self._rollback()
        tail = ("the source was resumed and keeps running" if resumed
                else "the source was not frozen and keeps running")
        raise MigrationFailed(f"migration of {self.cid} to {self.opts.to} failed during "
                              f"{where}: {reason}; {tail}")

    def _rollback(self):
        self._disarm()          # a runc started before the freeze (_arm_dump), if any
        if getattr(self, "checkpoint_hooks", False):
            self.checkpoint_hooks = False
            try:      # the source goes on: plugins undo (resume CUDA, tell the workload)
                self.plugins.post_checkpoint(os.path.join(self.work, "image"), mode="dump",
                                             work_dir=os.path.join(self.work, "work"),
                                             error=f"migration failed during {self.phase}")
            except Exception:
                pass
        if self.lazy_proc is not None:
            _kill_group(self.lazy_proc)
        for snd in (getattr(self, "lazy_sender", None), getattr(self, "final_sender", None)):
            for c in (snd and snd.conns) or ():
                c.close()
        if self.ctl is not None:
            try:
                self.ctl.send_json({"op": "abort"})
            except OSError:
                pass
            self.ctl.close()
            self.ctl = None
        resumed = False
        self._clear_netlock()
        self._drop_hold()
        if self.paused:
            p = self.src.run("resume", self.cid)
            st = self.src.run("state", self.cid)
            running = p.returncode == 0 or '"status": "running"' in st.stdout
            if not running:
                raise MigrtError(f"migration of {self.cid} failed during {self.phase} and the "
                                 f"source could not be resumed: {p.stderr.strip()} "
                                 f"(state: {st.stdout.strip()[:200]})")
            self.paused = False
            resumed = True
        self._cleanup_local(keep_logs=True)
        if getattr(self, "journal", None):
            self.journal.done()
        return resumed

    def _clear_netlock(self):
        """A CRIU that died between locking and unlocking the network (killed, or
        stopped with its runc) leaves the container cut off: undo that before it resumes."""
        if not self.dump_started:
            return
        th = self.dump_thread
        if th is not None:
            # interrupted mid-dump: CRIU may be waiting on pages nobody reads any more;
            # it fails once this process is gone, and then unlocks by itself
            th.join(3)
            if th.is_alive():
                return
        try:
            removed = netlock.clear(self.state["pid"])
        except (OSError, subprocess.SubprocessError, KeyError) as e:
            self.report["warning"] = f"could not check the source's network lock: {e}"
            return
        if removed:
            self.report["network_unlocked"] = removed

    def _drop_hold(self):
        """Rollback: the source resumes, so its network opens again."""
        if self.hold is None:
            return
        h, self.hold = self.hold, None
        try:
            h.drop()
        except (OSError, subprocess.SubprocessError) as e:
            self.report["warning"] = f"could not remove migrt's network lock of the source: {e}"

    def _plan_network(self, dest):
        """Before anything is frozen: does the container's IP move with it? That decides
        --tcp-established (unless given), and says ONE line when it does not."""
        pid = self.state["pid"]
        try:
            with open(os.path.join(self.bundle, "config.json")) as f:
                spec = json.load(f)
        except (OSError, ValueError):
            spec = {}
        try:
            host = handover.host_netns(pid)
        except OSError as e:
            raise RefusedError(f"container {self.cid}: cannot read its network namespace "
                               f"({e}); nothing was frozen")
        ext = handover.external_netns(spec)
        here = [] if host else _try(lambda: handover.addresses(f"/proc/{pid}/ns/net"), [])
        conns = [] if host else _try(lambda: handover.tcp_connections(pid, ("01",)), [])
        self.external_netns = ext
        dest = dest if isinstance(dest, dict) else {}
        kind = dest.get("netns")
        there = dest.get("addresses") or []
        if host:
            moves, why = False, "it uses this node's own network namespace (host network)"
        elif kind == "path":
            moves = bool(here) and set(here) <= set(there)
            why = (f"it has {', '.join(here) or 'no address'} here and will have "
                   f"{', '.join(there) or 'no address'} on the destination")
        elif kind == "host":
            moves, why = False, "the destination bundle uses its node's network namespace"
        elif not ext:
            # a namespace of its own: CRIU dumps it, addresses included, and the restore
            # makes it again (what the destination bundle says, if no --bundle, only
            # matters if it joins another namespace: then the restore fails and the
            # source resumes)
            moves, why = True, ""
        elif kind == "new":
            moves, why = False, ("the destination bundle gives it a new network namespace, "
                                 "without its addresses")
        else:
            moves, why = False, ("it joins a namespace by path here (a pod's), and the "
                                 "destination's address is not known before its container "
                                 "is created there (no --bundle)")
        tcp = self.opts.tcp_established
        self.report["tcp"] = {"addresses": here, "destination_addresses": there,
                              "ip_moves": moves, "established": len(conns)}
        if tcp is None:
            tcp = moves
        if tcp:
            self.opts.criu_flags.append("--tcp-established")
        elif not host:
            # connections are not migrated: CRIU restores them closed (the peers see a
            # reset and reconnect), rather than refusing the dump
            self.criu_conf.append("tcp-close")
        self.report["tcp"]["mode"] = "established" if tcp else (
            "closed" if not host else "not migrated")
        if not moves:
            if tcp:
                fate = ("--tcp-established was asked for: its restore fails if the "
                        "destination lacks those addresses, and the source then resumes")
            elif host:
                fate = ("they are not migrated: the dump fails if it has any "
                        "(the source then resumes)")
            else:
                fate = ("they are restored closed there (its end sees them fail); their peers must "
                        "reconnect to the new address")
            line = (f"{self.cid}'s IP does not move with it ({why}); its "
                    f"{len(conns)} established TCP connection(s): {fate}")
            self.report["tcp"]["note"] = line
            sys.stderr.write(f"migrt: {line}\n")
            sys.stderr.flush()
        if self.opts.skip_in_flight:
            # a connection the kernel completed but nobody accepted yet cannot be dumped
            # (`inet: In-flight connection`); skipped, its client sees a reset
            if _runc_has_flag(self.src.runc, "--tcp-skip-in-flight"):
                self.opts.criu_flags.append("--tcp-skip-in-flight")
            else:
                self.criu_conf.append("skip-in-flight")

    def _abort_precheck(self):
        """Refused after the destination's precheck: it drops what it staged for us."""
        self.ctl.send_json({"op": "abort"})
        self.ctl.close()
        self.ctl = None

    def _cleanup_local(self, keep_logs=False):
        if self.work and not self.opts.keep_image:
            logs = _keep_logs(self.work, self.mid) if keep_logs else None
            shutil.rmtree(self.work, ignore_errors=True)
            if logs:
                _write_kept_logs(self.mid, logs)

    # ------------------------------------------------------------ phases
    def _hold_container(self):
        """One `migrt migrate` of a container at a time on this node: an flock on a
        file of its own (runc root and id) until this process ends or is done with it.
        Two at once (two schedulers deciding together) both saw it running, and `runc
        pause` twice at the same moment let both freeze, dump and restore it: two
        copies. The second one is refused here, before anything is frozen."""
        import fcntl
        import hashlib
        d = os.path.join(recovery.state_dir(), "locks")
        makedirs_private(d)
        key = hashlib.sha1(f"{os.path.realpath(self.src.root)}\0{self.cid}".encode()).hexdigest()
        path = os.path.join(d, key[:24])
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RefusedError(f"container {self.cid} is being migrated by another `migrt "
                                   f"migrate` on this node; nothing was frozen")
            # its holder removes the file when done (release_lock): a lock taken on a
            # file already removed is no lock, so take the one at the path now
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.lock_fd, self.lock_path = fd, path     # release_lock() when this one is over

    def prechecks(self):
        self._hold_container()
        st = self.src.state()
        if st.get("status") != "running":
            raise RefusedError(f"container {self.cid} is {st.get('status')}, not running")
        self.state = st
        self.bundle = st["bundle"]
        from migrt.runc import criu_path
        if not os.access(criu_path(), os.X_OK):
            raise RefusedError("criu is not installed on this node")
        from migrt.criu import kdat             # CRIU's kernel probes cached, not redone
        kdat.ensure()
        from migrt.criu import cgyard           # the cgroup hierarchies mounted once
        yard = cgyard.ensure(st["pid"])
        self.criu_conf += cgyard.conf_lines(yard)
        self.report["criu_cgroup_yard"] = yard
        if self.opts.mode == "lazy":
            from migrt.criu import lazycheck
            why = lazycheck.problem()
            if why:
                raise RefusedError(f"cannot migrate {self.cid} with --lazy from this node: "
                                   f"{why}; nothing was frozen")
        # a POSIX lock on a file the process maps shared (SQLite in WAL mode) is lost by
        # a CRIU without packaging/criu-patches: the destination, whose CRIU restores,
        # checks its own (and says so in its reply); see map_locks_checked below
        bad = posix_locks_on_shared_maps(self.src.pids())
        if os.environ.get("MIGRT_ALLOW_LOCKED_SHARED_MAPS") == "1":
            bad = []
        est = self.src.memory_estimate()
        self.estimate = int(est * 1.1) + (4 << 20)
        hello = {"op": "control", "container": self.cid}
        req = {"op": "precheck", "container": self.cid, "mode": self.opts.mode,
               "node": mf.node_info(), "estimate": self.estimate,
               "bundle": self.opts.bundle, "root": self.opts.dest_root,
               "id": self.opts.new_id or self.cid,
               # this migrate waits for a lazy restore's memory fill before it lets the
               # source go (an older one would release it, and the staged image, at once)
               "caps": ["fill"]}
        if self.opts.mid:
            req["mid"] = self.opts.mid
        if bad:
            req["map_locks"] = {"pid": bad[0][0], "path": bad[0][1]}
        if self.opts.mode == "lazy":
            # the page server's TLS identity, and the agent's in the reply (migrt.criu.pagetls)
            from migrt.criu import pagetls
            self.page_tls = pagetls.identity(f"migrt page server {self.cid}")
            req["page_tls_cert"] = self.page_tls[1].decode()
            # the stream in frames after the handshake, if both CRIUs can (the agent says)
            req["page_frames"] = pagetls.frames_possible()
        try:
            self.ctl, _ = wire.connect(self.opts.to, self.opts.secret, hello)
            reply = self._request(req)
            from migrt.agent.staging import valid_mid
            if not valid_mid(reply.get("mid")):
                raise wire.ProtocolError("its precheck reply names no migration")
        except (wire.ProtocolError, OSError) as e:
            if self.ctl is not None:
                self.ctl.close()
                self.ctl = None
            raise RefusedError(f"destination {self.opts.to} cannot take {self.cid}: "
                               f"{wire.explain(e)}; nothing was frozen")
        self.mid = reply["mid"]
        theirs = reply.get("criu_features")
        self.dest_criu_features = theirs if isinstance(theirs, list) else []
        if bad and reply.get("map_locks") != "kept":
            # an agent from before the check: this node's CRIU is the best guess
            from migrt.criu import probe
            kept, why = probe.kept_map_locks(criu_path())
            if not kept:
                self._abort_precheck()
                raise RefusedError(
                    f"container {self.cid}: process {bad[0][0]} holds a POSIX lock on "
                    f"{bad[0][1]}, which it also maps shared, and this node's CRIU "
                    f"({criu_path()}) restores such a process without that lock ({why}; "
                    f"an SQLite database in WAL mode would be at risk; packaging/install.sh "
                    f"builds a CRIU that keeps it); nothing was frozen")
        if self.opts.mode == "lazy":
            frames = req["page_frames"] and reply.get("page_frames") is True
            if frames:          # packaging/criu-patches, stream-frames (tls.c)
                self.lazy_criu_env["MIGRT_CRIU_STREAM_FRAMES"] = "1"
            self.report["page_stream"] = ("AES-128-GCM frames keyed from TLS" if frames else
                                          "TLS records")
            try:
                self.page_tls += (pagetls.peer_cert(reply.get("page_tls_cert")),)
            except ValueError as e:
                self._abort_precheck()
                raise RefusedError(f"destination {self.opts.to} cannot take {self.cid} with "
                                   f"--lazy: {e}; nothing was frozen")
            # both CRIUs leave whole VMAs lazy unscanned (migrt.criu.features): the time
            # frozen then does not grow with memory. MIGRT_LAZY_RANGES=0 scans, to compare.
            from migrt.criu import features
            theirs = reply.get("criu_features")
            self.lazy_ranges = (os.environ.get("MIGRT_LAZY_RANGES", "1") != "0"
                                and isinstance(theirs, list) and features.LAZY_RANGES in theirs
                                and features.has(features.LAZY_RANGES))
            self.report["lazy_ranges"] = self.lazy_ranges
            if self.lazy_ranges:
                # mem.c lazy_whole_vma; proc_parse.c smaps_read_early (MIGRT_EARLY_SMAPS=0: not)
                self.lazy_criu_env["MIGRT_CRIU_LAZY_RANGES"] = "1"
                if os.environ.get("MIGRT_EARLY_SMAPS", "1") != "0" \
                        and features.has(features.EARLY_SMAPS):
                    self.lazy_criu_env["MIGRT_CRIU_EARLY_SMAPS"] = "1"
            if self.opts.precopy:
                # the pages compared with the pre-copy's are those of whole-lazy VMAs
                lacks = [w for w, has in (("this node's", features.has(features.LAZY_PARENT)),
                                          ("the destination's", isinstance(theirs, list)
                                           and features.LAZY_PARENT in theirs)) if not has]
                self.lazy_precopy = self.lazy_ranges and not lacks
                self.report["lazy_precopy"] = (
                    "used" if self.lazy_precopy else
                    f"not used: {' and '.join(lacks)} CRIU lacks {features.LAZY_PARENT}" if lacks
                    else "not used: needs lazy ranges (MIGRT_LAZY_RANGES)")
        self.report["migration"] = self.mid
        # plugins may refuse now, before anything is frozen (devices, GPU, isolation...)
        from migrt.plugins.engine import ForContainer
        self.plugins = ForContainer(self.src.root, self.cid)
        try:
            self.plugins.pre_migrate({"address": self.opts.to, "facts": reply.get("facts")})
        except MigrtError:
            self._abort_precheck()
            raise
        try:
            from migrt.plugins import nodefacts
            self.netlock = netlock.choose(nodefacts.collect(), reply.get("facts"))
        except ValueError as e:
            self._abort_precheck()
            raise RefusedError(f"{e}; nothing was frozen")
        self.report["network_lock"] = self.netlock
        try:
            self._plan_network(reply.get("net"))
        except MigrtError:
            self._abort_precheck()
            raise
        if self.opts.level == "auto":
            # compressing for a transfer that never leaves this machine (loopback, or a
            # veth into another network namespace) only takes CPU from CRIU and the agent
            import ipaddress
            peer = self.ctl.sock.getpeername()[0]
            here = mf.boot_id()
            same = ipaddress.ip_address(peer).is_loopback or (
                here is not None and reply.get("boot_id") == here)
            self.opts.level = 0 if same else 1
            self.report["zstd_level"] = self.opts.level
        self.work = os.path.join(_work_base(), self.mid)
        os.makedirs(self.work, mode=0o700)
        # from here on a dead `migrt migrate` is finished by migrt.migration.recovery
        self.journal = recovery.Journal.begin(self.mid, self.cid, self.src.root, self.opts.to,
                                              self.work, dest_id=self.opts.new_id or self.cid,
                                              dest_root=self.opts.dest_root, mode=self.opts.mode)

    def _sender(self, progress=None, want_blocks=False, streams=None, release=None):
        # each chunk's local copy is freed once sent, unless the user keeps the image
        return Sender(self.opts.to, self.opts.secret, self.mid,
                      streams=streams or self.opts.streams,
                      level=self.opts.level, progress=progress, want_blocks=want_blocks,
                      release=not self.opts.keep_image if release is None else release)

    def _checkpoint_argv(self, image, work, lazy_addr=None, status_fd=None):
        argv = ["checkpoint", "--image-path", image, "--work-path", work]
        if lazy_addr:
            # CRIU 4.1 fails to serve lazy pages with --leave-running (page-pipe splice
            # EBADF); without it CRIU keeps the tasks frozen until every page is served,
            # and on a failed transfer unfreezes them (the cgroup stays paused).
            argv += ["--lazy-pages", "--page-server", lazy_addr, "--status-fd", str(status_fd)]
        else:
            argv.insert(1, "--leave-running")
        return argv + self.opts.criu_flags + [self.cid]

    def _netlock_lines(self):
        """CRIU's network lock for this dump. With migrt's own hold on the source's
        namespace (handover.Hold: every packet in and out dropped, from before the
        freeze until the source is gone or resumed) CRIU's lock only repeats it, and
        costs: CRIU lifts its nftables lock at the end of a --leave-running dump (0.014 s
        here) and again at the end of the restore (0.007 s), both in the downtime. So,
        unless MIGRT_NETWORK_LOCK names a method, CRIU skips it; the image says so, and
        the destination's CRIU skips its lock too, which is safe as long as no packet
        for the container reaches the destination before its restore ends (migrt moves
        no address; a pod's new copy has an address of its own)."""
        if (self.hold is not None or self.will_hold) and netlock.automatic():
            self.report["network_lock"] = "skip"
            return ["network-lock skip"]
        return netlock.conf_lines(self.netlock)

    def _manifest_flags(self, *more):
        """The flags the restore needs, as the manifest records them: runc's, and
        --tcp-close (not runc's: the destination puts it in CRIU's config file, as the
        dump did; CRIU refuses to restore such an image without it)."""
        return (self.opts.criu_flags + list(more)
                + (["--tcp-close"] if "tcp-close" in self.criu_conf else []))

    def _capture(self, image, result):
        """The spec and the rootfs changes, taken while CRIU dumps (the container is
        frozen: its files cannot change), so that they travel during the dump rather
        than after it. Sets result['early'] to the image's parts that are complete."""
        try:
            from migrt import image as img
            result["manifest"] = img.capture_extra(
                image, self.cid, self.state, self.bundle,
                self._manifest_flags("--leave-running"), base=self.opts.rootfs_base,
                dumped=False)
            result["early"] = ("migrt/",)
        except Exception as e:
            result["capture_error"] = f"dump: {type(e).__name__}: {e}"

    def _dump_thread(self, image, work, result, capture=True):
        """Run runc checkpoint (and capture rootfs+spec); set result['done'] at the end.
        A runc started before the freeze (_arm_dump) is taken over: its gate is open."""
        armed = self._take_armed(image)

        def run():
            t0 = time.monotonic()
            cap = None
            if capture:
                cap = threading.Thread(target=self._capture, args=(image, result), daemon=True)
                cap.start()
            try:
                self.dump_started = True
                if armed is not None:
                    p = armed["proc"]
                    t0 = armed["gate"].t_go
                else:
                    p = subprocess.Popen([self.src.runc, "--root", self.src.root]
                                         + self._checkpoint_argv(image, work),
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, stdin=subprocess.DEVNULL,
                                         env=criuconf.env(self.work, self._netlock_lines()
                                                          + self.criu_conf))
                err = p.communicate()[1]
                result["criu_s"] = time.monotonic() - t0
                # CRIU's own figures (its stats image and its log's last time stamp)
                from migrt.criu import stats as criustats
                result["criu_stats"] = criustats.read((work, image), "dump")
                log = os.path.join(work, "dump.log")
                ran = criustats.log_span(log)
                if armed is not None and ran is not None:
                    # what CRIU did before its gate opened is not in the downtime
                    passed = criustats.gate_passed_at(log)
                    ran = ran - passed if passed is not None else None
                result["criu_ran_s"] = ran
                if cap is not None:
                    cap.join()
                if p.returncode != 0:
                    log = os.path.join(work, "dump.log")
                    errs = _criu_log_errors(log)
                    # the work dir goes with the rollback; its log is kept (_keep_logs)
                    kept = _kept_log(self.mid, _kept_name(os.path.basename(work)))
                    if self.opts.keep_image:
                        kept = log            # the work dir stays
                    out = err.strip()[-300:].replace(log, kept)
                    result["error"] = (f"runc checkpoint into {image} failed: {out}"
                                       + (f"; CRIU log {kept}: {'; '.join(errs)}" if errs
                                          else "") + _full_disk(image, errs))
                    return
                if "capture_error" in result:
                    result["error"] = result["capture_error"]
                    return
                if capture:
                    from migrt import image as img
                    img.after_dump(image, result["manifest"])
            except Exception as e:
                result["error"] = f"dump: {type(e).__name__}: {e}"
            finally:
                result["dump_s"] = time.monotonic() - t0
                result["done"] = True
                for wake in result.get("wake", ()):
                    wake()
        t = self.dump_thread = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def _send_round(self, image, work, capture, base=None, label="dump", fifos=False,
                    sender=None, pipes=None, send_dir=None):
        """Dump into image while sending it. fifos: the pages go through FIFOs (only
        when frozen anyway: CRIU then waits for the transfer, and so do the tasks)."""
        makedirs_private(image)   # plugins may have written there
        result = {"done": False}
        prog = Progress(self.estimate, self.opts.progress, status=self.status)
        prog.phase = label
        # only a pre-copy round's block digests are used again (by the delta round)
        if sender is None:
            sender = self._sender(prog, want_blocks=label == "pre-copy")
        else:                   # connected before the freeze
            sender.progress = prog
        if not fifos or self.opts.keep_image:
            pipes = None
        elif pipes is None:             # (made before the freeze: see _page_pipes)
            pipes = self._page_pipes(image, sender)
        ended = threading.Event()
        result["wake"] = [ended.set] + ([pipes.wake] if pipes else [])
        t0 = time.monotonic()
        th = self._dump_thread(image, work, result, capture)
        try:
            files = sender.send(send_dir or image, lambda: result["done"] or "error" in result,
                                base=base, pipes=pipes, wake=ended,
                                early=lambda: result.get("early", ()))
        except (TransferError, wire.ProtocolError) as e:
            th.join()
            prog.done(ok=False)
            if "error" in result:
                raise TransferError(result["error"])
            why = self._why()
            if why:
                raise TransferError(why) from e
            raise
        th.join()
        prog.done()
        if "error" in result:
            raise TransferError(result["error"])
        failpoints.hit("migrate.after-dump")
        if pipes is not None:   # page files CRIU wrote into FIFOs (the rest as plain files)
            self.report["page_fifos"] = len(pipes.sizes)
        return sender, files, result, time.monotonic() - t0

    def _page_pipes(self, image, sender):
        """The FIFOs CRIU writes the pages into: one page file per process (and per
        shared memory segment), enough for the usual case, within a bound on
        descriptors; CRIU writes any further ones as plain files, sent as they grow.
        Made before the freeze (between the freeze and the dump they took 3 to 20 ms here)."""
        makedirs_private(image)
        return PagePipes(image, min(self.src.nprocs + 16, MAX_PAGE_FIFOS), sender.chunk)

    def _why(self):
        """What the destination saw when a data connection broke (None if nothing)."""
        try:
            reply = self._request({"op": "why"})
        except (wire.ProtocolError, OSError):
            return None
        err = reply.get("reason") if isinstance(reply, dict) else None
        return f"destination: {err}" if err else None

    def _commit(self, files, manifest, final=True, lazy_address=None):
        # (the destination validates it against the schema: 5 ms for a small container's
        # 80 files, which this side's own check of it spent again in the downtime)
        manifest["files"] = manifest_files(files)
        msg = {"op": "commit", "manifest": manifest, "final": final}
        if lazy_address:
            msg["lazy_address"] = lazy_address
        if final:       # once committed, the staged copy can be restored from its marker
            self.journal.phase("restoring")
        return self._request(msg)

    def _bare_manifest(self):
        return {"format": mf.FORMAT, "created": mf.now(),
                "container": {"id": self.cid}, "node": mf.node_info(),
                "chunk_size": 1 << 20, "files": [], "rootfs": {"kind": "none"}}

    def _account(self, sender, key=""):
        s = sender.stats
        b = self.report["bytes"]
        b[f"image{key}"] = b.get(f"image{key}", 0) + s.raw
        b[f"sent_raw{key}"] = b.get(f"sent_raw{key}", 0) + s.sent_raw
        b[f"wire{key}"] = b.get(f"wire{key}", 0) + s.wire
        self.report.setdefault("cpu_compress_s", 0.0)
        self.report["cpu_compress_s"] = round(self.report["cpu_compress_s"] + s.cpu_compress, 3)

    def precopy_round(self, as_parent=False):
        """A dump while the container runs, sent whole; returns its blocks (the base of
        --precopy's delta round).

        as_parent (--precopy --lazy): the dump goes into the destination's images dir as
        parent/ (CRIU's name for an earlier dump of the same tasks) and stays here once
        sent. After the restore the source's page server compares each page it is asked
        for with this dump's and answers "the same" without the data; the destination
        reads those from its copy (packaging/criu-patches, lazy-parent). The comparison
        is exact, so nothing need track which pages were written in between (this
        kernel has no soft-dirty tracking)."""
        from migrt.runtime.checkpoints import PRECOPY_PARENT
        self.phase = "pre-copy"
        t0 = time.monotonic()
        self._detect_file_locks()
        top = os.path.join(self.work, "precopy") if as_parent else None
        image = os.path.join(top or self.work, PRECOPY_PARENT if as_parent else "round1")
        sender, files, result, took = self._send_round(
            image, os.path.join(self.work, "work1"), capture=False, label="pre-copy",
            send_dir=top, sender=self._sender(release=False) if as_parent else None)
        self._commit(files, self._bare_manifest(), final=False)
        self._t("precopy", t0)
        self.phases["precopy_dump_freeze"] = round(result.get("criu_s", 0), 4)
        # the pre-dump freezes the container too (CRIU's freezing + frozen time): its
        # clients wait then as in the downtime, although the copy is not switched yet
        st = result.get("criu_stats") or {}
        if st.get("frozen_s") is not None:
            self.phases["precopy_frozen"] = round(st.get("freezing_s", 0) + st["frozen_s"], 4)
        self._account(sender, "_precopy")
        if as_parent:
            self.precopy_files = files          # listed again in the final manifest
            self.lazy_criu_env["MIGRT_CRIU_LAZY_PARENT_DIR"] = image
        return sender.blocks

    def _detect_file_locks(self):
        """--file-locks when a process holds a lock (unless the user said either way)."""
        if self.opts.file_locks is None and "--file-locks" not in self.opts.criu_flags:
            n = held_file_locks(self.src.pids())
            if n:
                self.opts.criu_flags.append("--file-locks")
                self.report["file_locks"] = n
        elif self.opts.file_locks and "--file-locks" not in self.opts.criu_flags:
            self.opts.criu_flags.append("--file-locks")

    def _arm_dump(self):
        """Start `runc checkpoint` now, before the freeze: its CRIU waits at the gate
        (migrt.criu.gate) until the source is frozen, so that runc's and CRIU's start-up
        are not in the downtime. Nothing is started when the gate is off."""
        if not dumpgate.enabled():
            return
        self._detect_file_locks()       # runc's argv is fixed from here (see _open_gate)
        self.will_hold = not handover.host_netns(self.state["pid"])
        image = os.path.join(self.work, "image")
        work = os.path.join(self.work, "work")
        makedirs_private(image)
        makedirs_private(work)
        t0 = time.monotonic()
        g = dumpgate.DumpGate(self.work)
        a = {"gate": g, "image": image, "t_start": t0}
        try:
            if self.opts.mode == "lazy":
                a.update(self._lazy_spawn(image, work, g.conf_lines(), g.env()))
                proc = a["proc"]
            else:
                argv = self._checkpoint_argv(image, work)
                extra = g.conf_lines()
                proc = subprocess.Popen([self.src.runc, "--root", self.src.root] + argv,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, stdin=subprocess.DEVNULL,
                                        env=dict(criuconf.env(self.work, self._netlock_lines()
                                                              + self.criu_conf + extra),
                                                 **g.env()))
                a["proc"] = proc
        except BaseException:
            g.abort()
            raise
        a["file_locks"] = "--file-locks" in self.opts.criu_flags
        self.armed = a
        if not g.wait_ready(proc):
            err = self._disarm()
            raise TransferError(f"runc checkpoint did not reach CRIU's pre-dump gate "
                                f"(before the freeze): {err or 'it did not answer in 60s'}")
        self.report["dump_started_before_freeze_s"] = round(g.t_ready - t0, 4)
        failpoints.hit("migrate.dump-armed")

    def _arm_restore(self):
        """Have the destination start its restore now, before the freeze: its runc and
        CRIU wait at CRIU's gate until `restore` (migrt.agent.server.Agent.arm), so that
        their start-up is not in the downtime. The plan is what the restore will need,
        as far as it is known now; the destination uses the armed restore only if the
        restore it works out from the images matches it exactly, and otherwise restores
        as usual. Needs the destination's CRIU gate (features.RESTORE_GATE) and a bundle
        there (not --handoff, not a marker); MIGRT_RESTORE_ARM=0: not armed."""
        from migrt.criu import features
        if not self.opts.bundle or self.opts.handoff \
                or os.environ.get("MIGRT_RESTORE_ARM", "1") == "0" \
                or features.RESTORE_GATE not in self.dest_criu_features:
            return
        from migrt.runtime.checkpoints import RESTORE_FLAGS
        self._detect_file_locks()
        flags = [f for f in self._manifest_flags() if f in RESTORE_FLAGS]
        if self.opts.mode != "lazy":
            flags.append("--auto-dedup")      # migrt.runtime.sources.staged, restored once
        try:
            with open(os.path.join(self.src.root, self.cid, "state.json")) as f:
                descriptors = json.load(f).get("external_descriptors")
        except (OSError, ValueError):
            descriptors = None
        if not isinstance(descriptors, list):
            self.report["restore_armed"] = "no: the source's runc state has no descriptors"
            return
        t0 = time.monotonic()
        reply = self._request({
            "op": "arm", "bundle": self.opts.bundle, "root": self.opts.dest_root,
            "id": self.opts.new_id or self.cid, "restore_flags": flags,
            "lazy": self.opts.mode == "lazy", "memory": self.estimate,
            "criu_conf": ["tcp-close"] if "tcp-close" in self.criu_conf else [],
            "descriptors": descriptors})
        if reply.get("error"):
            raise TransferError(f"the destination's restore could not be started: "
                                f"{reply['error']}")
        self.report["restore_armed"] = "yes" if reply.get("armed") else \
            f"no: {reply.get('why') or 'the destination said no'}"
        self._t("restore_armed", t0)

    def _open_gate(self):
        """The source is frozen: let the armed CRIU dump. A lock taken between runc's
        start and the freeze needs runc's --file-locks, which that runc was not given:
        it is stopped at the gate and started again (_dump_thread, lazy_dump_and_send)."""
        a = self.armed
        if a is None:
            return
        if "--file-locks" in self.opts.criu_flags and not a["file_locks"]:
            self._disarm()
            self.report["dump_started_before_freeze_s"] = None
            self.report["dump_restarted"] = ("a process took a file lock after runc "
                                             "checkpoint started: started again with "
                                             "--file-locks, once frozen")
            return
        a["gate"].open()

    def _take_armed(self, image):
        a = self.armed
        if a is None or a["image"] != image or not a["gate"].is_open:
            return None
        self.armed = None
        return a

    def _disarm(self):
        """Stop an armed runc before its gate opened (CRIU has touched no task): its
        error output, if it said anything."""
        a, self.armed = self.armed, None
        if a is None:
            return None
        if a["gate"].is_open:
            if a.get("lazy"):           # its page server would wait: _rollback stops it
                os.close(a["status_r"])
                return None
            try:                        # CRIU is dumping: it ends by itself
                a["proc"].wait(30)
            except subprocess.TimeoutExpired:
                a["proc"].kill()
            return None
        a["gate"].abort()
        proc = a["proc"]
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            if a.get("lazy"):
                _kill_group(proc)
            else:
                proc.kill()
            _, err = proc.communicate()
        if a.get("status_r") is not None:
            os.close(a["status_r"])
        if a.get("lazy"):
            self.lazy_proc = None
        err = err.decode(errors="replace") if isinstance(err, bytes) else err
        return (err or "").strip()[-300:] or None

    def freeze(self):
        self.phase = "freeze"
        t0 = time.monotonic()
        self.journal.phase("frozen")
        # cut its network off first: nothing completes into a listen queue meanwhile,
        # and nothing leaves the source from now until it is gone (or resumed)
        pid = self.state["pid"]
        th = time.monotonic()
        try:
            self.hold = handover.Hold.take(pid, bool(getattr(self, "external_netns", None)))
        except (OSError, subprocess.SubprocessError) as e:
            raise TransferError(f"could not lock the source's network: {e}")
        if self.hold is not None:
            self.report["source_network_held"] = self.hold.method
            # the container's network is cut from here: its clients wait from now, so
            # the downtime counts from here too (the hold's own cost is network_hold)
            self._t("network_hold", th)
        t0 = time.monotonic()
        p = self.src.run("pause", self.cid)
        if p.returncode != 0:
            raise TransferError(f"runc pause: {p.stderr.strip()}")
        self.paused = True
        self._t("freeze", t0)
        self._detect_file_locks()      # frozen: no lock comes or goes any more
        return th if self.hold is not None else t0

    def dump_and_send(self, base=None):
        self.phase = "dump and transfer"
        sender, files, result, took = self._send_round(
            os.path.join(self.work, "image"), os.path.join(self.work, "work"),
            capture=True, base=base, fifos=True, sender=getattr(self, "final_sender", None),
            pipes=getattr(self, "final_pipes", None))
        self.phases["dump"] = round(result["dump_s"], 4)
        self.phases["dump_criu"] = round(result.get("criu_s", 0), 4)
        self.dump_figures = result
        t0 = time.monotonic()
        self.phase = "verification on the destination"
        self._commit(files, result["manifest"])
        self._t("commit", t0)
        self.phases["transfer"] = round(took + self.phases["commit"], 4)
        self.phases["transfer_after_dump"] = round(
            max(0.0, took - result["dump_s"]) + self.phases["commit"], 4)
        self._account(sender)

    def restore(self):
        self.phase = "restore on the destination"
        failpoints.hit("migrate.before-restore")
        t0 = time.monotonic()
        self.restore_sent = True
        if self.lazy_proc is not None:
            threading.Thread(target=self._watch_page_server, daemon=True).start()
        if self.opts.handoff:
            self.restore_sent = False     # nothing can restore it before the source goes
            self._handoff()
            return
        if self.opts.bundle:
            reply = self._request({"op": "restore", "bundle": self.opts.bundle,
                                   "root": self.opts.dest_root,
                                   "id": self.opts.new_id or self.cid})
        else:
            marker = f"MIGRT_RESTORE_FROM=staged:{self.mid}"
            self.report["marker"] = marker
            if not self.opts.progress:
                pass
            sys.stderr.write(f"migrt: staged; create the container on the destination "
                             f"with {marker} (waiting {self.opts.wait:.0f}s)\n")
            sys.stderr.flush()
            reply = self._request({"op": "wait", "timeout": self.opts.wait})
        self._t("restore", t0)
        # from here a failed page server is lazy_finish's (the copy runs, the control
        # connection stays: the destination is asked to stop its copy)
        self.restore_confirmed = not reply.get("error")
        self.restore_figures = reply.get("timing") if isinstance(reply.get("timing"), dict) \
            else None
        # running there, with its memory still streaming in from the staged image
        # (migrt.runtime.sources.staged.local_lazy): the source stays until that is done
        self.filling = bool(reply.get("filling"))
        self.report["destination_pid"] = reply.get("pid")
        self.report["destination_id"] = reply.get("container") or self.opts.new_id or self.cid

    def _handoff(self):
        """The destination keeps the staged copy for a later restore; the source is
        then let go (release_source). Until the answer the source can resume: the caller
        (migrt.kube.statefulset) lets no container be created from the marker before
        this migration has ended, and drops the kept copy if it failed."""
        self.phase = "handoff to the destination"
        reply = self._request({"op": "keep"})
        if reply.get("error"):
            raise TransferError(reply["error"])
        marker = f"MIGRT_RESTORE_FROM=staged:{self.mid}"
        self.report["marker"] = marker
        self.report["handoff"] = True
        self.report["destination_id"] = None

    def _dump_log_errors(self):
        """CRIU's own error lines in this migration's dump log."""
        return _criu_log_errors(os.path.join(self.work, "work", "dump.log"))

    def _watch_page_server(self):
        """Lazy mode: if CRIU's page server dies before the destination confirms, the
        destination cannot get its memory; stop waiting for it (CRIU has already thawed
        the source's tasks on the failed transfer)."""
        proc = self.lazy_proc
        while proc is not None and self.lazy_proc is proc and self.ctl is not None \
                and not self.restore_confirmed:
            if proc.poll() is not None:
                if proc.returncode != 0:
                    errs = self._dump_log_errors()
                    self.lazy_failed = ("CRIU page server failed"
                                        + (f": {'; '.join(errs)}" if errs else ""))
                    try:
                        self.ctl.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            time.sleep(0.05)

    def ask_status(self, tries=150):
        """After a lost reply to `restore`: what did the destination do?"""
        for _ in range(tries):
            try:
                c, _ = wire.connect(self.opts.to, self.opts.secret,
                                    {"op": "status", "mid": self.mid}, timeout=2)
                try:
                    st = c.read_json().get("state")
                finally:
                    c.close()
                if st in ("restored", "done"):
                    return "restored"
                if st in ("unknown", "failed"):
                    return "not restored"
            except (wire.ProtocolError, OSError):
                pass
            time.sleep(0.2)
        return None

    def release_source(self):
        self.phase = "release of the source"
        bury(self.bundle, f"migrated to {self.opts.to} (migration {self.mid})")
        rec = _restore_record(self.src.root, self.cid)
        # killed while frozen and still cut off: it never runs again, and its kernel
        # sends nothing (FIN, RST, data) on the connections the destination now owns
        warn = handover.release(self.src.run, self.cid)
        self.paused = False
        if warn:
            self.report["warning"] = warn
        elif rec:
            # a container migrt restored here leaves its restore's work dir behind
            from migrt.runtime.lifecycle import forget
            forget(rec)
        if self.hold is not None:
            h, self.hold = self.hold, None
            try:
                h.after_release()
            except (OSError, subprocess.SubprocessError) as e:
                self.report["warning"] = f"could not unlock the source's network namespace: {e}"
        try:
            if not self.opts.handoff:       # a kept copy stays for its restore
                self._request({"op": "release"})
        except (wire.ProtocolError, OSError):
            pass
        if self.ctl:
            self.ctl.close()
            self.ctl = None
        self._cleanup_local()
        self.journal.done()

    # ------------------------------------------------------------ lazy
    def _lazy_spawn(self, image, work, extra=(), extra_env=None):
        """`runc checkpoint --lazy-pages`: CRIU's page server listens on this node's side
        of the control connection, and writes a byte into status_r once it is up."""
        local_ip = self.ctl.sock.getsockname()[0]
        port = self.opts.page_server_port or _free_port(local_ip)
        from migrt.criu import pagetls
        tls = pagetls.write(os.path.join(self.work, "tls"), *self.page_tls)
        r, w = os.pipe()
        env = dict(criuconf.env(self.work, self._netlock_lines() + self.criu_conf
                                + pagetls.conf_lines(tls) + list(extra)), **self.lazy_criu_env,
                   **(extra_env or {}))
        try:
            self.lazy_proc = subprocess.Popen(
                [self.src.runc, "--root", self.src.root]
                + self._checkpoint_argv(image, work, f"{local_ip}:{port}", w),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(w,), start_new_session=True, env=env)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        return {"proc": self.lazy_proc, "status_r": r, "lazy": True,
                "address": f"{local_ip}:{port}"}

    def lazy_dump_and_send(self):
        """Dump everything but memory; a CRIU page server here serves the pages later."""
        self.phase = "dump (lazy)"
        image = os.path.join(self.work, "image")
        work = os.path.join(self.work, "work")
        makedirs_private(image)
        makedirs_private(work)
        armed = self._take_armed(image)
        # the spec and the rootfs changes are taken while CRIU dumps (the container is
        # frozen: its files cannot change), not after it, in the downtime
        from migrt import image as img
        cap = {}

        def capture():
            try:
                cap["m"] = img.capture_extra(image, self.cid, self.state, self.bundle,
                                             self._manifest_flags("--lazy-pages"),
                                             base=self.opts.rootfs_base, dumped=False)
            except Exception as e:          # noqa: BLE001 - raised below, in this thread
                cap["error"] = e
        capturing = threading.Thread(target=capture, name="migrt-capture", daemon=True)
        t0 = time.monotonic()
        self.dump_started = True
        capturing.start()
        if armed is not None:
            spawned = armed
            t0 = armed["gate"].t_go
        else:
            spawned = self._lazy_spawn(image, work)
        r, address = spawned["status_r"], spawned["address"]
        import select
        try:
            while True:
                rl, _, _ = select.select([r], [], [], 0.05)
                # CRIU writes one byte once the page server is up; end of file means
                # runc (and its CRIU) ended without it: the dump failed
                if rl and os.read(r, 1):
                    break                     # ready
                if not rl and self.lazy_proc.poll() is None:
                    continue                  # still dumping
                try:
                    self.lazy_proc.wait(30)
                except subprocess.TimeoutExpired:
                    _kill_group(self.lazy_proc)
                self._lazy_dump_failed(work)
        finally:
            os.close(r)
            capturing.join()
        self.phases["dump"] = round(time.monotonic() - t0, 4)
        self.dump_figures = {"dump_s": self.phases["dump"], "lazy": True}
        if "error" in cap:
            raise cap["error"]
        m = img.after_dump(image, cap["m"])
        self.phase = "transfer"
        t1 = time.monotonic()
        sender = self.lazy_sender
        files = sender.send(image, lambda: True)
        self._check_lazy(files, work)
        # the pre-copy's files stay staged beside these (the manifest lists them all)
        self._commit(dict(self.precopy_files, **files), m, lazy_address=address)
        self._t("transfer", t1)
        self._account(sender)
        self.report["page_server"] = address

    def _check_lazy(self, files, work):
        """A lazy dump leaves the memory in the frozen task. Pages CRIU wrote into the
        image instead (shared memory, memory locked in RAM, huge pages, or a dump that did
        not take the lazy path: seen once at 8 GiB, cause unknown) travel before the restore, in the
        downtime: say how much, and keep CRIU's log of it for a look."""
        paged = sum(size for rel, (size, _) in files.items()
                    if os.path.basename(rel).startswith("pages-"))
        self.report["lazy_pages_in_image"] = paged
        if paged < LAZY_PAGED_WARN:
            return
        kept = _kept_log(self.mid, "lazy-dump.log")
        try:
            with open(os.path.join(work, "dump.log"), "rb") as f:
                _write_kept_logs(self.mid, {"lazy-dump.log": f.read(8 << 20)})
        except OSError:
            kept = None
        # CRIU serves only private memory lazily: a shared mapping's pages (MAP_SHARED
        # anonymous, memfd, System V) go in the dump, one pagemap-shmem image per object
        shared = sum(1 for rel in files if os.path.basename(rel).startswith("pagemap-shmem-"))
        why = (f"{shared} shared memory object{'s' if shared != 1 else ''}, which CRIU "
               f"does not serve lazily, or memory locked in RAM or in huge pages"
               if shared else "memory locked in RAM or in huge pages")
        warn = (f"lazy mode: {paged / (1 << 20):.0f} MiB of the memory could not be left "
                f"lazy and went with the dump ({why})"
                + (f"; CRIU log {kept}" if kept else ""))
        self.report["warning"] = warn
        sys.stderr.write(f"migrt: warning: {warn}\n")
        sys.stderr.flush()

    def _lazy_dump_failed(self, work):
        """The lazy dump ended before its page server was up: nothing usable was made
        (nothing is committed or restored); say so with CRIU's own words."""
        log = os.path.join(work, "dump.log")
        errs = _criu_log_errors(log)
        err = self.lazy_proc.stderr.read().decode(errors="replace").strip()
        self.lazy_proc = None
        kept = log if self.opts.keep_image else _kept_log(self.mid, "dump.log")
        raise TransferError(
            f"the dump failed on this node (runc checkpoint --lazy-pages exited before "
            f"CRIU's page server was ready): {err.replace(log, kept)[-300:] or 'no output'}"
            + (f"; CRIU log {kept}: {'; '.join(errs)}" if errs else ""))

    def lazy_finish(self, timeout=600):
        """Wait until the page server has sent every page, then drop the source. A page
        server that failed (its connection cut, the destination's lazy-pages daemon
        gone, killed) may have left the destination's copy without part of its memory:
        that copy is stopped and the source, which still has all of it, resumes, as
        after a failed memory fill. If the destination cannot say it stopped its copy,
        the source stays frozen (in doubt) rather than risk two copies."""
        t0 = time.monotonic()
        failed = None
        try:
            rc = self.lazy_proc.wait(timeout)
            if rc != 0:
                err = (self.lazy_proc.stderr.read() or b"").decode(errors="replace").strip()
                # CRIU's own words first (e.g. the tasks' VMA flags changed while they
                # were being frozen: packaging/criu-patches, early-smaps), else runc's
                errs = self._dump_log_errors()
                failed = (f"the page server (runc checkpoint --lazy-pages) exited {rc}"
                          + (f": CRIU: {'; '.join(errs)[:300]}" if errs else
                             f" before it had served every page: {err.splitlines()[-1][:200]}"
                             if err else " before it had served every page"))
        except subprocess.TimeoutExpired:
            _kill_group(self.lazy_proc)
            failed = f"the page server had not served every page after {timeout:.0f}s"
        self._t("pages_served_after_restore", t0)
        self.lazy_proc = None
        if self.lazy_precopy and not failed:
            self._count_precopy_pages()
        if failed:
            self._lazy_failed_after_restore(failed)

    def _count_precopy_pages(self):
        """--precopy --lazy: how many of the pages served after the restore were the
        same as the pre-copy's (not sent) and how many were sent, from CRIU's log."""
        import re
        try:
            with open(os.path.join(self.work, "work", "dump.log"), "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - (64 << 10)))
                tail = f.read()
        except OSError:
            return
        m = re.search(rb"Lazy pages the same as the pre-copy's: (\d+), sent: (\d+) "
                      rb"\((\d+) replies with both\)", tail)
        if m:
            self.report["lazy_pages_from_precopy"] = int(m.group(1))
            self.report["lazy_pages_sent"] = int(m.group(2))
            self.report["lazy_replies_mixed"] = int(m.group(3))

    def _lazy_failed_after_restore(self, why):
        stopped, answer = False, "no answer"
        try:
            self.ctl.send_json({"op": "stop", "why": why})
            kind, msg = self.ctl.read_frame()
            stopped = kind == b"J" and bool(msg.get("stopped"))
            answer = (msg.get("error") if isinstance(msg, dict) else None) or "not stopped"
        except (wire.ProtocolError, OSError, AttributeError) as e:
            answer = f"no answer ({e})"
        if stopped:
            self._fail(f"{why}; the destination's copy, missing part of its memory, was "
                       f"stopped there")
        raise MigrationInDoubt(
            f"migration of {self.cid} to {self.opts.to}: {why}, and the destination did "
            f"not confirm that it stopped its copy ({answer}); the source is left frozen "
            f"(runc pause): "
            f"resume it only if the destination has no copy")

    # ------------------------------------------------------------ driver
    def run(self):
        t_start = time.monotonic()
        self.prechecks()
        self._t("precheck", t_start)
        failpoints.hit("migrate.before-freeze")
        try:
            base = self.precopy_round() if self.opts.mode == "precopy" else None
            if self.lazy_precopy:
                self.precopy_round(as_parent=True)
            # e.g. the workload is told and drains (rdma), CUDA is locked (gpu)
            self.phase = "checkpoint preparation (plugins)"
            self.plugins.pre_checkpoint(os.path.join(self.work, "image"), mode="dump",
                                        work_dir=os.path.join(self.work, "work"),
                                        destination=self.opts.to)
            self.checkpoint_hooks = True
            if self.opts.mode == "lazy":
                # lazy mode sends a few hundred KiB while frozen: one stream, connected now
                self.lazy_sender = self._sender(streams=1)
                self.lazy_sender.connect()
            elif os.environ.get("MIGRT_CONNECT_AFTER_FREEZE") != "1":
                # the dump's data connections too, authenticated now rather than while
                # frozen (MIGRT_CONNECT_AFTER_FREEZE=1: as before, for comparison)
                self.final_sender = self._sender()
                self.final_sender.connect()
                if not self.opts.keep_image:
                    self.final_pipes = self._page_pipes(os.path.join(self.work, "image"),
                                                        self.final_sender)
            self.phase = "start of the restore (runc restore on the destination, before the freeze)"
            self._arm_restore()
            self.phase = "start of the dump (runc checkpoint, before the freeze)"
            self._arm_dump()
            t_freeze = self.freeze()
            self._open_gate()
            if self.opts.mode == "lazy":
                self.lazy_dump_and_send()
            else:
                self.dump_and_send(base)
            self.restore()
        except (TransferError, wire.ProtocolError, OSError) as e:
            if getattr(self, "lazy_failed", None):
                self.lazy_proc = None
                self._fail(self.lazy_failed)
            if self.restore_sent and isinstance(e, (wire.ProtocolError, OSError)) \
                    and "restore failed" not in str(e):
                if self._destination_restored(f"lost contact during restore ({e})"):
                    return self._finish(t_start, t_freeze)
            self._fail(wire.explain(e))
        except BaseException as e:
            if isinstance(e, RefusedError) and not self.paused:
                self._rollback()
                raise
            reason = str(e) if isinstance(e, MigrtError) else (
                _interruption(e) or f"{type(e).__name__}: {e}")
            # asked to restore, the destination may run the container by now: resuming
            # the source could make two copies
            if self.restore_sent and not isinstance(e, MigrtError) \
                    and self._destination_restored(f"{reason} during restore"):
                self.report["note"] = (f"{reason} after the restore request; the destination "
                                       f"had restored, so the migration was completed")
                return self._finish(t_start, t_freeze)
            self._fail(reason)
        return self._finish(t_start, t_freeze)

    def _destination_restored(self, what):
        """After the restore request went out and its reply did not come back: True if
        the destination runs the container, False if it does not; if it cannot tell,
        the source is left frozen (MigrationInDoubt) rather than risk two copies."""
        outcome = self.ask_status()
        if outcome is None:
            raise MigrationInDoubt(
                f"migration of {self.cid} to {self.opts.to}: {what}; the destination's "
                f"outcome is unknown, so the source is left frozen (runc pause): resume it "
                f"only if the destination has no copy")
        return outcome == "restored"

    def _unfinished(self, reason):
        return MigrationUnfinished(
            f"migration of {self.cid} to {self.opts.to}: {reason} after the container "
            f"started there; it keeps running there, and this node's copy is released by "
            f"recovery (`migrt migrate` again, or this node's agent)"
            + ("; the page server goes on serving its memory" if self.opts.mode == "lazy"
               else ""))

    def _await_fill(self):
        """The destination runs the container and fills its memory in from the staged
        image: the source may go only once that is over. A failed fill has stopped the
        destination's copy: the source resumes."""
        self.phase = "memory fill on the destination"
        t0 = time.monotonic()
        try:
            self.ctl.send_json({"op": "filled", "timeout": 600})
            kind, msg = self.ctl.read_frame()
        except (wire.ProtocolError, OSError) as e:
            outcome = self.ask_status()
            if outcome == "not restored":
                self._fail(f"lost contact during the memory fill ({e}), and the destination "
                           f"has no running copy")
            if outcome is None:
                raise MigrationInDoubt(
                    f"migration of {self.cid} to {self.opts.to}: lost contact while the "
                    f"destination filled the container's memory ({e}); its outcome is "
                    f"unknown, so the source is left frozen (runc pause)")
        else:
            if kind != b"J" or msg.get("error"):
                err = msg.get("error") if isinstance(msg, dict) else "bad reply"
                if isinstance(msg, dict) and msg.get("stopped"):
                    self._fail(err)
                raise MigrationInDoubt(
                    f"migration of {self.cid} to {self.opts.to}: {err}; the source is left "
                    f"frozen (runc pause) until the destination's copy is known to run or "
                    f"to be gone")
        self._t("fill_after_restore", t0)
        self.report["memory_fill"] = "from the destination's staged image, after the restore"

    def _note_restored(self):
        """The container runs on the destination: say so in opts.restored_file (JSON,
        written whole), for whoever waits on this migration (the source node's agent)."""
        path = self.opts.restored_file
        if not path:
            return
        note = {"downtime": self.phases.get("downtime"), "phases": dict(self.phases),
                "mode": self.opts.mode, "filling": bool(self.filling),
                "destination_pid": self.report.get("destination_pid")}
        try:
            with open(os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                      "w") as f:
                f.write(json.dumps(note))
            os.replace(path + ".tmp", path)
        except OSError as e:      # a note for others: never fail the migration for it
            sys.stderr.write(f"migrt: could not write {path}: {e}\n")

    def _finish(self, t_start, t_freeze):
        t_running = time.monotonic()        # the destination runs the container
        self.phases["downtime"] = round(t_running - t_freeze, 4)
        self._note_restored()
        try:
            self.report["downtime"] = downtime_breakdown(
                self.phases, getattr(self, "dump_figures", None),
                getattr(self, "restore_figures", None), self.opts.mode)
        except Exception as e:        # figures are for reading: never fail a migration
            self.report["downtime"] = {"error": f"{type(e).__name__}: {e}"}
        if self.filling:
            try:
                self._await_fill()
            except (KeyboardInterrupt, Interrupted) as e:
                raise self._unfinished(_interruption(e))
        if getattr(self, "checkpoint_hooks", False):
            self.checkpoint_hooks = False
            try:
                self.plugins.post_checkpoint(os.path.join(self.work, "image"), mode="dump",
                                             work_dir=os.path.join(self.work, "work"))
            except Exception:
                pass      # the container already runs on the destination
        try:              # `migrt logs <id>` on this node shows where it went
            self.plugins.record({"event": "migrate", "to": self.opts.to, "mode": self.opts.mode,
                                 "migration": self.mid, "phases": dict(self.phases)})
        except Exception:
            pass
        try:
            failpoints.hit("migrate.before-release")
            if self.opts.mode == "lazy":
                self.release_source_lazy()
            else:
                self.await_go()
                self.release_source()
        except (KeyboardInterrupt, Interrupted) as e:
            raise self._unfinished(_interruption(e))
        # how long the source node still held the container (lazy: its memory until
        # every page was served) after the destination ran it
        self._t("source_released_after_restore", t_running)
        self._t("total", t_start)
        b = self.report["bytes"]
        if b.get("wire"):
            b["ratio"] = round(b.get("sent_raw", 0) / max(b["wire"], 1), 2)
        tr = self.phases.get("transfer")
        if tr:
            self.report["throughput_MBps"] = round(b.get("image", 0) / tr / 1e6, 1)
        return self.report

    def release_source_lazy(self):
        self.phase = "serving pages"
        self.lazy_finish()
        self.await_go()
        self.release_source()

    def await_go(self):
        """--hold-source: the copy runs on the destination; the source, frozen (and cut
        off), stays until the caller creates the file, or hold_timeout passed. One copy
        runs meanwhile: the destination's."""
        path = self.opts.hold_source
        if not path:
            return
        self.phase = "source held until released"
        t0 = time.monotonic()
        deadline = t0 + max(0.0, float(self.opts.hold_timeout))
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.report["source_held"] = "released" if os.path.exists(path) else "timeout"
        self._t("source_held", t0)


def _r(x):
    return round(x, 4) if isinstance(x, (int, float)) else x


def downtime_breakdown(phases, dump, restore, mode):
    """Where the downtime went, for `--json` (report["downtime"]):
    `phases`: what the source saw, in order, adding up to `total_s` (what none of them
    covers is `migrt_between_s`); `checkpoint` and `restore`: inside those two, down to
    CRIU's own figures (its stats images, microseconds in CRIU, given here in seconds) and
    the time around them (runc's, migrt's, the network's)."""
    total = phases.get("downtime") or 0.0
    # the network hold comes first: the downtime counts from it (Migration.freeze)
    top = {"network_hold_s": phases.get("network_hold"), "freeze_s": phases.get("freeze")}
    if mode == "lazy":
        top["checkpoint_s"] = phases.get("dump")
        top["transfer_and_commit_s"] = phases.get("transfer")
    else:
        top["checkpoint_s"] = phases.get("dump")
        top["transfer_after_checkpoint_s"] = (phases.get("transfer_after_dump") or 0.0) \
            - (phases.get("commit") or 0.0)
        top["commit_s"] = phases.get("commit")
    top["restore_s"] = phases.get("restore")
    top = {k: _r(v) for k, v in top.items() if v is not None}
    top["migrt_between_s"] = _r(max(0.0, total - sum(top.values())))
    out = {"total_s": _r(total), "phases": top}
    if phases.get("precopy_frozen") is not None:
        # not in total_s (the container ran between the two), but its clients waited
        out["precopy_frozen_s"] = _r(phases["precopy_frozen"])
    if dump:
        ck = {"total_s": _r(dump.get("dump_s") or phases.get("dump"))}
        if dump.get("lazy"):
            # CRIU 4.2.1 writes its dump figures only when the page server ends, and they
            # are not usable (seen: freezing 0, frozen "1843 s", pages_lazy 0)
            ck["note"] = ("runc checkpoint --lazy-pages until CRIU's page server is up; "
                          "CRIU has no usable figures of a lazy dump")
        ran = dump.get("criu_ran_s")
        runc = dump.get("criu_s")      # `runc checkpoint` (with its CRIU), end to end
        if ran is not None and runc is not None:
            ck["runc_s"] = _r(max(0.0, runc - ran))
            ck["criu_s"] = _r(ran)
        if ck.get("total_s") is not None and runc is not None:
            ck["migrt_s"] = _r(max(0.0, ck["total_s"] - runc))   # manifest, after_dump
        st = dump.get("criu_stats") or {}
        if st:
            ck["criu"] = {k: _r(v) for k, v in st.items()}
            if ran is not None:
                ck["criu"]["other_s"] = _r(max(0.0, ran - st.get("freezing_s", 0)
                                               - st.get("frozen_s", 0)))
        out["checkpoint"] = ck
    if restore:
        rs = {"total_s": top.get("restore_s")}
        agent = restore.get("agent_s")
        if agent is not None and rs["total_s"] is not None:
            rs["request_s"] = _r(max(0.0, rs["total_s"] - agent))  # network, the agent's loop
        for k in ("agent_s", "migrt_run_s", "lifecycle_s", "prepare_s", "before_runc_s",
                  "runc_s", "criu_s", "after_runc_s", "check_running_s"):
            if restore.get(k) is not None:
                rs[k] = _r(restore[k])
        if isinstance(restore.get("armed"), str):
            # started before the freeze ("used"), or why the restore ran as usual instead;
            # armed_before_s: its runc's and CRIU's start-up, out of the downtime
            rs["armed"] = restore["armed"]
            if restore.get("armed_before_s") is not None:
                rs["armed_before_s"] = _r(restore["armed_before_s"])
        run, life = rs.get("migrt_run_s"), rs.get("lifecycle_s")
        if run is not None and life is not None:
            # `migrt run` up to the restore proper: start-up, the staged source, plugins
            rs["migrt_start_s"] = _r(max(0.0, run - life))
        if isinstance(restore.get("criu"), dict):
            rs["criu"] = {k: _r(v) for k, v in restore["criu"].items()}
        out["restore"] = rs
    return out


def _try(f, default):
    try:
        return f()
    except (OSError, ValueError, subprocess.SubprocessError):
        return default


_RUNC_HELP = {}


def _runc_has_flag(runc, flag):
    """Whether this runc's checkpoint knows `flag` (runc 1.2 added --tcp-skip-in-flight;
    runc 1.1 sends CRIU nothing for it, so CRIU's config file can set it)."""
    if runc not in _RUNC_HELP:
        p = subprocess.run([runc, "checkpoint", "--help"], capture_output=True, text=True)
        _RUNC_HELP[runc] = p.stdout
    return flag in _RUNC_HELP[runc].split()


def _lock_lines(pid):
    """(fd, fields) for each `lock:` line of pid's /proc fdinfo (what CRIU itself reads)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                lines = [ln.split() for ln in f if ln.startswith("lock:")]
        except OSError:
            continue
        for w in lines:
            yield fd, w


def held_file_locks(pids):
    """How many file locks (flock, POSIX, OFD) the processes hold, as their fdinfo
    shows them (what CRIU itself reads): CRIU refuses to dump a task holding one unless
    told --file-locks, and runc always sends that option, so runc's flag must say it."""
    return sum(1 for pid in pids for _ in _lock_lines(pid))


# CRIU 4.2.1 as released loses a process's POSIX lock on a file that the process also
# maps: it takes the locks, then opens the file once more to map it and closes that
# descriptor, and any close() drops the process's POSIX locks on the file (SQLite's
# read lock on byte 128 of its -shm in WAL mode). install.sh's CRIU carries a patch
# (packaging/criu-patches); migrate asks the CRIU probe (migrt.criu.probe.kept_map_locks)
# before it moves a process holding such a lock.


def posix_locks_on_shared_maps(pids):
    """[(pid, path)] for each POSIX lock a process holds on a file it also maps shared."""
    out = []
    for pid in pids:
        locked = {}
        for fd, w in _lock_lines(pid):
            # lock:  1: POSIX  ADVISORY  READ 1234 fd:01:5678 128 128
            if len(w) >= 7 and w[2] == "POSIX":
                try:
                    major, minor, ino = w[6].split(":")
                    locked[(int(major, 16), int(minor, 16), int(ino))] = fd
                except ValueError:
                    pass
        if not locked:
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                maps = [ln.split(None, 5) for ln in f]
        except OSError:
            continue
        for m in maps:
            if len(m) < 5 or "s" not in m[1]:
                continue
            try:
                major, minor = m[3].split(":")
                key = (int(major, 16), int(minor, 16), int(m[4]))
            except ValueError:
                continue
            if key in locked:
                out.append((pid, m[5].strip() if len(m) > 5 else f"inode {key[2]}"))
                break
    return out


def bury(bundle, why):
    """A pod's container is about to go from this node: its kubelet must not create it
    again here (migrt.runtime.podrules). Best effort: a node without the records only
    risks the restart this prevents, never the migration."""
    try:
        from migrt.runc import read_spec
        from migrt.runtime import podrules
        podrules.bury(read_spec(bundle), why)
    except Exception:
        pass


def _kill_group(proc):
    """Stop runc checkpoint and the CRIU it runs (its own process group)."""
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.wait(10)
    except Exception:
        pass


def _free_port(host):
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def release_lock(mig):
    """End a migration's hold of its container (Migration._hold_container): the file
    goes while still locked, so that none is left per container ever migrated."""
    fd = getattr(mig, "lock_fd", None)
    if fd is None:
        return
    mig.lock_fd = None
    try:
        os.unlink(mig.lock_path)
    except OSError:
        pass
    os.close(fd)


def migrate(root, cid, opts):
    # first finish any migration a dead `migrt migrate` left on this node
    recovery.resolve_pending(opts.secret, lambda m: sys.stderr.write(f"migrt: {m}\n"))
    old = {}
    if threading.current_thread() is threading.main_thread():
        # (a closed terminal, SIGHUP, too: the source must not stay frozen for it)
        # (not where they are ignored: under nohup the migration goes on)
        old = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)
               if signal.getsignal(s) is not signal.SIG_IGN}
    from migrt.agent import metrics
    mig = None
    try:
        mig = Migration(root, cid, opts)
        report = mig.run()
        metrics.record_sent(report, "ok")
        return report
    except BaseException as e:
        from migrt.errors import EXIT_REFUSED, EXIT_ROLLED_BACK
        code = getattr(e, "exit_code", None)
        result = {EXIT_REFUSED: "refused", EXIT_ROLLED_BACK: "rolled_back", 5: "in_doubt",
                  6: "unfinished"}.get(code, "error")
        metrics.record_sent(getattr(mig, "report", None), result, mode=opts.mode)
        raise
    finally:
        release_lock(mig)
        status = getattr(mig, "status", None)
        if status is not None:
            status.close()
        for s, h in old.items():
            signal.signal(s, h)
