"""A migration through containerd, as a Kubernetes controller would do it.

Two containerd instances stand in for two nodes (node A and node B, each its own socket,
root, state and namespace, so their runc roots differ). A counter runs on A under the
migrt handler. `migrt migrate` moves it to the agent of node B, which stages it; the
"controller" then creates a new container through B's containerd carrying the marker
that migrate printed (MIGRT_RESTORE_FROM=staged:<id>), as it would create the new pod.
The counter goes on in B's task log, and A's copy is gone.
"""
import os
import re
import socket
import subprocess
import threading
import time

import pytest

import cri as C
from harness import IMAGE, wait_for

COUNTER = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done"


def numbers(path):
    try:
        with open(path) as f:
            return [int(x) for x in f.read().split() if x.isdigit()]
    except FileNotFoundError:
        return []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def agent(tmp_path, migrt_launcher):
    """migrt agent of "node B" on a loopback port, with private staging dirs."""
    secret = tmp_path / "secret"
    secret.write_text(os.urandom(24).hex())
    secret.chmod(0o600)
    staging = tmp_path / "staged"
    # node B's agent and node B's migrt (under its containerd) share the node's state dir,
    # as on a real node: a restore containerd runs is followed through the agent's records
    state = tmp_path / "agent-state"
    port = free_port()
    log = open(tmp_path / "agent.log", "wb")
    proc = subprocess.Popen([migrt_launcher, "agent", "--listen", f"127.0.0.1:{port}",
                             "--secret-file", str(secret), "--staging", str(staging),
                             "--disk", str(tmp_path / "disk"), "--log-dir",
                             str(tmp_path / "logs"), "--ttl", "120"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, MIGRT_STATE_DIR=str(state)))
    log.close()

    def listening():
        if proc.poll() is not None:
            raise AssertionError(f"agent exited: {(tmp_path / 'agent.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False
    wait_for(listening, timeout=20, what="the agent to listen")
    yield {"to": f"127.0.0.1:{port}", "secret": str(secret), "staging": str(staging),
           "log": tmp_path / "agent.log", "state": str(state)}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.mark.parametrize("dest", ["ctr", "cri"])
def test_migrate_between_two_containerd_nodes(start_containerd, migrt_launcher, agent,
                                              tmp_path, dest):
    """dest "ctr": the new container is made with ctr on node B; "cri": as the kubelet
    makes a new pod's container (RunPodSandbox with handler migrt, CreateContainer with
    the marker in its env, StartContainer); its output is the pod's log."""
    node_a = start_containerd(namespace="node-a")
    # node B's shims resolve staged:<id> in the agent's staging dir
    node_b = start_containerd(namespace="node-b", env={"MIGRT_STAGING": agent["staging"],
                                                       "MIGRT_STATE_DIR": agent["state"]},
                              cri=dest == "cri")
    a_log, b_log = str(tmp_path / "a.log"), str(tmp_path / "b.log")
    node_a.ctr("run", "-d", "--runc-binary", migrt_launcher, "--log-uri", f"file://{a_log}",
               IMAGE, "counter", "sh", "-c", COUNTER)
    wait_for(lambda: len(numbers(a_log)) >= 5, what="the counter on node A")

    mig = subprocess.Popen(
        [migrt_launcher, "--root", "/run/containerd/runc/node-a", "migrate", "counter",
         "--to", agent["to"], "--secret-file", agent["secret"], "--wait", "60", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    err_lines = []
    marker = {}

    def read_stderr():
        for line in mig.stderr:
            err_lines.append(line)
            m = re.search(r"MIGRT_RESTORE_FROM=(staged:\S+)", line)
            if m:
                marker["value"] = m.group(1)
    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        wait_for(lambda: marker.get("value") or mig.poll() is not None, timeout=60,
                 what="migrate to stage the container and print the marker")
        assert "value" in marker, f"migrate exited {mig.returncode}: {''.join(err_lines)}"

        # the controller creates the new pod's container on node B with the marker
        if dest == "ctr":
            node_b.ctr("run", "-d", "--runc-binary", migrt_launcher, "--env",
                       f"MIGRT_RESTORE_FROM={marker['value']}", "--log-uri",
                       f"file://{b_log}", IMAGE, "counter", "sh", "-c", COUNTER)
        else:
            api = C.CRI(node_b.address)
            logdir = str(tmp_path / "pod-b")
            os.makedirs(logdir)
            config = C.CRI.sandbox_config("moved", logdir)
            sid = api.run_pod(config, "migrt")
            cid = api.create(sid, config, "counter", IMAGE, ["sh", "-c", COUNTER],
                             env={"MIGRT_RESTORE_FROM": marker["value"]})
            api.start(cid)
        out, _ = mig.communicate(timeout=90)
    finally:
        if mig.poll() is None:
            mig.kill()
            mig.wait(5)
    assert mig.returncode == 0, f"migrate failed: {''.join(err_lines)}"
    assert '"destination_id"' in out

    if dest == "cri":
        b_log = os.path.join(logdir, "counter.log")
    wait_for(lambda: len(numbers(b_log)) >= 5, what="the counter's output on node B")
    last_a, got_b = numbers(a_log)[-1], numbers(b_log)
    assert got_b[0] == last_a + 1, f"node A ended at {last_a}, node B went on at {got_b[:3]}"
    if dest == "ctr":
        assert node_b.ctr("task", "ls").stdout.split()[-1] == "RUNNING"
    else:
        assert api.status(cid)["state"] == "RUNNING"
        api.stop_pod(sid)
        api.remove_pod(sid)
        api.close()
    # node A's copy is gone: its task is no longer running
    wait_for(lambda: "RUNNING" not in node_a.ctr("task", "ls").stdout, timeout=15,
             what="node A's task to stop")
    time.sleep(0.3)
    assert numbers(a_log)[-1] == last_a, "the source kept running after the migration"
    # and node A's containerd can clean up its old container as usual (the old pod's delete)
    node_a.ctr("task", "delete", "counter")
    node_a.ctr("container", "delete", "counter")
    assert node_a.ctr("container", "ls", "-q").stdout.split() == []
