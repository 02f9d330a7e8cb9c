"""xxhash digests of image files, whole and per chunk.

One chunk size for the whole image (recorded in the manifest) lets a verifier name the
exact chunk that is bad, and lets the transfer check each chunk as it lands.
"""
import os

import xxhash

CHUNK = 1 << 20


def chunk_digest(data):
    return xxhash.xxh3_64_hexdigest(data)


def file_digests(path, chunk=CHUNK):
    """Return (size, whole-file xxh3-128 hex, [per-chunk xxh3-64 hex])."""
    whole = xxhash.xxh3_128()
    chunks = []
    size = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            size += len(b)
            whole.update(b)
            chunks.append(chunk_digest(b))
    return size, whole.hexdigest(), chunks


class Streaming:
    """Digests of a file written piece by piece, in order (the receiving side)."""

    def __init__(self, chunk=CHUNK):
        self.chunk = chunk
        self.whole = xxhash.xxh3_128()
        self.cur = xxhash.xxh3_64()
        self.fill = 0
        self.size = 0
        self.chunks = []

    def update(self, b):
        self.whole.update(b)
        self.size += len(b)
        mv = memoryview(b)
        while len(mv):
            take = min(self.chunk - self.fill, len(mv))
            self.cur.update(mv[:take])
            self.fill += take
            mv = mv[take:]
            if self.fill == self.chunk:
                self.chunks.append(self.cur.hexdigest())
                self.cur = xxhash.xxh3_64()
                self.fill = 0

    def result(self):
        chunks = list(self.chunks)
        if self.fill:
            chunks.append(self.cur.hexdigest())
        return self.size, self.whole.hexdigest(), chunks


def block_digests(path, block):
    """xxh3-64 integers of every `block` bytes of path (for delta transfer)."""
    out = []
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(block)
            if not b:
                break
            out.append(xxhash.xxh3_64_intdigest(b))
    return out


def walk_files(top):
    """Relative paths of regular files under top, sorted; symlinks are reported as such."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for n in filenames:
            out.append(os.path.relpath(os.path.join(dirpath, n), top))
    return sorted(out)
