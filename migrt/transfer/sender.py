"""Send an image directory to an agent while CRIU may still be writing it.

The directory is cut into chunks of the manifest's chunk size; worker threads, one per
TCP stream, read a chunk, hash it (xxh3), compress it (zstd, which releases the GIL, so
streams compress in parallel) and send it. Files CRIU writes front to back (pages-*.img)
are sent as they grow: a chunk goes as soon as it is complete; everything else goes once
the dump has finished. In delta mode (pre-copy's second round) a worker compares each
block with the block at the same offset of the previous round and sends only those that
differ. The digests computed on the way become the manifest: nothing is read twice.
"""
import fnmatch
import os
import queue
import threading
import time

import xxhash
import zstandard

from migrt.image import digest
from migrt.transfer import wire

TAIL = ("pages-*.img",)
BLOCK = 64 << 10


def _fallocate():
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        f = libc.fallocate
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    PUNCH = 0x01 | 0x02           # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE

    def punch(path, off, n):
        if not n:
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            f(fd, PUNCH, off, n)  # best effort: a filesystem without holes keeps the bytes
        finally:
            os.close(fd)
    return punch


_punch = _fallocate()


class TransferError(Exception):
    """The transfer failed; the message says where."""


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.raw = 0          # bytes of image covered
        self.sent_raw = 0     # bytes actually sent (before compression)
        self.wire = 0         # bytes on the wire (after compression)
        self.chunks = 0
        self.cpu_compress = 0.0

    def add(self, raw, sent_raw, wire_bytes, cpu):
        with self.lock:
            self.raw += raw
            self.sent_raw += sent_raw
            self.wire += wire_bytes
            self.chunks += 1
            self.cpu_compress += cpu


class Sender:
    """One round of sending a directory over `streams` authenticated data connections."""

    def __init__(self, address, secret, mid, streams=4, level=1, chunk=digest.CHUNK,
                 progress=None, hello_extra=None, want_blocks=True, release=False):
        self.address = address
        self.secret = secret
        self.mid = mid
        self.streams = max(1, streams)
        self.level = level
        self.chunk = chunk
        self.progress = progress
        self.stats = Stats()
        self.error = None
        self.hello_extra = hello_extra or {}
        self.digests = {}      # rel -> {chunk index: digest}
        self.blocks = {}       # rel -> {block index: int digest} (for a later delta round)
        self.want_blocks = want_blocks
        self.release = release and _punch is not None
        self.lock = threading.Lock()

    conns = None

    def connect(self):
        """Open and authenticate the data connections (ahead of send(), if called early)."""
        conns = []
        try:
            for _ in range(self.streams):
                c, _ = wire.connect(self.address, self.secret,
                                    dict(self.hello_extra, op="data", mid=self.mid))
                conns.append(c)
        except BaseException:
            for c in conns:
                c.close()
            raise
        self.conns = conns
        return conns

    def _fail(self, msg):
        with self.lock:
            if self.error is None:
                self.error = msg

    def _worker(self, conn, jobs, base):
        comp = zstandard.ZstdCompressor(level=self.level) if self.level > 0 else None
        rbuf = memoryview(bytearray(self.chunk))    # each chunk is read into this one buffer
        ended = False
        try:
            while True:
                job = jobs.get()
                if job is None:
                    ended = True
                    break
                if self.error:
                    continue
                rel, path, off, n = job
                if n > len(rbuf):
                    rbuf = memoryview(bytearray(n))
                data = rbuf[:n]
                with open(path, "rb", buffering=0) as f:
                    if n and os.preadv(f.fileno(), [data], off) != n:
                        raise TransferError(f"{rel}: shrank while being sent")
                idx = off // self.chunk
                d = digest.chunk_digest(data)
                blocks = {}
                mv = memoryview(data)
                old = base.get(rel) if base is not None else None
                if self.want_blocks or old is not None:
                    for b in range(0, len(data), BLOCK):
                        blocks[(off + b) // BLOCK] = xxhash.xxh3_64_intdigest(mv[b:b + BLOCK])
                with self.lock:
                    self.digests.setdefault(rel, {})[idx] = d
                    if self.want_blocks:
                        self.blocks.setdefault(rel, {}).update(blocks)
                t0 = time.thread_time()
                sent_raw = wire_bytes = 0
                if old is None:
                    pieces = [(off, data, True)]
                else:
                    pieces = []
                    for b in range(0, len(data), BLOCK):
                        if old.get((off + b) // BLOCK) != blocks[(off + b) // BLOCK]:
                            if pieces and pieces[-1][0] + len(pieces[-1][1]) == off + b:
                                prev = pieces.pop()
                                pieces.append((prev[0], prev[1] + bytes(mv[b:b + BLOCK]), False))
                            else:
                                pieces.append((off + b, bytes(mv[b:b + BLOCK]), False))
                for poff, pdata, whole in pieces:
                    z = comp.compress(pdata) if comp else pdata
                    head = {"p": rel, "o": poff, "n": len(pdata),
                            "h": digest.chunk_digest(pdata), "z": 1 if comp else 0}
                    if whole:
                        head["c"] = idx
                    conn.send_data(head, z)
                    sent_raw += len(pdata)
                    wire_bytes += len(z)
                if self.release:
                    # sent: this copy of the chunk is no longer needed (a rollback resumes
                    # the container, not this dump), so give its memory back now
                    _punch(path, off, n)
                self.stats.add(n, sent_raw, wire_bytes, time.thread_time() - t0)
                if self.progress:
                    self.progress(self.stats)
            conn.send_json({"op": "eof"})
            conn.read_json()
        except wire.ProtocolError as e:
            self._fail(f"destination: {e}")
        except (OSError, TransferError) as e:
            self._fail(f"transfer to {self.address}: {self._reason(conn) or wire.explain(e)}")
        finally:
            conn.close()
            # after a failure the other streams may be gone too: keep taking jobs (until
            # this worker's end marker) so that send() never blocks on a full queue
            while not ended:
                ended = jobs.get() is None

    @staticmethod
    def _reason(conn):
        """The agent says why before it drops a data connection (a damaged chunk, no
        room): read that instead of reporting our own broken pipe."""
        try:
            conn.sock.settimeout(2)
            conn.read_json()
        except wire.ProtocolError as e:     # read_json raises the agent's {"error": ...}
            return f"destination: {e}"
        except Exception:
            pass
        return None

    def send(self, image_dir, finished, tail=TAIL, base=None, skip=(), rename=None):
        """Send image_dir; `finished()` says whether its writer is done.

        base: the `blocks` of a previous round for a delta. rename maps a top-level
        subdir to another name on the wire. Returns {rel: (size, [chunk digests])}.
        """
        conns, self.conns = self.conns or self.connect(), None
        jobs = queue.Queue(maxsize=self.streams * 8)
        threads = [threading.Thread(target=self._worker, args=(c, jobs, base), daemon=True)
                   for c in conns]
        for t in threads:
            t.start()
        queued = {}
        sizes = {}
        try:
            while True:
                done = finished()
                for rel in digest.walk_files(image_dir):
                    if rel in skip or self.error:
                        continue
                    tailable = any(fnmatch.fnmatch(os.path.basename(rel), p) for p in tail)
                    if not done and not tailable:
                        continue
                    path = os.path.join(image_dir, rel)
                    try:
                        size = os.path.getsize(path)
                    except FileNotFoundError:
                        continue
                    limit = size if done else (size // self.chunk) * self.chunk
                    pos = queued.get(rel, 0)
                    if done and rel not in queued and size == 0:
                        jobs.put((rel, path, 0, 0))
                    while pos < limit:
                        n = min(self.chunk, limit - pos)
                        jobs.put((rel, path, pos, n))
                        pos += n
                    queued[rel] = pos
                    if done:
                        sizes[rel] = size
                if done or self.error:
                    break
                time.sleep(0.01)
        finally:
            for _ in threads:
                jobs.put(None)
            for t in threads:
                t.join()
        if self.error:
            raise TransferError(self.error)
        out = {}
        for rel, size in sizes.items():
            d = self.digests.get(rel, {})
            n = (size + self.chunk - 1) // self.chunk
            out[rel] = (size, [d[i] for i in range(n)])
        return out


def manifest_files(results):
    return [{"path": rel, "size": size, "xxh3": digest.whole_digest(chunks), "chunks": chunks}
            for rel, (size, chunks) in sorted(results.items())]
