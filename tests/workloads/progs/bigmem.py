"""In the container: 1 GiB in 4096 separate mappings (shared and private anonymous ones
alternating, so the kernel cannot merge them), each filled with its own pattern; then
passes over all of them for ever: check each one's content, bump its round number.
Prints "P pass" after each full pass, "READY maps" once filled, BAD (which pages, and
whether they are zero) on a wrong byte."""
import mmap
import struct
import sys

COUNT = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
SIZE = 256 << 10


def body(i):
    """Mapping i's content (but its last 8 bytes): its number, over and over."""
    return (struct.pack("<I", i) * (SIZE // 4))[:SIZE - 8]


maps = []
for i in range(COUNT):
    flags = mmap.MAP_SHARED if i % 2 else mmap.MAP_PRIVATE
    m = mmap.mmap(-1, SIZE, flags=flags)
    m[:SIZE - 8] = body(i)
    m[SIZE - 8:] = struct.pack("<Q", 0)
    maps.append(m)
with open("/proc/self/maps") as f:
    print(f"READY {sum(1 for _ in f)}", flush=True)
rnd = 0
while True:
    rnd += 1
    for i, m in enumerate(maps):
        if m[:SIZE - 8] != body(i) or \
                struct.unpack("<Q", m[SIZE - 8:])[0] != rnd - 1:
            # what a user would want to know: which page went wrong, and was it zeroed
            # (a page never filled in) or someone else's content
            want = body(i) + struct.pack("<Q", rnd - 1)
            bad = [o // 4096 for o in range(0, SIZE, 4096) if m[o:o + 4096] != want[o:o + 4096]]
            zero = sum(1 for p in bad if m[p * 4096:(p + 1) * 4096] == bytes(4096))
            print(f"BAD mapping {i} in pass {rnd}: {len(bad)} of {SIZE // 4096} pages wrong "
                  f"(first {bad[0]}), {zero} of them zero", flush=True)
            sys.exit(1)
        m[SIZE - 8:] = struct.pack("<Q", rnd)
    print(f"P {rnd}", flush=True)
