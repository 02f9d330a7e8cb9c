"""The container-engine checkpoint archive: what podman, CRI-O and the kubelet write.

`podman container checkpoint --export`, CRI-O and the kubelet's checkpoint API
(KEP-2008) all write one tar (plain, gzip or zstd) laid out as:

    checkpoint/        CRIU's images, as `runc checkpoint` left them
    config.dump        the engine's container record (id, name, image, created...)
    spec.dump          the container's OCI spec
    rootfs-diff.tar    the container's writable layer (paths relative to its root)
    deleted.files      JSON list of paths deleted from the image's files
    network.status, stats-dump, devshm-checkpoint.tar, volumes/ ...   (optional)

`checkpointctl show|inspect` reads these. This module reads them (the tar itself, or
the directory it was unpacked into) for the restore marker and `migrt image`, and
writes them (`migrt image export`) from a migrt image or a staged migration.

Nothing of an archive is trusted: every member of the outer tar must be a regular
file or directory with a relative path; every member of rootfs-diff.tar and every
path in deleted.files must stay inside the container's root filesystem once applied
(symlinks already in that root are not followed out of it). A hostile archive is
refused with one line naming the member.
"""
import io
import json
import os
import shutil
import stat
import tarfile
import time

from migrt.errors import CheckpointError

CHECKPOINT = "checkpoint"
CONFIG_DUMP = "config.dump"
SPEC_DUMP = "spec.dump"
ROOTFS_DIFF = "rootfs-diff.tar"
DELETED = "deleted.files"
NETWORK = "network.status"
STATS = "stats-dump"

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
UNPACK_DIR = os.environ.get("MIGRT_UNPACK_DIR", "/run/migrt/unpacked")


# ---------------------------------------------------------------- recognising

def is_archive_dir(path):
    """An unpacked engine archive: checkpoint/ with CRIU's inventory, and the engine's
    dumps beside it."""
    return (os.path.isdir(os.path.join(path, CHECKPOINT))
            and os.path.isfile(os.path.join(path, CHECKPOINT, "inventory.img"))
            and not os.path.exists(os.path.join(path, "inventory.img")))


def compression(path):
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


class _Reader:
    """A tar stream of a (maybe compressed) archive file, as a context manager."""

    def __init__(self, path, name):
        self.path, self.name = path, name

    def __enter__(self):
        self.f = open(self.path, "rb")
        kind = compression(self.path)
        try:
            if kind == "zstd":
                import zstandard
                self.stream = zstandard.ZstdDecompressor().stream_reader(self.f)
                self.tar = tarfile.open(fileobj=self.stream, mode="r|")
            else:
                self.stream = None
                self.tar = tarfile.open(fileobj=self.f, mode="r|gz" if kind == "gzip" else "r|")
        except (tarfile.TarError, OSError, EOFError) as e:
            self.f.close()
            raise CheckpointError(f"checkpoint {self.name}: not a checkpoint archive "
                                  f"(tar, gzip or zstd): {e}")
        return self.tar

    def __exit__(self, *exc):
        self.tar.close()
        if self.stream is not None:
            self.stream.close()
        self.f.close()


def _clean_name(name, where):
    """A member name as a safe relative path, or CheckpointError."""
    n = name
    while n.startswith("./"):
        n = n[2:]
    n = n.rstrip("/")
    parts = n.split("/")
    if not n or name.startswith("/") or any(p in ("..",) for p in parts):
        raise CheckpointError(f"{where}: entry {name!r} escapes the archive; refusing it")
    return "/".join(p for p in parts if p not in ("", "."))


# ---------------------------------------------------------------- unpacking

def unpack(path, dest, name=None):
    """Unpack an engine archive into dest (created, owner-only). Returns dest.

    Only regular files and directories with relative paths are taken; anything else
    (a link, a device, a path with `..`) refuses the whole archive."""
    name = name or path
    where = f"checkpoint {name}"
    os.makedirs(dest, mode=0o700, exist_ok=True)
    seen_ckpt = False
    try:
        with _Reader(path, name) as tar:
            for m in tar:
                rel = _clean_name(m.name, where)
                if not rel:
                    continue
                if not (m.isreg() or m.isdir()):
                    kind = ("symlink" if m.issym() else "hard link" if m.islnk() else
                            "device" if (m.ischr() or m.isblk()) else "special file")
                    raise CheckpointError(f"{where}: entry {m.name!r} is a {kind}; a checkpoint "
                                          f"archive holds only files and directories; refusing it")
                target = os.path.join(dest, rel)
                _no_links_on_the_way(dest, rel, where)
                if rel == CHECKPOINT or rel.startswith(CHECKPOINT + "/"):
                    seen_ckpt = True
                if m.isdir():
                    os.makedirs(target, mode=0o700, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
                src = tar.extractfile(m)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    except (tarfile.TarError, EOFError) as e:
        raise CheckpointError(f"{where}: damaged archive: {e}")
    except OSError as e:
        raise CheckpointError(f"{where}: cannot unpack into {dest}: {e.strerror or e}")
    if not seen_ckpt:
        raise CheckpointError(f"{where}: no {CHECKPOINT}/ directory in the archive "
                              f"(not a podman, CRI-O or kubelet checkpoint archive)")
    return dest


def _no_links_on_the_way(top, rel, where):
    p = top
    for part in rel.split("/"):
        p = os.path.join(p, part)
        if os.path.islink(p):
            raise CheckpointError(f"{where}: entry {rel!r} passes a symlink; refusing it")


def unpack_private(path, name=None):
    """Unpack a marker's archive into a fresh dir of its own under UNPACK_DIR."""
    os.makedirs(UNPACK_DIR, mode=0o700, exist_ok=True)
    import tempfile
    dest = tempfile.mkdtemp(prefix="a-", dir=UNPACK_DIR)
    try:
        return unpack(path, dest, name)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


# ---------------------------------------------------------------- reading an unpacked archive

def read_json(root, rel, default=None):
    try:
        with open(os.path.join(root, rel)) as f:
            return json.load(f)
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(root, rel)}: not readable JSON: {e}")


def engine_of(spec):
    ann = (spec or {}).get("annotations") or {}
    m = ann.get("io.container.manager")
    if m == "libpod":
        return "podman"
    if m == "cri-o":
        return "CRI-O"
    if ann.get("migrt.exported"):
        return "migrt"
    return "containerd"


def deleted_files(root, name):
    lst = read_json(root, DELETED, [])
    if not isinstance(lst, list) or not all(isinstance(x, str) for x in lst):
        raise CheckpointError(f"checkpoint {name}: {DELETED} is not a list of paths")
    return lst


def _inside(rootfs, rel, where):
    """Absolute host path of container path `rel` under rootfs; refuse an escape
    (`..`, or a parent that resolves outside through a symlink already there)."""
    rel = rel.lstrip("/")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise CheckpointError(f"{where}: {rel!r} escapes the container's root filesystem; "
                              f"refusing the checkpoint")
    real_root = os.path.realpath(rootfs)
    p = os.path.join(rootfs, *parts)
    parent = os.path.realpath(os.path.dirname(p))
    if parent != real_root and not parent.startswith(real_root + "/"):
        raise CheckpointError(f"{where}: {rel!r} leads outside the container's root filesystem "
                              f"(through a symlink); refusing the checkpoint")
    return p


def check_rootfs_diff(root, name):
    """Read rootfs-diff.tar's member list and refuse anything that cannot be applied
    safely; returns the members (no data read)."""
    path = os.path.join(root, ROOTFS_DIFF)
    where = f"checkpoint {name}: {ROOTFS_DIFF}"
    if not os.path.exists(path):
        return []
    out = []
    try:
        with tarfile.open(path, "r:") as t:
            for m in t.getmembers():
                rel = m.name
                parts = [p for p in rel.split("/") if p not in ("", ".")]
                if rel.startswith("/") or ".." in parts:
                    raise CheckpointError(f"{where}: entry {rel!r} escapes the container's root "
                                          f"filesystem; refusing the checkpoint")
                if not parts:
                    continue
                if m.ischr() or m.isblk():
                    raise CheckpointError(f"{where}: entry {rel!r} is a device node; refusing "
                                          f"the checkpoint")
                if m.islnk():
                    lp = [p for p in m.linkname.split("/") if p not in ("", ".")]
                    if m.linkname.startswith("/") or ".." in lp:
                        raise CheckpointError(f"{where}: hard link {rel!r} points outside the "
                                              f"container's root filesystem; refusing the checkpoint")
                out.append(m)
    except tarfile.TarError as e:
        raise CheckpointError(f"{where}: damaged: {e}")
    return out


def apply_rootfs(root, rootfs, name):
    """Apply deleted.files, then rootfs-diff.tar, to a bundle's rootfs."""
    where = f"checkpoint {name}"
    members = check_rootfs_diff(root, name)
    gone = [_inside(rootfs, rel, f"{where}: {DELETED}") for rel in deleted_files(root, name)]
    for p in gone:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)
    if not members:
        return 0
    total = 0
    dirs = []
    with tarfile.open(os.path.join(root, ROOTFS_DIFF), "r:") as t:
        for m in members:
            p = _inside(rootfs, m.name, f"{where}: {ROOTFS_DIFF}")
            if m.isdir():
                if os.path.lexists(p) and (os.path.islink(p) or not os.path.isdir(p)):
                    os.unlink(p)
                os.makedirs(p, exist_ok=True)
                dirs.append((p, m))
                continue
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            elif os.path.lexists(p):
                os.unlink(p)
            if m.issym():
                os.symlink(m.linkname, p)
                os.lchown(p, m.uid, m.gid)
                continue
            if m.islnk():
                os.link(_inside(rootfs, m.linkname, f"{where}: {ROOTFS_DIFF}"), p,
                        follow_symlinks=False)
                continue
            if m.isfifo():
                os.mkfifo(p, 0o600)
            elif m.isreg():
                src = t.extractfile(m)
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                total += m.size
            else:
                continue
            os.chown(p, m.uid, m.gid)
            os.chmod(p, m.mode & 0o7777)
            os.utime(p, (m.mtime, m.mtime))
    for p, m in reversed(dirs):
        os.chown(p, m.uid, m.gid)
        os.chmod(p, m.mode & 0o7777)
        os.utime(p, (m.mtime, m.mtime))
    return total


def describe(root):
    """What the engine recorded about the container: for inspect, and the pod namespace."""
    cfg = read_json(root, CONFIG_DUMP, {}) or {}
    spec = read_json(root, SPEC_DUMP, {}) or {}
    ann = spec.get("annotations") or {}
    ns = (ann.get("io.kubernetes.pod.namespace") or ann.get("io.kubernetes.cri.sandbox-namespace")
          or None)
    name = cfg.get("name") or ann.get("io.kubernetes.cri.container-name") or ""
    return {"engine": engine_of(spec), "id": cfg.get("id", ""), "name": name,
            "image": cfg.get("rootfsImageName") or cfg.get("rootfsImageRef") or "",
            "runtime": cfg.get("runtime", ""), "created": cfg.get("createdTime", ""),
            "checkpointed": cfg.get("checkpointedTime", ""), "namespace": ns,
            "pod": ann.get("io.kubernetes.pod.name") or ann.get("io.kubernetes.cri.sandbox-name")}


# ---------------------------------------------------------------- writing (migrt image export)

def _add_file(tar, path, arcname):
    st = os.stat(path)
    ti = tarfile.TarInfo(arcname)
    ti.size, ti.mode, ti.mtime = st.st_size, stat.S_IMODE(st.st_mode), int(st.st_mtime)
    with open(path, "rb") as f:
        tar.addfile(ti, f)


def _add_bytes(tar, arcname, data, mode=0o600):
    ti = tarfile.TarInfo(arcname)
    ti.size, ti.mode, ti.mtime = len(data), mode, int(time.time())
    tar.addfile(ti, io.BytesIO(data))


def _add_dir(tar, arcname, mode=0o700):
    ti = tarfile.TarInfo(arcname)
    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, mode, int(time.time())
    tar.addfile(ti)


def rootfs_diff_bytes(m, diff_dir):
    """rootfs-diff.tar of a migrt manifest's writable layer (files from diff_dir/files)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for e in (m.get("rootfs") or {}).get("entries", []):
            ti = tarfile.TarInfo(e["path"])
            ti.mode, ti.uid, ti.gid = e["mode"], e["uid"], e["gid"]
            ti.mtime = e["mtime"] / 1e9
            if e["type"] == "dir":
                ti.type = tarfile.DIRTYPE
                t.addfile(ti)
            elif e["type"] == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, e["target"]
                t.addfile(ti)
            elif e["type"] == "file":
                src = os.path.join(diff_dir, "files", e["path"])
                ti.size = os.path.getsize(src)
                with open(src, "rb") as f:
                    t.addfile(ti, f)
    return buf.getvalue()


def export(image_dir, dest, m, rootfs_dir=None, compress="none"):
    """Write a migrt image (manifest m) as an engine checkpoint archive at dest.

    checkpoint/ is the whole migrt image (so a restore through the marker verifies it
    against its manifest as before); rootfs-diff.tar and deleted.files carry its
    writable layer for podman, CRI-O and checkpointctl."""
    from migrt.image import rootfs as rfs
    diff_dir = rootfs_dir or os.path.join(image_dir, rfs.DIFF_DIR)
    from migrt.image.manifest import SPEC
    with open(os.path.join(image_dir, SPEC), "rb") as f:
        spec = json.loads(f.read())
    spec.setdefault("annotations", {})["migrt.exported"] = m["container"]["id"]
    c = m["container"]
    cfg = {"id": c["id"], "name": c["id"], "rootfsImageName": "",
           "runtime": "runc", "createdTime": m["created"], "checkpointedTime": m["created"],
           "restored": False, "migrt": {"node": m["node"].get("hostname"),
                                         "bundle": c.get("bundle")}}
    tmp = dest + ".migrt-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    raw = os.fdopen(fd, "wb")
    try:
        if compress == "zstd":
            import zstandard
            out = zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False)
            mode = "w|"
        elif compress == "gzip":
            out, mode = raw, "w|gz"
        else:
            out, mode = raw, "w|"
        with tarfile.open(fileobj=out, mode=mode, format=tarfile.PAX_FORMAT) as t:
            _add_dir(t, CHECKPOINT)
            # exactly the files the manifest lists (a staged migration keeps its
            # writable layer apart: rootfs_dir stands for migrt/rootfs), and the manifest
            from migrt.image import _locate, MANIFEST
            made = set()
            for rel in [e["path"] for e in m["files"]] + [MANIFEST]:
                parts = rel.split("/")
                for i in range(1, len(parts)):
                    d = "/".join(parts[:i])
                    if d not in made:
                        made.add(d)
                        _add_dir(t, f"{CHECKPOINT}/{d}")
                src = os.path.join(image_dir, rel) if rel == MANIFEST else \
                    _locate(image_dir, rel, rootfs_dir)
                _add_file(t, src, f"{CHECKPOINT}/{rel}")
            stats = os.path.join(image_dir, STATS)
            if os.path.isfile(stats):
                _add_file(t, stats, STATS)
            _add_bytes(t, CONFIG_DUMP, json.dumps(cfg, indent=2).encode())
            _add_bytes(t, SPEC_DUMP, json.dumps(spec, indent=2).encode())
            _add_bytes(t, NETWORK, b"null")
            _add_bytes(t, ROOTFS_DIFF, rootfs_diff_bytes(m, diff_dir))
            deleted = ["/" + p for p in (m.get("rootfs") or {}).get("deleted", [])]
            _add_bytes(t, DELETED, json.dumps(deleted, indent=2).encode())
        if out is not raw:
            out.close()
        raw.close()
        os.replace(tmp, dest)
    except BaseException:
        raw.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return dest
