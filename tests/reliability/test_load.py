"""Load: N containers through migrt at once, every lifecycle step concurrently.

create+start, checkpoint (a migrt image: CRIU's files plus manifest and rootfs
changes), restore through the marker, delete: each phase runs for all containers at
the same time. Every restored counter must carry on from its own next number, and
afterwards nothing of theirs may be left: no process, mount, cgroup, CRIU work dir or
runc state. The figures are printed (pytest -s shows them; the table in
docs/reliability.md comes from them).

MIGRT_LOAD_N (default 16) and MIGRT_LOAD_ROUNDS (default 3) size it.
"""
import concurrent.futures as cf
import json
import os
import time

import pytest

import leaks
import ocitest

N = int(os.environ.get("MIGRT_LOAD_N", "16"))
ROUNDS = int(os.environ.get("MIGRT_LOAD_ROUNDS", "3"))


def numbers(out):
    return [int(x) for x in out.lines() if x.strip().isdigit()]


def counter_log(bundle):
    with open(os.path.join(bundle, "rootfs", "data", "counter.log")) as f:
        return [int(x) for x in f.read().split()]


def test_concurrent_lifecycle_through_migrt(node, migrt_launcher, make_bundle, tmp_path):
    rt = node("load", binary=migrt_launcher)
    rt._stdin = []
    tag = ocitest.uid("MIGRT_LOAD_TAG")
    cids = [ocitest.uid(f"ld{i}") for i in range(N)]
    bundles = {c: make_bundle(["sh", "-c", ocitest.COUNTER], name=c, env=[f"{tag}=1"])
               for c in cids}
    outs = {}
    ops = {"create": 0, "start": 0, "checkpoint": 0, "restore": 0, "delete": 0}
    failures = []
    seconds = {}

    def phase(name, fn):
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(max_workers=N) as ex:
            for cid, err in zip(cids, ex.map(fn, cids)):
                if err:
                    failures.append(f"{name} {cid}: {err}")
        seconds[name] = seconds.get(name, 0) + time.monotonic() - t0

    def create(cid):
        rc, out, err = rt.create(cid, bundles[cid])
        ops["create"] += 1
        if rc:
            return err.text.strip() or f"exit {rc}"
        outs[cid] = out
        p = rt.run("start", cid)
        ops["start"] += 1
        return p.stderr.strip() if p.returncode else None

    before = {}

    def checkpoint(cid):
        ocitest.wait_for(lambda: len(numbers(outs[cid])) >= 3, timeout=30, what=f"{cid} counting")
        image = str(tmp_path / f"img-{cid}-{len(seconds)}")
        p = rt.run("checkpoint", "--image-path", image, cid)
        ops["checkpoint"] += 1
        if p.returncode:
            return p.stderr.strip()
        outs[cid].thread.join(10)               # the old stdout ends with the dump
        before[cid] = numbers(outs[cid])[-1]
        ocitest.bundlekit.set_env(bundles[cid], "MIGRT_RESTORE_FROM", image)
        return None

    def restore(cid):
        rc, out, err = rt.create(cid, bundles[cid])
        ops["restore"] += 1
        if rc:
            return err.text.strip() or f"exit {rc}"
        outs[cid] = out
        if rt.run("start", cid).returncode:       # the no-op start a caller sends
            return "start after restore failed"
        try:
            ocitest.wait_for(lambda: len(numbers(out)) >= 2, timeout=30, what="counting")
        except AssertionError as e:
            return str(e)
        got = numbers(out)
        if got[0] != before[cid] + 1 or got != list(range(got[0], got[0] + len(got))):
            return f"counter did not continue: was {before[cid]}, restored prints {got[:5]}"
        # put the caller's spec (without marker) back for the next round
        ocitest.bundlekit.set_env(bundles[cid], "MIGRT_RESTORE_FROM", None)
        return None

    def delete(cid):
        rt.run("kill", cid, "KILL")
        try:
            ocitest.wait_for(lambda: (rt.state(cid) or {}).get("status") in ("stopped", None),
                             timeout=20, what="stopped")
        except AssertionError as e:
            return str(e)
        p = rt.run("delete", cid)
        ops["delete"] += 1
        return p.stderr.strip() if p.returncode else None

    t_start = time.monotonic()
    phase("create+start", create)
    for _ in range(ROUNDS):
        phase("checkpoint", checkpoint)
        phase("restore", restore)
    # the file each workload kept open on fd 3 got every number once, in order, across
    # every checkpoint and restore
    for cid in cids:
        log = counter_log(bundles[cid])
        if log != list(range(1, len(log) + 1)) or log[-1] <= before.get(cid, 0):
            failures.append(f"{cid}: counter.log lost or repeated numbers")
    phase("delete", delete)
    total = time.monotonic() - t_start

    time.sleep(0.5)
    found = {
        "processes": leaks.processes(tag=tag, paths=[str(tmp_path)]),
        "mounts": leaks.mounts(str(tmp_path)),
        "cgroups": leaks.cgroups([f"/migrt-test/{c}" for c in cids]),
        "work_dirs": leaks.work_dirs(rt.root, cids),
        "runc_state": [c for c in cids if os.path.exists(os.path.join(rt.root, c))],
    }
    counts, details = leaks.report(**found)
    figures = {"containers": N, "rounds": ROUNDS, "operations": ops, "failures": len(failures),
               "leaks": counts, "seconds": {k: round(v, 2) for k, v in seconds.items()},
               "total_seconds": round(total, 2)}
    print("\nLOAD " + json.dumps(figures))
    assert not failures, failures
    assert not details, details
    assert ops["restore"] == N * ROUNDS and ops["delete"] == N


M = int(os.environ.get("MIGRT_LOAD_MIGRATIONS", "8"))


def test_concurrent_migrations_to_one_agent(tmp_path, migrt_launcher, make_bundle):
    """M containers migrate at the same moment to one agent, each over 4 TLS streams."""
    import subprocess
    import migr
    from migrt.migration import recovery
    nodes = migr.Nodes(migrt_launcher, tmp_path, make_bundle)
    try:
        agent = nodes.agent()
        tag = ocitest.uid("MIGRT_MLOAD_TAG")
        ctrs = [nodes.counter(extra_env=[f"{tag}=1"]) for _ in range(M)]
        t0 = time.monotonic()
        procs = [subprocess.Popen(nodes.migrate_argv(cid, dest, agent), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
                 for cid, bundle, dest, out in ctrs]
        results = [(p.wait(180), p.stdout.read(), p.stderr.read()) for p in procs]
        wall = time.monotonic() - t0
        failures = [f"{c[0]}: {err.decode()[-300:]}" for c, (rc, _, err) in zip(ctrs, results) if rc]
        downtimes = sorted(json.loads(o)["phases"]["downtime"] for rc, o, _ in results if rc == 0)
        for cid, bundle, dest, out in ctrs:
            try:
                out.thread.join(15)
                last = ocitest.last_count(out)
                nums = migr.wait_dest_counting(agent, cid, last)
                if nums[0] != last + 1 or migr.copies(nodes, cid) != {"a": None, "b": "running"}:
                    failures.append(f"{cid}: source ended at {last}, destination {nums[:3]}, "
                                    f"copies {migr.copies(nodes, cid)}")
            except AssertionError as e:
                failures.append(f"{cid}: {e}")
        for cid, *_ in ctrs:
            nodes.b.run("delete", "--force", cid)
        time.sleep(0.5)
        cids = [c[0] for c in ctrs]
        found = {
            "processes": leaks.processes(tag=tag),
            "mounts": leaks.mounts(str(tmp_path)),
            "cgroups": leaks.cgroups([f"/migrt-test/{c}" for c in cids]
                                     + [f"/migrt-test/{c}-dst" for c in cids]),
            "staged": agent.staged_data(),
            "journals": [j.path for j in recovery.pending() if j.rec.get("container") in cids],
            "work_dirs": leaks.work_dirs(nodes.b.root, cids),
        }
        counts, details = leaks.report(**found)
        figures = {"migrations": M, "to_one_agent": True, "failures": len(failures),
                   "wall_seconds": round(wall, 2),
                   "downtime_s": {"min": downtimes[0] if downtimes else None,
                                  "median": downtimes[len(downtimes) // 2] if downtimes else None,
                                  "max": downtimes[-1] if downtimes else None},
                   "leaks": counts}
        print("\nMIGRATION LOAD " + json.dumps(figures))
        assert not failures, failures
        assert not details, details
    finally:
        nodes.cleanup()
