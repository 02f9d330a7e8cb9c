"""In the container: 1 GiB in 4096 separate mappings (shared and private anonymous ones
alternating, so the kernel cannot merge them), each filled with its own pattern; then
passes over all of them for ever: check each one's content, bump its round number.
Prints "P pass" after each full pass, "READY maps" once filled, BAD on a wrong byte."""
import hashlib
import mmap
import struct
import sys

COUNT = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
SIZE = 256 << 10


def body(i):
    seed = hashlib.blake2b(struct.pack("<I", i), digest_size=64).digest()
    return seed * ((SIZE - 64) // 64) + bytes(64 - 8)


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
digests = [hashlib.blake2b(body(i), digest_size=16).digest() for i in range(COUNT)]
while True:
    rnd += 1
    for i, m in enumerate(maps):
        if hashlib.blake2b(m[:SIZE - 8], digest_size=16).digest() != digests[i] or \
                struct.unpack("<Q", m[SIZE - 8:])[0] != rnd - 1:
            print(f"BAD mapping {i} in pass {rnd}", flush=True)
            sys.exit(1)
        m[SIZE - 8:] = struct.pack("<Q", rnd)
    print(f"P {rnd}", flush=True)
