"""nginx (master and worker) serving a file under a request loop, one new connection per
request, migrated: no request fails except one that timed out within the downtime, and
nothing a client received is corrupt."""
import hashlib
import os
import socket
import threading
import time

import wl

PORT = 80
TIMEOUT = 15.0
CONF = """daemon off;
user root;
master_process on;
worker_processes 1;
pid /run/nginx.pid;
error_log stderr warn;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path /tmp/body;
    proxy_temp_path /tmp/proxy;
    fastcgi_temp_path /tmp/fastcgi;
    uwsgi_temp_path /tmp/uwsgi;
    scgi_temp_path /tmp/scgi;
    server {
        listen 80;
        root /data/www;
    }
}
"""


def base_with(blob):
    def build(root):
        os.makedirs(f"{root}/data/www")
        with open(f"{root}/data/www/blob", "wb") as f:
            f.write(blob)
        with open(f"{root}/data/nginx.conf", "w") as f:
            f.write(CONF)
    return build


def get(net, ip, path, timeout=TIMEOUT):
    """One HTTP/1.0 GET on a new connection: (status, body)."""
    s = wl.connect(net, ip, PORT, timeout=timeout)
    try:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: wl\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    length = [int(v) for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")[1:])
              if k.strip().lower() == b"content-length"]
    if length and len(body) != length[0]:
        raise ConnectionError(f"short body: {len(body)} of {length[0]} bytes")
    return status, body


class Loop(threading.Thread):
    """GET /blob on a new connection, again and again; every outcome kept with its time."""

    def __init__(self, net, ip, digest):
        super().__init__(daemon=True)
        self.net, self.ip, self.digest = net, ip, digest
        self.results = []       # (start, end, "ok" | "corrupt" | "timeout" | "error: ...")
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                status, body = get(self.net, self.ip, "/blob")
                if status != 200:
                    what = f"error: HTTP {status}"
                elif hashlib.sha256(body).hexdigest() != self.digest:
                    what = "corrupt"
                else:
                    what = "ok"
            except socket.timeout:
                what = "timeout"
            except OSError as e:
                what = f"error: {e!r}"
            self.results.append((t0, time.monotonic(), what))

    def count(self, what):
        return sum(1 for r in self.results if r[2] == what)

    def failures(self):
        return [r for r in self.results if r[2] != "ok"]

    def longest_gap(self):
        oks = [r[1] for r in self.results if r[2] == "ok"]
        return max((b - a for a, b in zip(oks, oks[1:])), default=0.0)


def run(cluster, mode):
    blob = os.urandom(256 << 10)
    digest = hashlib.sha256(blob).hexdigest()
    cid, addr, dst = cluster.container("nginx", base_with(blob),
                                       ["nginx", "-c", "/data/nginx.conf"])
    cluster.wait_serving(cid, addr, PORT)
    loop = Loop(cluster.net, addr.ip, digest)
    loop.start()
    wl.ocitest.wait_for(lambda: loop.count("ok") > 50, timeout=30, what="requests served")
    mig = cluster.migrate(cid, addr, dst, mode)
    if mig.ok:
        n = loop.count("ok")
        try:
            wl.ocitest.wait_for(lambda: loop.count("ok") > n + 50, timeout=40,
                                what="requests served after the migration")
        except AssertionError:
            pass
    loop.stop.set()
    loop.join(TIMEOUT + 5)
    return cid, addr, mig, loop


def test_nginx(cluster, mode):
    cid, addr, mig, loop = run(cluster, mode)
    wl.assert_moved(cluster, cid, mig)
    assert loop.count("corrupt") == 0
    # a request may time out only if it was sent while the container was frozen
    lo, hi = mig.frozen_window()
    bad = [r for r in loop.failures() if not (r[2] == "timeout" and lo <= r[0] <= hi)]
    assert bad == [], [(round(s - mig.t0, 3), round(e - mig.t0, 3), w) for s, e, w in bad][:10]
    after = [r for r in loop.results if r[0] > mig.t1]
    assert len([r for r in after if r[2] == "ok"]) >= 50, "node B did not serve the loop"
    # node B's nginx: both processes there, and a new request answered
    assert len(cluster.dest_pids(cid)) == 2, cluster.dest_pids(cid)
    status, body = get(cluster.net, addr.ip, "/blob")
    assert status == 200 and hashlib.sha256(body).hexdigest() == loop.digest
