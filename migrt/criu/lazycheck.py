"""Can CRIU's page server run on this node? (`migrt migrate --lazy`, `migrt doctor`)

CRIU's page server (the source side of a lazy migration) resizes a scratch pipe to 819
pages, which the kernel rounds up to 4 MiB, and does not check whether that worked: when
the resize is refused the first page request fails with `page-pipe: splice: -1: Bad file
descriptor` (criu/page-pipe.c, pipe_read_dest_init, CRIU 4.1.1 and later). A pipe may grow
past fs.pipe-max-size only with CAP_SYS_RESOURCE, which root lacks on some nodes (VMs and
sandboxes drop it from the bounding set). So the page server needs either.
"""
PAGE_SERVER_PIPE = 4 << 20
PIPE_MAX = "/proc/sys/fs/pipe-max-size"
CAP_SYS_RESOURCE = 24


def _read(path, read=None):
    if read is not None:
        return read(path)
    with open(path) as f:
        return f.read()


def problem(read=None):
    """None if CRIU's page server can size its pipe here, else one line saying why not."""
    try:
        status = _read("/proc/self/status", read)
        for line in status.splitlines():
            if line.startswith("CapEff:") and int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1:
                return None
        limit = int(_read(PIPE_MAX, read).strip())
    except (OSError, ValueError, TypeError):
        return None         # cannot tell: let CRIU try, its error is reported
    if limit >= PAGE_SERVER_PIPE:
        return None
    return (f"fs.pipe-max-size is {limit} and this node's root lacks CAP_SYS_RESOURCE, so "
            f"CRIU's page server cannot size its {PAGE_SERVER_PIPE >> 20} MiB pipe and lazy "
            f"pages would fail (page-pipe splice EBADF); raise it: sysctl -w "
            f"fs.pipe-max-size={PAGE_SERVER_PIPE} (packaging/install.sh sets it in "
            f"/etc/sysctl.d/90-migrt.conf)")
