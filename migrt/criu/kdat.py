"""CRIU's kernel-feature cache, kept on a tmpfs.

Every CRIU run starts by probing the kernel (its "kerndat": dozens of features, each a
small syscall experiment), unless it finds an earlier run's results in its cache file.
CRIU writes that file only on a tmpfs, so that a reboot, perhaps into another kernel,
drops it; the file's dir is a build setting (RUNDIR, /run by default). On a node whose
/run is not a tmpfs (a container, some minimal images) every dump and every restore
probes again: 0.04 to 0.05 s at each end of a migration, all of it in the downtime.

install.sh builds CRIU with RUNDIR=/run/migrt/criu (the build stamp records it), and
migrt makes sure that dir exists and is a tmpfs before CRIU runs for a migration: the
agent at its start, `migrt migrate` in its precheck. Where /run is a tmpfs the dir is
just made; where it is not, a 1 MiB tmpfs of migrt's own is mounted there. A CRIU built
elsewhere keeps its own dir and is not affected.
"""
import os

from migrt.mounts import MS_NODEV, MS_NOSUID, TMPFS, mount, mount_of

DIR = "/run/migrt/criu"
FILE = "criu.kdat"


def ensure(log=None):
    """Make DIR a dir on a tmpfs (as root). Returns what it found or did: "tmpfs",
    "mounted", or one line saying why not (never raises: without the cache CRIU only
    probes the kernel again)."""
    try:
        os.makedirs(DIR, mode=0o700, exist_ok=True)
        point, kind = mount_of(DIR)
        if kind == TMPFS:
            return TMPFS
        if os.geteuid() != 0:
            return f"{DIR} is on {kind}, and only root can mount a tmpfs there"
        mount("migrt-criu", DIR, TMPFS, MS_NOSUID | MS_NODEV, "size=1m,mode=0700")
    except OSError as e:
        return f"{DIR}: {e.strerror or e}"
    if log:
        log(f"{DIR} was on {kind} ({point}): mounted a 1 MiB tmpfs there for CRIU's "
            "kernel-feature cache")
    return "mounted"


def state():
    """For `migrt doctor`: (ok, one line)."""
    if not os.path.isdir(DIR):
        return False, f"{DIR} does not exist yet (the agent or migrate makes it)"
    point, kind = mount_of(DIR)
    if kind != TMPFS:
        return False, f"{DIR} is on {kind}, not a tmpfs: CRIU will not keep its cache there"
    have = os.path.exists(os.path.join(DIR, FILE))
    return True, (f"{DIR} on a tmpfs, " +
                  ("cache present" if have else "no cache yet (CRIU writes it on its next run)"))
