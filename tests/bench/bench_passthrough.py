#!/usr/bin/env python3
"""Benchmark: what does migrt add to a runc call that it only passes through?

Runs the same commands N times through plain runc and through migrt, interleaved so
both see the same machine, and prints per-command medians, the difference and the
ratio. Target (issue 2): median overhead at most 15 ms per call.

    python3 tests/bench/bench_passthrough.py [--runs 200] [--migrt /usr/local/bin/migrt]

With no --migrt it builds a launcher for this checkout (venv /opt/migrt/venv).
A real busybox container is created in a private --root for state/ps/exec/events.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import ocitest  # noqa: E402


def timed(argv, runs_out):
    t = time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    runs_out.append(time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--migrt")
    ap.add_argument("--runc", default=shutil.which("runc") or "/usr/sbin/runc")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="migrt-bench-")
    migrt = args.migrt or ocitest.build_launcher(os.path.join(tmp, "migrt"))
    root = os.path.join(tmp, "root")
    bundle = ocitest.bundlekit.make_bundle(os.path.join(tmp, "bundle"), ["sleep", "3600"],
                                           cgroups_path="/migrt-bench/passthrough")
    rt = ocitest.Runtime(args.runc, root)
    rc, _, err = rt.create("bench", bundle, start=True)
    if rc:
        sys.exit(f"cannot start the benchmark container: {err.text}")
    cmds = {
        "state": ["state", "bench"],
        "list": ["list"],
        "ps": ["ps", "bench"],
        "kill -0": ["kill", "bench", "0"],
        "state (missing)": ["state", "nope"],
        "features": ["features"],
    }
    env_note = f"runc {args.runc}, migrt {migrt}, {args.runs} runs each, interleaved"
    results = {}
    try:
        for name, sub in cmds.items():
            a, b = [], []
            for _ in range(args.runs):
                timed([args.runc, "--root", root, *sub], a)
                timed([migrt, "--root", root, *sub], b)
            results[name] = (statistics.median(a), statistics.median(b))
    finally:
        rt.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"pass-through overhead ({env_note})")
    print(f"{'command':<18}{'runc ms':>9}{'migrt ms':>10}{'diff ms':>9}{'ratio':>7}")
    diffs = []
    for name, (a, b) in results.items():
        diffs.append((b - a) * 1000)
        print(f"{name:<18}{a*1000:9.2f}{b*1000:10.2f}{(b-a)*1000:9.2f}{b/a:7.2f}")
    worst = max(diffs)
    print(f"median overhead: {statistics.median(diffs):.2f} ms, worst command {worst:.2f} ms "
          f"(target <= 15 ms): {'OK' if worst <= 15 else 'OVER'}")


if __name__ == "__main__":
    main()
