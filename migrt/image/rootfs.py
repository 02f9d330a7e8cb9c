"""The container's writable layer: what changed in its root filesystem since it started.

CRIU carries processes, not files; a container whose files changed must find them
changed on the destination too (CRIU even refuses to restore a file whose size differs).
Three ways to find the changes, best first:

- overlay: the rootfs is an overlay mount; its upper dir *is* the writable layer
  (whiteouts are deletions, opaque dirs replace the lower dir);
- base: the user names the unchanged image (a directory); the rootfs is compared to it;
- since-start: a plain rootfs dir; anything whose ctime is not older than the container
  (ctime cannot be set from userspace) changed, and each changed directory's full listing
  is recorded so the destination can drop the entries deleted there.

The diff is written as regular files under <dest>/files/ plus a list of entries.
"""
import os
import shutil
import stat
from migrt.safeio import makedirs_private

DIFF_DIR = "migrt/rootfs"


def overlay_upper(rootfs):
    """Return the upperdir of the overlay mounted at rootfs, or None."""
    target = os.path.realpath(rootfs)
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        parts = line.split(" - ")
        if len(parts) != 2:
            continue
        left, right = parts[0].split(), parts[1].split()
        if left[4].encode().decode("unicode_escape") != target or right[0] != "overlay":
            continue
        for opt in right[2].split(","):
            if opt.startswith("upperdir="):
                found = opt[len("upperdir="):]
    return found


def _entry(rel, st, top):
    e = {"path": rel, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
         "mtime": st.st_mtime_ns}
    if stat.S_ISDIR(st.st_mode):
        e["type"] = "dir"
    elif stat.S_ISLNK(st.st_mode):
        e["type"] = "symlink"
        e["target"] = os.readlink(os.path.join(top, rel))
    elif stat.S_ISREG(st.st_mode):
        e["type"] = "file"
        e["size"] = st.st_size
    else:
        e["type"] = "other"
    return e


def _criu_temp(dirpath, top, name):
    """CRIU's own temporary dir in the container's /tmp (mount.c: "/tmp/cr-tmpfs.XXXXXX",
    made and removed while it dumps a tmpfs mount, as the rootfs changes are taken): not
    the container's, never carried."""
    return name.startswith("cr-tmpfs.") and len(name) == 15 \
        and os.path.relpath(dirpath, top) == "tmp"


def _walk(top):
    """Yield (relpath, lstat) for everything under top, parents first; what vanishes
    meanwhile is left out."""
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(n for n in dirnames if not _criu_temp(dirpath, top, n))
        for n in dirnames + sorted(filenames):
            full = os.path.join(dirpath, n)
            try:
                yield os.path.relpath(full, top), os.lstat(full)
            except FileNotFoundError:
                continue


def diff(rootfs, since_ns=None, base=None):
    """Find the writable layer of rootfs. Returns (kind, source_dir, entries, deleted, listings)."""
    entries, deleted, listings = [], [], {}
    upper = overlay_upper(rootfs)
    if upper:
        for rel, st in _walk(upper):
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                deleted.append(rel)
                continue
            e = _entry(rel, st, upper)
            if e["type"] == "dir":
                try:
                    if os.getxattr(os.path.join(upper, rel), "trusted.overlay.opaque") == b"y":
                        listings[rel] = sorted(os.listdir(os.path.join(rootfs, rel)))
                except OSError:
                    pass
            if e["type"] != "other":
                entries.append(e)
        return "overlay", upper, entries, deleted, listings
    if base:
        for rel, st in _walk(rootfs):
            try:
                bst = os.lstat(os.path.join(base, rel))
            except FileNotFoundError:
                bst = None
            same = (bst is not None and stat.S_IFMT(bst.st_mode) == stat.S_IFMT(st.st_mode)
                    and bst.st_mode == st.st_mode and bst.st_uid == st.st_uid
                    and bst.st_gid == st.st_gid)
            if same and stat.S_ISREG(st.st_mode):
                same = bst.st_size == st.st_size and bst.st_mtime_ns == st.st_mtime_ns
            elif same and stat.S_ISLNK(st.st_mode):
                same = os.readlink(os.path.join(base, rel)) == os.readlink(os.path.join(rootfs, rel))
            if not same:
                e = _entry(rel, st, rootfs)
                if e["type"] != "other":
                    entries.append(e)
        for rel, _ in _walk(base):
            if not os.path.lexists(os.path.join(rootfs, rel)):
                parent = os.path.dirname(rel)
                if not any(rel.startswith(d + "/") for d in deleted) or not parent:
                    deleted.append(rel)
        return "base", rootfs, entries, deleted, listings
    if since_ns is None:
        return "none", rootfs, [], [], {}
    for rel, st in _walk(rootfs):
        if st.st_ctime_ns < since_ns:
            continue
        try:
            e = _entry(rel, st, rootfs)
            if e["type"] == "dir":
                names = os.listdir(os.path.join(rootfs, rel))
                if rel == "tmp":
                    names = [n for n in names if not _criu_temp(os.path.join(rootfs, "tmp"),
                                                                rootfs, n)]
                listings[rel] = sorted(names)
        except (FileNotFoundError, NotADirectoryError):
            continue            # gone since the walk saw it
        if e["type"] == "other":
            listings.pop(rel, None)
            continue
        entries.append(e)
    try:
        if os.lstat(rootfs).st_ctime_ns >= since_ns:
            listings["."] = sorted(os.listdir(rootfs))
    except OSError:
        pass
    return "since-start", rootfs, entries, deleted, listings


def write_diff(source_dir, entries, dest):
    """Copy the regular files of `entries` from source_dir into dest/files/; return bytes."""
    total = 0
    files = os.path.join(dest, "files")
    makedirs_private(files)
    for e in entries:
        if e["type"] != "file":
            continue
        src = os.path.join(source_dir, e["path"])
        dst = os.path.join(files, e["path"])
        makedirs_private(os.path.dirname(dst))
        with open(src, "rb") as fi:
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
        e["size"] = os.path.getsize(dst)
        total += e["size"]
    return total


def _inside(root, rel):
    """The absolute path of rel under root; refuse anything escaping root."""
    if os.path.isabs(rel) or rel.startswith("../") or "/../" in rel or rel == ".." \
            or rel.endswith("/.."):
        raise ValueError(f"path escapes the rootfs: {rel}")
    if rel == ".":
        return root
    p = os.path.join(root, rel) if rel != "." else root
    parent = os.path.realpath(os.path.dirname(p))
    if not (parent + "/").startswith(os.path.realpath(root) + "/") and parent != os.path.realpath(root):
        raise ValueError(f"path escapes the rootfs: {rel}")
    return p


def _remove(p):
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
    elif os.path.lexists(p):
        os.unlink(p)


UNDO_PREFIX = ".migrt-undo-"


class Journal:
    """What `apply` changed in a rootfs, so that a failed restore can put it back exactly.

    Whatever apply removes or replaces is first moved aside into one dir inside the
    rootfs (a rename on the same filesystem; a copy where overlayfs refuses to rename a
    lower dir); whatever it creates is noted; every dir whose entries or attributes
    change has its mode, owner and times noted. rollback() puts all of it back,
    commit() drops the saved copies once the restore succeeded."""

    def __init__(self, rootfs):
        self.rootfs = rootfs
        self.dir = None
        self.saved = []         # (path, where its original is kept)
        self.created = []
        self.dirs = {}          # path -> lstat before the first change
        self.seen = set()
        self.n = 0

    def _note_dir(self, d):
        if d not in self.dirs:
            try:
                self.dirs[d] = os.lstat(d)
            except OSError:
                pass

    def _covered(self, p):
        q = p
        while q and q != self.rootfs and q != "/":
            if q in self.seen:
                return True
            q = os.path.dirname(q)
        return False

    def save(self, p):
        """Call before p is removed, replaced or created."""
        if self._covered(p):
            return
        self.seen.add(p)
        self._note_dir(os.path.dirname(p))
        if not os.path.lexists(p):
            self.created.append(p)
            return
        if self.dir is None:
            import tempfile
            self._note_dir(self.rootfs)
            self.dir = tempfile.mkdtemp(prefix=UNDO_PREFIX, dir=self.rootfs)
        dst = os.path.join(self.dir, str(self.n))
        self.n += 1
        try:
            os.rename(p, dst)
        except OSError as e:
            if e.errno != 18:               # EXDEV: overlayfs, a lower dir
                raise
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.copytree(p, dst, symlinks=True)
                shutil.rmtree(p)
            else:
                shutil.copy2(p, dst, follow_symlinks=False)
                os.unlink(p)
            st = os.lstat(dst)
            os.lchown(dst, st.st_uid, st.st_gid)
        self.saved.append((p, dst))

    def touch_dir(self, p):
        """Call before an existing dir's mode, owner or times are set."""
        self._note_dir(p)

    def rollback(self):
        for p in reversed(self.created):
            if os.path.lexists(p):
                _remove(p)
        for p, dst in reversed(self.saved):
            if os.path.lexists(p):
                _remove(p)
            os.rename(dst, p)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        for d, st in sorted(self.dirs.items(), key=lambda kv: -len(kv[0])):
            try:
                os.lchown(d, st.st_uid, st.st_gid)
                os.chmod(d, stat.S_IMODE(st.st_mode))
                os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
            except OSError:
                pass

    def commit(self):
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
            st = self.dirs.get(self.rootfs)
            if st is not None:      # the undo dir's coming and going is not a change
                try:
                    os.utime(self.rootfs, ns=(st.st_atime_ns, st.st_mtime_ns))
                except OSError:
                    pass


def apply(diff_dir, info, rootfs, move=True, journal=None):
    """Put the writable layer `info` (manifest's rootfs section) in place under rootfs.

    Regular files are moved with rename (staging lives on the node's disk beside the
    bundles); across filesystems they are copied. Returns the number of bytes copied.
    With a Journal, everything changed can be put back (Journal.rollback).
    The staged files are taken as regular files only (never followed), and attributes
    are set without following symlinks.
    """
    j = journal or Journal(rootfs)
    copied = 0
    for rel in info.get("deleted", []):
        p = _inside(rootfs, rel)
        if os.path.lexists(p):
            j.save(p)
    for rel, names in sorted(info.get("listings", {}).items()):
        d = _inside(rootfs, rel)
        if os.path.isdir(d) and not os.path.islink(d):
            keep = set(names)
            for n in os.listdir(d):
                if n not in keep and not (rel == "." and n.startswith(UNDO_PREFIX)):
                    j.save(os.path.join(d, n))
    files = os.path.join(diff_dir, "files")
    dirs = []
    for e in info.get("entries", []):
        p = _inside(rootfs, e["path"])
        t = e["type"]
        if t == "dir":
            if os.path.lexists(p) and not (os.path.isdir(p) and not os.path.islink(p)):
                j.save(p)
            if not os.path.lexists(p):
                j.save(p)
                os.makedirs(p, exist_ok=True)
            else:
                j.touch_dir(p)
            dirs.append((p, e))
            continue
        j.save(p)
        if t == "symlink":
            os.symlink(e["target"], p)
            os.lchown(p, e["uid"], e["gid"])
            continue
        src = os.path.join(files, e["path"])
        sst = os.lstat(src)
        if not stat.S_ISREG(sst.st_mode):
            raise ValueError(f"rootfs change {e['path']}: not a regular file in the image")
        try:
            if not move:
                raise OSError(18, "copy")
            os.rename(src, p)
        except OSError as err:
            if err.errno != 18:   # EXDEV
                raise
            tmp = p + ".migrt-tmp"
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as fi:
                out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                with os.fdopen(out, "wb") as fo:
                    shutil.copyfileobj(fi, fo, 1 << 20)
            os.replace(tmp, p)
            copied += e.get("size", 0)
        os.chown(p, e["uid"], e["gid"], follow_symlinks=False)
        _chmod_nofollow(p, e["mode"])
        os.utime(p, ns=(e["mtime"], e["mtime"]), follow_symlinks=False)
    for p, e in reversed(dirs):
        os.chown(p, e["uid"], e["gid"], follow_symlinks=False)
        _chmod_nofollow(p, e["mode"])
        os.utime(p, ns=(e["mtime"], e["mtime"]), follow_symlinks=False)
    return copied


def _chmod_nofollow(p, mode):
    """chmod of what p itself is (Linux has no lchmod: through an O_PATH descriptor)."""
    fd = os.open(p, os.O_PATH | os.O_NOFOLLOW)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            return
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)
