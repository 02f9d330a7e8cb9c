"""migrt's record of one container's checkpoints, restores and migrations.

Kept per container id under /var/lib/migrt/containers/<id>/ (MIGRT_LOG_DIR, or the
logs plugin's `dir` option): events.jsonl (one JSON object per event: time, node,
event, phases and timings, error) and criu/ (copies of CRIU's dump and restore logs).
The logs plugin carries the events inside every checkpoint, so the record on the
destination node continues the source's. `migrt logs <id>` shows it; the migration
engine adds its own phases with `append(cid, {"event": "migrate", ...})`.
"""
import json
import os
import shutil
import socket
import time
import uuid

DEFAULT_DIR = "/var/lib/migrt/containers"
KEEP_EVENTS = 1000      # events.jsonl keeps the newest this many events of an id
CARRY_EVENTS = 200      # a checkpoint carries the newest this many
_TRIM_AT = 512 << 10    # ...looked at when the file passes this size


def base_dir(override=None):
    return override or os.environ.get("MIGRT_LOG_DIR") or DEFAULT_DIR


def container_dir(cid, base=None, create=True):
    if not cid or "/" in cid or cid in (".", ".."):
        raise ValueError(f"bad container id {cid!r}")
    d = os.path.join(base_dir(base), cid)
    if create:
        os.makedirs(os.path.join(d, "criu"), mode=0o700, exist_ok=True)
    return d


def _stamp(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % int((t % 1) * 1000)


def append(cid, event, base=None):
    """Add one event; returns it (with id, time and node filled in)."""
    now = time.time()
    ev = {"id": uuid.uuid4().hex[:16], "time": _stamp(now), "node": socket.gethostname()}
    ev.update({k: v for k, v in event.items() if v is not None})
    path = os.path.join(container_dir(cid, base), "events.jsonl")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (json.dumps(ev, sort_keys=True) + "\n").encode())
        big = os.fstat(fd).st_size > _TRIM_AT
    finally:
        os.close(fd)
    if big:
        # an id that is used again and again (a name, not a generated id) must not
        # make every checkpoint carry, and every restore merge, all of its history
        _rewrite(path, events(cid, base)[-KEEP_EVENTS:])
    return ev


def _rewrite(path, evs):
    tmp = path + ".tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        for e in evs:
            f.write(json.dumps(e, sort_keys=True) + "\n")
    os.replace(tmp, path)


def events(cid, base=None):
    path = os.path.join(container_dir(cid, base, create=False), "events.jsonl")
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


def merge(cid, incoming, base=None):
    """Add events carried by a checkpoint that this node's record does not have yet."""
    existing = events(cid, base)
    have = {e.get("id") for e in existing}
    new = [e for e in incoming if e.get("id") not in have]
    if not new:
        return 0
    path = os.path.join(container_dir(cid, base), "events.jsonl")
    allev = sorted(existing + new, key=lambda e: e.get("time", ""))
    _rewrite(path, allev[-KEEP_EVENTS:])
    return len(new)


def keep_criu_log(cid, src, kind, keep=20, base=None):
    """Copy a CRIU log into the record; returns the copy's path or None."""
    if not src or not os.path.exists(src):
        return None
    d = os.path.join(container_dir(cid, base), "criu")
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


def criu_logs(cid, base=None):
    d = os.path.join(container_dir(cid, base, create=False), "criu")
    try:
        return [os.path.join(d, n) for n in sorted(os.listdir(d))]
    except OSError:
        return []
