"""The checkpoints a node holds: list them, remove them, keep only so many.

Looked for in the allowed checkpoint locations (MIGRT_CHECKPOINT_DIRS), two levels
deep (`<dir>/<checkpoint>` or `<dir>/<container>/<checkpoint>`; the kubelet writes
`checkpoint-<pod>_<namespace>-<container>-<time>.tar`): runc/migrt image dirs, engine
archives (.tar, gzip, zstd) and unpacked archive dirs; and the staged migrations of
this node's agent (staged:<id>). migrt's own working dirs under /run/migrt are not
checkpoints and are never listed.

Retention (`gc`) works per container, like the checkpoint-restore-operator's
maxCheckpointsPerContainer: the newest `keep` of each container stay, older ones go, and
anything older than `max_age` goes. A staged migration goes only when it is over
(done, failed) or older than max_age and not being received, restored or filled.
"""
import json
import os
import shutil
import time

from migrt.errors import CheckpointError
from migrt.image import archive

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.zstd")
# migrt's own dirs inside /run/migrt (work dirs, unpacked archives, staging, metrics...)
OWN = {"work", "unpacked", "staged", "metrics", "kept-logs", "journal", "spare", "e2e"}
BUSY = ("receiving", "restoring", "filling")


def _du(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for dirpath, _, files in os.walk(path):
        for n in files:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


def _parse_time(s):
    from migrt.image import parse_rfc3339_ns
    if not isinstance(s, str):
        return None
    ns = parse_rfc3339_ns(s.replace("+00:00", "Z"))
    return ns / 1e9 if ns else None


def kind_of(path):
    """'migrt' | 'runc' | 'archive-dir' | 'archive' | None (not a checkpoint)."""
    if os.path.islink(path):
        return None
    if os.path.isdir(path):
        if archive.is_archive_dir(path):
            return "archive-dir"
        if os.path.isfile(os.path.join(path, "inventory.img")):
            return "migrt" if os.path.isfile(os.path.join(path, "migrt", "manifest.json")) \
                else "runc"
        return None
    if os.path.isfile(path) and path.endswith(ARCHIVE_SUFFIXES):
        return "archive"
    return None


def describe(path, kind):
    """{path, kind, container, created, bytes}: `container` keys retention."""
    e = {"path": path, "kind": kind, "container": None, "namespace": None, "pod": None,
         "created": None, "bytes": _du(path)}
    try:
        if kind == "migrt":
            with open(os.path.join(path, "migrt", "manifest.json")) as f:
                m = json.load(f)
            c = m.get("container") or {}
            e.update(container=c.get("id"), namespace=c.get("namespace"),
                     created=_parse_time(m.get("created")))
        elif kind == "archive-dir":
            d = archive.describe(path)
            e.update(container=d["name"] or d["id"], namespace=d["namespace"], pod=d["pod"],
                     created=_parse_time(d["checkpointed"]) or None)
        elif kind == "archive":
            e.update(_archive_name_facts(os.path.basename(path)))
    except (OSError, ValueError, CheckpointError, AttributeError):
        pass
    if e["created"] is None:
        e["created"] = os.lstat(path).st_mtime
    if not e["container"]:
        # a plain runc dir records no container: its parent dir often is one
        e["container"] = os.path.basename(os.path.dirname(path)) + "/?"
    return e


def _archive_name_facts(name):
    """The kubelet's name: checkpoint-<pod>_<namespace>-<container>-<RFC3339>.tar;
    podman's and others': no rule, the file is the container."""
    import re
    m = re.match(r"^checkpoint-(.+)_([a-z0-9-]+)-(.+)-(\d{4}-\d\d-\d\dT[\d:.]+Z?)\.tar", name)
    if m:
        pod, ns, ctr, when = m.groups()
        return {"container": f"{ns}/{pod}/{ctr}", "namespace": ns, "pod": pod,
                "created": _parse_time(when if when.endswith("Z") else when + "Z")}
    return {}


def scan(dirs=None):
    """Every checkpoint in the allowed locations, oldest first."""
    from migrt.runtime.checkpoints import allowed_dirs
    out, seen = [], set()
    for top in dirs or allowed_dirs():
        if not os.path.isdir(top):
            continue
        for depth1 in sorted(os.listdir(top)):
            if depth1.startswith(".") or (top.rstrip("/").endswith("/run/migrt") and depth1 in OWN):
                continue
            p = os.path.join(top, depth1)
            k = kind_of(p)
            if k:
                if os.path.realpath(p) not in seen:
                    seen.add(os.path.realpath(p))
                    out.append(describe(p, k))
                continue
            if os.path.isdir(p) and not os.path.islink(p):
                try:
                    names = sorted(os.listdir(p))
                except OSError:
                    continue
                for depth2 in names:
                    q = os.path.join(p, depth2)
                    k = kind_of(q)
                    if k and os.path.realpath(q) not in seen:
                        seen.add(os.path.realpath(q))
                        out.append(describe(q, k))
    return sorted(out, key=lambda e: e["created"] or 0)


def staged(staging=None):
    from migrt.agent import staging as stg
    out = []
    for s in stg.all_staged(staging or stg.staging_root()):
        rec = s.read() or {}
        size = _du(s.dir) + (_du(s.disk_dir) if s.disk_dir and os.path.isdir(s.disk_dir) else 0)
        out.append({"path": f"staged:{s.mid}", "kind": "staged", "state": rec.get("state"),
                    "container": rec.get("container"), "namespace": None, "pod": None,
                    "created": rec.get("created") or os.lstat(s.dir).st_mtime,
                    "updated": rec.get("updated"), "bytes": size})
    return out


def remove(path, force=False):
    """Remove one checkpoint (a path in an allowed location, or staged:<id>)."""
    if path.startswith("staged:"):
        from migrt.agent.staging import Staged, valid_mid
        mid = path[len("staged:"):]
        if not valid_mid(mid):
            raise CheckpointError(f"{path}: not a migration id")
        s = Staged(mid)
        rec = s.read()
        if rec is None:
            raise CheckpointError(f"{path}: no such staged migration in {os.path.dirname(s.dir)}")
        if rec.get("state") in BUSY and not force:
            raise CheckpointError(f"{path} is {rec['state']}: the agent is using it "
                                  f"(--force removes it anyway)")
        s.remove()
        return
    from migrt.runtime.checkpoints import check_allowed
    if not os.path.lexists(path):
        raise CheckpointError(f"{path} does not exist")
    real = check_allowed(path, path)
    if os.path.islink(path):
        raise CheckpointError(f"{path} is a symlink; remove what it names instead")
    if kind_of(real) is None:
        raise CheckpointError(f"{path} is not a checkpoint (no CRIU images, not an archive); "
                              f"not removing it")
    if os.path.isdir(real):
        shutil.rmtree(real)
    else:
        os.unlink(real)


def plan_gc(entries, keep=None, max_age=None, now=None):
    """Which checkpoints go: beyond the newest `keep` of their container, or older than
    max_age seconds. Returns [(entry, reason)]."""
    now = time.time() if now is None else now
    groups = {}
    for e in entries:
        groups.setdefault((e.get("namespace"), e["container"]), []).append(e)
    out = []
    for _, es in sorted(groups.items(), key=lambda kv: str(kv[0])):
        es = sorted(es, key=lambda e: e["created"] or 0, reverse=True)
        for i, e in enumerate(es):
            age = now - (e["created"] or now)
            if keep is not None and i >= keep:
                out.append((e, f"beyond the newest {keep} of {e['container']}"))
            elif max_age is not None and age > max_age:
                out.append((e, f"{age / 3600:.1f} h old"))
    return out


def plan_gc_staged(entries, max_age=None, now=None):
    now = time.time() if now is None else now
    out = []
    for e in entries:
        state = e.get("state")
        age = now - (e.get("updated") or e["created"] or now)
        if state in ("done", "failed"):
            out.append((e, f"{state}"))
        elif state not in BUSY and max_age is not None and age > max_age:
            out.append((e, f"{state}, {age / 3600:.1f} h old"))
    return out


def parse_age(s):
    """'90s', '30m', '12h', '7d', or seconds."""
    if s is None:
        return None
    s = s.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    try:
        if s and s[-1] in units:
            return float(s[:-1]) * units[s[-1]]
        return float(s)
    except ValueError:
        raise CheckpointError(f"--max-age {s!r}: give a number of seconds, or 30m, 12h, 7d")
