#!/usr/bin/env python3
"""Benchmark: moving a pod with `kubectl migrt pod` on a real two-node Kubernetes.

Starts the cluster of tests/kube (Kubernetes 1.20.2, per-node containerd and migrt
agent), the PodMigration controller with its shipped role, and the kubectl plugin. Then,
for each pod size and mode asked, N times (plus one warm-up left out), a pod is moved
from one node to the other with `kubectl migrt pod NAME --to NODE --mode M --json`,
alternating directions. The pods:

- small (`--size-mib 0`): busybox, a shell counter printed every 10 ms and served by
  busybox httpd;
- `--size-mib S` (e.g. 1024): tests/bench/memtouch.c built static into the image, which
  fills S MiB of anonymous memory, keeps rewriting 0.5% of its pages every 100 ms and
  prints its counter (every 100 ms) into its log and /tmp/count, served by busybox httpd;
  the pod's memory limit is S + 256 MiB.

Each pod has a ClusterIP Service of its own (port 80 -> 8080). This cluster runs no
kube-proxy (none is built), so the benchmark plays kube-proxy's iptables mode for the
host: it watches the Service's Endpoints (`kubectl get endpoints --watch`) and rewrites a
nat chain of its own that DNATs the ClusterIP to the ready endpoints, as kube-proxy does
(kube-proxy syncs no faster; it may be slower). A client on the host polls
http://CLUSTER-IP/count every 20 ms (new TCP connection each time, 0.3 s timeout). For
each move:

- command to done: wall time of the kubectl migrt command (PodMigration created,
  new pod scheduled and waiting, migration, hand-over, old pod deleted);
- migrt downtime: the migration's own figure (freeze of the source until its copy runs);
- pod-level downtime by Service: the longest gap between two answers the Service client
  got during the move (freeze, restore, the new pod turning Ready in the kubelet, the
  Endpoints update, the proxy rule; plus up to one poll interval); the answers after
  the gap must carry on the counter (same process, not a restart);
- pod-level downtime by log: the gap between the last line the old pod logged and the
  first line the new pod logged (containerd's CRI log timestamps of both nodes, one
  machine clock), so it includes one tick (10 ms small, 100 ms memtouch).

Anchors (published, Tencent's mig runtime): pod recreate p50 9 s, hybrid migration
downtime 0.7 s at 1 GiB. Targets here: command to done <= 5 s for a small pod;
pod-level downtime <= 1 s at 1 GiB in lazy mode.

    /opt/migrt/venv/bin/python tests/bench/bench_kube_migrate.py [-n 3] \
        [--mode full,precopy,lazy] [--size-mib 0,1024] [--json-out FILE] [--readiness-probe]
        [--statefulset]

With --statefulset the pod is a StatefulSet's (NAME-0, placed by the scheduler, moved to
the other node; it keeps its name), and each move also prints where its downtime went:
frozen until the copy was kept on the target, the old pod's deletion, its re-creation by
the StatefulSet controller, the sandbox and restore on the target.

Needs root, containerd, runc, CRIU, iptables, gcc (static libc) for --size-mib > 0 (no
network).
"""
import argparse
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(TESTS, "kube"), TESTS]

import ocitest  # noqa: E402
import cluster as kc  # noqa: E402
import kubemigrt  # noqa: E402

TICKER = ("trap 'exit 0' TERM; mkdir -p /www; httpd -p 8080 -h /www; i=0; "
          "while :; do i=$((i+1)); echo $i; echo $i > /www/count; usleep 10000; done")
MEMTOUCH = "httpd -p 8080 -h /tmp; exec /bin/memtouch {mib} 5"
POLL = 0.02


def stamp(line):
    """(seconds since epoch, counter) from one `kubectl logs --timestamps` line."""
    ts, _, rest = line.partition(" ")
    if not rest.strip().isdigit():
        return None
    day, frac = ts.rstrip("Z").split(".") if "." in ts else (ts.rstrip("Z"), "0")
    t = datetime.datetime.strptime(day, "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.timezone.utc).timestamp() + float("0." + frac)
    return t, int(rest)


def follow_logs(c, pod, lines):
    """`kubectl logs -f --timestamps` of the old pod until its container ends."""
    p = subprocess.Popen(c.kubectl_argv("logs", "-f", "--timestamps", pod),
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in p.stdout:
        s = stamp(line.strip())
        if s:
            lines.append(s)
    p.wait()


class ServiceProxy:
    """kube-proxy's iptables mode for one Service, on the host only: a watch on its
    Endpoints, and a nat chain of ours DNATing ClusterIP:80 to the ready addresses
    (random among several, as kube-proxy does)."""

    def __init__(self, c, svc, cluster_ip, tag):
        self.c, self.svc, self.ip = c, svc, cluster_ip
        self.chain = f"MIGRT-BENCH-{tag}"[:28]
        self.jump = ["-d", f"{cluster_ip}/32", "-p", "tcp", "--dport", "80", "-j", self.chain]
        self.changes = []           # (wall time, [ips])
        self.current = None
        subprocess.run(["iptables", "-w", "-t", "nat", "-N", self.chain], check=True)
        subprocess.run(["iptables", "-w", "-t", "nat", "-I", "OUTPUT", *self.jump], check=True)
        self.proc = subprocess.Popen(
            c.kubectl_argv("get", "endpoints", svc, "--watch", "-o",
                           'jsonpath={.subsets[*].addresses[*].ip}{"\\n"}'),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        for line in self.proc.stdout:
            ips = sorted(line.split())
            if ips == self.current:
                continue
            self.current = ips
            rules = [f":{self.chain} - [0:0]"]
            for i, ip in enumerate(ips):
                left = len(ips) - i
                prob = ([] if left == 1 else
                        ["-m", "statistic", "--mode", "random", "--probability",
                         f"{1 / left:.5f}"])
                rules.append(" ".join(["-A", self.chain, "-p", "tcp", *prob, "-j", "DNAT",
                                       "--to-destination", f"{ip}:8080"]))
            subprocess.run(["iptables-restore", "-w", "--noflush"], check=True, text=True,
                           input="*nat\n" + "\n".join(rules) + "\nCOMMIT\n")
            self.changes.append((time.time(), ips))

    def close(self):
        self.proc.kill()
        self.proc.wait()
        subprocess.run(["iptables", "-w", "-t", "nat", "-D", "OUTPUT", *self.jump],
                       capture_output=True)
        subprocess.run(["iptables", "-w", "-t", "nat", "-F", self.chain], capture_output=True)
        subprocess.run(["iptables", "-w", "-t", "nat", "-X", self.chain], capture_output=True)


def ask(ip, timeout=0.3):
    """The counter a GET /count through ip:80 answers, or None."""
    try:
        with socket.create_connection((ip, 80), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"GET /count HTTP/1.0\r\n\r\n")
            data = b""
            while True:
                b = s.recv(4096)
                if not b:
                    break
                data += b
        body = data.split(b"\r\n\r\n", 1)[1].strip()
        return int(body)
    except (OSError, ValueError, IndexError):
        return None


class Poller:
    """A client polling the Service: (wall time, counter) of every answer."""

    def __init__(self, ip):
        self.ip, self.answers, self.stop = ip, [], threading.Event()
        self.failed = []            # wall times of polls that got no answer
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop.is_set():
            t0 = time.time()
            n = ask(self.ip)
            if n is not None:
                self.answers.append((time.time(), n))
            else:
                self.failed.append(time.time())
            time.sleep(max(0.0, POLL - (time.time() - t0)))

    def close(self):
        self.stop.set()
        self.t.join(5)

    def longest_gap(self, since, until):
        a = [x for x in self.answers if since <= x[0] <= until]
        if len(a) < 2:
            return None, None
        i = max(range(1, len(a)), key=lambda k: a[k][0] - a[k - 1][0])
        return a[i][0] - a[i - 1][0], (a[i - 1], a[i])

    def gaps(self, since, until, longer=0.3):
        """Every pause between answers longer than `longer`: (start - since, length)."""
        a = [x for x in self.answers if since <= x[0] <= until]
        return [(round(a[k - 1][0] - since, 3), round(a[k][0] - a[k - 1][0], 3))
                for k in range(1, len(a)) if a[k][0] - a[k - 1][0] > longer]


def one_move(c, ctl, i, mode, mib, probe=False, sts=False):
    src, dst = kc.NODES[i % 2], kc.NODES[(i + 1) % 2]
    tag = os.urandom(3).hex()
    pod = f"bench-{mib}m-{mode}-{i}-{tag}"
    if mib:
        m = kc.pod_manifest(pod, MEMTOUCH.format(mib=mib), node=None if sts else src,
                            resources={"limits": {"memory": f"{mib + 256}Mi"}})
    else:
        m = kc.pod_manifest(pod, TICKER, node=None if sts else src)
    m["metadata"]["labels"] = {"bench": tag}
    if probe:
        # what an operator would add: the kubelet takes a pod that stops answering out
        # of the Endpoints (here: the frozen source, after one failed probe)
        m["spec"]["containers"][0]["readinessProbe"] = {
            "httpGet": {"path": "/count", "port": 8080}, "periodSeconds": 1,
            "timeoutSeconds": 1, "failureThreshold": 1}
    if sts:
        # a StatefulSet of one (`--statefulset`): its pod NAME-0 keeps its name
        name = f"bsts-{i}-{tag}"
        c.apply({"apiVersion": "apps/v1", "kind": "StatefulSet",
                 "metadata": {"name": name, "namespace": c.namespace},
                 "spec": {"replicas": 1, "serviceName": name,
                          "selector": {"matchLabels": {"bench": tag}},
                          "template": {"metadata": {"labels": {"bench": tag}},
                                       "spec": m["spec"]}}})
        pod = f"{name}-0"
        src = c.wait_pod(pod, timeout=180)["spec"]["nodeName"]
        dst = kc.NODES[1 - kc.NODES.index(src)]
    else:
        c.run_pod(m, timeout=180)
    kc.wait_for(lambda: len(c.logs(pod).split()) > (50 if not mib else 10), 120,
                "counter running")
    c.apply({"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": f"bench-{tag}", "namespace": c.namespace},
             "spec": {"selector": {"bench": tag},
                      "ports": [{"port": 80, "targetPort": 8080}]}})
    cip = c.get("service", f"bench-{tag}")["spec"]["clusterIP"]
    proxy = ServiceProxy(c, f"bench-{tag}", cip, tag)
    poller = None
    try:
        kc.wait_for(lambda: ask(cip) is not None, 60, "an answer through the Service")
        poller = Poller(cip)
        old_lines = []
        t = threading.Thread(target=follow_logs, args=(c, pod, old_lines), daemon=True)
        t.start()
        time.sleep(1.0)
        w0, t0 = time.time(), time.monotonic()
        r = ctl.kubectl_migrt("pod", pod, "--to", dst, "--mode", mode, "--json", timeout=600)
        took = time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError(f"move {i} failed: {r.stdout[-3000:]} {r.stderr[-2000:]}\n"
                               f"{ctl.tail()}")
        rep = json.loads(r.stdout)
        st = rep["status"]
        new = st["targetPod"]
        # the Service must answer from the new pod: wait for two answers after done
        n_done = len(poller.answers)
        kc.wait_for(lambda: len(poller.answers) >= n_done + 2, 60,
                    "answers through the Service after the move")
        w1 = time.time()
        poller.close()
        gap, around = poller.longest_gap(w0, w1)
        pauses = poller.gaps(w0, w1)
        # (>=: the Service may answer from the restored copy before its next tick)
        assert around[1][1] >= around[0][1] > 0, ("counter did not carry on", around)
        t.join(30)
        kc.wait_for(lambda: len(c.logs(new).split()) > 5, 60, "new pod's log")
        new_lines = [s for s in (stamp(x) for x in c.kubectl("logs", "--timestamps", new)
                                 .stdout.splitlines()) if s]
        log_gap = new_lines[0][0] - old_lines[-1][0]
        # pauses in the old pod's own log during the move (pre-copy's pre-dump freezes it)
        old_w = [x for x in old_lines if x[0] >= w0]
        old_pauses = [(round(old_w[k - 1][0] - w0, 3), round(old_w[k][0] - old_w[k - 1][0], 3))
                      for k in range(1, len(old_w)) if old_w[k][0] - old_w[k - 1][0] > 0.3]
        assert new_lines[0][1] == old_lines[-1][1] + 1, (old_lines[-1], new_lines[0])
    finally:
        if poller:
            poller.close()
        proxy.close()
        c.kubectl("delete", "service", f"bench-{tag}", "--wait=false", check=False)
    if sts:
        c.kubectl("delete", "statefulset", name, "--wait=false")
    c.delete_pod(new, "--grace-period=0", "--force")
    c.wait_gone(new)
    ho = st.get("handoff") or {}
    handoff = {}
    if sts and ho.get("restoredAt"):
        # the StatefulSet's downtime: frozen until the copy was kept on the target and
        # the source released; the old pod's deletion; its re-creation by the StatefulSet
        # controller (through the webhook); sandbox and restore on the target
        handoff = {"frozen_to_handoff": ho.get("frozenSeconds"),
                   "handoff_to_deleted": round(ho["deletedAt"] - ho["at"], 3),
                   "delete_call": ho.get("deleteSeconds"),
                   "deleted_to_recreated": round(ho["createdAt"] - ho["deletedAt"], 3),
                   "recreated_to_restored": round(ho["restoredAt"] - ho["createdAt"], 3)}
    # how long the Endpoints listed more than one address (the frozen source's too:
    # kube-proxy then sends part of the new connections to a pod that cannot answer)
    both, since = 0.0, None
    for tw, ips in proxy.changes + [(w1, [])]:
        if since is not None:
            both += max(0.0, min(tw, w1) - since)
            since = None
        if len(ips) > 1 and tw < w1:
            since = max(tw, w0)
    return {"size_mib": mib, "mode": mode, "command_to_done": took,
            "migrt_downtime": st.get("downtimeSeconds"), "svc_downtime": gap,
            "log_downtime": log_gap, "cli_reported": rep["commandToDoneSeconds"],
            "phases": st.get("phases") or {}, "bytes": st.get("bytes") or {},
            "statefulset": sts, "handoff": handoff,
            "steps": st.get("stepTimes") or {},
            "endpoint_changes": [(round(t - w0, 3), ips) for t, ips in proxy.changes
                                 if t >= w0],
            "failed_polls": sum(1 for x in poller.failed if w0 <= x <= w1),
            "answers": sum(1 for x in poller.answers if w0 <= x[0] <= w1),
            "two_endpoints_s": round(both, 3), "service_pauses": pauses,
            "old_log_pauses": old_pauses,
            "gap_from": round(around[0][0] - w0, 3), "gap_to": round(around[1][0] - w0, 3),
            "load": os.getloadavg()}


def build_memtouch(work):
    out = os.path.join(work, "memtouch")
    subprocess.run(["gcc", "-O2", "-static", "-o", out, os.path.join(HERE, "memtouch.c")],
                   check=True)
    return out


def med(v):
    v = [x for x in v if isinstance(x, (int, float))]
    return (statistics.median(v), min(v), max(v)) if v else (float("nan"),) * 3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=3, help="moves per size and mode")
    ap.add_argument("--mode", default="full",
                    help="comma-separated: full, precopy, lazy")
    ap.add_argument("--size-mib", default="0",
                    help="comma-separated pod sizes in MiB; 0 = the small busybox pod")
    ap.add_argument("--json-out", help="write every move's record here")
    ap.add_argument("--readiness-probe", action="store_true",
                    help="give the pod an HTTP readinessProbe (1 s period, 1 failure)")
    ap.add_argument("--hand-over", default="on", choices=("on", "off", "both"),
                    help="the controller's Service hand-over when the copy runs "
                    "(MIGRT_KUBE_HAND_OVER); both: each size and mode with it off, then on "
                    "(the controller restarted between)")
    ap.add_argument("--statefulset", action="store_true",
                    help="move the pod of a StatefulSet of one (it keeps its name: deleted, "
                    "then recreated on the target); full and precopy modes only")
    args = ap.parse_args()
    modes = args.mode.split(",")
    for m in modes:
        if m not in ("full", "precopy", "lazy"):
            ap.error(f"--mode {m}: one of full, precopy, lazy")
        if args.statefulset and m == "lazy":
            ap.error("--statefulset: full or precopy mode (a StatefulSet pod is not moved lazily)")
    sizes = [int(s) for s in args.size_mib.split(",")]
    work = tempfile.mkdtemp(prefix="bench-kube-mig-")
    migrt = ocitest.build_launcher(os.path.join(work, "migrt"))
    rootfs = ocitest.bundlekit.make_rootfs(os.path.join(work, "rootfs"))
    if any(sizes):
        shutil.copy(build_memtouch(work), os.path.join(rootfs, "bin", "memtouch"))
    images = [kc.harness.oci_layout_tar(rootfs, os.path.join(work, "busybox.tar")),
              kc.harness.oci_layout_tar(rootfs, os.path.join(work, "pause.tar"),
                                        name=kc.PAUSE_IMAGE, cmd=kc.harness.PAUSE_CMD)]
    bin_dir = kc.ensure_built(os.path.join(work, "build.log"))
    c = kc.Cluster(kc.make_base(), bin_dir, migrt, images)
    c.start()
    print(f"cluster up in {c.timings['start_s']} s; load average {os.getloadavg()}",
          flush=True)
    ctl = None
    results = []
    try:
        ctl = kubemigrt.setup(c, work)
        i = 0
        settings = ["off", "on"] if args.hand_over == "both" else [args.hand_over]
        for mib, mode, ho in [(m, d, h) for m in sizes for d in modes for h in settings]:
            if ctl.env.get("MIGRT_KUBE_HAND_OVER") != ("1" if ho == "on" else "0"):
                ctl.kill()
                ctl.env["MIGRT_KUBE_HAND_OVER"] = "1" if ho == "on" else "0"
                ctl.start()
            for k in range(args.n + 1):         # the first is a warm-up
                r = one_move(c, ctl, i, mode, mib, args.readiness_probe, args.statefulset)
                i += 1
                r["warmup"] = k == 0
                r["hand_over"] = ho
                ph = ", ".join(f"{a} {b:.2f}" for a, b in r["phases"].items()
                               if isinstance(b, (int, float)))
                print(f"{mib or 'small'} MiB {mode} (hand-over {ho}) move {k}: command to done "
                      f"{r['command_to_done']:.2f} s, migrt downtime "
                      f"{r['migrt_downtime']:.3f} s, by Service {r['svc_downtime']:.3f} s "
                      f"(from +{r['gap_from']} to +{r['gap_to']} s), by log "
                      f"{r['log_downtime']:.3f} s; {r['failed_polls']} failed polls of "
                      f"{r['failed_polls'] + r['answers']}, two endpoints for "
                      f"{r['two_endpoints_s']} s; Service pauses {r['service_pauses']}, "
                      f"old pod's log pauses {r['old_log_pauses']}; endpoints {r['endpoint_changes']}; "
                      f"phases: {ph}; load {r['load'][0]:.2f}"
                      + (f"; StatefulSet handoff {r['handoff']}" if r["handoff"] else "")
                      + (" (warm-up)" if k == 0 else ""), flush=True)
                results.append(r)
                if args.json_out:
                    with open(args.json_out, "w") as f:
                        json.dump(results, f, indent=1)
    finally:
        if ctl:
            ctl.kill()
        c.stop()
        shutil.rmtree(work, ignore_errors=True)
    res = [r for r in results if not r["warmup"]]
    print("\n| size | mode | hand-over | moves | command to done (s) | pod-level downtime "
          "by Service (s) | by log (s) | migrt downtime (s) | polls failed | two endpoints (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mib, mode, ho in [(m, d, h) for m in sizes for d in modes for h in settings]:
        rs = [r for r in res if r["size_mib"] == mib and r["mode"] == mode
              and r["hand_over"] == ho]
        if not rs:
            continue
        cells = []
        for k in ("command_to_done", "svc_downtime", "log_downtime", "migrt_downtime"):
            m, lo, hi = med([r[k] for r in rs])
            cells.append(f"{m:.2f} ({lo:.2f} to {hi:.2f})")
        failed = sum(r["failed_polls"] for r in rs)
        polls = failed + sum(r["answers"] for r in rs)
        cells.append(f"{failed} of {polls} ({100 * failed / max(polls, 1):.0f}%)")
        cells.append(f"{med([r['two_endpoints_s'] for r in rs])[0]:.2f}")
        print(f"| {f'{mib} MiB' if mib else 'small'} | {mode} | {ho} | {len(rs)} | "
              + " | ".join(cells) + " |")
    print("\nAnchors: Tencent's pod recreate p50 9 s; their hybrid migration downtime at "
          "1 GiB 0.7 s. Targets: command to done <= 5 s (small pod), pod-level downtime "
          "<= 1 s at 1 GiB in lazy mode.")
    small = [r["command_to_done"] for r in res if r["size_mib"] == 0]
    if small:
        print(f"small pod command to done median {statistics.median(small):.2f} s: "
              f"{'met' if statistics.median(small) <= 5 else 'MISSED'}")
    big = [r["svc_downtime"] for r in res if r["size_mib"] >= 1024 and r["mode"] == "lazy"]
    if big:
        print(f">=1 GiB lazy pod-level downtime by Service median "
              f"{statistics.median(big):.2f} s: "
              f"{'met' if statistics.median(big) <= 1 else 'MISSED'}")
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
