"""The migrt checkpoint image: CRIU's images plus what CRIU does not carry.

A migrt image is a directory made by `runc checkpoint` (left as runc wrote it) with
migrt's own files under `migrt/`: the bundle's spec, the container's writable layer
(migrt.image.rootfs) and a manifest of digests (migrt.image.manifest). The runtime core
calls `finalize_checkpoint` after a checkpoint and `verify_image` before a restore.
"""
import json
import os
import platform
import stat

from migrt.errors import CheckpointError
from migrt.image import digest, manifest as mf, rootfs as rfs
from migrt.safeio import open_regular

MANIFEST = mf.MANIFEST
SPEC = mf.SPEC
STAMP = "migrt/verified.json"
# Written by CRIU/runc when an image is restored or used as a work dir; not image content.
_IGNORED_SUFFIXES = (".log", ".socket")
_IGNORED_NAMES = {"stats-restore", STAMP, MANIFEST + ".tmp"}


def parse_rfc3339_ns(s):
    """runc's `created` ("2026-01-02T03:04:05.123456789Z") as ns since the epoch."""
    import calendar
    import re
    m = re.match(r"(\d+)-(\d+)-(\d+)T(\d+):(\d+):(\d+)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", s or "")
    if not m:
        return None
    y, mo, d, h, mi, se, frac, tz = m.groups()
    secs = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(se)))
    if tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        secs -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    ns = int((frac or "0").ljust(9, "0")[:9])
    return secs * 1_000_000_000 + ns


def restrict(path):
    """Make an image readable by its owner only (dirs 0700, files 0600)."""
    for dirpath, dirnames, filenames in os.walk(path):
        os.chmod(dirpath, 0o700)
        for n in filenames:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                os.chmod(p, 0o600)


def rootfs_of(bundle, spec, state=None):
    """The rootfs dir: runc's state.json has config.rootfs, `runc state` has rootfs."""
    state = state or {}
    for r in ((state.get("config") or {}).get("rootfs"), state.get("rootfs")):
        if r:
            return r
    root = (spec.get("root") or {}).get("path", "rootfs")
    return root if os.path.isabs(root) else os.path.join(bundle, root)


def rootfs_base(spec):
    ann = spec.get("annotations") or {}
    return ann.get("migrt.rootfs-base") or os.environ.get("MIGRT_ROOTFS_BASE") or None


def capture_extra(image_dir, container_id, state, bundle, criu_flags, base=None, extra=None,
                  dumped=True, spec_raw=None, rootfs=True, rootfs_dir=None):
    """Add the spec and the writable layer to a CRIU image dir; return the manifest
    without its `files` (the caller digests them, or lets `capture` do it).

    Call while the container's processes cannot change its files (frozen or dumped).
    dumped=False: CRIU is still writing the dir (the container frozen meanwhile); the
    caller then completes the manifest with `after_dump` once CRIU is done.
    spec_raw / rootfs_dir: the bundle's config.json and a view of its rootfs taken before the
    dump, for a bundle its owner may have removed since (containerd does, once the
    dumped task has exited).
    """
    os.makedirs(os.path.join(image_dir, "migrt"), mode=0o700, exist_ok=True)
    if spec_raw is None:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec_raw = f.read()
    raw = spec_raw
    spec = json.loads(raw)
    fd = os.open(os.path.join(image_dir, SPEC), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    since = parse_rfc3339_ns((state or {}).get("created"))
    base = base or rootfs_base(spec)
    if rootfs:
        kind, src, entries, deleted, listings = rfs.diff(
            rootfs_dir or rootfs_of(bundle, spec, state), since, base)
        diff_dir = os.path.join(image_dir, rfs.DIFF_DIR)
        nbytes = rfs.write_diff(src, entries, diff_dir)
    else:
        # the engine that asked carries the writable layer itself, if its user wants it
        kind, entries, deleted, listings, nbytes = "engine", [], [], {}, 0
    info = {"kind": kind, "entries": entries, "deleted": deleted, "listings": listings,
            "bytes": nbytes}
    if base:
        info["base"] = base
    m = {"format": mf.FORMAT, "created": mf.now(),
         "container": {"id": container_id, "bundle": os.path.abspath(bundle),
                       "pid": int((state or {}).get("init_process_pid")
                                  or (state or {}).get("pid") or 0),
                       "status": (state or {}).get("status", "")},
         "node": mf.node_info(), "criu_flags": list(criu_flags or []),
         "chunk_size": digest.CHUNK, "files": [], "rootfs": info, "processes": []}
    from migrt.image.manifest import pod_namespace
    ns = pod_namespace(spec)
    if ns:
        m["container"]["namespace"] = ns
    if extra:
        m.update(extra)
    return after_dump(image_dir, m) if dumped else m


def after_dump(image_dir, m):
    """Finish capture_extra's manifest once CRIU's images are complete: the processes
    they hold, and the whole dir made owner-only."""
    restrict(image_dir)
    from migrt.image import criuimg
    try:
        m["processes"] = criuimg.processes(image_dir)
    except (OSError, ValueError, IndexError):
        m["processes"] = []
    return m


def capture(image_dir, container_id, state, bundle, criu_flags, base=None, extra=None,
            spec_raw=None, rootfs=True, rootfs_dir=None):
    """capture_extra, then digest every file and write the manifest. Returns it."""
    m = capture_extra(image_dir, container_id, state, bundle, criu_flags, base, extra,
                      spec_raw=spec_raw, rootfs=rootfs, rootfs_dir=rootfs_dir)
    m["files"] = mf.file_entries(image_dir)
    mf.parse(json.dumps(m))
    mf.write(image_dir, m)
    return m


ENGINES_WITH_ROOTFS = ("libpod", "cri-o")


def engine_carries_rootfs(bundle, spec_raw=None):
    """podman and CRI-O put the container's writable layer in their own archive
    (rootfs-diff.tar), or leave it out when their user says so (`podman container
    checkpoint --ignore-rootfs`): migrt must not add a copy of it to the images they
    pack, or those files would leave the node whatever the user asked."""
    try:
        if spec_raw is None:
            with open(os.path.join(bundle, "config.json"), "rb") as f:
                spec_raw = f.read()
        ann = json.loads(spec_raw).get("annotations") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return ann.get("io.container.manager") in ENGINES_WITH_ROOTFS


def finalize_checkpoint(image_dir, container_id, state, bundle, criu_flags, spec_raw=None,
                        rootfs_dir=None):
    """Called by the core after a successful `migrt checkpoint`. spec_raw and rootfs_dir:
    the bundle's config.json and a view of its rootfs taken before the dump (a kubelet's
    containerd removes the bundle once the checkpointed task exits)."""
    capture(image_dir, container_id, state, bundle, criu_flags, spec_raw=spec_raw,
            rootfs=not engine_carries_rootfs(bundle, spec_raw), rootfs_dir=rootfs_dir)


def load_manifest(image_dir):
    return mf.load(image_dir)


def _locate(image_dir, rel, rootfs_dir):
    if rootfs_dir and (rel == rfs.DIFF_DIR or rel.startswith(rfs.DIFF_DIR + "/")):
        return os.path.join(rootfs_dir, rel[len(rfs.DIFF_DIR) + 1:])
    return os.path.join(image_dir, rel)


def _stat_key(st):
    return [st.st_size, st.st_ctime_ns, st.st_ino]


def stamp_verified(image_dir, m, rootfs_dir=None):
    """Record that every file was checked (by the agent, as it arrived) and its stat then.

    verify_image trusts this record only while no file's size, ctime or inode changed:
    ctime cannot be set from userspace, so any write since shows.
    """
    files = {}
    for e in m["files"]:
        files[e["path"]] = _stat_key(os.lstat(_locate(image_dir, e["path"], rootfs_dir)))
    st = os.lstat(os.path.join(image_dir, MANIFEST))
    rec = {"manifest": _stat_key(st), "files": files}
    p = os.path.join(image_dir, STAMP)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(rec))


def _stamp_record(image_dir):
    """The agent's verified-on-arrival record (stamp_verified), or None. Only a stamp
    written with this process's own privilege counts: one written by anyone else (the
    agent's unprivileged network side) cannot spare root's checks."""
    from migrt.safeio import open_regular
    try:
        fd = open_regular(os.path.join(image_dir, STAMP))
        with os.fdopen(fd, "rb") as f:
            if os.fstat(f.fileno()).st_uid != os.geteuid():
                return None
            rec = json.loads(f.read(16 << 20))
        return rec if isinstance(rec, dict) and isinstance(rec.get("files"), dict) else None
    except (OSError, ValueError):
        return None


def _stamp_ok(image_dir, m, rootfs_dir, rec=None):
    rec = rec or _stamp_record(image_dir)
    if rec is None:
        return False
    try:
        if rec["manifest"] != _stat_key(os.lstat(os.path.join(image_dir, MANIFEST))):
            return False
        for e in m["files"]:
            if rec["files"].get(e["path"]) != _stat_key(os.lstat(_locate(image_dir, e["path"], rootfs_dir))):
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def verify_image(image_dir, rootfs_dir=None, full=False, check_arch=True):
    """Check every file of a migrt image; raise CheckpointError naming the first bad one.

    Returns the manifest. `full` ignores the agent's verified-on-arrival record.
    """
    rec = None if full else _stamp_record(image_dir)
    # a manifest the agent validated on arrival, unchanged since (same size, ctime and
    # inode, read through the descriptor that was checked), is not validated again: the
    # schema costs 5 ms for a small container's 80 files, in the downtime
    m = mf.load(image_dir, validated=(lambda st: rec["manifest"] == _stat_key(st))
                 if rec else None)
    if check_arch and m["node"]["arch"] != platform.machine():
        raise CheckpointError(f"{os.path.join(image_dir, MANIFEST)}: image made on "
                              f"{m['node']['arch']}, this node is {platform.machine()}")
    if rec and _stamp_ok(image_dir, m, rootfs_dir, rec):
        return m
    chunk = m["chunk_size"]
    listed = set()
    for e in m["files"]:
        rel = e["path"]
        listed.add(rel)
        p = _locate(image_dir, rel, rootfs_dir)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            raise CheckpointError(f"{p}: missing from the image")
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{p}: not a regular file (tampered)")
        if st.st_mode & 0o022:
            raise CheckpointError(f"{p}: writable by group or others (insecure image)")
        if st.st_size != e["size"]:
            what = "truncated" if st.st_size < e["size"] else "longer than recorded"
            raise CheckpointError(f"{p}: {what} ({st.st_size} bytes, manifest says {e['size']})")
        try:
            f = os.fdopen(open_regular(p), "rb", buffering=0)
        except OSError as err:
            raise CheckpointError(f"{p}: {err.strerror or err} (refused)")
        with f:
            for i, want in enumerate(e["chunks"]):
                b = f.read(chunk)
                if digest.chunk_digest(b) != want:
                    raise CheckpointError(f"{p}: chunk {i} (offset {i * chunk}) does not match "
                                          f"its digest (damaged or tampered)")
    tops = [(image_dir, "")]
    if rootfs_dir:
        tops.append((rootfs_dir, rfs.DIFF_DIR))
    for top, prefix in tops:
        for rel in digest.walk_files(top):
            name = os.path.join(prefix, rel) if prefix else rel
            if name in listed or name in _IGNORED_NAMES or name == MANIFEST:
                continue
            if name.endswith(_IGNORED_SUFFIXES) or (rootfs_dir and not prefix
                                                      and name.startswith(rfs.DIFF_DIR + "/")):
                continue
            full_path = os.path.join(top, rel)
            if not os.path.isfile(full_path) or os.path.islink(full_path):
                continue
            raise CheckpointError(f"{full_path}: not in the manifest (tampered)")
    return m


def apply_rootfs(image_dir, bundle, rootfs_dir=None, m=None, spec=None, move=True,
                 journal=None):
    """Put the image's writable layer in place in `bundle`'s rootfs.

    move=True renames the staged files into place (a staged migration is used once);
    move=False copies them, leaving a local image restorable again.
    """
    m = m or mf.load(image_dir)
    if spec is None:
        with open(os.path.join(bundle, "config.json")) as f:
            spec = json.load(f)
    diff_dir = rootfs_dir or os.path.join(image_dir, rfs.DIFF_DIR)
    try:
        return rfs.apply(diff_dir, m["rootfs"], rootfs_of(bundle, spec), move=move,
                         journal=journal)
    except ValueError as e:
        raise CheckpointError(f"{os.path.join(image_dir, MANIFEST)}: {e}")


def prepare_restore(image_dir, bundle, spec, journal=None):
    """Called by the core before restoring a local migrt image: its rootfs changes, copied."""
    return apply_rootfs(image_dir, bundle, spec=spec, move=False, journal=journal)


def rootfs_journal(bundle, spec):
    """A migrt.image.rootfs.Journal for the bundle's rootfs (the core's undo of prepare)."""
    return rfs.Journal(rootfs_of(bundle, spec))


def inspect(image_dir):
    """A summary of an image for people: processes, sizes, memory, rootfs changes."""
    m = mf.load(image_dir)
    from migrt.image import criuimg
    procs = m.get("processes") or criuimg.processes(image_dir)
    sizes = {"criu": 0, "memory": 0, "rootfs": 0, "total": 0}
    for e in m["files"]:
        sizes["total"] += e["size"]
        if e["path"].startswith(rfs.DIFF_DIR + "/"):
            sizes["rootfs"] += e["size"]
        elif not e["path"].startswith("migrt/"):
            sizes["criu"] += e["size"]
            if os.path.basename(e["path"]).startswith("pages-"):
                sizes["memory"] += e["size"]
    r = m["rootfs"]
    return {"container": m["container"], "created": m["created"], "node": {
        k: v for k, v in m["node"].items() if k != "cpu_flags"},
        "criu_flags": m.get("criu_flags", []), "processes": procs, "sizes": sizes,
        "files": len(m["files"]),
        "rootfs": {"kind": r["kind"], "changed": [e["path"] for e in r.get("entries", [])],
                   "deleted": r.get("deleted", []), "bytes": r.get("bytes", 0)}}
