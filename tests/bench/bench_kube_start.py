#!/usr/bin/env python3
"""Benchmark: pod start latency on a real Kubernetes, runtimeClassName migrt vs runc.

Starts the two-node cluster of tests/kube (Kubernetes 1.20.2 built by
packaging/build-kubernetes.sh), the migrt handler pointing at a launcher for this
checkout. Then N pods per handler are created one after the other, alternating migrt and
runc (the kubelet's own handler) and both nodes, so both handlers see the same machine
and cluster state. Each pod's latency is from just before its POST to the API server to
the watch event that first shows it Running (all its containers started), read from one
watch stream. Prints medians and means per handler and the ratio migrt/runc (target,
issue 13: <= 1.1).

    /opt/migrt/venv/bin/python tests/bench/bench_kube_start.py [-n 20] [--migrt PATH]

Needs root, containerd, runc (no network: images are built from a busybox rootfs).
Note: the kubelet 1.20 notices started containers through its PLEG relist (every 1 s),
so single latencies are quantised by about a second; compare medians over many pods.
"""
import argparse
import http.client
import json
import os
import ssl
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(TESTS, "kube"), TESTS]

import ocitest  # noqa: E402
import cluster as kc  # noqa: E402


class Api:
    def __init__(self, c):
        host, port = c.server.split("//")[1].split(":")
        self.host, self.port = host, int(port)
        self.ns = c.namespace
        self.ctx = ssl.create_default_context(cafile=c.pki.ca)
        self.ctx.load_cert_chain(os.path.join(c.pki.dir, "admin.crt"),
                                 os.path.join(c.pki.dir, "admin.key"))

    def conn(self, timeout=60):
        return http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=timeout)

    def create_pod(self, manifest):
        h = self.conn()
        h.request("POST", f"/api/v1/namespaces/{self.ns}/pods", body=json.dumps(manifest),
                  headers={"Content-Type": "application/json"})
        r = h.getresponse()
        body = r.read()
        h.close()
        if r.status != 201:
            raise RuntimeError(f"create pod: {r.status} {body[:300]!r}")


def watch_running(api, seen, stop):
    """Record the first moment each pod is seen Running (from a watch stream)."""
    h = api.conn(timeout=3600)
    h.request("GET", f"/api/v1/namespaces/{api.ns}/pods?watch=1")
    r = h.getresponse()
    buf = b""
    while not stop.is_set():
        chunk = r.read1(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if not line.strip():
                continue
            now = time.monotonic()
            ev = json.loads(line)
            obj = ev.get("object", {})
            name = obj.get("metadata", {}).get("name")
            if obj.get("status", {}).get("phase") == "Running" and name not in seen:
                seen[name] = now


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=20, help="pods per handler")
    ap.add_argument("--migrt", help="the migrt binary for the handler (default: a launcher)")
    ap.add_argument("--keep", action="store_true", help="leave the cluster's logs in /run")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="bench-kube-")
    migrt = args.migrt or ocitest.build_launcher(os.path.join(work, "migrt"))
    rootfs = ocitest.bundlekit.make_rootfs(os.path.join(work, "rootfs"))
    images = [kc.harness.oci_layout_tar(rootfs, os.path.join(work, "busybox.tar")),
              kc.harness.oci_layout_tar(rootfs, os.path.join(work, "pause.tar"),
                                        name=kc.PAUSE_IMAGE, cmd=kc.harness.PAUSE_CMD)]
    t0 = time.monotonic()
    bin_dir = kc.ensure_built(os.path.join(work, "build.log"))
    print(f"kubernetes built/found in {time.monotonic() - t0:.1f} s", flush=True)
    c = kc.Cluster(kc.make_base(), bin_dir, migrt, images)
    c.start()
    print(f"cluster up in {c.timings['start_s']} s", flush=True)
    try:
        api = Api(c)
        seen, stop = {}, threading.Event()
        w = threading.Thread(target=watch_running, args=(api, seen, stop), daemon=True)
        w.start()
        time.sleep(1)
        lat = {"migrt": [], "runc": []}
        # warm-up: one of each (first pod on a node pays for image unpacking)
        plan = []
        for i in range(args.n + 1):
            for handler in (("migrt", "runc") if i % 2 == 0 else ("runc", "migrt")):
                plan.append((i, handler))
        for k, (i, handler) in enumerate(plan):
            node = kc.NODES[k % 2]
            name = f"bench-{handler}-{i}-{k}"
            m = kc.pod_manifest(name, "sleep 3600",
                                runtime_class="migrt" if handler == "migrt" else None, node=node)
            m["spec"]["automountServiceAccountToken"] = True
            start = time.monotonic()
            api.create_pod(m)
            kc.wait_for(lambda: name in seen, 120, f"pod {name} Running", interval=0.02)
            if i > 0:
                lat[handler].append(seen[name] - start)
        stop.set()
        print(f"{'handler':8} {'n':>3} {'median s':>9} {'mean s':>8} {'min':>6} {'max':>6}")
        for h, v in lat.items():
            print(f"{h:8} {len(v):>3} {statistics.median(v):>9.3f} {statistics.mean(v):>8.3f} "
                  f"{min(v):>6.3f} {max(v):>6.3f}")
        ratio = statistics.median(lat["migrt"]) / statistics.median(lat["runc"])
        mean_ratio = statistics.mean(lat["migrt"]) / statistics.mean(lat["runc"])
        print(f"ratio migrt/runc: median {ratio:.3f}, mean {mean_ratio:.3f} (target <= 1.1)")
    finally:
        c.stop()


if __name__ == "__main__":
    main()
