"""migrt through the real containerd: the runc v2 shim with BinaryName = migrt.

Two ways in, as users have them: `ctr` (containerd's own client, `--runc-binary`) and the
CRI API (what the kubelet calls), where the runtime handler "migrt" comes from the shipped
drop-in in containerd-config/. Each test starts its own containerd and leaves nothing
behind.
"""
import base64
import json
import os
import subprocess
import time

import pytest

import cri as C
import harness
from harness import IMAGE, wait_for

COUNTER = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done"


def numbers(text):
    return [int(x) for x in text.split() if x.isdigit()]


def migrt_work_dirs(c):
    """migrt's per-restore CRIU work dirs under this containerd's shims: a deleted
    container must leave none behind."""
    d = os.path.join(c.migrt_state, "work")
    return set(os.listdir(d)) if os.path.isdir(d) else set()


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


# --- ctr ------------------------------------------------------------------------------

def ctr_lifecycle(c, binary, tmp):
    """run, exec, log, stop, delete with `binary` as the shim's runc; what a user sees."""
    seen = {}
    log = os.path.join(tmp, f"{os.path.basename(binary)}.log")
    c.ctr("run", "-d", "--runc-binary", binary, "--log-uri", f"file://{log}", IMAGE, "life",
          "sh", "-c", "trap 'echo got TERM; exit 7' TERM; echo started; "
                      "while :; do sleep 0.1; done")
    wait_for(lambda: "started" in read(log), what="the container's first line")
    seen["status"] = c.ctr("task", "ls").stdout.split()[-1]
    seen["exec"] = c.ctr("task", "exec", "--exec-id", "e1", "life",
                         "sh", "-c", "echo hello from $(hostname) >&1; exit 3",
                         check=False)
    seen["exec"] = (seen["exec"].returncode, seen["exec"].stdout.split()[:2])
    pids = c.ctr("task", "ps", "life").stdout.split("\n")[1:]
    seen["ps"] = len([p for p in pids if p.strip()]) >= 1
    c.ctr("task", "pause", "life")
    seen["paused"] = c.ctr("task", "ls").stdout.split()[-1]
    c.ctr("task", "resume", "life")
    c.ctr("task", "kill", "-s", "SIGTERM", "life")
    wait_for(lambda: c.ctr("task", "ls").stdout.split()[-1] == "STOPPED", what="STOPPED")
    seen["log"] = read(log).split("\n")
    c.ctr("task", "delete", "life")
    c.ctr("container", "delete", "life")
    seen["left"] = c.ctr("container", "ls", "-q").stdout.split()
    return seen


def test_ctr_lifecycle_same_as_runc(start_containerd, traced, tmp_path):
    binary, calls = traced
    c = start_containerd(binary)
    with_runc = ctr_lifecycle(c, "/usr/sbin/runc", str(tmp_path))
    with_migrt = ctr_lifecycle(c, binary, str(tmp_path))
    assert with_runc["status"] == "RUNNING" and with_runc["paused"] == "PAUSED"
    assert with_runc["exec"] == (3, ["hello", "from"])
    assert "got TERM" in with_runc["log"]
    assert with_migrt == with_runc
    # and it really was migrt that the shim called, for every step
    for step in ("create", "start", "exec", "pause", "resume", "kill", "delete"):
        assert step in calls(), f"shim never called migrt {step}: {calls()}"


@pytest.mark.parametrize("entry", ["launcher", "front", "zipapp"])
def test_ctr_checkpoint_and_marker_restore(request, start_containerd, migrt_launcher, entry,
                                           checkpoint_dir, tmp_path):
    """`ctr task checkpoint` through migrt, then a new container created with the marker
    restores it, and its output goes on in the new task's log. Through migrt's launcher,
    the proposed shell front door (migrt/front/front.sh) before it, and the single-file
    zipapp on the system's Python."""
    env = None
    if entry == "front":
        migrt_launcher = request.getfixturevalue("front")
    elif entry == "zipapp":
        migrt_launcher, env = request.getfixturevalue("pyz")
    c = start_containerd(env=env)
    old_log, new_log = str(tmp_path / "old.log"), str(tmp_path / "new.log")
    c.ctr("run", "-d", "--runc-binary", migrt_launcher, "--log-uri", f"file://{old_log}",
          IMAGE, "counter", "sh", "-c", COUNTER)
    wait_for(lambda: len(numbers(read(old_log))) >= 5, what="the counter")
    image = os.path.join(checkpoint_dir, "counter")
    c.ctr("task", "checkpoint", "--exit", "--image-path", image,
          "--work-path", os.path.join(checkpoint_dir, "work"), "counter")
    assert os.path.exists(os.path.join(image, "inventory.img"))
    last = numbers(read(old_log))[-1]
    c.ctr("task", "delete", "counter")

    c.ctr("run", "-d", "--runc-binary", migrt_launcher, "--env", f"MIGRT_RESTORE_FROM={image}",
          "--log-uri", f"file://{new_log}", IMAGE, "counter2", "sh", "-c", COUNTER)
    wait_for(lambda: len(numbers(read(new_log))) >= 5, what="the restored counter's output")
    got = numbers(read(new_log))
    assert got[0] == last + 1, f"counter restarted or skipped: old ended {last}, new {got[:5]}"
    assert got == list(range(got[0], got[0] + len(got)))
    # the task is an ordinary containerd task: exec works; the marker is not visible
    env = c.ctr("task", "exec", "--exec-id", "env", "counter2", "cat", "/proc/1/environ").stdout
    assert "MIGRT_RESTORE_FROM" not in env
    assert c.ctr("task", "ls").stdout.split()[-1] == "RUNNING"
    c.ctr("task", "kill", "-s", "SIGKILL", "counter2")
    wait_for(lambda: c.ctr("task", "ls").stdout.split()[-1] == "STOPPED", what="STOPPED")
    c.ctr("task", "delete", "counter2")
    assert migrt_work_dirs(c) == set()


def test_containerd_checkpoint_image_round_trip(start_containerd, migrt_launcher):
    """containerd's own checkpoint (an image in its content store, with the rw layer) and
    `ctr containers restore --live` work through migrt as through runc: the restore is
    runc's own `restore`, which migrt passes through."""
    c = start_containerd()
    c.ctr("run", "-d", "--runc-binary", migrt_launcher, IMAGE, "cnt", "sh", "-c",
          "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done")

    def count():
        p = c.ctr("task", "exec", "--exec-id", f"e{time.monotonic_ns()}", "cnt", "cat",
                  "/tmp/count", check=False)
        return int(p.stdout) if p.stdout.strip().isdigit() else 0
    wait_for(lambda: count() >= 30, timeout=20, what="the counter to reach 30")
    c.ctr("containers", "checkpoint", "--task", "--rw", "cnt", "localhost/ckpt/cnt:1")
    after_checkpoint = count()
    c.ctr("task", "kill", "-s", "SIGKILL", "cnt")
    wait_for(lambda: c.ctr("task", "ls").stdout.split()[-1] == "STOPPED", what="STOPPED")
    c.ctr("task", "delete", "cnt")
    c.ctr("container", "delete", "cnt")

    c.ctr("containers", "restore", "--live", "--rw", "cnt", "localhost/ckpt/cnt:1")
    assert c.ctr("task", "ls").stdout.split()[-1] == "RUNNING"
    after = count()
    # checkpointed at 30 or more: a fresh start would be back near 0
    assert 30 <= after <= after_checkpoint + 30, (after_checkpoint, after)
    info = json.loads(c.ctr("containers", "info", "cnt").stdout)
    options = base64.b64decode(info["Runtime"]["Options"]["value"])     # runc Options proto
    assert migrt_launcher.encode() in options, "the restored container lost BinaryName"


def test_ctr_failed_restore_shows_migrts_message(start_containerd, migrt_launcher,
                                                 checkpoint_dir):
    c = start_containerd()
    missing = os.path.join(checkpoint_dir, "never-made")
    p = c.ctr("run", "-d", "--runc-binary", migrt_launcher, "--env",
              f"MIGRT_RESTORE_FROM={missing}", IMAGE, "ghost", "sh", "-c", COUNTER, check=False)
    assert p.returncode != 0
    assert f"checkpoint {missing} does not exist" in p.stderr, p.stderr
    # nothing half-made is left running
    assert "ghost" not in c.ctr("task", "ls", "-q").stdout.split()

    os.makedirs(os.path.join(checkpoint_dir, "empty"))
    p = c.ctr("run", "-d", "--runc-binary", migrt_launcher, "--env",
              f"MIGRT_RESTORE_FROM={checkpoint_dir}/empty", IMAGE, "ghost2", "sh", "-c",
              COUNTER, check=False)
    assert p.returncode != 0 and "is incomplete" in p.stderr, p.stderr


def test_ctr_runs_when_shim_path_lacks_sbin(start_containerd, migrt_launcher):
    """containerd started outside systemd (a shell whose PATH has no sbin): migrt still
    finds runc (MIGRT_RUNC, PATH, then /usr/sbin/runc)."""
    c = start_containerd(path="/usr/local/bin:/usr/bin:/bin")
    c.ctr("run", "-d", "--runc-binary", migrt_launcher, IMAGE, "nosbin", "sh", "-c", COUNTER)
    assert c.ctr("task", "ls").stdout.split()[-1] == "RUNNING"
    out = c.ctr("task", "exec", "--exec-id", "e", "nosbin", "echo", "ok").stdout
    assert out == "ok\n"


def test_ctr_checkpoint_when_shim_path_lacks_sbin(start_containerd, migrt_launcher,
                                                   checkpoint_dir):
    """The same shim environment: checkpoint needs CRIU, which runc looks up on PATH."""
    c = start_containerd(path="/usr/local/bin:/usr/bin:/bin")
    c.ctr("run", "-d", "--runc-binary", migrt_launcher, IMAGE, "nosbin", "sh", "-c", COUNTER)
    p = c.ctr("task", "checkpoint", "--exit", "--image-path",
              os.path.join(checkpoint_dir, "img"), "nosbin", check=False)
    assert p.returncode == 0, p.stderr


# --- CRI: the kubelet's path, with the runtime handler of the shipped drop-in ------------

@pytest.fixture
def pod(start_containerd, tmp_path):
    """pod(handler, name, binary=None) -> (cri, containerd, sandbox_id, sandbox_config, logdir)."""
    made = []

    def make(handler="migrt", name="p", binary=None, c=None, version=None):
        c = c or start_containerd(binary, cri=True, version=version)
        api = C.CRI(c.address)
        logdir = str(tmp_path / f"pods-{name}")
        os.makedirs(logdir, exist_ok=True)
        config = C.CRI.sandbox_config(name, logdir)
        sid = api.run_pod(config, handler)
        made.append((api, sid))
        return api, c, sid, config, logdir
    yield make
    for api, sid in made:
        for step in (api.stop_pod, api.remove_pod):
            try:
                step(sid)
            except C.CRIError:
                pass
        api.close()


def test_cri_pod_lifecycle_with_migrt_handler(pod, traced, containerd_version):
    binary, calls = traced
    api, c, sid, config, logdir = pod("migrt", binary=binary, version=containerd_version)
    cid = api.create(sid, config, "app", IMAGE,
                     ["sh", "-c", "trap 'echo bye; exit 0' TERM; echo ready; "
                                  "while :; do sleep 0.1; done"])
    api.start(cid)
    C.wait_state(api, cid, "RUNNING")
    log = os.path.join(logdir, "app.log")
    wait_for(lambda: "ready" in C.log_lines(log), what="the container's log")
    out, err, code = api.exec_sync(cid, ["sh", "-c", "echo out; echo err >&2; exit 4"])
    assert (out, err, code) == ("out\n", "err\n", 4)
    api.stop(cid, timeout=10)
    st = C.wait_state(api, cid, "EXITED")
    assert st["exit_code"] == 0 and "bye" in C.log_lines(log)
    api.remove(cid)
    with pytest.raises(C.CRIError):
        api.status(cid)
    seen = calls()
    for step in ("create", "start", "exec", "kill", "delete"):
        assert step in seen, f"containerd never called migrt {step}: {seen}"


@pytest.mark.parametrize("handler", ["", "runc"])
def test_runc_pods_never_meet_migrt(pod, traced, handler):
    """Registering migrt changes nothing for everyone else: pods of the default handler
    and of "runc" run as before, and migrt is never called for them."""
    binary, calls = traced
    api, c, sid, config, logdir = pod(handler, binary=binary)
    cid = api.create(sid, config, "app", IMAGE, ["sh", "-c", "echo hi; sleep 60"])
    api.start(cid)
    C.wait_state(api, cid, "RUNNING")
    assert api.exec_sync(cid, ["echo", "ok"])[0] == "ok\n"
    api.stop(cid, timeout=0)
    api.remove(cid)
    assert calls() == []


def test_shipped_drop_in_loads_as_is(start_containerd, containerd_version):
    """containerd-config/containerd-v2-migrt.toml imported unchanged (only BinaryName points
    at this checkout): the CRI plugin loads, with handler migrt and runc both present."""
    c = start_containerd(mode="import", version=containerd_version)
    api = C.CRI(c.address)
    try:
        f = api.call("Status", C.msg((1, True)))
        info = {}
        for entry in f.get(2, []):
            kv = C.parse(entry)
            info[kv[1][0].decode()] = kv[2][0].decode()
    finally:
        api.close()
    config = json.loads(info["config"])
    runtimes = config["containerd"]["runtimes"]
    assert runtimes["migrt"]["runtimeType"] == "io.containerd.runc.v2"
    assert runtimes["migrt"]["options"]["BinaryName"] == c.migrt
    assert runtimes["runc"]["runtimeType"] == "io.containerd.runc.v2"
    assert config["containerd"]["defaultRuntimeName"] == "runc"


def test_cri_checkpoint_and_restore_into_new_pod(pod, checkpoint_dir, containerd_version):
    """As a controller moving a pod: checkpoint the container (ctr task checkpoint on the
    CRI container), then a new pod whose container carries the marker continues it, and
    its output flows to the new container's log."""
    api, c, sid, config, logdir = pod("migrt", name="src", version=containerd_version)
    cid = api.create(sid, config, "counter", IMAGE, ["sh", "-c", COUNTER])
    api.start(cid)
    src_log = os.path.join(logdir, "counter.log")
    wait_for(lambda: len(C.log_lines(src_log)) >= 5, what="the counter")
    image = os.path.join(checkpoint_dir, "counter")
    c.ctr("task", "checkpoint", "--exit", "--image-path", image, cid, namespace="k8s.io")
    C.wait_state(api, cid, "EXITED")
    last = numbers(" ".join(C.log_lines(src_log)))[-1]

    api2, _, sid2, config2, logdir2 = pod("migrt", name="dst", c=c)
    cid2 = api2.create(sid2, config2, "counter", IMAGE, ["sh", "-c", COUNTER],
                       env={"MIGRT_RESTORE_FROM": image})
    api2.start(cid2)
    C.wait_state(api2, cid2, "RUNNING")
    dst_log = os.path.join(logdir2, "counter.log")
    wait_for(lambda: len(C.log_lines(dst_log)) >= 5, what="the restored counter's log")
    got = numbers(" ".join(C.log_lines(dst_log)))
    assert got[0] == last + 1, f"old pod ended at {last}, new pod's log starts {got[:5]}"
    out, _, code = api2.exec_sync(cid2, ["cat", "/proc/1/cmdline"])
    assert code == 0 and COUNTER in out.replace("\0", " ")
    api2.stop(cid2, timeout=0)
    C.wait_state(api2, cid2, "EXITED")
    api2.remove(cid2)
    assert migrt_work_dirs(c) == set()


def test_cri_migrt_checkpoint_on_the_node(pod, checkpoint_dir, migrt_launcher):
    """`migrt checkpoint` run on the node against containerd's runc root, as an operator
    would under a kubelet: containerd removes the task's bundle once the dumped container
    has exited, and migrt's image must still be complete (issue 13: it failed with
    FileNotFoundError .../config.json). The image then restores into a new pod."""
    api, c, sid, config, logdir = pod("migrt", name="src")
    cid = api.create(sid, config, "counter", IMAGE, ["sh", "-c", COUNTER])
    api.start(cid)
    src_log = os.path.join(logdir, "counter.log")
    wait_for(lambda: len(C.log_lines(src_log)) >= 5, what="the counter")
    bundle = os.path.join(c.state, "io.containerd.runtime.v2.task", "k8s.io", cid)
    assert os.path.exists(os.path.join(bundle, "config.json"))
    image = os.path.join(checkpoint_dir, "counter")
    p = subprocess.run([migrt_launcher, "--root", "/run/containerd/runc/k8s.io", "checkpoint",
                        "--image-path", image, cid], capture_output=True, text=True,
                       env=dict(os.environ, MIGRT_STATE_DIR=c.migrt_state), timeout=120)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    C.wait_state(api, cid, "EXITED")
    wait_for(lambda: not os.path.exists(bundle), what="containerd removing the bundle")
    v = subprocess.run([migrt_launcher, "image", "verify", image], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    with open(os.path.join(image, "migrt", "config.json")) as f:
        assert json.load(f)["process"]["args"][-1] == COUNTER
    # migrt's view of the rootfs is gone with the checkpoint
    with open("/proc/self/mountinfo") as f:
        assert "ckpt-rootfs-" not in f.read()
    last = numbers(" ".join(C.log_lines(src_log)))[-1]

    api2, _, sid2, config2, logdir2 = pod("migrt", name="dst", c=c)
    cid2 = api2.create(sid2, config2, "counter", IMAGE, ["sh", "-c", COUNTER],
                       env={"MIGRT_RESTORE_FROM": image})
    api2.start(cid2)
    C.wait_state(api2, cid2, "RUNNING")
    dst_log = os.path.join(logdir2, "counter.log")
    wait_for(lambda: len(C.log_lines(dst_log)) >= 5, what="the restored counter's log")
    got = numbers(" ".join(C.log_lines(dst_log)))
    assert got[0] == last + 1, f"old pod ended at {last}, new pod's log starts {got[:5]}"
    api2.stop(cid2, timeout=0)
    C.wait_state(api2, cid2, "EXITED")
    api2.remove(cid2)


def test_cri_failed_restore_shows_migrts_message(pod, checkpoint_dir):
    api, c, sid, config, logdir = pod("migrt")
    missing = os.path.join(checkpoint_dir, "gone")
    cid = api.create(sid, config, "ghost", IMAGE, ["sh", "-c", COUNTER],
                     env={"MIGRT_RESTORE_FROM": missing})
    with pytest.raises(C.CRIError) as e:
        api.start(cid)
    # what `kubectl describe pod` would show as the container's error
    assert f"checkpoint {missing} does not exist" in e.value.details, e.value.details
    st = api.status(cid)
    assert st["state"] in ("CREATED", "EXITED")
    api.remove(cid)
