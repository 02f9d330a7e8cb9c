"""In the container: 1 GiB in 4096 separate mappings (shared and private anonymous ones
alternating, so the kernel cannot merge them), each filled with its own pattern; then
passes over all of them for ever: check each one's content, bump its round number.
Prints "P pass" after each full pass, "READY maps" once filled, BAD on a wrong byte."""
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
            print(f"BAD mapping {i} in pass {rnd}", flush=True)
            sys.exit(1)
        m[SIZE - 8:] = struct.pack("<Q", rnd)
    print(f"P {rnd}", flush=True)
