"""The transfer alone: MB/s and CPU of each side, per zstd level and stream count.

    /opt/migrt/venv/bin/python tests/bench/bench_transfer.py [--mib 1024] [--levels 0,1,3]
        [--streams 1,4] [--markdown]

migrt's Sender sends a pages image from tmpfs to a receiving process (the agent's data
path: TLS 1.3-PSK, xxh3 per chunk, zstd, migrt.transfer.receiver.Stage into tmpfs) on
loopback, with no CRIU running. The image is the benchmark workload's memory pattern
(tests/bench/memtouch.c: 4 random bytes, 4 zero bytes), so zstd gets about 2:1. It says
whether compression or the transfer itself would be a migration's bottleneck: CPU seconds
per GiB for each side, and the throughput one core of each gives.
"""
import argparse
import multiprocessing as mp
import os
import random
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import psutil  # noqa: E402
import zstandard  # noqa: E402

from migrt.transfer import receiver, sender as snd, wire  # noqa: E402

SECRET = b"bench-transfer-secret-0123456789abcdef"
MID = "m-0000000000bench0"


def make_image(path, mib):
    rnd = random.Random(1)
    with open(path, "wb") as f:
        for _ in range(mib):
            words = [rnd.getrandbits(32) for _ in range(1 << 17)]
            f.write(struct.pack(f"<{len(words) * 2}I", *[x for w in words for x in (w, 0)]))


def split_image(src, n):
    """pages-1.img cut into n page files of equal size, each with a 56-byte pagemap file
    (the size of CRIU's pagemap-shmem image for one run of pages)."""
    whole = os.path.join(src, "pages-1.img")
    size = os.path.getsize(whole)
    piece = size // n
    with open(whole, "rb") as f:
        for i in range(n):
            with open(os.path.join(src, f"pages-{i + 2}.img"), "wb") as out:
                out.write(f.read(piece))
            with open(os.path.join(src, f"pagemap-shmem-{i + 1}.img"), "wb") as out:
                out.write(os.urandom(56))
    os.unlink(whole)


def serve(dest, q):
    """The receiving side, in its own process so that its CPU is counted apart."""
    stage = receiver.Stage(os.path.join(dest, "image"), os.path.join(dest, "rootfs"))
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    q.put(lsock.getsockname()[1])

    def conn(s):
        c, _ = wire.accept(s, SECRET)
        d = zstandard.ZstdDecompressor()
        try:
            while True:
                kind, payload = c.read_frame()
                if kind == b"J":
                    c.send_json({"ok": True})
                    return
                stage.write(payload[0], payload[1], d)
        finally:
            c.close()
    while True:
        s, _ = lsock.accept()
        threading.Thread(target=conn, args=(s,), daemon=True).start()


def one(src, mib, level, streams, work):
    dest = tempfile.mkdtemp(dir=work)
    q = mp.Queue()
    p = mp.Process(target=serve, args=(dest, q), daemon=True)
    p.start()
    port = q.get(timeout=30)
    child = psutil.Process(p.pid)
    c0, m0, t0 = child.cpu_times(), psutil.Process().cpu_times(), time.monotonic()
    s = snd.Sender(f"127.0.0.1:{port}", SECRET, MID, streams=streams, level=level,
                   want_blocks=False)
    s.send(src, lambda: True)
    dt = time.monotonic() - t0
    c1, m1 = child.cpu_times(), psutil.Process().cpu_times()
    p.kill()
    p.join()
    shutil.rmtree(dest, ignore_errors=True)
    gib = mib / 1024
    send_cpu = (m1.user - m0.user) + (m1.system - m0.system)
    recv_cpu = (c1.user - c0.user) + (c1.system - c0.system)
    return {"level": level, "streams": streams, "seconds": dt, "MBps": mib * 1048576 / dt / 1e6,
            "wire_ratio": s.stats.wire / max(1, s.stats.raw),
            "send_cpu_per_GiB": send_cpu / gib, "recv_cpu_per_GiB": recv_cpu / gib,
            "compress_cpu_per_GiB": s.stats.cpu_compress / gib}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--levels", default="0,1,3")
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--files", default="1",
                    help="N,...: the image also cut into N page files, each with a small "
                         "pagemap file beside it, as CRIU writes one of each per shared "
                         "memory object (per-file costs)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="migrt-bench-xfer-", dir="/dev/shm")
    try:
        srcs = {}
        for nf in (int(x) for x in args.files.split(",")):
            src = srcs[nf] = os.path.join(work, f"src-{nf}")
            os.makedirs(src)
            make_image(os.path.join(src, "pages-1.img"), args.mib)
            if nf > 1:
                split_image(src, nf)
        # one run thrown away: on a VM that hands free pages back to the host, the first
        # run pays host faults for the receiver's fresh tmpfs pages (docs/engine.md)
        one(srcs[min(srcs)], args.mib, 0, 4, work)
        rows = [dict(one(src, args.mib, lv, st, work), files=nf)
                for nf, src in srcs.items()
                for lv in (int(x) for x in args.levels.split(","))
                for st in (int(x) for x in args.streams.split(","))]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    head = ("page files", "zstd level", "streams", "MB/s", "wire/raw", "sender CPU s/GiB",
            "of which stream threads", "receiver CPU s/GiB")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
    for r in rows:
        cells = (str(r["files"]), str(r["level"]), str(r["streams"]), f"{r['MBps']:.0f}",
                 f"{r['wire_ratio']:.2f}", f"{r['send_cpu_per_GiB']:.2f}",
                 f"{r['compress_cpu_per_GiB']:.2f}", f"{r['recv_cpu_per_GiB']:.2f}")
        print(("| " + " | ".join(cells) + " |") if args.markdown else "  ".join(
            f"{h}={c}" for h, c in zip(head, cells)))


if __name__ == "__main__":
    main()
