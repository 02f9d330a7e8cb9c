"""Mounts, read from /proc/self/mountinfo and made with mount(2) through libc (no mount
binary needed). Used where migrt keeps its own data on a tmpfs: the agent's staging dir
(migrt.agent.stagefs) and CRIU's kernel-feature cache (migrt.criu.kdat)."""
import ctypes
import os

TMPFS = "tmpfs"
MS_NOSUID, MS_NODEV, MS_REMOUNT = 2, 4, 32


def _unescape(s):
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def mount_of(path):
    """(mount point, fs type) of the filesystem that holds path (its nearest existing dir)."""
    path = os.path.realpath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    best, kind = "", "?"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            try:
                point = _unescape(parts[4])
                fs = parts[parts.index("-") + 1]
            except (IndexError, ValueError):
                continue
            if (path == point or path.startswith(point.rstrip("/") + "/")) and \
                    len(point) >= len(best):
                best, kind = point, fs          # the last of equal points is on top
    return best, kind


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


def mount(src, target, fstype, flags, data):
    """mount(2); OSError naming the target."""
    libc = _libc()
    enc = (lambda s: s.encode() if isinstance(s, str) else s)
    if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), target)
