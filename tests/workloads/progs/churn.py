"""In the container: memory that is freed, refilled and shared with children while a
lazy migration still streams it in. 256 MiB in one private mapping (64 blocks of 4 MiB,
each filled with its own number) and 1024 small private mappings of 64 KiB (each its
own number, each next to a shared page so that the kernel cannot merge them); then passes for ever: in every block, free a 256 KiB window (madvise
MADV_DONTNEED) at an offset that moves each pass, check that it reads back as zeros and
that the rest of the block still holds the block's number, write the window again;
check every small mapping; every 4th pass fork a child that checks a few blocks and
exits. Prints "C pass" after each pass, "READY" once filled, BAD (where, and whether
the page was zero) on a wrong byte."""
import mmap
import os
import struct
import sys

BLOCK = 4 << 20
BLOCKS = 64
WINDOW = 256 << 10
SMALL = 64 << 10
SMALLS = 1024


def pattern(i, size):
    return struct.pack("<I", i) * (size // 4)


def bad(what, got, want):
    page = next(o for o in range(0, len(want), 4096) if got[o:o + 4096] != want[o:o + 4096])
    zero = got[page:page + 4096] == bytes(4096)
    print(f"BAD {what}: page {page // 4096} differs ({'zero' if zero else 'other data'})",
          flush=True)
    sys.exit(1)


big = mmap.mmap(-1, BLOCK * BLOCKS, flags=mmap.MAP_PRIVATE)
for b in range(BLOCKS):
    big[b * BLOCK:(b + 1) * BLOCK] = pattern(b, BLOCK)
smalls, seps = [], []
for i in range(SMALLS):
    m = mmap.mmap(-1, SMALL, flags=mmap.MAP_PRIVATE)
    m[:] = pattern(BLOCKS + i, SMALL)
    smalls.append(m)
    seps.append(mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED))
print("READY", flush=True)

rnd = 0
while True:
    rnd += 1
    off = (rnd * 3 * WINDOW) % (BLOCK - WINDOW)
    zeros = bytes(WINDOW)
    for b in range(BLOCKS):
        base = b * BLOCK
        want = pattern(b, BLOCK)
        big.madvise(mmap.MADV_DONTNEED, base + off, WINDOW)
        got = big[base + off:base + off + WINDOW]
        if got != zeros:
            print(f"BAD block {b} window at {off}: not zero after MADV_DONTNEED", flush=True)
            sys.exit(1)
        big[base + off:base + off + WINDOW] = want[:WINDOW]
        got = big[base:base + BLOCK]
        if got != want:
            bad(f"block {b} in pass {rnd}", got, want)
    for i, m in enumerate(smalls):
        want = pattern(BLOCKS + i, SMALL)
        if m[:] != want:
            bad(f"small mapping {i} in pass {rnd}", m[:], want)
    if rnd % 4 == 1:
        pid = os.fork()
        if pid == 0:
            for b in range(0, BLOCKS, 7):
                if big[b * BLOCK:(b + 1) * BLOCK] != pattern(b, BLOCK):
                    print(f"BAD child of pass {rnd}: block {b}", flush=True)
                    os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            print(f"BAD child of pass {rnd} exited with status {status:#x}", flush=True)
            sys.exit(1)
    print(f"C {rnd}", flush=True)
