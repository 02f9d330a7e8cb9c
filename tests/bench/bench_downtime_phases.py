"""Where a small container's downtime goes: `migrt demo --json` (a busybox counter,
two simulated nodes on this machine) run N times, the medians of its "downtime"
breakdown printed as a table (phase, seconds).

    /opt/migrt/venv/bin/python tests/bench/bench_downtime_phases.py [--rounds 7]
        [--mode full|lazy] [--network veth|loopback] [--markdown] [--compare 'VAR=V ...']

Before/after a release: --compare-migrt OTHER_LAUNCHER (that checkout's, built with
`python3 -c 'import ocitest; ocitest.build_launcher("/tmp/old/migrt")'` from its tests/),
with --compare-migrt-env 'MIGRT_CRIU=/tmp/old-criu/criu' for the CRIU that release built.
The issue 17 before/after (the settings that bring back what was changed):

    ... --compare 'MIGRT_STAGING_ON_DISK=1 MIGRT_LOCAL_FILL_MIN=0 MIGRT_CONNECT_AFTER_FREEZE=1'


Each figure is the median over the rounds of that figure alone (so the rows need not add
up exactly); the raw reports go to stderr as JSON.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import ocitest  # noqa: E402

ROWS = [
    ("downtime (network hold or freeze until running on the destination)", ("total_s",)),
    ("  network hold: the source's network cut", ("phases", "network_hold_s")),
    ("  freeze: runc pause", ("phases", "freeze_s")),
    ("  checkpoint: runc checkpoint", ("phases", "checkpoint_s")),
    ("    runc's own (start-up, its RPC, cgroups)", ("checkpoint", "runc_s")),
    ("    CRIU, start to end", ("checkpoint", "criu_s")),
    ("      CRIU freezing (seizing the frozen tasks)", ("checkpoint", "criu", "freezing_s")),
    ("      CRIU frozen (parasite, state, memory)", ("checkpoint", "criu", "frozen_s")),
    ("        of which memory dump", ("checkpoint", "criu", "memdump_s")),
    ("        of which memory write", ("checkpoint", "criu", "memwrite_s")),
    ("      CRIU before and after (start-up, network lock, images)",
     ("checkpoint", "criu", "other_s")),
    ("    migrt (manifest, after the dump)", ("checkpoint", "migrt_s")),
    ("  transfer after the checkpoint", ("phases", "transfer_after_checkpoint_s")),
    ("  commit (destination verifies)", ("phases", "commit_s")),
    ("  transfer and commit (lazy: the image without its pages)",
     ("phases", "transfer_and_commit_s")),
    ("  restore: request until running", ("phases", "restore_s")),
    ("    request and reply (network, agent)", ("restore", "request_s")),
    ("    migrt run start-up (spare restorer, staged source, plugins)",
     ("restore", "migrt_start_s")),
    ("    rootfs changes into the bundle", ("restore", "prepare_s")),
    ("    migrt before runc (lazy-pages daemon for a local fill)", ("restore", "before_runc_s")),
    ("    runc's own (runc restore around CRIU)", ("restore", "runc_s")),
    ("    CRIU, start to end", ("restore", "criu_s")),
    ("      CRIU restore (namespaces, mounts, files, memory)", ("restore", "criu", "restore_s")),
    ("        of which forking the tasks", ("restore", "criu", "forking_s")),
    ("      CRIU before and after (start-up, network unlock)", ("restore", "criu", "other_s")),
    ("    migrt after runc (post-restore plugins, record)", ("restore", "after_runc_s")),
    ("    agent checks it runs (runc state)", ("restore", "check_running_s")),
    ("  migrt between phases", ("phases", "migrt_between_s")),
]


def get(d, path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def medians(reports):
    out = {}
    for label, path in ROWS:
        vals = [v for v in (get(r.get("downtime"), path) for r in reports)
                if isinstance(v, (int, float))]
        if vals:
            out[path] = (statistics.median(vals), min(vals), max(vals))
    return out


def demo(migrt, a, env):
    p = subprocess.run([migrt, "demo", "--json", "--mode", a.mode, "--network", a.network],
                       capture_output=True, text=True, timeout=300, cwd="/",
                       env=dict(os.environ, **env))
    if p.returncode != 0:
        sys.stderr.write(f"demo failed: {p.stderr[-400:]}\n")
        return None
    rep = json.loads(p.stdout)
    sys.stderr.write(json.dumps(rep.get("downtime")) + "\n")
    return rep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--mode", default="full", choices=("full", "precopy", "lazy"))
    ap.add_argument("--network", default="veth", choices=("veth", "loopback"))
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--compare", default=None, metavar="'VAR=VALUE ...'",
                    help="also run every round with these in the environment (both nodes' "
                    "migrt and node B's agent inherit them), alternating, and show both "
                    "columns: before/after a change")
    ap.add_argument("--migrt", default=None, help="migrt launcher [default: this checkout's]")
    ap.add_argument("--compare-migrt", default=None, metavar="LAUNCHER",
                    help="also run every round with this other migrt launcher (another "
                    "checkout's: python3 -c 'import ocitest; ocitest.build_launcher(DEST)' "
                    "from its tests/), alternating: before/after a release")
    ap.add_argument("--compare-migrt-env", default="", metavar="'VAR=VALUE ...'",
                    help="the environment of the --compare-migrt variant (e.g. its CRIU: "
                    "MIGRT_CRIU=/path/to/old/criu, a file named criu)")
    a = ap.parse_args()
    migrt = a.migrt
    if migrt is None:
        migrt = ocitest.build_launcher(os.path.join(tempfile.mkdtemp(prefix="migrt-bench-"),
                                                    "migrt"))
    variants = [("default", {}, migrt)]
    if a.compare:           # "A=1 B=2": several settings at once
        env = dict(kv.partition("=")[::2] for kv in a.compare.split())
        variants.insert(0, (a.compare, env, migrt))
    if a.compare_migrt:
        env = dict(kv.partition("=")[::2] for kv in a.compare_migrt_env.split())
        name = " ".join([a.compare_migrt] + a.compare_migrt_env.split())
        variants.insert(0, (name, env, a.compare_migrt))
    reports = {name: [] for name, _, _ in variants}
    for _ in range(a.rounds):
        for name, env, launcher in variants:
            rep = demo(launcher, a, env)
            if rep:
                reports[name].append(rep)
    variants = [(name, env) for name, env, _ in variants]
    if not all(reports.values()):
        sys.exit("no round succeeded")
    cols = [(name, medians(reports[name])) for name, _ in variants]
    load = os.getloadavg()[0]
    title = (f"{a.mode} mode, busybox counter, {a.network}, "
             + ", ".join(f"{len(reports[n])} rounds {n}" for n, _ in variants)
             + f", load average {load:.1f} at the end; medians (min-max)")
    print(title)
    if a.markdown:
        print("\n| phase | " + " | ".join(f"s, {n}" for n, _ in cols) + " |")
        print("|---|" + "---|" * len(cols))
    for label, path in ROWS:
        if not any(path in m for _, m in cols):
            continue
        cells = []
        for _, m in cols:
            v = m.get(path)
            cells.append(f"{v[0]:.3f} ({v[1]:.3f}-{v[2]:.3f})" if v else "-")
        if a.markdown:
            pad = len(label) - len(label.lstrip())
            print(f"| {'&nbsp;' * pad}{label.strip()} | " + " | ".join(cells) + " |")
        else:
            print(f"{label:<64} " + "  ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
