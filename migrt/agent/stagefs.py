"""The agent's staging dir is a tmpfs, wherever it is.

Memory images belong in memory: staged on a disk they go through the page cache and the
disk twice (written by the transfer, read by CRIU's restore), which is where a full-mode
migration of a GiB or more lost seconds. So when the agent (as root) starts on a staging
dir that is not on a tmpfs, it mounts its own tmpfs there, sized by --staging-size
(default: half of the node's memory, tmpfs's own default), never more than the memory
available at that moment, and says so in its log. It notes that mount in root's own dir,
so that it unmounts it when it exits (if no restored container still reads from it) and
an agent restarted after a crash takes it over instead of stacking another one.
If the mount cannot be made the agent refuses to start with one line: staging on a disk
only ever happens because someone mounted a disk there on purpose
(MIGRT_STAGING_ON_DISK=1 says so).

The rootfs changes (`--disk`) stay on the disk: they are renamed into the bundle.
"""
import ctypes
import json
import os

from migrt.agent import staging as stg
from migrt.mounts import (MS_NODEV, MS_NOSUID, MS_REMOUNT, TMPFS, _libc,
                          mount as _mount, mount_of)  # noqa: F401 - mount_of: doctor

RESERVE = 256 << 20          # memory left to everything else when sizing the tmpfs


class StageFsError(Exception):
    pass


def meminfo():
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def mem_available():
    return meminfo().get("MemAvailable", 0)


def default_size(cap=None):
    """The tmpfs's size: cap (--staging-size / $MIGRT_STAGING_SIZE) or half of the node's
    memory, never more than what is available now less a reserve."""
    m = meminfo()
    want = cap if cap else m.get("MemTotal", 0) // 2
    avail = max(m.get("MemAvailable", 0) - RESERVE, 64 << 20)
    return max(16 << 20, min(want, avail))


def _note_path(staging):
    return os.path.join(stg.private_root(staging), "tmpfs.json")


def mounted_by_us(staging):
    """What the note of an agent that mounted a tmpfs on staging says, or None."""
    from migrt.safeio import read_regular
    try:
        note = json.loads(read_regular(_note_path(staging), 1 << 16))
    except (OSError, ValueError):
        return None
    if not isinstance(note, dict) or note.get("staging") != os.path.realpath(staging):
        return None
    point, kind = mount_of(staging)
    return note if kind == TMPFS and point == os.path.realpath(staging) else None


def ensure(staging, size=None, log=None):
    """Make sure staging is on a tmpfs; mount one if not. Returns a dict saying what it
    found or did: {"fstype", "mounted" (by this agent), "size"}; StageFsError (one line)
    when staging would be on a disk and no tmpfs can be mounted there."""
    staging = os.path.realpath(staging)
    point, kind = mount_of(staging)
    if kind == TMPFS:
        note = mounted_by_us(staging)
        st = os.statvfs(staging)
        out = {"fstype": kind, "mounted": bool(note), "size": st.f_blocks * st.f_frsize}
        if note and log:
            log(f"staging {staging}: the private tmpfs a previous agent mounted "
                f"({out['size'] >> 20} MiB), taken over")
        return out
    if os.environ.get("MIGRT_STAGING_ON_DISK") == "1":
        if log:
            log(f"staging {staging} is on {kind} ({point}), kept there on purpose "
                "(MIGRT_STAGING_ON_DISK=1): memory images go through the disk")
        return {"fstype": kind, "mounted": False, "size": None}
    if os.geteuid() != 0:
        raise StageFsError(
            f"staging {staging} is on {kind} ({point}), not a tmpfs, and only root can mount "
            "one there: start the agent as root, mount a tmpfs there, or set "
            "MIGRT_STAGING_ON_DISK=1 to stage memory images on that disk on purpose")
    nbytes = default_size(size)
    hidden = len(os.listdir(staging)) if os.path.isdir(staging) else 0
    try:
        _mount("migrt-staging", staging, TMPFS, MS_NOSUID | MS_NODEV,
               f"size={nbytes},mode=0700")
    except OSError as e:
        raise StageFsError(f"staging {staging} is on {kind} ({point}), not a tmpfs, and "
                           f"mounting one there failed: {e.strerror}; mount a tmpfs there "
                           "yourself, or set MIGRT_STAGING_ON_DISK=1 to stage memory images on "
                           "that disk on purpose")
    # its propagation stays the parent's: a runtime that a containerd or CRI-O in a
    # slave mount namespace runs for a `staged:` marker must see the staged images too
    from migrt.safeio import makedirs_private, write_private
    makedirs_private(os.path.dirname(_note_path(staging)))
    write_private(_note_path(staging), json.dumps({"staging": staging, "size": nbytes,
                                                   "pid": os.getpid()}).encode())
    if log:
        log(f"staging {staging} was on {kind} ({point}): mounted a private tmpfs there, "
            f"{nbytes >> 20} MiB (" + ("--staging-size" if size else "half of memory") +
            f", at most the {mem_available() >> 20} MiB available)" +
            (f"; {hidden} entries left on the disk below it are hidden" if hidden else ""))
    return {"fstype": TMPFS, "mounted": True, "size": nbytes}


def grow(staging, need, log=None):
    """Raise the size of the tmpfs this agent mounted so that `need` more bytes fit, as far
    as available memory allows (root only). Returns the new free bytes, or None."""
    note = mounted_by_us(staging)
    if not note or os.geteuid() != 0:
        return None
    st = os.statvfs(staging)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    size = st.f_blocks * st.f_frsize
    want = used + need + (16 << 20)
    limit = used + max(mem_available() - RESERVE, 0)
    new = min(want, limit)
    if new <= size:
        return None
    try:
        _mount(None, staging, None, MS_REMOUNT | MS_NOSUID | MS_NODEV, f"size={new}")
    except OSError as e:
        if log:
            log(f"staging {staging}: could not grow its tmpfs to {new >> 20} MiB: {e.strerror}")
        return None
    if log:
        log(f"staging {staging}: tmpfs grown from {size >> 20} to {new >> 20} MiB")
    st = os.statvfs(staging)
    return st.f_bavail * st.f_frsize


def in_use(staging):
    """Staged migrations whose images still feed a running container (lazy fill)."""
    busy = []
    for s in stg.all_staged(staging):
        rec = s.read() or {}
        if rec.get("state") == "filling" or (rec.get("state") == "restored" and rec.get("lazy")):
            busy.append(s.mid)
    return busy


def release(staging, log=None):
    """On the agent's exit: unmount the tmpfs it mounted, unless a restored container
    still reads its memory from there (then it stays, and the next agent takes it over)."""
    note = mounted_by_us(staging)
    if not note or os.geteuid() != 0:
        return False
    busy = in_use(staging)
    if busy:
        if log:
            log(f"staging {staging}: tmpfs kept mounted, {len(busy)} restored container(s) "
                f"still fill their memory from it ({', '.join(busy[:4])})")
        return False
    try:
        rc = _libc().umount2(os.path.realpath(staging).encode(), 0)
        if rc != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    except OSError as e:
        if log:
            log(f"staging {staging}: could not unmount its tmpfs: {e.strerror}")
        return False
    try:
        os.unlink(_note_path(staging))
    except OSError:
        pass
    if log:
        log(f"staging {staging}: private tmpfs unmounted")
    return True
