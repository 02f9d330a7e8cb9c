"""What a test leaves behind on the node: processes, mounts, cgroups, files.

Each probe is scoped to what one test made (a tag in the containers' environment, the
test's temp dir, its container ids), so tests running beside it do not count.
"""
import glob
import hashlib
import os

CGROUP_ROOT = "/sys/fs/cgroup"
STATE_DIR = os.environ.get("MIGRT_STATE_DIR", "/run/migrt")


def processes(tag=None, paths=()):
    """pids whose environment holds `tag` or whose command line names one of `paths`."""
    found = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            if tag:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if tag.encode() in f.read():
                        found.append(int(d))
                        continue
            if paths:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                if any(p in cmd for p in paths):
                    found.append(int(d))
        except OSError:
            continue
    return found


def mounts(under, staging=False):
    """Mount points (in our mount namespace) under a directory. A running agent's own
    staging tmpfs (source "migrt-staging", migrt.agent.stagefs) is no leak: it is left
    out unless staging=True (test_staging_tmpfs checks that an agent's exit unmounts it)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mp = parts[4]
            try:
                source = parts[parts.index("-") + 2]
            except (ValueError, IndexError):
                source = ""
            if source == "migrt-staging" and not staging:
                continue
            if mp == under or mp.startswith(under.rstrip("/") + "/"):
                out.append(mp)
    return out


def cgroups(cgroup_paths):
    """cgroup dirs (any v1 controller or the unified tree) still present for these paths."""
    out = []
    for cg in cgroup_paths:
        rel = cg.lstrip("/")
        for ctl in glob.glob(os.path.join(CGROUP_ROOT, "*")):
            p = os.path.join(ctl, rel)
            if os.path.isdir(p):
                out.append(p)
    return out


def work_dirs(root, cids):
    """migrt's CRIU work dirs of these containers (see migrt.runtime.lifecycle.work_dir)."""
    import glob
    out = []
    for cid in cids:
        key = hashlib.sha1(f"{os.path.realpath(root)}\0{cid}".encode()).hexdigest()[:16]
        p = os.path.join(STATE_DIR, "work", key)
        out += glob.glob(p) + glob.glob(p + "-*")       # one fresh dir per restore
    return out


def files(top):
    """Every file under top (for "nothing staged is left")."""
    out = []
    for dirpath, _, names in os.walk(top):
        out += [os.path.join(dirpath, n) for n in names]
    return out


def report(**found):
    """{"processes": 0, ...} counts and the non-empty lists, for the printed figures."""
    return {k: len(v) for k, v in found.items()}, {k: v for k, v in found.items() if v}
