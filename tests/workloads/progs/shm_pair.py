"""In the container: two processes sharing a file in /dev/shm and a UNIX socket pair.

The parent writes a pattern of sequence number n into the shared segment and sends n over
the socket; the child checks the segment holds exactly that pattern, writes its answer
(n's pattern, reversed) into the second half and sends n back; the parent checks both.
Prints "S n" every 10 rounds; a mismatch prints BAD and ends the program."""
import mmap
import os
import socket
import struct
import sys
import time

SEG = "/dev/shm/wl-seg"
HALF = 256 << 10


def pattern(n, back=False):
    word = struct.pack("<QQ", n, (n * 0x9E3779B97F4A7C15) & (2 ** 64 - 1))
    if back:
        word = word[::-1]
    return word * (HALF // len(word))


def say(line):
    """One write per line: the two processes share stdout."""
    os.write(1, (line + "\n").encode())


def recv_n(s):
    data = b""
    while len(data) < 8:
        chunk = s.recv(8 - len(data))
        if not chunk:
            say("BAD socket closed")
            os._exit(1)
        data += chunk
    return struct.unpack("<Q", data)[0]


fd = os.open(SEG, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
os.ftruncate(fd, 2 * HALF)
m = mmap.mmap(fd, 2 * HALF, mmap.MAP_SHARED)
parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
if os.fork() == 0:
    parent_end.close()
    while True:
        n = recv_n(child_end)
        if m[:HALF] != pattern(n):
            say(f"BAD child saw another segment for {n}")
            os._exit(1)
        m[HALF:] = pattern(n, back=True)
        child_end.sendall(struct.pack("<Q", n))
child_end.close()
n = 0
while True:
    n += 1
    m[:HALF] = pattern(n)
    parent_end.sendall(struct.pack("<Q", n))
    if recv_n(parent_end) != n or m[HALF:] != pattern(n, back=True):
        say(f"BAD parent: answer for {n} wrong")
        sys.exit(1)
    if n % 10 == 0:
        say(f"S {n}")
    time.sleep(0.002)
