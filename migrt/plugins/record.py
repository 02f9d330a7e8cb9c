"""migrt's record of one container's checkpoints, restores and migrations.

Kept per container under /var/lib/migrt/containers/<id>@<root key>/ (MIGRT_LOG_DIR, or
the logs plugin's `dir` option), keyed by the runtime root as well as the id: containerd's
`c1` in one namespace, another namespace's `c1` and a runc root's `c1` are different
containers (meta.json says which: id, root). Inside: events.jsonl (one JSON object per event: time, node,
event, phases and timings, error) and criu/ (copies of CRIU's dump and restore logs).
The logs plugin carries the events inside every checkpoint, so the record on the
destination node continues the source's. `migrt logs <id>` shows it; the migration
engine adds its own phases with `append(cid, {"event": "migrate", ...})`. A record with
no event for MIGRT_RECORD_DAYS (30) is removed (`sweep`).
"""
import json
import os
import shutil
import socket
import time
import uuid
from migrt.safeio import makedirs_private

DEFAULT_DIR = "/var/lib/migrt/containers"
KEEP_EVENTS = 1000      # events.jsonl keeps the newest this many events of an id
CARRY_EVENTS = 200      # a checkpoint carries the newest this many
_TRIM_AT = 512 << 10    # ...looked at when the file passes this size
KEEP_DAYS = 30.0        # an id's record goes after this many days without an event
SWEEP_EVERY = 3600      # seconds between two looks for such records


def base_dir(override=None):
    return override or os.environ.get("MIGRT_LOG_DIR") or DEFAULT_DIR


META = "meta.json"


def root_key(root):
    import hashlib
    return hashlib.sha1(os.path.realpath(root).encode()).hexdigest()[:10]


def key(cid, root=None):
    """The record's dir name: <id>@<root key>, or <id> alone without a root (records
    made before roots were told apart, and callers that know none)."""
    if not cid or "/" in cid or cid in (".", "..") or "@" in cid:
        raise ValueError(f"bad container id {cid!r}")
    return f"{cid}@{root_key(root)}" if root else cid


def container_dir(cid, base=None, create=True, root=None):
    d = os.path.join(base_dir(base), key(cid, root))
    if create:
        makedirs_private(os.path.join(d, "criu"))
        meta = os.path.join(d, META)
        if not os.path.exists(meta):
            tmp = meta + ".tmp"
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(json.dumps({"id": cid, "root": os.path.realpath(root) if root else None}))
            os.replace(tmp, meta)
    return d


def read_meta(d):
    try:
        with open(os.path.join(d, META)) as f:
            m = json.load(f)
        if isinstance(m, dict) and isinstance(m.get("id"), str):
            return m
    except (OSError, ValueError):
        pass
    name = os.path.basename(d)
    return {"id": name.split("@", 1)[0], "root": None}


def records(base=None):
    """[(dir, meta)] of every container record, by id then root."""
    top = base_dir(base)
    try:
        names = sorted(os.listdir(top))
    except OSError:
        return []
    out = []
    for n in names:
        d = os.path.join(top, n)
        if not n.startswith(".") and os.path.isdir(d):
            out.append((d, read_meta(d)))
    return out


def find(query, base=None, root=None):
    """Records whose id is `query`, or starts with it (a short id, at least 4
    characters), optionally only under runtime root `root`. [(dir, meta)]"""
    rr = os.path.realpath(root) if root else None
    hits = []
    for d, m in records(base):
        if rr and m.get("root") != rr:
            continue
        cid = m["id"]
        if cid == query or (len(query) >= 4 and cid.startswith(query)):
            hits.append((d, m))
    exact = [h for h in hits if h[1]["id"] == query]
    return exact or hits


def keep_days():
    try:
        return float(os.environ.get("MIGRT_RECORD_DAYS", KEEP_DAYS))
    except ValueError:
        return KEEP_DAYS


def sweep(base=None, days=None, now=None, every=SWEEP_EVERY):
    """Remove the records of ids with no event for `days` (MIGRT_RECORD_DAYS, 30; 0
    keeps them all). Records outlive their containers so that `migrt logs` can still
    tell where one went, but a node that moves containers all day must not keep one
    dir per id forever. Called off the downtime (a container's delete, the agent's
    janitor); looks at most once per `every` seconds (a stamp file), so that it costs
    one stat on the common path. Returns the ids removed."""
    days = keep_days() if days is None else days
    if days <= 0:
        return []
    top = base_dir(base)
    now = time.time() if now is None else now
    stamp = os.path.join(top, ".swept")
    try:
        if now - os.stat(stamp).st_mtime < every:
            return []
    except OSError:
        pass
    try:
        with open(os.open(stamp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w"):
            pass
        os.utime(stamp, (now, now))
        names = os.listdir(top)
    except OSError:
        return []
    cutoff = now - days * 86400
    gone = []
    for name in names:
        d = os.path.join(top, name)
        if name.startswith(".") or not os.path.isdir(d):
            continue
        try:
            newest = max(os.stat(os.path.join(d, f)).st_mtime
                         for f in ("", "events.jsonl", "criu") if os.path.exists(os.path.join(d, f)))
        except (OSError, ValueError):
            continue
        if newest < cutoff:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(name)
    return gone


def _stamp(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % int((t % 1) * 1000)


def append(cid, event, base=None, root=None):
    """Add one event; returns it (with id, time and node filled in)."""
    now = time.time()
    ev = {"id": uuid.uuid4().hex[:16], "time": _stamp(now), "node": socket.gethostname()}
    ev.update({k: v for k, v in event.items() if v is not None})
    path = os.path.join(container_dir(cid, base, root=root), "events.jsonl")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (json.dumps(ev, sort_keys=True) + "\n").encode())
        big = os.fstat(fd).st_size > _TRIM_AT
    finally:
        os.close(fd)
    if big:
        # an id that is used again and again (a name, not a generated id) must not
        # make every checkpoint carry, and every restore merge, all of its history
        _rewrite(path, events(cid, base, root)[-KEEP_EVENTS:])
    return ev


def _rewrite(path, evs):
    tmp = path + ".tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        for e in evs:
            f.write(json.dumps(e, sort_keys=True) + "\n")
    os.replace(tmp, path)


def events(cid, base=None, root=None, d=None):
    path = os.path.join(d or container_dir(cid, base, create=False, root=root), "events.jsonl")
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return out


def merge(cid, incoming, base=None, root=None):
    """Add events carried by a checkpoint that this node's record does not have yet."""
    existing = events(cid, base, root)
    have = {e.get("id") for e in existing}
    new = [e for e in incoming if e.get("id") not in have]
    if not new:
        return 0
    path = os.path.join(container_dir(cid, base, root=root), "events.jsonl")
    allev = sorted(existing + new, key=lambda e: e.get("time", ""))
    _rewrite(path, allev[-KEEP_EVENTS:])
    return len(new)


def keep_criu_log(cid, src, kind, keep=20, base=None, root=None):
    """Copy a CRIU log into the record; returns the copy's path or None."""
    if not src or not os.path.exists(src):
        return None
    d = os.path.join(container_dir(cid, base, root=root), "criu")
    dest = os.path.join(d, time.strftime("%Y%m%dT%H%M%S", time.gmtime())
                        + f"-{time.time_ns() % 1000000:06d}-{kind}.log")
    shutil.copyfile(src, dest)
    os.chmod(dest, 0o600)
    logs = sorted(os.listdir(d))
    for old in logs[:-keep] if keep > 0 else []:
        try:
            os.unlink(os.path.join(d, old))
        except OSError:
            pass
    return dest


def criu_logs(cid, base=None, root=None, d=None):
    d = os.path.join(d or container_dir(cid, base, create=False, root=root), "criu")
    try:
        return [os.path.join(d, n) for n in sorted(os.listdir(d))]
    except OSError:
        return []
