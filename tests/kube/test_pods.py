"""Pods under `runtimeClassName: migrt` on a real two-node Kubernetes, through kubectl.

What a cluster user checks: the pod runs, `kubectl logs` and `kubectl exec` work, probes
drive restarts and readiness, limits reach the container's cgroup, deletion with and
without a grace period ends the container; the usual controllers create such pods; pods
reach each other across nodes; and a pod without the runtime class never reaches migrt.
"""
import ipaddress
import json
import os
import socket
import subprocess
import uuid

import pytest

import cluster as kc
from cluster import pod_manifest, container_id, restart_count, wait_for

COUNTER = ("trap 'exit 0' TERM; i=0; "
           "while :; do i=$((i+1)); echo $i; echo $i > /tmp/count; sleep 0.2; done")


def name(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def numbers(text):
    return [int(x) for x in text.split() if x.isdigit()]


def calls_for(log, cid):
    """The migrt subcommands (create, start, state, exec, kill, delete...) logged for cid."""
    if not os.path.exists(log):
        return []
    out = []
    with open(log) as f:
        for line in f:
            words = line.split()
            if cid in words or any(w.endswith("/" + cid) for w in words):
                i = 0
                while i < len(words) and words[i].startswith("-"):
                    i += 1 if "=" in words[i] or words[i] in ("--debug", "--systemd-cgroup") else 2
                out.append(words[i] if i < len(words) else "")
    return out


def runc_list(node):
    p = subprocess.run(["runc", "--root", os.path.join(node.runc_root, "k8s.io"), "list",
                        "--format", "json"], capture_output=True, text=True)
    return {c["id"]: c for c in json.loads(p.stdout or "null") or []}


@pytest.mark.parametrize("node", kc.NODES)
def test_pod_runs_under_migrt_logs_and_exec(kube, migrt_calls_log, node):
    pod = name("run")
    p = kube.run_pod(pod_manifest(pod, COUNTER, node=node))
    assert p["spec"]["nodeName"] == node
    cid = container_id(p)
    assert cid
    # the container went through migrt: created and started by it, on this node's root
    calls = calls_for(migrt_calls_log, cid)
    assert "create" in calls and "start" in calls, calls
    assert cid in runc_list(kube.nodes[node])
    wait_for(lambda: len(numbers(kube.logs(pod))) >= 5, 30, "counter lines in kubectl logs")
    seen = numbers(kube.logs(pod))
    assert seen[:3] == [1, 2, 3]
    out = kube.exec(pod, "cat", "/tmp/count").stdout
    assert int(out) >= seen[-1]
    assert "exec" in calls_for(migrt_calls_log, cid)
    # exec sees the pod's network: an address of this node's pod range
    ip = p["status"]["podIP"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(kube.pod_subnet(kc.NODES.index(node)))
    out = kube.exec(pod, "ip", "-4", "addr", "show", "eth0").stdout
    assert ip in out
    kube.delete_pod(pod, "--grace-period=0", "--force")
    kube.wait_gone(pod)


def test_logs_follow(kube):
    """`kubectl logs -f` of a migrt pod: it follows the lines written after it started,
    every one once and in order, and ends by itself, with the container's last line, when
    the container ends."""
    pod = name("follow")
    m = pod_manifest(pod, "i=0; while [ ! -e /tmp/stop ]; do i=$((i+1)); echo $i; "
                          "sleep 0.2; done; echo bye", node="node-b")
    m["spec"]["restartPolicy"] = "Never"
    kube.run_pod(m)
    wait_for(lambda: len(numbers(kube.logs(pod))) >= 3, 30, "counter lines")
    proc, lines = kube.follow_logs(pod)
    try:
        wait_for(lambda: len(lines) >= 3, 30, "kubectl logs -f printing")
        n0 = numbers(kube.logs(pod))[-1]
        # lines written after `logs -f` started come through it
        wait_for(lambda: numbers("\n".join(lines)) and numbers("\n".join(lines))[-1] >= n0 + 10,
                 30, "kubectl logs -f following new lines")
        assert proc.poll() is None, lines[-5:]
        # the container ends: so does the stream, with its last line, nothing lost
        kube.exec(pod, "touch", "/tmp/stop")
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    got = numbers("\n".join(lines))
    assert got == list(range(1, len(got) + 1)), got[-10:]
    assert got[-1] >= n0 + 10
    assert lines[-1] == "bye", lines[-3:]
    assert proc.returncode == 0, lines[-3:]
    kube.delete_pod(pod, "--grace-period=0", "--force")
    kube.wait_gone(pod)


def test_pod_without_runtime_class_never_calls_migrt(kube, migrt_calls_log):
    plain, ours = name("plain"), name("ours")
    kube.apply(pod_manifest(plain, COUNTER, runtime_class=None, node="node-a"))
    kube.apply(pod_manifest(ours, COUNTER, node="node-a"))
    p_plain = kube.wait_pod(plain)
    p_ours = kube.wait_pod(ours)
    assert "runtimeClassName" not in p_plain["spec"]
    assert kube.exec(plain, "echo", "hello").stdout.strip() == "hello"
    wait_for(lambda: len(numbers(kube.logs(plain))) >= 3, 30, "plain pod's log")
    plain_id, ours_id = container_id(p_plain), container_id(p_ours)
    # the control: the migrt pod's container is in the log of calls
    assert "create" in calls_for(migrt_calls_log, ours_id)
    assert calls_for(migrt_calls_log, plain_id) == []
    # nor its sandbox (the handler is chosen per pod): every runc container of the plain
    # pod (its pause and its main container) is absent from the log, every one of ours in it
    by_pod = {}
    for cid, st in runc_list(kube.nodes["node-a"]).items():
        pod_name = (st.get("annotations") or {}).get("io.kubernetes.cri.sandbox-name")
        by_pod.setdefault(pod_name, []).append(cid)
    assert len(by_pod.get(plain, [])) == 2 and len(by_pod.get(ours, [])) == 2, by_pod
    for cid in by_pod[plain]:
        assert calls_for(migrt_calls_log, cid) == []
    for cid in by_pod[ours]:
        assert "create" in calls_for(migrt_calls_log, cid)
    for pod in (plain, ours):
        kube.delete_pod(pod, "--grace-period=0", "--force")
    for pod in (plain, ours):
        kube.wait_gone(pod)


def test_probes(kube, migrt_calls_log):
    """An exec liveness probe and an HTTP readiness probe, both through migrt."""
    pod = name("probe")
    cmd = ("mkdir -p /www && echo ok > /www/index.html && touch /tmp/healthy && "
           "httpd -f -p 8080 -h /www")
    m = pod_manifest(
        pod, cmd, node="node-b",
        livenessProbe={"exec": {"command": ["cat", "/tmp/healthy"]},
                       "periodSeconds": 1, "failureThreshold": 2, "initialDelaySeconds": 1},
        readinessProbe={"httpGet": {"path": "/index.html", "port": 8080},
                        "periodSeconds": 1, "failureThreshold": 1})
    p = kube.run_pod(m)
    cid = container_id(p)
    # the liveness probe is an exec through migrt
    wait_for(lambda: calls_for(migrt_calls_log, cid).count("exec") >= 2, 30,
             "liveness probe execs through migrt")
    assert restart_count(kube.pod(pod)) == 0
    # readiness follows the HTTP answer: 404 makes the pod unready, 200 ready again
    kube.exec(pod, "rm", "/www/index.html")
    wait_for(lambda: not kc._cond(kube.pod(pod), "Ready"), 30, "pod unready after a 404")
    kube.exec(pod, "sh", "-c", "echo ok > /www/index.html")
    kube.wait_pod(pod, "Ready", timeout=30)
    # a failing liveness probe restarts the container (under migrt again)
    kube.exec(pod, "rm", "/tmp/healthy")
    p = wait_for(lambda: (lambda x: x if restart_count(x) >= 1 else None)(kube.pod(pod)),
                 60, "a restart after the liveness probe failed")
    p = kube.wait_pod(pod, "Ready", timeout=60)
    new = container_id(p)
    assert new != cid
    assert "create" in calls_for(migrt_calls_log, new)
    kube.delete_pod(pod, "--grace-period=0", "--force")
    kube.wait_gone(pod)


def test_resource_limits(kube):
    pod = name("limits")
    m = pod_manifest(pod, COUNTER, node="node-a",
                     resources={"limits": {"memory": "64Mi", "cpu": "250m"},
                                "requests": {"memory": "32Mi", "cpu": "100m"}})
    p = kube.run_pod(m)
    assert p["status"]["qosClass"] == "Burstable"
    mem = kube.exec(pod, "cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes").stdout
    assert int(mem) == 64 << 20
    quota = kube.exec(pod, "cat", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us").stdout
    period = kube.exec(pod, "cat", "/sys/fs/cgroup/cpu/cpu.cfs_period_us").stdout
    assert int(quota) * 4 == int(period)
    shares = kube.exec(pod, "cat", "/sys/fs/cgroup/cpu/cpu.shares").stdout
    assert int(shares) == 102
    kube.delete_pod(pod, "--grace-period=0", "--force")
    kube.wait_gone(pod)


def memory_cgroup(pid):
    """(OOM kills counted, memory limit) of pid's memory cgroup: cgroup v1's memory
    controller where it has one (this machine), else cgroup v2's unified one."""
    with open(f"/proc/{pid}/cgroup") as f:
        lines = [ln.rstrip("\n").split(":", 2) for ln in f]
    v1 = [path for _, ctrl, path in lines if "memory" in ctrl.split(",")]
    if v1:
        d = "/sys/fs/cgroup/memory" + v1[0]
        events, limit = "memory.oom_control", "memory.limit_in_bytes"
    else:
        d = "/sys/fs/cgroup" + [path for _, ctrl, path in lines if ctrl == ""][0]
        events, limit = "memory.events", "memory.max"
    with open(os.path.join(d, events)) as f:
        counts = dict(ln.split() for ln in f)
    with open(os.path.join(d, limit)) as f:
        return int(counts["oom_kill"]), int(f.read())


def test_memory_limit_is_enforced(kube):
    """Going past the memory limit gets the process OOM-killed inside the container's own
    memory cgroup, as under runc.

    The shell stays the container's first process and the allocating dd is its child, so
    the container (and its cgroup) is still there to look at after the kill: the shell's
    log shows dd's SIGKILL (137) and the cgroup's memory.events counts the OOM kill.
    The kubelet's `reason` is not asserted: containerd 1.6 here reports `Error` for it as
    often as `OOMKilled`, under the plain runc handler just the same (README)."""
    pod = name("oom")
    m = pod_manifest(pod, "sleep 1; dd if=/dev/zero of=/dev/null bs=100M count=1; "
                          "echo dd-exit=$?; sleep 30",
                     node="node-b", resources={"limits": {"memory": "32Mi"}})
    m["spec"]["restartPolicy"] = "Never"
    p = kube.run_pod(m)
    wait_for(lambda: "dd-exit=" in kube.logs(pod), 60, "dd to end")
    assert "dd-exit=137" in kube.logs(pod), kube.logs(pod)
    node = kube.node_of(p)
    pid = runc_list(node)[container_id(p)]["pid"]
    kills, limit = memory_cgroup(pid)
    assert kills >= 1 and limit == 32 << 20, (kills, limit)
    kube.delete_pod(pod, "--grace-period=0", "--force")
    kube.wait_gone(pod)


def test_delete_with_grace(kube):
    """The container gets SIGTERM and its trap runs before it goes."""
    pod = name("grace")
    host_dir = os.path.join(kube.base, "hostpath-" + pod)
    os.makedirs(host_dir)
    m = pod_manifest(pod, "trap 'echo got-TERM > /out/term; exit 0' TERM; "
                          "while :; do sleep 0.2; done", node="node-a",
                     volumeMounts=[{"name": "out", "mountPath": "/out"}])
    m["spec"]["volumes"] = [{"name": "out", "hostPath": {"path": host_dir}}]
    m["spec"]["terminationGracePeriodSeconds"] = 30
    p = kube.run_pod(m)
    cid = container_id(p)
    node = kube.node_of(p)
    kube.delete_pod(pod, "--grace-period=30")
    term = os.path.join(host_dir, "term")
    wait_for(lambda: os.path.exists(term), 30, "the container's TERM trap")
    with open(term) as f:
        assert f.read().strip() == "got-TERM"
    wait_for(lambda: cid not in runc_list(node), 60, "the container gone from runc's root")
    kube.wait_gone(pod)


def test_delete_without_grace(kube):
    pod = name("nograce")
    p = kube.run_pod(pod_manifest(pod, "trap '' TERM; while :; do sleep 0.2; done",
                                  node="node-b"))
    cid = container_id(p)
    node = kube.node_of(p)
    pid = runc_list(node)[cid]["pid"]
    kube.kubectl("delete", "pod", pod, "--grace-period=0", "--force", timeout=60)
    kube.wait_gone(pod, timeout=10)
    # the kubelet kills it although it ignores SIGTERM; nothing of it is left
    wait_for(lambda: cid not in runc_list(node), 60, "the container gone from runc's root")
    assert not os.path.exists(f"/proc/{pid}") or \
        open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_controllers_make_migrt_pods(kube, migrt_calls_log):
    """A Deployment spread over both nodes, a StatefulSet and a Job, all under migrt."""
    tmpl = pod_manifest("x", COUNTER)["spec"]
    dep, sts, job = name("dep"), name("sts"), name("job")
    kube.apply({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": dep},
                "spec": {"replicas": 2, "selector": {"matchLabels": {"app": dep}},
                         "template": {"metadata": {"labels": {"app": dep}},
                                      "spec": dict(tmpl, topologySpreadConstraints=[{
                                          "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                          "whenUnsatisfiable": "DoNotSchedule",
                                          "labelSelector": {"matchLabels": {"app": dep}}}])}}})
    kube.apply({"apiVersion": "apps/v1", "kind": "StatefulSet",
                "metadata": {"name": sts},
                "spec": {"replicas": 1, "serviceName": sts,
                         "selector": {"matchLabels": {"app": sts}},
                         "template": {"metadata": {"labels": {"app": sts}}, "spec": tmpl}}})
    jtmpl = pod_manifest("x", "echo job-done")["spec"]
    jtmpl["restartPolicy"] = "Never"
    kube.apply({"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": job},
                "spec": {"backoffLimit": 0, "template": {"spec": jtmpl}}})

    def dep_ready():
        d = kube.get("deployment", dep)
        return d.get("status", {}).get("readyReplicas") == 2
    wait_for(dep_ready, 90, "deployment with 2 ready replicas")
    pods = kube.get("pods", "-l", f"app={dep}")["items"]
    assert sorted(p["spec"]["nodeName"] for p in pods) == list(kc.NODES)
    for p in pods:
        assert "create" in calls_for(migrt_calls_log, container_id(p))
    wait_for(lambda: kube.get("statefulset", sts).get("status", {}).get("readyReplicas") == 1,
             90, "statefulset ready")
    p0 = kube.pod(f"{sts}-0")
    assert "create" in calls_for(migrt_calls_log, container_id(p0))
    wait_for(lambda: kube.get("job", job).get("status", {}).get("succeeded") == 1, 90,
             "job succeeded")
    jp = kube.get("pods", "-l", f"job-name={job}")["items"][0]
    assert kube.logs(jp["metadata"]["name"]).strip() == "job-done"
    assert "create" in calls_for(migrt_calls_log, container_id(jp))
    for kind, n in (("deployment", dep), ("statefulset", sts), ("job", job)):
        kube.kubectl("delete", kind, n, "--wait=false")
    wait_for(lambda: not kube.get("pods", "-l", f"app in ({dep},{sts})")["items"], 90,
             "controller pods gone")


def test_pods_reach_each_other_and_the_agents_across_nodes(kube):
    server, client = name("srv"), name("cli")
    kube.run_pod(pod_manifest(server, "mkdir -p /www && echo from-$(hostname) > /www/index.html"
                              " && httpd -f -p 8080 -h /www", node="node-a"))
    kube.run_pod(pod_manifest(client, "sleep 3600", node="node-b"))
    ip = kube.pod(server)["status"]["podIP"]
    # (busybox-static's wget crashes on Debian 12: an HTTP request by hand through nc)
    out = kube.exec(client, "sh", "-c", f"printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | "
                                        f"nc -w 5 {ip} 8080").stdout
    assert out.splitlines()[0].startswith("HTTP/1.") and " 200 " in out.splitlines()[0], out
    assert out.splitlines()[-1] == f"from-{server}", out
    # the agent of each node answers from the other node's pods and address
    for node in kc.NODES:
        ag = kube.nodes[node]
        assert ag.agent.poll() is None
        other = kube.nodes[[n for n in kc.NODES if n != node][0]]
        with socket.create_connection((ag.ip, ag.agent_port), timeout=5,
                                      source_address=(other.ip, 0)):
            pass
    ag = kube.nodes["node-a"]
    p = kube.exec(client, "nc", "-w", "3", ag.ip, str(ag.agent_port), check=False)
    assert "Connection refused" not in p.stderr and "timed out" not in p.stderr, p.stderr
    for pod in (server, client):
        kube.delete_pod(pod, "--grace-period=0", "--force")
    for pod in (server, client):
        kube.wait_gone(pod)
