"""The cgroup hierarchies, mounted once for CRIU's dumps (its "cgroup yard").

To read a container's cgroups, CRIU mounts every cgroup hierarchy afresh in a temporary
dir ("yard") at each dump and unmounts them after. On a cgroup v1 node with nine
hierarchies that is 0.02 s of every dump, taken while the container is frozen. CRIU's
`cgroup-yard` option names a dir where they are mounted already: one dir per hierarchy,
named as CRIU names it (the controllers as /proc/PID/cgroup lists them, `name=` dropped
from a named one, `unified` for cgroup v2).

`ensure(pid)` makes that dir under migrt's CRIU dir (a tmpfs: see migrt.criu.kdat) with a
bind mount of each hierarchy the process belongs to, and returns it; None when one of
them cannot be found or mounted, and CRIU then mounts them itself, as before.
MIGRT_CGROUP_YARD=0 turns it off.

migrt's dumps use it, and every restore through migrt (the marker's, the restorer's own
process naming the hierarchies). A restore's CRIU mounts only the hierarchies the image
names, a few microseconds each on a stock node; but a fresh cgroup2 mount applies its
mount options to the whole node (cgroup2 has one set), so CRIU's option-less one turned
a node's `favordynmods` off at every restore (`mount` no longer listed it), and on such a
node that mount took 8 to 18 ms of the restore here (CRIU's log, "Making controller
dir"). A hierarchy the image names and the yard lacks is mounted there by CRIU itself,
and stays for the next restore.
"""
import os

from migrt.criu import kdat
from migrt.mounts import _unescape, mount

YARD = os.path.join(kdat.DIR, "cgyard")
MS_BIND = 4096


def names(pid):
    """The yard's dir names CRIU opens for a dump of process `pid`."""
    out = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            parts = line.rstrip("\n").split(":", 2)
            if len(parts) != 3:
                continue
            ctrls = parts[1]
            if ctrls == "":
                out.append("unified")
            elif ctrls.startswith("name="):
                out.append(ctrls[len("name="):])
            else:
                out.append(ctrls)
    return out


def hierarchies(wanted):
    """{yard name: a mount point of that hierarchy's root}, for the names wanted, from
    this mount namespace: a cgroup v1 mount whose super options hold every controller of
    the name (or its name=), the cgroup2 mount for "unified"."""
    found = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            try:
                i = parts.index("-")
                fs, opts, root, point = parts[i + 1], parts[i + 3], parts[3], parts[4]
            except (IndexError, ValueError):
                continue
            if root != "/" or fs not in ("cgroup", "cgroup2"):
                continue
            have = set(opts.split(","))
            for name in wanted:
                if name in found:
                    continue
                if fs == "cgroup2":
                    ok = name == "unified"
                else:
                    ok = name != "unified" and (
                        set(name.split(",")) <= have or f"name={name}" in have)
                if ok:
                    found[name] = _unescape(point)
    return found


def _mounted(path):
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def ensure(pid):
    """YARD with every hierarchy of `pid` bind-mounted in it, or None (never raises)."""
    if os.environ.get("MIGRT_CGROUP_YARD", "1") == "0" or os.geteuid() != 0:
        return None
    try:
        want = names(pid)
        if not want:
            return None
        have = None
        for name in want:
            d = os.path.join(YARD, name)
            if _mounted(d):
                continue
            if have is None:
                have = hierarchies(want)
            src = have.get(name)
            if src is None:
                return None
            os.makedirs(d, mode=0o700, exist_ok=True)
            mount(src, d, None, MS_BIND, None)
        return YARD
    except (OSError, ValueError):
        return None


def conf_lines(yard):
    return [f"cgroup-yard {yard}"] if yard else []
