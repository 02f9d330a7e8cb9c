"""A real CRIU probe (for `migrt doctor`): can this node's CRIU checkpoint and restore
what real workloads hold, an established TCP connection and file locks?

`criu check` says yes on nodes where every server still fails to dump: CRIU 4.1.1 on
kernels 6.16 and later cannot read the options of any AF_INET socket ("Can't get 1:16
opt: Operation not supported", fixed in CRIU 4.2). So the probe does the real thing, on a
tiny helper: a Python process started in its own network namespace (unshare -n), which
brings its lo up, connects to itself over 127.0.0.1, takes a flock() and a POSIX lock on
files in a temporary dir, maps a third file MAP_SHARED and takes a POSIX read lock on its
byte 128 (what every SQLite connection in WAL mode holds on its -shm file), and waits. CRIU dumps it there with --tcp-established
--file-locks and restores it (-d); the restored helper sends a few bytes over its
connection and reports what arrived; its locks must be held again; then it is killed.
The lock on the mapped file is reported apart (Result.map_locks): CRIU 4.2.1 as released
drops it (its restorer closes the descriptor it maps the file with, and any close drops
the process's POSIX locks on that file; packaging/criu-patches fixes that), and migrate
refuses a container holding such a lock unless this CRIU keeps it (kept_map_locks).
CRIU locks the network of the namespace it dumps, which is the helper's own: the host's
network is never locked. About a second; root only.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# The helper. argv[1]: the probe's temporary dir. Writes "ready" (its pid) when it holds
# everything, and "after" when SIGUSR1 asks it to use its connection.
HELPER = r"""
import fcntl, mmap, os, signal, socket, struct, sys
d = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sH22x", fcntl.ioctl(s, 0x8913, struct.pack("16sH22x", b"lo", 0)))[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", flags | 1))   # SIOCSIFFLAGS: lo up
s.close()
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(1)
a = socket.create_connection(ls.getsockname())
b, _ = ls.accept()
ls.close()
f = open(os.path.join(d, "flock"), "w")
fcntl.flock(f, fcntl.LOCK_EX)
g = open(os.path.join(d, "posix-lock"), "w")
fcntl.lockf(g, fcntl.LOCK_EX)
h = os.open(os.path.join(d, "mapped"), os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(h, 4096)
m = mmap.mmap(h, 4096, mmap.MAP_SHARED)
m[0:5] = b"migrt"
fcntl.lockf(h, fcntl.LOCK_SH, 1, 128)

def use(*_):
    a.sendall(b"migrt-probe")
    got = b.recv(64)
    with open(os.path.join(d, "after.tmp"), "w") as out:
        out.write("tcp ok" if got == b"migrt-probe" else "tcp got %r" % got)
    os.rename(os.path.join(d, "after.tmp"), os.path.join(d, "after"))

signal.signal(signal.SIGUSR1, use)
with open(os.path.join(d, "ready.tmp"), "w") as r:
    r.write(str(os.getpid()))
os.rename(os.path.join(d, "ready.tmp"), os.path.join(d, "ready"))
while True:
    signal.pause()
"""

WAIT = 10.0


class Result:
    """ok, or the stage that failed ("setup": the probe could not run at all, which says
    nothing about CRIU; "dump", "restore", "after": CRIU's part) and one line why.
    map_locks: whether the restored helper held its POSIX lock on the file it maps shared
    (None: the probe did not get that far). It does not count in ok."""

    def __init__(self, ok, stage="", error="", seconds=0.0, map_locks=None):
        self.ok, self.stage, self.error, self.seconds = ok, stage, error, seconds
        self.map_locks = map_locks

    def __repr__(self):
        return (f"Result(ok={self.ok}, stage={self.stage!r}, error={self.error!r}, "
                f"map_locks={self.map_locks!r})")


def _first_error(log):
    try:
        with open(log, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return "no log"
    # CRIU logs its failed attempt to raise its own RLIMIT_NOFILE as an error on every
    # run where root lacks CAP_SYS_RESOURCE, and goes on: that one is not the cause.
    errs = [ln for ln in lines if "Error (" in ln and "RLIMIT_NOFILE for self" not in ln]
    if not errs:
        return (lines[-1] if lines else "empty log").strip()
    return re.sub(r"^\(\s*[\d.]+\)\s*(\d+: )?", "", errs[0]).strip()


def _wait_for(path, until):
    while time.monotonic() < until:
        if os.path.exists(path):
            return True
        time.sleep(0.02)
    return False


def _held_locks(pid):
    kinds = set()
    try:
        with open("/proc/locks") as f:
            for line in f:
                cols = line.split()
                if len(cols) > 4 and cols[4] == str(pid):
                    kinds.add(cols[1])
    except OSError:
        pass
    return kinds


def _holds_byte_128(pid, path):
    """Does pid hold a POSIX read lock on exactly byte 128 of path?"""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            for line in f:
                c = line.split()
                if "->" in c[:2] or len(c) < 8:      # "N: -> ...": a waiter, not a holder
                    continue
                dev_ino = c[5].rsplit(":", 1)
                if (c[1] == "POSIX" and c[3] == "READ" and c[4] == str(pid)
                        and int(dev_ino[-1]) == st.st_ino and c[6] == c[7] == "128"):
                    return True
    except (OSError, ValueError, IndexError):
        pass
    return False


def _is_helper(pid, d):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return d.encode() in f.read()
    except OSError:
        return False


def run(criu, python=None, keep=None):
    """Probe `criu`. python: the interpreter for the helper (default this one).
    keep: a dir to copy the CRIU logs into (for a report). Returns a Result."""
    t0 = time.monotonic()
    if os.geteuid() != 0:
        return Result(False, "setup", "not root: CRIU needs root to dump a process")
    unshare = shutil.which("unshare") or "/usr/bin/unshare"
    d = tempfile.mkdtemp(prefix="migrt-criu-probe-")
    os.chmod(d, 0o700)
    images = os.path.join(d, "images")
    os.mkdir(images)
    helper = None
    restored = None
    try:
        try:
            helper = subprocess.Popen(
                [unshare, "--net", python or sys.executable, "-I", "-S", "-c", HELPER, d],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(d, "helper.err"), "w"), cwd="/",
                start_new_session=True)
        except OSError as e:
            return Result(False, "setup", f"cannot start the helper: {e}")
        if not _wait_for(os.path.join(d, "ready"), time.monotonic() + WAIT):
            helper.kill()
            helper.wait()
            with open(os.path.join(d, "helper.err"), errors="replace") as f:
                err = (f.read().strip().splitlines() or ["no output"])[-1]
            return Result(False, "setup", f"the helper did not start: {err}")
        pid = helper.pid
        dump = subprocess.run(
            [criu, "dump", "-t", str(pid), "-D", images, "-o", "dump.log", "-v4",
             "--tcp-established", "--file-locks"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        if dump.returncode != 0:
            return Result(False, "dump", _first_error(os.path.join(images, "dump.log")),
                          time.monotonic() - t0)
        helper.wait(timeout=10)          # dumped and killed by CRIU: free its pid
        helper = None
        pidfile = os.path.join(d, "restored.pid")
        rest = subprocess.run(
            [criu, "restore", "-D", images, "-o", "restore.log", "-v4", "-d",
             "--tcp-established", "--file-locks", "--pidfile", pidfile],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        try:
            with open(pidfile) as f:
                restored = int(f.read().strip())
        except (OSError, ValueError):
            restored = pid if rest.returncode == 0 else None
        if rest.returncode != 0:
            return Result(False, "restore", _first_error(os.path.join(images, "restore.log")),
                          time.monotonic() - t0)
        locks = _held_locks(restored)
        map_locks = _holds_byte_128(restored, os.path.join(d, "mapped"))
        os.kill(restored, signal.SIGUSR1)
        if not _wait_for(os.path.join(d, "after"), time.monotonic() + WAIT):
            return Result(False, "after", "the restored helper did not answer",
                          time.monotonic() - t0, map_locks)
        with open(os.path.join(d, "after")) as f:
            said = f.read().strip()
        if said != "tcp ok":
            return Result(False, "after", f"the restored TCP connection: {said}",
                          time.monotonic() - t0, map_locks)
        if not {"FLOCK", "POSIX"} <= locks:
            return Result(False, "after", "the restored helper does not hold its file locks "
                          f"(held: {', '.join(sorted(locks)) or 'none'})",
                          time.monotonic() - t0, map_locks)
        return Result(True, seconds=time.monotonic() - t0, map_locks=map_locks)
    except subprocess.TimeoutExpired as e:
        return Result(False, "dump" if "dump" in e.cmd else "restore",
                      f"CRIU did not finish in {e.timeout:.0f} s", time.monotonic() - t0)
    finally:
        if helper is not None and helper.poll() is None:
            helper.kill()
            helper.wait()
        if restored is not None and _is_helper(restored, d):
            try:
                os.kill(restored, signal.SIGKILL)
            except OSError:
                pass
        if keep:
            os.makedirs(keep, exist_ok=True)
            for name in ("dump.log", "restore.log"):
                if os.path.exists(os.path.join(images, name)):
                    shutil.copy(os.path.join(images, name), os.path.join(keep, name))
        shutil.rmtree(d, ignore_errors=True)


# migrate asks kept_map_locks() only for a container holding a POSIX lock on a file it
# maps shared; the answer is kept per CRIU binary (path, inode, size, mtime) in CACHE.
CACHE = "/run/migrt/criu-map-locks.json"


def kept_map_locks(criu):
    """(True, "") if `criu` restores a POSIX lock on a file the process maps shared,
    (False, why) if it does not or the probe could not tell. Probes once per binary."""
    import json
    try:
        st = os.stat(criu)
    except OSError as e:
        return False, f"cannot stat {criu}: {e.strerror}"
    key = f"{os.path.realpath(criu)}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    try:
        with open(CACHE) as f:
            known = json.load(f)
        if key in known:
            return tuple(known[key])
    except (OSError, ValueError):
        known = {}
    r = run(criu)
    if r.map_locks:
        answer = (True, "")
    elif r.map_locks is False:
        answer = (False, "the CRIU probe's restored process lost its POSIX lock on a file "
                         "it maps shared")
    else:
        answer = (False, f"the CRIU probe could not tell ({r.stage}: {r.error})")
    if r.stage != "setup":             # a setup failure says nothing about this CRIU
        known[key] = list(answer)
        try:
            os.makedirs(os.path.dirname(CACHE), exist_ok=True)
            tmp = f"{CACHE}.{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(json.dumps(known))
            os.replace(tmp, CACHE)
        except OSError:
            pass
    return answer
