"""Benchmark: real workloads (tests/workloads) migrated in each mode, what their clients saw.

For each workload and mode, REPEAT migrations (a fresh pair of nodes each time) between
two runc roots on this machine, the container's address handed over to node B as the
tests do. Per row: downtime as `migrt migrate` reports it (median, and every run), what
the client saw (longest time between two answers, requests that failed), and how long
after the restore the memory was all back (lazy: served by the source's page server;
full and pre-copy: filled from node B's staged image).

    /opt/migrt/venv/bin/python tests/bench/bench_workloads.py --repeat 3 --markdown

--criu LABEL=PATH[,LABEL=PATH...] runs each workload and mode once per CRIU build given
(MIGRT_CRIU for the nodes, the agent and migrate), the builds taking turns in each
round: before/after figures of a CRIU change side by side.

Needs root, runc, CRIU 4.2+ and the workload packages (packaging/install.sh).
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "workloads"))

import wl  # noqa: E402
import test_redis  # noqa: E402
import test_nginx  # noqa: E402
import test_postgres  # noqa: E402
import test_programs  # noqa: E402


def gap(times):
    return max((b - a for a, b in zip(times, times[1:])), default=None)


def redis(cl, mode):
    _, _, mig, r, idle, incr = test_redis.run(cl, mode)
    return mig, {"gap": incr.longest_gap(), "failed": int(incr.error is not None),
                 "client": "INCR loop, one connection"}


def nginx(cl, mode):
    _, _, mig, loop = test_nginx.run(cl, mode)
    fails = loop.failures()
    timeouts = sum(1 for f in fails if f[2] == "timeout")
    return mig, {"gap": loop.longest_gap(), "failed": len(fails),
                 "client": f"GET of 256 KiB, new connection each; {len(loop.results)} "
                           f"requests, {timeouts} timed out, "
                           f"{len(fails) - timeouts} failed otherwise"}


def postgres(cl, mode):
    _, _, mig, w, _ = test_postgres.run(cl, mode)
    return mig, {"gap": gap(w.times), "failed": len(w.errors),
                 "client": "INSERT loop, one connection"}


def program(name, args=(), ready_tag="", ready_n=5, **kw):
    def run(cl, mode):
        p = test_programs.Prog(cl, name, args, **kw)
        p.wait_src(lambda t: len(test_programs.lines(t, ready_tag)) >= ready_n,
                   f"{name} working", timeout=180)
        mig = cl.migrate(p.cid, p.addr, p.dst, mode)
        return mig, {"gap": None, "failed": None, "client": "(inside the container)"}
    return run


WORKLOADS = {
    "redis": redis,
    "nginx": nginx,
    "postgres": postgres,
    "sqlite": program("sqlite_writer.py", ready_tag="W", ready_n=30),
    "threads": program("threads.py", ready_tag="T", ready_n=10),
    "shm-socketpair": program("shm_pair.py", ready_tag="S", ready_n=5),
    "1gib-4096-maps": program("bigmem.py", ["4096"], ready_tag="P", ready_n=1,
                              shm_size="1200m"),
    "jvm-1gib": program("Heap.java", ["1024"], ready_tag="J", ready_n=3,
                        argv=["java", "-Xms1200m", "-Xmx1200m", "-XX:+UseSerialGC",
                              "-XX:-UsePerfData"]),
}


def one(launcher, work, name, mode):
    tmp = tempfile.mkdtemp(dir=work)
    cl = wl.Cluster(launcher, tmp)
    try:
        cl.start_agent()
        mig, seen = WORKLOADS[name](cl, mode)
        if not mig.ok:
            return {"error": mig.why().splitlines()[0][:200]}
        ph = mig.phases()
        fill = ph.get("pages_served_after_restore", ph.get("fill_after_restore"))
        return dict(seen, downtime=ph.get("downtime"), fill=fill, wall=mig.t1 - mig.t0,
                    phases=ph)
    except Exception as e:  # noqa: BLE001 - a failed run is a row, not the end
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    finally:
        cl.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def fmt(v, unit="s"):
    return "-" if v is None else f"{v:.2f}{unit}" if isinstance(v, float) else str(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--modes", default=",".join(wl.MODES))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--criu", default="",
                    help="LABEL=PATH,...: run each workload and mode with each CRIU build")
    args = ap.parse_args()
    variants = [tuple(v.split("=", 1)) for v in args.criu.split(",") if v] or [(None, None)]
    for label, path in variants:
        if label and (os.path.basename(path) != "criu" or not os.access(path, os.X_OK)):
            ap.error(f"--criu {label}={path}: must be an executable file named criu")
    work = tempfile.mkdtemp(prefix="migrt-bench-wl-")
    launcher = wl.ocitest.build_launcher(os.path.join(work, "migrt"))
    rows = []
    for name in args.workloads.split(","):
        for mode in args.modes.split(","):
            runs = {label: [] for label, _ in variants}
            for i in range(args.repeat):
                for label, path in variants:
                    if path:
                        os.environ["MIGRT_CRIU"] = path
                    t = time.monotonic()
                    r = one(launcher, work, name, mode)
                    runs[label].append(r)
                    print(f"# {name} {mode}{f' criu {label}' if label else ''} run {i + 1}: "
                          f"{r} ({time.monotonic() - t:.0f}s)", file=sys.stderr, flush=True)
            for label, _ in variants:
                rows.append((name, f"{mode}, criu {label}" if label else mode, runs[label]))
    shutil.rmtree(work, ignore_errors=True)
    print("| workload | mode | downtime (s), median | runs | client: longest gap (s), max | "
          "client: failed requests, total | memory all back after the restore (s), median "
          "| client (first good run) | failed runs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, mode, runs in rows:
        good = [r for r in runs if "error" not in r]
        bad = [r["error"] for r in runs if "error" in r]
        dts = [r["downtime"] for r in good if r.get("downtime") is not None]
        gaps = [r["gap"] for r in good if r.get("gap") is not None]
        fails = [r["failed"] for r in good if r.get("failed") is not None]
        fills = [r["fill"] for r in good if r.get("fill") is not None]
        print(f"| {name} | {mode} | {fmt(statistics.median(dts) if dts else None, '')} | "
              f"{', '.join(f'{d:.2f}' for d in dts) or '-'} | "
              f"{fmt(max(gaps) if gaps else None, '')} | "
              f"{sum(fails) if fails else '-'} | "
              f"{fmt(statistics.median(fills) if fills else None, '')} | "
              f"{good[0]['client'] if good else '-'} | "
              f"{f'{len(bad)} of {len(runs)}: ' + bad[0] if bad else 'none'} |")


if __name__ == "__main__":
    main()
