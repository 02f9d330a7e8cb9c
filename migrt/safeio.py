"""Opening files that someone else may have put there: a checkpoint, a staged migration.

`open_regular` never follows a symlink at the last component and never blocks on what
is not a regular file (a FIFO, a device): O_NOFOLLOW|O_NONBLOCK, then fstat S_ISREG on
what was opened. Anything else is refused with NotRegular (an OSError) naming the path.
"""
import os
import stat


class NotRegular(OSError):
    pass


def open_regular(path, flags=os.O_RDONLY):
    """A descriptor of the regular file at path (blocking mode restored), or NotRegular."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == 40:           # ELOOP: the last component is a symlink
            raise NotRegular(e.errno, "a symlink, not a regular file", path)
        if e.errno == 6:            # ENXIO: a FIFO opened for writing with no reader
            raise NotRegular(e.errno, "not a regular file", path)
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(21, "not a regular file", path)
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_regular(path, limit=64 << 20):
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        return f.read(limit)


def open_file(path, mode="rb"):
    """open_regular as a Python file object (read modes)."""
    return os.fdopen(open_regular(path), mode)


def write_private(path, data, mode=0o600):
    """Write data to path through a fresh file (never through a symlink or an existing
    file planted there), then rename it into place."""
    tmp = path + ".tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def makedirs_private(path, mode=0o700):
    """os.makedirs where every dir it creates gets `mode` (not only the last)."""
    missing = []
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
            os.chmod(d, mode)
        except FileExistsError:
            pass
