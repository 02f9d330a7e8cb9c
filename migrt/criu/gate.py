"""Start `runc checkpoint` before the freeze; let its CRIU dump once the source is frozen.

Everything `runc checkpoint` does before CRIU seizes a task (Go's start-up, runc's
config and state, a CRIU run of its own that only answers runc's version query, then
CRIU's start-up, its RPC and config files, its kernel-feature cache) took 0.03 to
0.06 s here, and it was all in the downtime: migrate froze the container first, then
started runc. It need not be: CRIU runs its config file's action scripts in RPC mode
too, after runc's notification, and the "pre-dump" one before it looks at a task. The
gate is such a script. migrate starts runc with it, waits until CRIU stands at the gate,
cuts the network and freezes, then opens the gate: the dump begins at once.

The gate's parts, in the migration's work dir (root only):
- `gate.ready`, a FIFO: the script writes a line into it once CRIU is at the gate;
- `gate.lock`: migrate holds an exclusive flock(2) on it from before runc starts, and
  the script waits for a shared one (util-linux's flock(1)). It goes on when migrate
  lets go, or when migrate dies (the kernel drops its lock);
- `gate.go`: made by migrate just before it lets go. The script's exit status is
  whether it is there. Without it CRIU stops ("Pre dump script failed") before it has
  touched a task, and runc exits with an error: a migrate that fails or dies before the
  freeze leaves nothing dumped and nothing seized.

CRIU runs the script for its other actions too (network lock and unlock, post-dump),
in the downtime: a fork and an exec each, 2 to 3 ms here. install.sh's CRIU does not
when MIGRT_CRIU_PRE_DUMP_SCRIPT names the script (packaging/criu-patches,
gate-script-at-pre-dump-only.patch; env()); for any other CRIU, once the gate is open
the script's name leads to /bin/true.
`MIGRT_DUMP_GATE=0` turns the gate off (runc started after the freeze, as before).
"""
import fcntl
import os
import select
import shutil
import time

SCRIPT = "gate.sh"


def enabled():
    return os.environ.get("MIGRT_DUMP_GATE", "1") != "0" and shutil.which("flock") is not None


class Gate:
    """One gate in `work_dir` (see the module's text): `gate.ready`, `gate.lock`,
    `gate.go`. The waiting side is CRIU's (a script, or CRIU itself: RestoreGate) or a
    process of migrt's own (wait_for_go). Not reusable: one open() or abort()."""

    def __init__(self, work_dir):
        self.dir = work_dir
        self.ready_path = os.path.join(work_dir, "gate.ready")
        self.go_path = os.path.join(work_dir, "gate.go")
        self.lock_path = os.path.join(work_dir, "gate.lock")
        for p in (self.ready_path, self.go_path, self.lock_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        os.mkfifo(self.ready_path, 0o600)
        self.ready_fd = os.open(self.ready_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                               0o600)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        self.t_ready = None
        self.t_go = None

    def wait_ready(self, proc, timeout=60.0):
        """Wait until CRIU stands at the gate: True; False if `proc` (runc) ended first or
        `timeout` passed (the caller aborts the gate then)."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return False
            rl, _, _ = select.select([self.ready_fd], [], [], min(left, 0.02))
            if rl:
                try:
                    if os.read(self.ready_fd, 64):
                        self.t_ready = time.monotonic()
                        return True
                except BlockingIOError:
                    pass
                # no writer yet gives end of file at once on a FIFO: wait, not spin
                time.sleep(0.002)
            if proc.poll() is not None:
                return False

    def open(self):
        """Let the waiting side go on."""
        os.close(os.open(self.go_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self.t_go = time.monotonic()
        self._release()

    def abort(self):
        """The waiting side stops at the gate (CRIU: before it has touched a task)."""
        self._release()

    def _release(self):
        for name in ("lock_fd", "ready_fd"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)

    @property
    def is_open(self):
        return self.t_go is not None


class DumpGate(Gate):
    """The pre-dump gate of an armed `runc checkpoint` (a CRIU action script)."""

    def __init__(self, work_dir):
        if any(c.isspace() or c in "\"'\\$`;&|<>" for c in work_dir):
            raise ValueError(f"work dir {work_dir!r} cannot be named in a CRIU action script")
        super().__init__(work_dir)
        lock_path = self.lock_path
        self.script = os.path.join(work_dir, SCRIPT)
        fd = os.open(self.script, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o700)
        with os.fdopen(fd, "w") as f:
            # `1<>`: opening the FIFO read-write never blocks, whatever migrate does
            f.write("#!/bin/sh\n"
                    '[ "$CRTOOLS_SCRIPT_ACTION" = pre-dump ] || exit 0\n'
                    f"echo ready 1<>{self.ready_path}\n"
                    f"flock -s {lock_path} true\n"
                    f"[ -e {self.go_path} ]\n")

    def conf_lines(self):
        """The CRIU config line that runs the gate (CRIU gives it to `sh -c`; its config
        file takes no value with a space in it)."""
        return [f"action-script {self.script}"]

    def env(self):
        """For the environment of the `runc checkpoint` it gates: its CRIU runs the
        script for the pre-dump action only (a CRIU without the patch ignores this)."""
        return {"MIGRT_CRIU_PRE_DUMP_SCRIPT": self.script}

    def open(self):
        """Let CRIU dump (the source is frozen now)."""
        # CRIU's later actions (network lock and unlock, post-dump: in the downtime) run
        # /bin/true from here on instead of a second shell (about 1 ms less each); the
        # shell that runs the pre-dump action has the script open already
        link = self.script + ".true"
        try:
            os.symlink("/bin/true", link)
            os.rename(link, self.script)
        except OSError:
            pass
        Gate.open(self)


class RestoreGate(Gate):
    """The gate of an armed `runc restore`: install.sh's CRIU (restore-gate.patch, the
    CRIU feature "restore-gate") waits in it itself, before it reads any image, when
    MIGRT_CRIU_RESTORE_GATE names its dir (env()). Its log says "restore gate open" when
    it goes on (migrt.criu.stats.log_span counts from there)."""

    def env(self):
        return {"MIGRT_CRIU_RESTORE_GATE": self.dir}


class _Late(Exception):
    pass


def wait_for_go(gate_dir, timeout=None):
    """The waiting side of a Gate, for a process of migrt's own (an armed restore waits
    for its agent): says it is ready, waits until the gate's holder lets go (or dies, or
    `timeout` seconds passed: from the main thread only), and returns whether it said go."""
    import signal
    import threading
    fd = os.open(os.path.join(gate_dir, "gate.ready"), os.O_RDWR | os.O_CLOEXEC)
    try:
        os.write(fd, b"ready\n")
    finally:
        os.close(fd)
    lock = os.open(os.path.join(gate_dir, "gate.lock"), os.O_RDONLY | os.O_CLOEXEC)
    bounded = timeout is not None and threading.current_thread() is threading.main_thread()

    def late(_sig, _frame):
        raise _Late()
    old = signal.signal(signal.SIGALRM, late) if bounded else None
    try:
        if bounded:
            signal.setitimer(signal.ITIMER_REAL, max(0.001, timeout))
        fcntl.flock(lock, fcntl.LOCK_SH)
    except _Late:
        return False
    finally:
        if bounded:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        os.close(lock)
    return os.path.exists(os.path.join(gate_dir, "gate.go"))
