"""Faults during a migration: kill -9 of `migrt migrate`, of the agent, of CRIU, and a
cut connection, at each phase. Real runc, real CRIU, real TLS over loopback TCP.

Each scenario starts a counter on node A, starts `migrt migrate` to node B's agent,
does its damage at one exact point (failpoints in migrate and the agent, a CRIU action
script that holds CRIU at a named step, or a TCP proxy that resets every connection),
then lets the system resolve itself the way it would on a real node: the migrate
command finishing or rolling back on its own, the agent being restarted, or `migrt
migrate` being run again. Then, as a user would check it:

- exactly one copy of the container runs (on A or on B) and none is left paused;
- its state is intact: the counter goes on from the next number, on A or on B, and the
  file it keeps open holds every number once, in order;
- no staged image data is left on B, no journal of the migration is left on A, and no
  process of the migration (runc checkpoint, CRIU) is left behind.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import leaks
import migr
import ocitest
from migrt.migration import recovery

RESULTS = []
WORK = os.path.join(os.environ.get("MIGRT_STATE_DIR", "/run/migrt"), "migrate")
RESTORE_WORK = os.path.join(os.environ.get("MIGRT_STATE_DIR", "/run/migrt"), "work")


@pytest.fixture
def nodes(tmp_path, migrt_launcher, make_bundle):
    n = migr.Nodes(migrt_launcher, tmp_path, make_bundle)
    yield n
    n.cleanup()
    # a failed scenario may leave what it started (a hung runc restore and its CRIU
    # tasks, a bind mount of runc's): end those, by pid, so later tests start clean
    migr.kill_tree_of(str(tmp_path))
    migr.umount_under(str(tmp_path))


def wait_file(path, timeout=60, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(path) and os.listdir(path) if os.path.isdir(path) else os.path.exists(path):
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"migrate ended ({proc.returncode}) before the fault point: "
                                 f"{err.decode()[-800:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {path}")


def kill_pid(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def journals_of(cid):
    out = []
    try:
        for n in os.listdir(recovery.state_dir()):
            try:
                with open(os.path.join(recovery.state_dir(), n)) as f:
                    if json.load(f).get("container") == cid:
                        out.append(n)
            except (OSError, ValueError):
                pass
    except FileNotFoundError:
        pass
    return out


def numbers_file(bundle):
    try:
        with open(os.path.join(bundle, "rootfs", "data", "counter.log")) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def settle(nodes, agent, cid, bundle, dest, out_a, expect, resolve=None, timeout=60):
    """Wait until the migration is resolved, then check everything a user would."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        c = migr.copies(nodes, cid)
        last = c
        one = (c["a"] == "running" and c["b"] is None) or (c["b"] == "running" and c["a"] is None)
        if one and not journals_of(cid) and not agent.staged_data():
            break
        if resolve:
            resolve()
        time.sleep(0.3)
    else:
        raise AssertionError(f"not resolved: copies {last}, journals {journals_of(cid)}, "
                             f"staged {agent.staged_data()[:3]}; agent log: {agent.log()[-1500:]}")
    where = "a" if last["a"] == "running" else "b"
    assert where == expect, f"container ended on {where}, expected {expect}"
    if where == "a":
        n0 = ocitest.last_count(out_a)
        ocitest.wait_for(lambda: ocitest.last_count(out_a) >= n0 + 3, timeout=15,
                         what="counter going on at the source")
        nums = [int(x) for x in out_a.lines() if x.isdigit()]
        assert nums == list(range(1, len(nums) + 1)), "source stdout lost or repeated numbers"
        # and with its network: no lock of a CRIU that died while it held one
        assert ocitest.net_works(nodes.a.state(cid)["pid"]), "the source's network stays locked"
        log = numbers_file(bundle)
    else:
        out_a.thread.join(15)
        a_last = ocitest.last_count(out_a)
        nums = migr.wait_dest_counting(agent, cid, a_last)
        assert nums[0] == a_last + 1 and nums == list(range(nums[0], nums[0] + len(nums))), \
            f"destination did not carry on: source ended at {a_last}, destination {nums[:5]}"
        log = numbers_file(dest)
    assert log == list(range(1, len(log) + 1)) and len(log) > 3, "counter.log damaged"
    # the destination bundle keeps what its owner wrote (the agent's marker went back out,
    # also after a rollback in the restore phase), and a node the container is not on
    # keeps no restore work dir of it
    ocitest.wait_for(lambda: "MIGRT_RESTORE_FROM=staged:" not in open(
        os.path.join(dest, "config.json")).read(), timeout=20, what="the agent's marker gone")
    if where == "a":
        ocitest.wait_for(lambda: leaks.work_dirs(nodes.b.root, [cid]) == [], timeout=20,
                         what="no restore work dir on B")
    left = [p for p in migr.leaks_processes(cid) if p != os.getpid()]
    assert left == [], f"processes of the migration left: {left}"
    assert leaks.mounts(nodes.tmp) == [], "mounts left behind"
    return where


def run_scenario(nodes, tmp_path, name, expect, *, mig_fp=None, agent_fp=None,
                 criu_at=None, criu_side=None, fault, resolve="none", proxy=False,
                 mig_args=(), peer_timeout=None, message=None):
    fpdir = str(tmp_path / "fp")
    os.makedirs(fpdir, exist_ok=True)
    agent_env = {"MIGRT_FAILPOINT_DIR": fpdir}
    if peer_timeout:
        agent_env["MIGRT_PEER_TIMEOUT"] = str(peer_timeout)
    if agent_fp:
        agent_env["MIGRT_FAILPOINTS"] = agent_fp
    agent = nodes.agent(ttl=8, env=agent_env)
    src_ann = dest_ann = None
    hook = None
    if criu_at:
        hook, ann = migr.criu_hook(tmp_path, criu_at)
        src_ann, dest_ann = (ann, None) if criu_side == "dump" else (None, ann)
    cid, bundle, dest, out_a = nodes.counter(src_annotations=src_ann, dest_annotations=dest_ann)
    ocitest.lo_up(nodes.a.state(cid)["pid"])
    px = migr.Proxy(agent.port) if proxy else None
    env = {"MIGRT_FAILPOINT_DIR": fpdir}
    if peer_timeout:
        env["MIGRT_PEER_TIMEOUT"] = str(peer_timeout)
    if mig_fp:
        env["MIGRT_FAILPOINTS"] = mig_fp
    work_before = set(os.listdir(WORK)) if os.path.isdir(WORK) else set()
    mounts_before = set(leaks.mounts(RESTORE_WORK))
    t0 = time.monotonic()
    mig = nodes.spawn_migrate(cid, dest, agent, *mig_args, env=env,
                              to=px.address if px else None)
    ctx = {"agent": agent, "mig": mig, "fpdir": fpdir, "hook": hook, "proxy": px,
           "nodes": nodes, "cid": cid, "undo": []}
    try:
        fault(ctx)
        try:
            mig.wait(90)
        except subprocess.TimeoutExpired:
            mig.kill()
            raise
        rc = mig.returncode
        err = mig.stderr.read().decode(errors="replace")
        t_migrate = time.monotonic() - t0
    finally:
        for undo in ctx["undo"]:
            undo()
    if message:
        assert message in err, err[-800:]
    if peer_timeout:
        # noticed within a few timeouts, not the kernel's minutes of retransmissions
        assert t_migrate < 10 * peer_timeout, f"migrate took {t_migrate:.0f}s: {err[-500:]}"

    resolver = None
    if resolve == "restart-agent":
        if agent.proc.poll() is None:
            agent.kill()
        agent.restart(env={})
    elif resolve == "rerun-migrate":
        def resolver():
            p = subprocess.run(nodes.migrate_argv(cid, dest, agent), capture_output=True,
                               text=True, timeout=60)
            ctx.setdefault("reruns", []).append((p.returncode, p.stderr.strip()[-300:]))
        resolver()
        resolver = None
    elif resolve == "rerun-migrate-while-pending":
        def resolver():       # what an operator's retry loop does
            if journals_of(cid):
                subprocess.run(nodes.migrate_argv(cid, dest, agent), capture_output=True,
                               timeout=60)
    if hook:
        # the action script CRIU left behind (its CRIU is dead) has nothing to wait for
        try:
            kill_pid(int(open(os.path.join(hook, "script.pid")).read()))
        except (OSError, ValueError):
            pass
    where = settle(nodes, agent, cid, bundle, dest, out_a, expect, resolver)
    took = time.monotonic() - t0
    # the source's local copy of the image (its work dir) is gone as well
    ocitest.wait_for(lambda: not (set(os.listdir(WORK)) - work_before), timeout=10,
                     what="the migration's work dir on the source to go")
    # nor mounts a killed CRIU left in a restore's work dir (its cgroup yard)
    left = set(leaks.mounts(RESTORE_WORK)) - mounts_before
    assert not left, f"mounts left behind: {sorted(left)[:3]}"
    RESULTS.append({"scenario": name, "migrate_exit": rc, "ended_on": where,
                    "migrate_seconds": round(t_migrate, 1), "seconds": round(took, 1)})
    print(f"\nFAULT {name}: migrate exit {rc}, container on node {where.upper()}, "
          f"resolved in {took:.1f}s; {err.strip().splitlines()[-1][:160] if err.strip() else ''}")
    if px:
        px.close()
    return rc, err


# ---------------------------------------------------------------- fault actions

def at_failpoint(point, then):
    def fault(ctx):
        wait_file(os.path.join(ctx["fpdir"]), proc=ctx["mig"] if "agent" not in point else None)
        while not any(f.startswith(point) for f in os.listdir(ctx["fpdir"])):
            if ctx["mig"].poll() is not None:
                raise AssertionError(f"migrate ended before {point}: "
                                     f"{ctx['mig'].stderr.read().decode()[-800:]}")
            time.sleep(0.02)
        then(ctx)
    return fault


def at_criu(then):
    def fault(ctx):
        pidfile = os.path.join(ctx["hook"], "criu.pid")
        end = time.monotonic() + 60
        while not os.path.exists(pidfile) or not open(pidfile).read().strip():
            assert time.monotonic() < end, "CRIU never reached the action"
            if ctx["mig"].poll() is not None:
                raise AssertionError(f"migrate ended before CRIU's step: "
                                     f"{ctx['mig'].stderr.read().decode()[-800:]}")
            time.sleep(0.02)
        then(ctx)
    return fault


def kill_migrate(ctx):
    kill_pid(ctx["mig"].pid)


def kill_agent(ctx):
    ctx["agent"].kill()


def kill_agent_restart_soon(ctx):
    ctx["agent"].kill()
    time.sleep(1)
    ctx["agent"].restart(env={})


def kill_criu(ctx):
    kill_pid(int(open(os.path.join(ctx["hook"], "criu.pid")).read()))


def cut(ctx):
    ctx["proxy"].cut()


def blackhole(seconds=None):
    """Drop every packet to and from the agent's port, without a reset: the peer is as
    good as a host powered off (or, with seconds, a partition that heals)."""
    def fault(ctx):
        rules = [["INPUT", "-p", "tcp", "--dport", str(ctx["agent"].port), "-j", "DROP"],
                 ["INPUT", "-p", "tcp", "--sport", str(ctx["agent"].port), "-j", "DROP"]]

        def lift():
            for r in rules:
                subprocess.run(["iptables", "-D", *r], capture_output=True)
        ctx["undo"].append(lift)
        for r in rules:
            subprocess.run(["iptables", "-I", *r], check=True, capture_output=True)
        if seconds:
            time.sleep(seconds)
            lift()
    return fault


def interrupt(sig):
    """What a user's Ctrl-C (SIGINT to the whole foreground process group) or a
    supervisor's SIGTERM does to `migrt migrate`."""
    def fault(ctx):
        os.killpg(ctx["mig"].pid, sig)
    return fault


def cut_and_partition(ctx):
    ctx["proxy"].block(True)
    ctx["proxy"].cut()
    time.sleep(4)
    ctx["proxy"].block(False)


SCENARIOS = [
    # name, expect, kwargs
    # migrate run again: it finishes the dead one's journal, then migrates for real
    ("kill -9 migrate, before freeze; migrate again", "b",
     dict(mig_fp="migrate.before-freeze=pause(60)",
          fault=at_failpoint("migrate.before-freeze", kill_migrate), resolve="rerun-migrate")),
    ("kill -9 migrate, during dump (CRIU at network-lock)", "a",
     dict(criu_at="network-lock", criu_side="dump", fault=at_criu(kill_migrate),
          resolve="restart-agent")),
    ("kill -9 migrate, during transfer (sent, not committed)", "a",
     dict(mig_fp="migrate.after-dump=pause(60)",
          fault=at_failpoint("migrate.after-dump", kill_migrate), resolve="restart-agent")),
    ("kill -9 migrate, during restore", "b",
     dict(agent_fp="agent.before-restore=pause(2)",
          fault=at_failpoint("agent.before-restore", kill_migrate), resolve="none")),
    ("kill -9 migrate, after restore before release; migrate again", "b",
     dict(mig_fp="migrate.before-release=pause(60)",
          fault=at_failpoint("migrate.before-release", kill_migrate), resolve="rerun-migrate")),
    ("kill -9 agent, before freeze", "a",
     dict(mig_fp="migrate.before-freeze=pause(2)",
          fault=at_failpoint("migrate.before-freeze", kill_agent), resolve="restart-agent")),
    ("kill -9 agent, during transfer", "a",
     dict(mig_fp="migrate.after-dump=pause(2)",
          fault=at_failpoint("migrate.after-dump", kill_agent), resolve="restart-agent")),
    ("kill -9 agent, during restore (before create)", "a",
     dict(agent_fp="agent.before-restore=pause(60)",
          fault=at_failpoint("agent.before-restore", kill_agent_restart_soon))),
    ("kill -9 agent, during restore (created, not started)", "b",
     dict(agent_fp="agent.after-create=pause(60)",
          fault=at_failpoint("agent.after-create", kill_agent_restart_soon))),
    ("kill -9 CRIU, during dump", "a",
     dict(criu_at="network-lock", criu_side="dump", fault=at_criu(kill_criu))),
    ("kill -9 CRIU, at the end of the dump (post-dump, tasks still seized)", "a",
     dict(criu_at="post-dump", criu_side="dump", fault=at_criu(kill_criu))),
    ("kill -9 CRIU, during restore", "a",
     dict(criu_at="post-setup-namespaces", criu_side="restore", fault=at_criu(kill_criu),
          message="migrt stopped the restore's tasks: CRIU's main process was gone")),
    ("cut connection, before freeze", "a",
     dict(proxy=True, mig_fp="migrate.before-freeze=pause(2)",
          fault=at_failpoint("migrate.before-freeze", cut))),
    ("cut connection, during transfer", "a",
     dict(proxy=True, mig_fp="migrate.after-dump=pause(2)",
          fault=at_failpoint("migrate.after-dump", cut))),
    ("cut connection, during restore (4 s partition)", "b",
     dict(proxy=True, agent_fp="agent.before-restore=pause(2)",
          fault=at_failpoint("agent.before-restore", cut_and_partition))),
    # interrupted on purpose: before the restore request the source goes on; after it,
    # migrate asks the destination, which has the container by then
    ("Ctrl-C, during transfer", "a",
     dict(mig_fp="migrate.after-dump=pause(3)",
          fault=at_failpoint("migrate.after-dump", interrupt(signal.SIGINT)))),
    ("Ctrl-C, during restore", "b",
     dict(agent_fp="agent.before-restore=pause(2)",
          fault=at_failpoint("agent.before-restore", interrupt(signal.SIGINT)))),
    ("SIGTERM, during transfer", "a",
     dict(mig_fp="migrate.after-dump=pause(3)",
          fault=at_failpoint("migrate.after-dump", interrupt(signal.SIGTERM)))),
    ("SIGTERM, during restore", "b",
     dict(agent_fp="agent.before-restore=pause(2)",
          fault=at_failpoint("agent.before-restore", interrupt(signal.SIGTERM)))),
    ("Ctrl-C, after restore before release; migrate again", "b",
     dict(mig_fp="migrate.before-release=pause(3)", message="keeps running there",
          fault=at_failpoint("migrate.before-release", interrupt(signal.SIGINT)),
          resolve="rerun-migrate")),
    ("Ctrl-C, lazy mode, destination running, pages still served", "b",
     dict(mig_args=("--lazy",), mig_fp="migrate.before-release=pause(3)",
          fault=at_failpoint("migrate.before-release", interrupt(signal.SIGINT)),
          resolve="rerun-migrate-while-pending", message="keeps running there")),
    ("SIGHUP (terminal closed), during transfer", "a",
     dict(mig_fp="migrate.after-dump=pause(3)",
          fault=at_failpoint("migrate.after-dump", interrupt(signal.SIGHUP)))),
    # the peer vanishes without a reset: TCP_USER_TIMEOUT and keepalive (3 s here)
    # notice it, instead of the kernel's quarter of an hour of retransmissions
    ("destination goes silent (no reset), during transfer", "a",
     dict(peer_timeout=3, mig_fp="migrate.after-dump=pause(2)", message="no answer for 3s",
          fault=at_failpoint("migrate.after-dump", blackhole()))),
    ("destination goes silent during restore, back after 8 s", "b",
     dict(peer_timeout=3, agent_fp="agent.before-restore=pause(2)",
          fault=at_failpoint("agent.before-restore", blackhole(8)))),
    ("cut connection, after restore before release", "b",
     dict(proxy=True, mig_fp="migrate.before-release=pause(2)",
          fault=at_failpoint("migrate.before-release", cut))),
    # the other modes: pre-copy's first round runs while the source still runs; lazy
    # mode keeps a page server on the source until the destination has every page
    ("kill -9 migrate, pre-copy first round (source running)", "a",
     dict(mig_args=("--precopy",), mig_fp="migrate.after-dump=pause(60)",
          fault=at_failpoint("migrate.after-dump", kill_migrate), resolve="restart-agent")),
    ("kill -9 migrate, lazy mode, before restore", "a",
     dict(mig_args=("--lazy",), mig_fp="migrate.before-restore=pause(60)",
          fault=at_failpoint("migrate.before-restore", kill_migrate),
          resolve="restart-agent")),
    # the destination runs and takes its memory from the dead migrate's page server,
    # which must go on serving: recovery deletes the source only once it is done
    ("kill -9 migrate, lazy mode, destination running, pages still served", "b",
     dict(mig_args=("--lazy",), mig_fp="migrate.before-release=pause(60)",
          fault=at_failpoint("migrate.before-release", kill_migrate),
          resolve="rerun-migrate-while-pending")),
]


@pytest.mark.parametrize("name,expect,kw", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_fault(nodes, tmp_path, name, expect, kw):
    run_scenario(nodes, tmp_path, name, expect, **kw)


def test_fault_summary():
    if RESULTS:
        print("\nFAULT SUMMARY " + json.dumps(RESULTS))


def test_two_migrations_of_one_container_at_once(nodes, tmp_path, make_bundle):
    """Two `migrt migrate` of the same container, at the same moment, to two agents
    (say, two schedulers deciding at once): exactly one copy ends up running."""
    import migr as m
    ag1 = nodes.agent()
    ag2 = nodes.agent()
    cid, bundle, dest, out = nodes.counter()
    dest2 = make_bundle(["sh", "-c", ocitest.COUNTER], name=cid + "-dst2")
    root_c = str(tmp_path / "root-c")
    argv1 = nodes.migrate_argv(cid, dest, ag1)
    argv2 = nodes.migrate_argv(cid, dest2, ag2)
    argv2[argv2.index("--dest-root") + 1] = root_c
    ag2.restore_root = root_c
    ag2.restart()
    p1 = subprocess.Popen(argv1, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p2 = subprocess.Popen(argv2, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    r1, r2 = p1.wait(120), p2.wait(120)
    c = ocitest.Runtime(nodes.launcher, root_c)
    states = {"a": (nodes.a.state(cid) or {}).get("status"),
              "b": (nodes.b.state(cid) or {}).get("status"),
              "c": (c.state(cid) or {}).get("status")}
    try:
        running = [k for k, v in states.items() if v == "running"]
        assert len(running) == 1 and not [k for k, v in states.items() if v == "paused"], \
            (states, r1, r2, p1.stderr.read()[-300:], p2.stderr.read()[-300:])
        loser = (p1 if r1 else p2).stderr.read().decode().strip()[-250:]
        print(f"\nFAULT two migrations at once: exits {r1}/{r2}, running on {running[0]}; {loser}")
        assert not ag1.staged_data() and not ag2.staged_data()
    finally:
        c.run("delete", "--force", cid)


def test_second_migrate_of_a_container_being_migrated_is_refused(nodes, tmp_path):
    """While one `migrt migrate` of a container is under way (here held just before its
    freeze), another of the same container is refused at once, before freezing anything
    (exit 3, one line); the first then completes: one copy."""
    ag = nodes.agent()
    cid, bundle, dest, out = nodes.counter()
    fp = tmp_path / "fp-hold"
    fp.mkdir()
    first = nodes.spawn_migrate(cid, dest, ag, env={
        "MIGRT_FAILPOINTS": "migrate.before-freeze=pause(4)", "MIGRT_FAILPOINT_DIR": str(fp)})
    ocitest.wait_for(lambda: os.listdir(fp), timeout=30, what="the first migrate held")
    p, _ = nodes.migrate(cid, dest, ag)
    assert p.returncode == 3, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "being migrated by another" in lines[0], p.stderr
    assert first.wait(120) == 0, first.stderr.read().decode()[-500:]
    assert migr.copies(nodes, cid) == {"a": None, "b": "running"}
    migr.wait_dest_counting(ag, cid, 0)


def _checkpoints_of(cid):
    """pids of the `runc checkpoint` processes of container cid."""
    return migr.leaks_processes(cid, b"checkpoint")


@pytest.mark.parametrize("mode", ["full", "lazy"])
def test_migrate_killed_while_its_dump_waits_at_the_gate(nodes, tmp_path, mode):
    """migrate starts `runc checkpoint` before the freeze, its CRIU waiting at a gate
    (migrt.criu.gate) until the source is frozen. migrate killed there (kill -9): that
    runc and its CRIU end by themselves, CRIU having stopped at its pre-dump script
    without touching a task; the source never stops counting; a second migrate moves it."""
    ag = nodes.agent()
    cid, bundle, dest, out = nodes.counter()
    fp = tmp_path / "fp"
    fp.mkdir()
    extra = ("--lazy",) if mode == "lazy" else ()
    work_before = set(os.listdir(WORK)) if os.path.isdir(WORK) else set()
    mig = nodes.spawn_migrate(cid, dest, ag, *extra, env={
        "MIGRT_FAILPOINTS": "migrate.dump-armed=pause(60)", "MIGRT_FAILPOINT_DIR": str(fp)})
    wait_file(str(fp), proc=mig)
    armed = _checkpoints_of(cid)
    assert armed, "no runc checkpoint started before the freeze"
    assert nodes.a.state(cid)["status"] == "running"
    logs = [os.path.join(WORK, m, "work", "dump.log")
            for m in set(os.listdir(WORK)) - work_before]
    logs = [p for p in logs if os.path.exists(p)]
    assert logs, "CRIU has not started"
    kill_pid(mig.pid)
    mig.wait(10)
    ocitest.wait_for(lambda: not _checkpoints_of(cid), timeout=15,
                     what="the armed runc checkpoint and its CRIU to end by themselves")
    assert nodes.a.state(cid)["status"] == "running"
    before = ocitest.last_count(out)
    ocitest.wait_for(lambda: ocitest.last_count(out) >= before + 3, timeout=10,
                     what="the source counting on")
    log = open(logs[0], errors="replace").read()
    assert "Pre dump script failed" in log, log[-1500:]
    assert "Seized task" not in log and "was trapped" not in log, log[-1500:]
    p = subprocess.run(nodes.migrate_argv(cid, dest, ag, *extra), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-800:] + ag.log()[-3000:]
    assert migr.copies(nodes, cid) == {"a": None, "b": "running"}
    migr.wait_dest_counting(ag, cid, 0)


def _lazy_memtouch_served(nodes, tmp_path, pause, marker=False):
    """A 768 MiB memtouch moved in lazy mode, with `migrt migrate` held at its failpoint
    before the release: the destination runs it while the source's page server still
    serves its memory (seconds, under memtouch's faults). With `marker`, migrate gets no
    bundle: it stages, and the destination's copy is created from the marker it prints
    by another process, as containerd (the kubelet) does. Returns (cid, migrate, agent,
    the source's stdout, the page server's CRIU pids)."""
    memtouch = ocitest.static_program(os.path.join(
        os.path.dirname(__file__), "..", "bench", "memtouch.c"), str(tmp_path))
    cid = ocitest.uid("lz")
    args = ["/bin/memtouch", "768", "20"]        # 768 MiB, 2% of it rewritten every 0.1 s
    bundles = []
    for name in (cid, cid + "-dst"):
        b = nodes.make_bundle(args, name=name)
        ocitest.put_program(b, memtouch)
        bundles.append(b)
    src, dest = bundles
    agent = nodes.agent()
    rc, out, err = nodes.a.create(cid, src, start=True)
    assert rc == 0, err.text
    ocitest.wait_for(lambda: "ready" in out.text, timeout=120, what="memtouch filled")
    fpdir = str(tmp_path / "fp")
    os.makedirs(fpdir)
    env = {"MIGRT_FAILPOINT_DIR": fpdir,
           "MIGRT_FAILPOINTS": f"migrate.before-release=pause({pause})"}
    if not marker:
        mig = nodes.spawn_migrate(cid, dest, agent, "--lazy", env=env)
    else:
        argv = nodes.migrate_argv(cid, dest, agent, "--lazy", "--wait", "60")
        del argv[argv.index("--bundle"):argv.index("--bundle") + 2]
        mig = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, start_new_session=True,
                               env=dict(os.environ, **env))
        nodes.procs.append(mig)
        said = b""
        while b"MIGRT_RESTORE_FROM=" not in said:
            line = mig.stderr.readline()
            assert line, said.decode(errors="replace")[-800:]
            said += line
        value = said.split(b"MIGRT_RESTORE_FROM=", 1)[1].split()[0].decode()
        ocitest.bundlekit.set_env(dest, "MIGRT_RESTORE_FROM", value)
        b = ocitest.Runtime(nodes.b.binary, nodes.b.root, env={"MIGRT_STAGING": agent.staging})
        rc, _, err = b.create(cid, dest, start=True)
        assert rc == 0, err.text
    wait_file(fpdir, proc=mig)
    while not any(f.startswith("migrate.before-release") for f in os.listdir(fpdir)):
        assert mig.poll() is None, mig.stderr.read().decode()[-800:]
        time.sleep(0.02)
    assert (nodes.b.state(cid) or {}).get("status") == "running"
    pids = ocitest.lazy_page_server(cid)
    assert pids, "the page server had already served every page"
    return cid, mig, agent, out, pids


def _source_goes_on_alone(nodes, agent, cid, out):
    """One copy: the source, running again (not paused) and going on."""
    assert nodes.b.state(cid) is None, nodes.b.state(cid)
    assert nodes.a.state(cid)["status"] == "running"
    rounds = len(out.lines())
    ocitest.wait_for(lambda: len(out.lines()) > rounds + 5, timeout=20,
                     what="memtouch going on at the source")
    ocitest.wait_for(lambda: not agent.staged_data(), timeout=20, what="staging emptied")
    assert not journals_of(cid)


def test_lazy_page_server_dies_before_every_page_is_served(nodes, tmp_path):
    """Lazy mode: the source's page server dies (kill -9 of its CRIU) while the
    destination's copy, already running, still lacks part of its memory. That copy is
    stopped there and the source, which has all of it, resumes: one line says so, exit
    4. Before, the source was released anyway and the copy died at its first missing
    page: no copy left at all."""
    cid, mig, agent, out, pids = _lazy_memtouch_served(nodes, tmp_path, 1)
    for pid in pids:
        kill_pid(pid)
    mig.wait(120)
    msg = mig.stderr.read().decode(errors="replace")
    assert mig.returncode == 4, msg[-800:] + agent.log()[-6000:]
    assert "missing part of its memory, was stopped there" in msg, msg[-800:]
    assert "the source was resumed" in msg, msg[-800:]
    assert len(msg.strip().splitlines()) == 1, msg
    _source_goes_on_alone(nodes, agent, cid, out)


def test_lazy_page_server_dies_under_a_copy_created_from_the_marker(nodes, tmp_path):
    """As above, but the destination's copy was created from the marker by another
    process, as containerd does for a pod (not by the agent): the agent still stops it
    (the restore noted, as root, which container it made for this migration) and the
    source resumes. Before, the agent could not stop such a copy: the source stayed
    frozen and the migration ended in doubt, the copy running on without part of its
    memory."""
    cid, mig, agent, out, pids = _lazy_memtouch_served(nodes, tmp_path, 1, marker=True)
    for pid in pids:
        kill_pid(pid)
    mig.wait(120)
    msg = mig.stderr.read().decode(errors="replace").strip().splitlines()
    assert mig.returncode == 4, "\n".join(msg[-5:]) + agent.log()[-6000:]
    assert "missing part of its memory, was stopped there" in msg[-1], msg[-3:]
    assert "the source was resumed" in msg[-1], msg[-3:]
    assert "the container here was stopped" in agent.log()
    _source_goes_on_alone(nodes, agent, cid, out)


def test_lazy_page_server_dies_after_migrate_was_killed(nodes, tmp_path):
    """Lazy mode, both failures at once: `migrt migrate` is killed (kill -9) after the
    restore, while its page server still serves the destination's memory, and then that
    page server dies too. Recovery (`python -m migrt.migration.recovery`, as the agent
    runs it) reads in CRIU's log that not every page was served: it has the
    destination's copy stopped and resumes the source, and its line says so. Before,
    recovery deleted the source once the page server had ended, served or not: no copy
    left at all."""
    cid, mig, agent, out, pids = _lazy_memtouch_served(nodes, tmp_path, 60)
    kill_pid(mig.pid)
    mig.wait(10)
    assert journals_of(cid)
    for pid in pids:
        kill_pid(pid)
    ocitest.wait_for(lambda: not ocitest.lazy_page_server(cid) and not any(
        cid.encode() in a and b"checkpoint" in a for a in _cmdlines()), timeout=30,
        what="the page server's runc to end")
    p = subprocess.run([sys.executable, "-m", "migrt.migration.recovery"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, MIGRT_SECRET_FILE=nodes.secret_file))
    assert p.returncode == 0, p.stdout + p.stderr + agent.log()[-4000:]
    line = [x for x in p.stdout.splitlines() if cid in x]
    assert len(line) == 1, p.stdout
    assert "its page server ended before it had served every page" in line[0], line
    assert "the destination's copy, missing part of its memory, was stopped there; " \
           "source resumed" in line[0], line
    assert "the container here was stopped (the source's recovery)" in agent.log()
    _source_goes_on_alone(nodes, agent, cid, out)


def _cmdlines():
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    out.append(f.read())
            except OSError:
                pass
    return out
