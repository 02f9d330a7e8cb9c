"""Punching holes in files (fallocate FALLOC_FL_PUNCH_HOLE), where the filesystem can."""
import ctypes
import os

_PUNCH = 0x01 | 0x02          # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def _load():
    try:
        f = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return f


_fallocate = _load()
available = _fallocate is not None


def punch(fd, off, n):
    """Free the blocks of [off, off+n) of an open file. False if that could not be done
    (the bytes then stay)."""
    if not n or _fallocate is None:
        return False
    return _fallocate(fd, _PUNCH, off, n) == 0


def punch_path(path, off, n):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return punch(fd, off, n)
    finally:
        os.close(fd)
