"""Any checkpoint a user may hand `migrt image`: what it is, what it holds, is it sound.

Forms: a migrt image (runc's dir plus migrt/manifest.json), a plain `runc checkpoint` /
`ctr` / podman images dir, an engine archive (podman, CRI-O, kubelet: a .tar, plain,
gzip or zstd) or the directory it was unpacked into, and `staged:<migration-id>`.
"""
import contextlib
import os
import platform
import shutil
import tarfile
import tempfile

from migrt.errors import CheckpointError
from migrt.image import archive


class Opened:
    """kind: migrt | runc | archive | archive-dir | staged; image_dir holds CRIU's
    images; root is the engine archive's root (or None); rootfs_dir a staged
    migration's separate writable layer."""

    def __init__(self, path, kind, image_dir, root=None, rootfs_dir=None):
        self.path, self.kind, self.image_dir = path, kind, image_dir
        self.root, self.rootfs_dir = root, rootfs_dir

    @property
    def is_migrt(self):
        return os.path.isfile(os.path.join(self.image_dir, "migrt", "manifest.json"))


@contextlib.contextmanager
def opened(path):
    """Yield an Opened for path; an archive file is unpacked into a temporary dir,
    removed afterwards."""
    if path.startswith("staged:"):
        from migrt.agent.staging import Staged, valid_mid
        mid = path[len("staged:"):]
        if not valid_mid(mid):
            raise CheckpointError(f"{path}: not a migration id")
        s = Staged(mid)
        if s.read() is None:
            raise CheckpointError(f"{path}: no such staged migration in {os.path.dirname(s.dir)}")
        yield Opened(path, "staged", s.image_dir, rootfs_dir=s.rootfs_dir or None)
        return
    if not os.path.lexists(path):
        raise CheckpointError(f"{path} does not exist")
    if os.path.isfile(path):
        tmp = tempfile.mkdtemp(prefix="migrt-inspect-")
        try:
            archive.unpack(path, tmp, path)
            yield Opened(path, "archive", os.path.join(tmp, archive.CHECKPOINT), root=tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is neither a checkpoint directory nor an archive")
    if archive.is_archive_dir(path):
        yield Opened(path, "archive-dir", os.path.join(path, archive.CHECKPOINT), root=path)
        return
    yield Opened(path, "migrt" if os.path.isfile(os.path.join(path, "migrt", "manifest.json"))
                 else "runc", path)


def _sizes(image_dir):
    sizes = {"criu": 0, "memory": 0, "rootfs": 0, "total": 0}
    n = 0
    for dirpath, _, files in os.walk(image_dir):
        for f in files:
            p = os.path.join(dirpath, f)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            size = os.path.getsize(p)
            n += 1
            sizes["total"] += size
            sizes["criu"] += size
            if f.startswith("pages-"):
                sizes["memory"] += size
    return sizes, n


def _arch(image_dir, name):
    from migrt.runtime.checkpoints import core_arch
    cores = sorted(e for e in os.listdir(image_dir) if e.startswith("core-") and e.endswith(".img"))
    return core_arch(os.path.join(image_dir, cores[0]), name) if cores else "?"


def inspect(path):
    """The summary `migrt image inspect` prints (and --json dumps)."""
    from migrt import image
    from migrt.image import criuimg
    with opened(path) as o:
        if o.is_migrt:
            info = image.inspect(o.image_dir)
        else:
            if not os.path.isfile(os.path.join(o.image_dir, "inventory.img")):
                raise CheckpointError(f"{path}: no CRIU images here (no inventory.img); not a "
                                      f"checkpoint")
            sizes, n = _sizes(o.image_dir)
            info = {"container": {"id": ""}, "created": "", "node": {"arch": _arch(o.image_dir, path)},
                    "criu_flags": [], "processes": criuimg.processes(o.image_dir),
                    "sizes": sizes, "files": n,
                    "rootfs": {"kind": "none", "changed": [], "deleted": [], "bytes": 0}}
        info["format"] = o.kind if o.kind != "staged" else "migrt"
        if o.kind == "staged":
            info["format"] = "staged migrt image"
        elif o.kind in ("archive", "archive-dir"):
            d = archive.describe(o.root)
            info["format"] = f"checkpoint archive ({d['engine']})" + \
                (f", {archive.compression(path)}" if o.kind == "archive" else ", unpacked")
            info["engine"] = d
            for k in ("name", "image", "namespace", "pod"):
                if d.get(k) and not info["container"].get(k):
                    info["container"][k] = d[k]
            kind = (info.get("rootfs") or {}).get("kind")
            if not o.is_migrt or kind == "engine":
                if not o.is_migrt:
                    info["container"] = {"id": d["id"], "name": d["name"], "image": d["image"],
                                         "namespace": d["namespace"], "pod": d["pod"]}
                    info["created"] = d["created"]
                members = archive.check_rootfs_diff(o.root, path)
                changed = [m.name for m in members]
                nbytes = sum(m.size for m in members if m.isreg())
                info["rootfs"] = {"kind": "rootfs-diff.tar", "changed": changed,
                                  "deleted": [p.lstrip("/") for p in archive.deleted_files(o.root, path)],
                                  "bytes": nbytes}
                info["sizes"]["rootfs"] = nbytes
                info["sizes"]["total"] += nbytes
        return info


def verify(path):
    """Check a checkpoint as the restore marker would (complete, no symlinks, this
    architecture, archive members safe), plus every digest of a migrt image.
    Returns a summary; raises CheckpointError naming the first problem."""
    from migrt import image
    from migrt.runtime.checkpoints import validate
    with opened(path) as o:
        out = {"path": path, "format": o.kind, "ok": True}
        if o.kind == "staged":
            m = image.verify_image(o.image_dir, rootfs_dir=o.rootfs_dir, full=True)
        else:
            validate(o.image_dir, path)
            m = image.verify_image(o.image_dir, full=True) if o.is_migrt else None
        if o.root:
            archive.check_rootfs_diff(o.root, path)
            archive.deleted_files(o.root, path)
        if m:
            out.update(digests=True, files=len(m["files"]),
                       chunks=sum(len(e["chunks"]) for e in m["files"]),
                       bytes=sum(e["size"] for e in m["files"]))
        else:
            sizes, n = _sizes(o.image_dir)
            out.update(digests=False, files=n, bytes=sizes["total"])
        out["arch"] = platform.machine()
        return out
