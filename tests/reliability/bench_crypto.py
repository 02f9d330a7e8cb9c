"""What encryption costs: TLS-PSK on the wire against plain TCP, and AES-256-GCM at rest.

    /opt/migrt/venv/bin/python tests/reliability/bench_crypto.py [--mib 1024]

A benchmark (prints figures), not a timed test. Both ends of each connection run in
this one process, so the figures are per stream with both sides' CPU on this machine.
"""
import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from migrt import crypto  # noqa: E402


def stream(total, wrap_server=None, wrap_client=None):
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    info = {}

    def server():
        s, _ = ls.accept()
        if wrap_server:
            s = wrap_server(s)
            info["cipher"] = s.cipher()[0]
        got = 0
        while got < total:
            b = s.recv(1 << 20)
            if not b:
                break
            got += len(b)
    t = threading.Thread(target=server)
    t.start()
    c = socket.create_connection(ls.getsockname())
    if wrap_client:
        c = wrap_client(c)
    buf = os.urandom(1 << 20)
    t0 = time.perf_counter()
    for _ in range(total >> 20):
        c.sendall(buf)
    t.join()
    dt = time.perf_counter() - t0
    c.close()
    ls.close()
    return total / dt / 1e6, info.get("cipher")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    a = ap.parse_args()
    total = a.mib << 20
    secret = os.urandom(32)
    plain, _ = stream(total)
    tls, cipher = stream(total, lambda s: crypto.wrap_server(s, secret),
                         lambda s: crypto.wrap_client(s, secret))
    print(f"wire, one stream, {a.mib} MiB over loopback")
    print(f"  plain TCP        {plain:8.0f} MB/s")
    print(f"  TLS 1.3 PSK      {tls:8.0f} MB/s  ({cipher})")
    d = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        os.environ["MIGRT_KEY_DIR"] = os.path.join(d, "keys")
        os.makedirs(os.path.join(d, "src"))
        n = min(a.mib, 256)
        with open(os.path.join(d, "src", "pages-1.img"), "wb") as f:
            for _ in range(n):
                f.write(os.urandom(1 << 20))
        t0 = time.perf_counter()
        crypto.encrypt_image(os.path.join(d, "src"), os.path.join(d, "enc"))
        enc = (n << 20) / (time.perf_counter() - t0) / 1e6
        t0 = time.perf_counter()
        crypto.decrypt_image(os.path.join(d, "enc"), os.path.join(d, "dec"))
        dec = (n << 20) / (time.perf_counter() - t0) / 1e6
        print(f"at rest, AES-256-GCM, {n} MiB image on tmpfs")
        print(f"  encrypt_image    {enc:8.0f} MB/s")
        print(f"  decrypt_image    {dec:8.0f} MB/s")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
