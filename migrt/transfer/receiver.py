"""Write arriving chunks into a staging directory and check them.

Every chunk is checked against the xxh3 digest its sender computed before it is
written; at the end the manifest's per-chunk digests are compared with what arrived
(chunks patched by a delta round are read back and hashed again), so the staged image
is known good before anyone restores from it. Paths are confined to the staging dirs,
and a byte quota (and the filesystem's own free space) bounds what a peer can write.
"""
import os
import threading

import zstandard

from migrt.image import digest, manifest as mf
from migrt.image.rootfs import DIFF_DIR
from migrt.safeio import makedirs_private


class StageError(Exception):
    """The staged image is bad or does not fit; the message names the file."""


def _check_rel(rel):
    if (not isinstance(rel, str) or not rel or rel.startswith("/") or "\0" in rel
            or any(p in ("..", ".", "") for p in rel.split("/")) or len(rel) > 4096):
        raise StageError(f"refusing path {rel!r}")
    return rel


def _hash_chunks(path, size, indexes, chunk):
    """{index: digest} of the given chunks of a file, hashed where the file's pages are
    (mmap): a delta round patches blocks all over an image, and reading every patched
    chunk back into fresh buffers took most of the commit."""
    import mmap
    out = {}
    with open(path, "rb", buffering=0) as f:
        if size == 0:
            return {i: digest.chunk_digest(b"") for i in indexes}
        with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
            view = memoryview(m)
            try:
                for i in indexes:
                    out[i] = digest.chunk_digest(view[i * chunk:(i + 1) * chunk])
            finally:
                view.release()
    return out


class Stage:
    """One staged migration's files: memory images on tmpfs, rootfs changes on disk."""

    def __init__(self, image_dir, rootfs_dir, quota=None, chunk=digest.CHUNK):
        self.image_dir = image_dir
        self.rootfs_dir = rootfs_dir
        self.quota = quota
        self.chunk = chunk
        self.lock = threading.Lock()
        # one write at a time: parallel writes to one file queue on its inode lock
        # inside the kernel, where waiters spin and take the CPU that CRIU needs
        self.write_lock = threading.Lock()
        self.fds = {}
        self.dirs = set()    # dirs made and checked (no symlink on the way) for fds
        self.known = {}      # rel -> {chunk index: digest} as received
        self.touched = {}    # rel -> set of chunk indexes patched by a delta
        self.touches = {}    # rel -> {chunk index: patches written so far}
        self.written = 0
        self.error = None
        for d in (image_dir, rootfs_dir):
            makedirs_private(d)

    def path(self, rel):
        _check_rel(rel)
        if rel.startswith(DIFF_DIR + "/"):
            return os.path.join(self.rootfs_dir, rel[len(DIFF_DIR) + 1:])
        return os.path.join(self.image_dir, rel)

    def _fd(self, rel):
        fd = self.fds.get(rel)
        if fd is None:
            p = self.path(rel)
            parent = os.path.dirname(p)
            if parent not in self.dirs:
                # (once per dir: an image of thousands of shared-memory objects is
                # thousands of files in one dir)
                makedirs_private(parent)
                if os.path.realpath(parent) != parent:
                    raise StageError(f"refusing path {rel!r} (symlink in the way)")
                self.dirs.add(parent)
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            self.fds[rel] = fd
        return fd

    def write(self, head, payload, dctx):
        """Check and write one data frame. Raises StageError."""
        rel = head.get("p")
        off, n, h = head.get("o"), head.get("n"), head.get("h")
        if not (isinstance(off, int) and isinstance(n, int) and 0 <= off and 0 <= n <= 64 << 20):
            raise StageError(f"{rel}: malformed chunk header")
        if head.get("z"):
            try:
                data = dctx.decompress(payload, max_output_size=n) if n else b""
            except zstandard.ZstdError as e:
                raise StageError(f"{rel}: chunk at offset {off} does not decompress ({e})")
        else:
            data = payload
        if len(data) != n or digest.chunk_digest(data) != h:
            raise StageError(f"{rel}: chunk at offset {off} arrived damaged (digest mismatch)")
        with self.lock:
            if self.error:
                raise StageError(self.error)
            if self.quota is not None and self.written + n > self.quota:
                raise StageError(f"no room on the destination: staging quota of "
                                 f"{self.quota} bytes exceeded")
            self.written += n
            fd = self._fd(rel)
            idx = head.get("c")
            if isinstance(idx, int) and idx * self.chunk == off:
                self.known.setdefault(rel, {})[idx] = h
            else:
                t = self.touched.setdefault(rel, set())
                g = self.touches.setdefault(rel, {})
                for c in range(off // self.chunk, (off + max(n, 1) - 1) // self.chunk + 1):
                    t.add(c)
                    g[c] = g.get(c, 0) + 1
            end = head.get("e")
            mine = self.touches.get(rel, {}).get(end)
        try:
            with self.write_lock:
                os.pwrite(fd, data, off)
                if isinstance(end, int) and 0 <= end == off // self.chunk:
                    # a delta's last patch of this chunk: hash the patched chunk now
                    whole = os.pread(fd, self.chunk, end * self.chunk)
                else:
                    whole = None
        except OSError as e:
            if e.errno == 28:
                raise StageError(f"no room on the destination: {self.path(rel)}: {e.strerror}")
            raise StageError(f"{self.path(rel)}: {e.strerror}")
        if whole is not None:
            d = digest.chunk_digest(whole)
            with self.lock:
                # (a patch of this chunk written after it leaves it to the commit)
                if self.touches.get(rel, {}).get(end) == mine:
                    self.known.setdefault(rel, {})[end] = d
                    self.touched.get(rel, set()).discard(end)

    def fail(self, msg):
        with self.lock:
            if self.error is None:
                self.error = msg

    def finish(self, manifest):
        """Compare what arrived with the manifest; write it. Returns the manifest."""
        m = mf.parse(manifest if isinstance(manifest, (bytes, str)) else
                     __import__("json").dumps(manifest), "manifest from the source")
        if m["chunk_size"] != self.chunk:
            raise StageError("manifest chunk size differs from the transfer's")
        want = {e["path"]: e for e in m["files"]}
        for rel in list(self.fds):
            if rel not in want:
                os.close(self.fds.pop(rel))
        for top, prefix in ((self.image_dir, ""), (self.rootfs_dir, DIFF_DIR)):
            for rel in digest.walk_files(top):
                name = f"{prefix}/{rel}" if prefix else rel
                if name not in want and name != mf.MANIFEST:
                    os.unlink(os.path.join(top, rel))
        for rel, e in sorted(want.items()):
            p = self.path(rel)
            fd = self.fds.get(rel)
            if fd is None:
                if not os.path.exists(p):
                    raise StageError(f"{rel}: never arrived")
                fd = self._fd(rel)
            size = os.fstat(fd).st_size
            if size != e["size"]:
                if size < e["size"] and rel not in self.touched and rel not in self.known:
                    raise StageError(f"{rel}: incomplete ({size} of {e['size']} bytes)")
                os.ftruncate(fd, e["size"])
                self.touched.setdefault(rel, set()).add(max(0, (min(size, e["size"]) - 1)) // self.chunk)
            known = self.known.get(rel, {})
            touched = self.touched.get(rel, set())
            recheck = [i for i in range(len(e["chunks"])) if i in touched or known.get(i) is None]
            got = dict(known)
            if recheck:
                got.update(_hash_chunks(p, e["size"], recheck, self.chunk))
            for i, d in enumerate(e["chunks"]):
                if got.get(i) != d:
                    raise StageError(f"{rel}: chunk {i} does not match the manifest")
            os.fchmod(fd, 0o600)
        self.close()
        mf.write(self.image_dir, m)
        from migrt import image
        image.stamp_verified(self.image_dir, m, self.rootfs_dir)
        self.known = {e["path"]: dict(enumerate(e["chunks"])) for e in m["files"]}
        self.touched = {}
        self.touches = {}
        return m

    def close(self):
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = {}
