#!/usr/bin/env python3
"""Benchmark: what does migrt add to a whole container cycle through containerd?

One private containerd with two CRI runtime handlers: "runc" (the runc v2 shim calling
runc) and "migrt" (the same shim with BinaryName = migrt, registered from the shipped
drop-in). For each handler a pod is started, then N containers go through the cycle the
kubelet drives: CreateContainer, StartContainer, ExecSync, StopContainer, RemoveContainer.
Cycles alternate between the handlers so both see the same machine. Prints per-phase
medians, the whole cycle's median for each, and the ratio (target, issue 5: <= 1.1).

    /opt/migrt/venv/bin/python tests/bench/bench_containerd.py [-n 30] [--migrt PATH]

Without --migrt a launcher for this checkout is used (what install.sh writes). Needs
root, containerd and runc (no network: the images are built from a busybox rootfs).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(TESTS, "e2e"), TESTS]

import cri as C  # noqa: E402
import harness  # noqa: E402
import ocitest  # noqa: E402

PHASES = ("create", "start", "exec", "stop", "remove")


def cycle(api, sid, config, name):
    t = {}
    s = time.perf_counter()
    cid = api.create(sid, config, name, harness.IMAGE,
                     ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"])
    t["create"] = time.perf_counter() - s
    s = time.perf_counter()
    api.start(cid)
    t["start"] = time.perf_counter() - s
    s = time.perf_counter()
    out, _, code = api.exec_sync(cid, ["echo", "ok"])
    t["exec"] = time.perf_counter() - s
    assert (out, code) == ("ok\n", 0), (out, code)
    s = time.perf_counter()
    api.stop(cid, timeout=10)
    t["stop"] = time.perf_counter() - s
    s = time.perf_counter()
    api.remove(cid)
    t["remove"] = time.perf_counter() - s
    t["cycle"] = sum(t[p] for p in PHASES)
    return t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--containers", type=int, default=30,
                    help="containers per handler (default 30)")
    ap.add_argument("--migrt", help="the migrt binary (default: a launcher for this checkout)")
    ap.add_argument("--python-only", action="store_true",
                    help="BinaryName = migrt's Python launcher alone, without the shell "
                    "front door that the installed `migrt` has")
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args(argv)

    work = tempfile.mkdtemp(prefix="migrt-bench-ctrd-")
    base = tempfile.mkdtemp(prefix="migrt-bctrd-", dir="/run")
    migrt = a.migrt or ocitest.build_launcher(os.path.join(work, "migrt"),
                                              front=not a.python_only)
    rootfs = ocitest.bundlekit.make_rootfs(os.path.join(work, "rootfs"))
    c = harness.Containerd(base, migrt)
    apis = []
    try:
        c.start()
        for name, cmd in ((harness.IMAGE, ("/bin/sh",)),
                          (harness.PAUSE_IMAGE, harness.PAUSE_CMD)):
            tar = harness.oci_layout_tar(rootfs, os.path.join(work, "img.tar"), name=name,
                                         cmd=cmd)
            c.import_image(tar, namespace="k8s.io")
        pods = {}
        for handler in ("runc", "migrt"):
            api = C.CRI(c.address)
            apis.append(api)
            logdir = os.path.join(work, f"pod-{handler}")
            os.makedirs(logdir)
            config = C.CRI.sandbox_config(f"bench-{handler}", logdir)
            pods[handler] = (api, api.run_pod(config, handler), config)
        results = {"runc": [], "migrt": []}
        total = a.warmup + a.containers
        for i in range(total):
            order = ("runc", "migrt") if i % 2 == 0 else ("migrt", "runc")
            for handler in order:
                api, sid, config = pods[handler]
                t = cycle(api, sid, config, f"c{i}")
                if i >= a.warmup:
                    results[handler].append(t)
        for api, sid, _ in pods.values():
            api.stop_pod(sid)
            api.remove_pod(sid)
    finally:
        for api in apis:
            api.close()
        c.stop()

    def med(handler, phase):
        return statistics.median(r[phase] for r in results[handler]) * 1000

    print(f"containerd CRI cycle, {a.containers} containers per handler (after {a.warmup} "
          f"warm-up), migrt = {'Python launcher alone' if a.python_only else 'front door + Python launcher'}; "
          "medians in ms:")
    print(f"  {'phase':<8} {'runc':>9} {'migrt':>9} {'diff':>8}")
    for p in PHASES + ("cycle",):
        r, m = med("runc", p), med("migrt", p)
        print(f"  {p:<8} {r:9.1f} {m:9.1f} {m - r:+8.1f}")
    ratio = med("migrt", "cycle") / med("runc", "cycle")
    print(f"ratio migrt/runc for the whole cycle: {ratio:.3f} (target <= 1.10): "
          f"{'OK' if ratio <= 1.10 else 'OVER TARGET'}")
    return 0 if ratio <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
