#!/usr/bin/env python3
"""How long CRIU keeps a task frozen with and without hardware breakpoints.

CRIU stops a dumped task as its parasite leaves, and a restored task as its restorer
leaves. CRIU as released sets a hardware breakpoint there (PTRACE_POKEUSER of a debug
register); install.sh's CRIU steps the last few syscalls instead
(packaging/criu-patches/without-hw-breakpoints.patch), and MIGRT_CRIU_BREAKPOINTS=1
brings the breakpoints back. The first breakpoint in the system makes the kernel patch
its code for perf (and undoes that a second after the last one goes), so each round
here waits 2 s between CRIU runs, as on a node that migrates now and then.

Each round: a shell loop is dumped (`criu dump --shell-job`, the task killed), then
restored (`criu restore -d`) and killed; the figures are the spans of CRIU's own logs
(first to last time stamp: the dump is nearly all frozen time) and the restore's wall
time. Both variants alternate; medians (min-max).

    tests/bench/bench_criu_breakpoints.py --rounds 7 [--criu /usr/local/sbin/criu]
"""
import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time

STAMP = re.compile(rb"^\((\d+\.\d+)\)", re.M)


def log_span(path):
    with open(path, "rb") as f:
        stamps = [float(m.group(1)) for m in STAMP.finditer(f.read())]
    return stamps[-1] - stamps[0]


def one_round(criu, env, work):
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    task = subprocess.Popen(["sh", "-c", "while :; do sleep 0.2; done"], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    subprocess.run([criu, "dump", "-t", str(task.pid), "-D", work, "--shell-job", "-v4",
                    "-o", "dump.log"], env=env, check=True, capture_output=True)
    task.wait()
    time.sleep(2)
    pidfile = os.path.join(work, "pid")
    t0 = time.monotonic()
    subprocess.run([criu, "restore", "-D", work, "--shell-job", "-d", "-v4", "-o",
                    "restore.log", "--pidfile", pidfile], env=env, check=True, capture_output=True)
    wall = time.monotonic() - t0
    with open(pidfile) as f:
        os.kill(int(f.read()), signal.SIGKILL)
    time.sleep(2)
    return {"dump_s": log_span(os.path.join(work, "dump.log")),
            "restore_s": log_span(os.path.join(work, "restore.log")), "restore_wall_s": wall}


def fmt(xs):
    return f"{statistics.median(xs):.4f} ({min(xs):.4f}-{max(xs):.4f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--criu", default=shutil.which("criu", path="/usr/local/sbin:/usr/sbin:/sbin")
                    or "criu")
    args = ap.parse_args()
    variants = {"steps (default)": {}, "breakpoints (MIGRT_CRIU_BREAKPOINTS=1)":
                {"MIGRT_CRIU_BREAKPOINTS": "1"}}
    res = {k: [] for k in variants}
    work = tempfile.mkdtemp(prefix="migrt-bench-bp-", dir="/dev/shm")
    try:
        for _ in range(args.rounds):
            for name, extra in variants.items():
                res[name].append(one_round(args.criu, dict(os.environ, **extra), work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.criu}, {args.rounds} rounds each, alternating; medians (min-max), seconds\n")
    print("| | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    for key, label in (("dump_s", "criu dump (log span: nearly all of it frozen)"),
                       ("restore_s", "criu restore (log span)"),
                       ("restore_wall_s", "criu restore (wall)")):
        print(f"| {label} | " + " | ".join(fmt([r[key] for r in res[v]]) for v in variants) + " |")


if __name__ == "__main__":
    main()
