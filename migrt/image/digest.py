"""xxhash digests of image files, whole and per chunk.

One chunk size for the whole image (recorded in the manifest) lets a verifier name the
exact chunk that is bad, and lets the transfer check each chunk as it lands.
"""
import os

import xxhash

CHUNK = 1 << 20


def chunk_digest(data):
    return xxhash.xxh3_64_hexdigest(data)


def whole_digest(chunks):
    """A file's digest: xxh3-128 over its chunk digests (so chunks can be hashed in parallel)."""
    return xxhash.xxh3_128_hexdigest(",".join(chunks).encode())


def file_digests(path, chunk=CHUNK):
    """Return (size, whole-file digest, [per-chunk xxh3-64 hex])."""
    chunks = []
    size = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            size += len(b)
            chunks.append(chunk_digest(b))
    return size, whole_digest(chunks), chunks


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
