"""Faults in the middle of a pod move on the real two-node Kubernetes (issue 14).

Each test starts a move of a pod holding about 200 MB of touched memory (its transfer
takes a while) from node-a to node-b with a PodMigration, does its damage while the
transfer runs (the target node's staging dir holds part of the image), and then checks
what a user would: the PodMigration's phase and message, which pod runs (`kubectl get
pods`), that the source pod's counter goes on in the same container (restart count 0) or
that the new pod's goes on from the old one's, that no pod is left Pending or
crash-looping, and, sampled ten times a second through each node's runc for the whole
move, that the workload never ran on both nodes at once; at the end exactly one copy
runs. The damage:

- kill -9 of node-a's (the source's) agent, restarted as its supervisor would: the
  `migrt migrate` it started runs in a session of its own and finishes the move; the
  controller asks the restarted agent again for the same migration id;
- kill -9 of node-b's (the target's) agent, restarted: the source rolls back;
- node-b's kubelet stopped (SIGTERM, as `systemctl stop kubelet`) while its pod's
  create waits for the migration, started again once the migration's outcome is known
  (the source resumes), or once the image is committed on node-b (the move completes);
- the network between the nodes cut (packets to and from node-b's agent dropped) until
  the PodMigration ends: the source sees no answer for its peer timeout and rolls back;
- the PodMigration deleted during the transfer: its finalizer keeps it until the outcome.

Where the damage lands must not depend on timing: node-a's agent runs its `migrt
migrate` with the failpoint `migrate.after-dump=pause(15)` (migrt/criu/failpoints.py),
so the migration, once its image is sent, waits 15 s before it commits it on the
target. The damage is done as soon as part of the image has arrived (or at that pause
if the transfer was quicker than the test's look): always before the commit.
"""
import os
import signal
import subprocess
import threading
import time

import pytest

import cluster as kc
import ocitest
import kubemigrt
from cluster import pod_manifest, container_id, restart_count, wait_for
from kubemigrt import (COUNTER, name, numbers, new_podmigration, wait_pm_end, running_of,
                       events_of, check_counter_moved)

# ~200 MB held in a shell variable (every page touched), then the counter
BIG_COUNTER = "x=$(head -c 200000000 /dev/zero | tr '\\0' a); " + COUNTER
PAUSE = 15


@pytest.fixture(scope="module")
def fault_kube(kube, workdir):
    ctl = kubemigrt.setup(kube, workdir, env={"MIGRT_KUBE_SCHEDULE_TIMEOUT": "20"})
    yield ctl
    ctl.kill()


@pytest.fixture
def paused_source(kube, tmp_path):
    """node-a's agent restarted with the failpoint that holds each migration after its
    image is sent (see the module's doc); both agents as they were afterwards."""
    a = kube.nodes["node-a"]
    fp = tmp_path / "failpoints"
    fp.mkdir()
    a.kill_agent(signal.SIGTERM)
    a.start_agent(env={"MIGRT_FAILPOINTS": f"migrate.after-dump=pause({PAUSE})",
                       "MIGRT_FAILPOINT_DIR": str(fp)})
    yield str(fp)
    while SAMPLERS:             # (a failed test's: its runc list would outlive the cluster)
        c = SAMPLERS.pop()
        c.stop.set()
        c.t.join(10)
    for n in kube.nodes.values():
        n.kill_agent(signal.SIGTERM)
        n.start_agent()


SAMPLERS = []


class Copies:
    """Samples every 0.1 s, until stopped, the containers of the old pod on node-a and
    of the new pod on node-b as their runc sees them; records any moment both ran."""

    def __init__(self, kube, old):
        self.kube, self.old, self.new = kube, old, None
        self.both, self.samples = [], 0
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()
        SAMPLERS.append(self)

    def now(self):
        a = running_of(self.kube.nodes["node-a"], self.old)
        b = running_of(self.kube.nodes["node-b"], self.new) if self.new else {}
        return a, b

    def run(self):
        while not self.stop.is_set():
            a, b = self.now()
            if "running" in a.values() and "running" in b.values():
                self.both.append((a, b))
            self.samples += 1
            time.sleep(0.1)

    def end(self):
        self.stop.set()
        self.t.join(10)
        assert self.samples > 10
        assert not self.both, f"both copies ran at once: {self.both[:3]}"


def start_move(kube, pod, pmn):
    """A PodMigration of pod to node-b; (its status once the transfer runs, Copies)."""
    copies = Copies(kube, pod)
    new_podmigration(kube, pmn, pod)
    st = wait_for(lambda: (lambda s: s if s.get("step") == "migrating" else None)(
        kube.get("podmigration", pmn).get("status") or {}), 90, "the migration step",
        interval=0.05)
    copies.new = st["targetPod"]
    return st, copies


def wait_transfer(kube, st, fp):
    """Until part of the image has arrived on node-b (or the migration waits at the
    failpoint after sending it all): the transfer runs, nothing is committed."""
    staged = os.path.join(kube.nodes["node-b"].staging, st["migrationID"])

    def arrived():
        if any(f.startswith("migrate.after-dump.") for f in os.listdir(fp)):
            return "all sent"
        size = 0
        for d, _, files in os.walk(staged):
            for f in files:
                try:
                    size += os.lstat(os.path.join(d, f)).st_size
                except OSError:
                    pass
        return f"{size} bytes arrived" if size > 16 << 20 else None
    at = wait_for(arrived, 120, "the image arriving on node-b", interval=0.01)
    print(f"\nFAULT {st['targetPod']}: the damage comes with {at}")
    return at


def big_pod(kube, pod):
    kube.run_pod(pod_manifest(pod, BIG_COUNTER, node="node-a"), timeout=120)
    wait_for(lambda: len(numbers(kube.logs(pod))) >= 5, 60, "the counter")
    return kube.pod(pod), numbers(kube.logs(pod))


def no_stuck_pods(kube, *names):
    """None of these pods (those that still exist) is Pending, crash-looping or waiting."""
    for n in names:
        p = kube.get("pods", "--field-selector", f"metadata.name={n}")["items"]
        for x in p:
            assert x["status"].get("phase") == "Running", (n, x["status"])
            for c in x["status"].get("containerStatuses") or []:
                assert "running" in c.get("state", {}), (n, c)
                assert c.get("restartCount") == 0, (n, c)


def check_source_runs_on(kube, pod, old, pmn, copies):
    """Outcome 1: the source pod runs on, the same container, no new pod anywhere."""
    wait_for(lambda: not kube.get("pods", "-l", f"migrt.io/migration={pmn}")["items"], 60,
             "the new pod deleted")
    # its container gone from node-b too (the kubelet cleans up the deleted pod)
    wait_for(lambda: not running_of(kube.nodes["node-b"], copies.new), 60,
             "no container of the new pod on node-b")
    p = kube.pod(pod)
    assert container_id(p) == container_id(old) and restart_count(p) == 0, p["status"]
    assert kc._cond(p, "Ready") and p["spec"]["nodeName"] == "node-a"
    n0 = numbers(kube.logs(pod))[-1]
    wait_for(lambda: numbers(kube.logs(pod))[-1] > n0 + 3, 30, "the source counting on")
    copies.end()
    a, b = copies.now()
    assert list(a.values()) == ["running"] and not b, (a, b)
    no_stuck_pods(kube, pod)
    assert "MigrationFailed" in [r for r, _ in events_of(kube, pod)]


def check_moved(kube, pod, st, before, copies):
    """Outcome 2: the new pod runs on node-b with the counter going on, the old pod gone."""
    new = st["targetPod"]
    kube.wait_gone(pod)
    p = kube.wait_pod(new)
    assert p["spec"]["nodeName"] == "node-b" and restart_count(p) == 0
    check_counter_moved(kube, new, before)
    copies.end()
    a, b = copies.now()
    assert not a and list(b.values()) == ["running"], (a, b)
    no_stuck_pods(kube, new)
    assert "Migrated" in [r for r, _ in events_of(kube, new)]
    kube.delete_pod(new)
    kube.wait_gone(new)


def test_source_agent_killed_mid_transfer_the_move_completes(kube, fault_kube, paused_source):
    pod, pmn = name("ksrc"), name("pm")
    old, before = big_pod(kube, pod)
    st, copies = start_move(kube, pod, pmn)
    at = wait_transfer(kube, st, paused_source)
    a = kube.nodes["node-a"]
    a.kill_agent()                  # kill -9 of the agent alone (KillMode=process)
    a.start_agent(env={"MIGRT_FAILPOINTS": f"migrate.after-dump=pause({PAUSE})",
                       "MIGRT_FAILPOINT_DIR": paused_source})
    pm = wait_pm_end(kube, pmn, 180)
    s = pm["status"]
    assert s["phase"] == "Succeeded", (at, s, fault_kube.tail())
    assert f"moved to node-b as pod {st['targetPod']}" in s["message"], s
    check_moved(kube, pod, s, before, copies)


def test_target_agent_killed_mid_transfer_the_source_runs_on(kube, fault_kube, paused_source):
    pod, pmn = name("ktgt"), name("pm")
    old, _ = big_pod(kube, pod)
    st, copies = start_move(kube, pod, pmn)
    at = wait_transfer(kube, st, paused_source)
    b = kube.nodes["node-b"]
    b.kill_agent()
    b.start_agent()
    pm = wait_pm_end(kube, pmn, 180)
    s = pm["status"]
    assert s["phase"] == "Failed", (at, s, fault_kube.tail())
    assert s["message"].startswith("migration failed: "), s
    check_source_runs_on(kube, pod, old, pmn, copies)
    kube.delete_pod(pod)
    kube.wait_gone(pod)


def cut(kube, on):
    """Drop every packet to and from node-b's agent. With iptables, which install.sh
    installs (a fresh machine has no `nft` command)."""
    b = kube.nodes["node-b"]
    rules = [["INPUT", "-p", "tcp", "-d", b.ip, "--dport", str(b.agent_port), "-j", "DROP"],
             ["INPUT", "-p", "tcp", "-s", b.ip, "--sport", str(b.agent_port), "-j", "DROP"]]
    for r in rules:
        if on:
            subprocess.run(["iptables", "-I", *r], check=True, capture_output=True)
        else:
            while subprocess.run(["iptables", "-D", *r], capture_output=True).returncode == 0:
                pass


def test_transfer_cut_the_source_runs_on(kube, fault_kube, paused_source):
    pod, pmn = name("cut"), name("pm")
    old, _ = big_pod(kube, pod)
    st, copies = start_move(kube, pod, pmn)
    try:
        at = wait_transfer(kube, st, paused_source)
        cut(kube, True)
        pm = wait_pm_end(kube, pmn, 240)
    finally:
        cut(kube, False)
    s = pm["status"]
    assert s["phase"] == "Failed", (at, s, fault_kube.tail())
    assert s["message"].startswith("migration failed: ") and "no answer" in s["message"], s
    check_source_runs_on(kube, pod, old, pmn, copies)
    kube.delete_pod(pod)
    kube.wait_gone(pod)


def test_podmigration_deleted_mid_transfer_the_move_ends_then_it_goes(kube, fault_kube,
                                                                      paused_source):
    pod, pmn = name("del"), name("pm")
    old, before = big_pod(kube, pod)
    st, copies = start_move(kube, pod, pmn)
    # every state the PodMigration goes through from here until it is gone
    watch = subprocess.Popen(kube.kubectl_argv(
        "get", "podmigration", pmn, "--watch", "-o",
        'jsonpath={.status.phase}|{.status.step}|{.metadata.deletionTimestamp}|'
        '{.status.message}{"\\n"}'), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    seen = []
    threading.Thread(target=lambda: [seen.append(x.rstrip("\n")) for x in watch.stdout],
                     daemon=True).start()
    try:
        wait_for(lambda: seen, 30, "the watch's first line")
        wait_transfer(kube, st, paused_source)
        kube.kubectl("delete", "podmigration", pmn, "--wait=false")
        wait_for(lambda: kube.kubectl("get", "podmigration", pmn, check=False).returncode != 0,
                 180, "the PodMigration gone (its finalizer released)")
        wait_for(lambda: seen and seen[-1].startswith("Succeeded|"), 10,
                 "the watch's last state")
    finally:
        watch.kill()
    # deleted during the migration: it stayed, marked, until the outcome, which it says
    marked = [x for x in seen if x.split("|")[2]]
    assert marked and marked[0].startswith("Running|migrating|"), seen
    last = seen[-1].split("|")
    assert last[0] == "Succeeded" and last[2], seen
    assert last[3].startswith(f"moved to node-b as pod {st['targetPod']}"), seen
    check_moved(kube, pod, st, before, copies)


def test_target_kubelet_stopped_mid_transfer_the_source_runs_on(kube, fault_kube,
                                                               paused_source):
    """The new pod's create waits for the migration inside containerd, on the kubelet's
    behalf; stopping the kubelet cancels its request and that create ends. Nothing on
    node-b creates the container from the staged image any more, so the migration's
    bound on that wait (120 s, the source frozen meanwhile) runs out and the source
    resumes. The kubelet is started again only once the PodMigration has ended."""
    pod, pmn = name("klet"), name("pm")
    old, _ = big_pod(kube, pod)
    st, copies = start_move(kube, pod, pmn)
    at = wait_transfer(kube, st, paused_source)
    b = kube.nodes["node-b"]
    b.stop_kubelet()
    try:
        pm = wait_pm_end(kube, pmn, 300)
    finally:
        b.restart_kubelet()
    s = pm["status"]
    assert s["phase"] == "Failed", (at, s, fault_kube.tail())
    assert "no container was created from the marker in time" in s["message"] and \
        "the source was resumed and keeps running" in s["message"], s
    check_source_runs_on(kube, pod, old, pmn, copies)
    kube.delete_pod(pod)
    kube.wait_gone(pod)


def test_target_kubelet_back_before_the_bound_the_move_completes(kube, fault_kube,
                                                                 paused_source):
    """As above, but the kubelet is started again once the image is committed on
    node-b (the source frozen, waiting for a create from the marker): it syncs the
    new pod, whose container was never started, creates it again, and that create
    restores the staged image: the move completes. The new pod's restart count says
    the kubelet's first attempt failed; its counter goes on from the old pod's."""
    pod, pmn = name("kback"), name("pm")
    old, before = big_pod(kube, pod)
    st, copies = start_move(kube, pod, pmn)
    at = wait_transfer(kube, st, paused_source)
    b = kube.nodes["node-b"]
    b.stop_kubelet()
    record = os.path.join(b.staging, st["migrationID"], "migration.json")
    try:
        wait_for(lambda: '"staged"' in open(record).read(), 120,
                 "the image committed on node-b")
    finally:
        b.restart_kubelet()
    pm = wait_pm_end(kube, pmn, 240)
    s = pm["status"]
    assert s["phase"] == "Succeeded", (at, s, fault_kube.tail())
    new = s["targetPod"]
    kube.wait_gone(pod)
    p = kube.wait_pod(new)
    assert p["spec"]["nodeName"] == "node-b", p["spec"]
    check_counter_moved(kube, new, before)
    copies.end()
    a, bb = copies.now()
    assert not a and list(bb.values()) == ["running"], (a, bb)
    # (1 here: the kubelet's first attempt, cancelled with it, left a container that
    # never started; the one it made again is the restored process, not a fresh start)
    assert restart_count(p) in (0, 1), p["status"]
    assert f"moved to node-b as pod {new}" in s["message"], s
    kube.delete_pod(new)
    kube.wait_gone(new)


# ~600 MB held in a shell variable: served in the background after a lazy restore, it
# keeps the source's page server at work for a second or more
LAZY_COUNTER = "x=$(head -c 600000000 /dev/zero | tr '\\0' a); " + COUNTER


@pytest.fixture
def held_release(kube, tmp_path):
    """node-a's agent restarted so that its `migrt migrate` runs wait 10 s at the
    failpoint before the release: in lazy mode the new pod's container runs by then,
    its memory still coming from node-a's page server."""
    a = kube.nodes["node-a"]
    fp = tmp_path / "failpoints"
    fp.mkdir()
    a.kill_agent(signal.SIGTERM)
    a.start_agent(env={"MIGRT_FAILPOINTS": "migrate.before-release=pause(10)",
                       "MIGRT_FAILPOINT_DIR": str(fp)})
    yield str(fp)
    while SAMPLERS:
        c = SAMPLERS.pop()
        c.stop.set()
        c.t.join(10)
    a.kill_agent(signal.SIGTERM)
    a.start_agent()


def test_lazy_page_server_killed_after_the_restore_the_source_runs_on(kube, fault_kube,
                                                                     held_release):
    """Lazy mode: the new pod's container runs on node-b, created by its kubelet from
    the marker, when node-a's page server dies (kill -9) before it has served every
    page. That copy lacks part of its memory: node-b's agent stops it (the restore
    noted, as root, which container it made for the migration), the source resumes,
    the PodMigration fails and the new pod goes. Before, the agent could not stop a
    copy the kubelet had made: the source stayed frozen and the migration ended in
    doubt, the copy running on without part of its memory."""
    pod, pmn = name("lzps"), name("pm")
    kube.run_pod(pod_manifest(pod, LAZY_COUNTER, node="node-a"), timeout=180)
    wait_for(lambda: len(numbers(kube.logs(pod))) >= 3, 90, "the counter")
    old = kube.pod(pod)
    copies = Copies(kube, pod)
    new_podmigration(kube, pmn, pod, mode="lazy")
    wait_for(lambda: any(f.startswith("migrate.before-release.")
                         for f in os.listdir(held_release)), 120,
             "the new pod's container restored", interval=0.01)
    pids = ocitest.lazy_page_server(container_id(old))
    assert pids, "node-a's page server had already served every page"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    st = kube.get("podmigration", pmn)["status"]
    copies.new = st.get("targetPod")
    assert copies.new, st
    pm = wait_pm_end(kube, pmn, 180)
    s = pm["status"]
    assert s["phase"] == "Failed", (s, fault_kube.tail())
    assert s["message"].startswith("migration failed: "), s
    assert "missing part of its memory, was stopped there" in s["message"], s
    check_source_runs_on(kube, pod, old, pmn, copies)
    kube.delete_pod(pod)
    kube.wait_gone(pod)
