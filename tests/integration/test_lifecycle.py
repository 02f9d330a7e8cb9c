"""The whole runc lifecycle through migrt matches plain runc (real runc, real CRIU).

Each scenario runs twice, once through plain runc and once through the runtime under
test, and compares what a caller sees: exit codes, state JSON, list output.
"""
import json
import os
import signal
import subprocess
import time

import pytest

import ocitest

STATE_KEYS = {"ociVersion", "id", "pid", "status", "bundle", "rootfs", "created", "owner"}


def lifecycle(rt, make_bundle, root_form="separate"):
    """create/state/start/ps/exec/pause/resume/kill/delete; returns what was seen."""
    seen = {}
    cid = ocitest.uid("lc")
    bundle = make_bundle(["sh", "-c", "echo started; exec sleep 600"])
    rc, out, err = rt.create(cid, bundle, "--pid-file", os.path.join(bundle, "init.pid"))
    seen["create"] = rc
    st = rt.state(cid)
    seen["created.status"] = st["status"]
    seen["state.keys"] = set(st) >= STATE_KEYS
    seen["pidfile"] = int(open(os.path.join(bundle, "init.pid")).read()) == st["pid"]
    seen["start"] = rt.run("start", cid, root_form=root_form).returncode
    seen["running.status"] = rt.state(cid)["status"]
    seen["list"] = cid in rt.ids()
    ps = rt.run("ps", "--format", "json", cid)
    seen["ps"] = (ps.returncode, len(json.loads(ps.stdout)) >= 1)
    seen["exec"] = rt.run("exec", cid, "cat", "/etc/passwd").stdout.startswith("root:")
    seen["exec.exit"] = rt.run("exec", cid, "sh", "-c", "exit 7").returncode
    seen["pause"] = rt.run("pause", cid).returncode
    seen["paused.status"] = rt.state(cid)["status"]
    seen["resume"] = rt.run("resume", cid).returncode
    upd = rt.run("update", "--resources", "-", cid, input=json.dumps({"pids": {"limit": 50}}))
    seen["update"] = upd.returncode
    seen["kill"] = rt.run("kill", cid, "KILL").returncode
    ocitest.wait_for(lambda: rt.state(cid)["status"] == "stopped", what="stopped")
    seen["delete"] = rt.run("delete", cid).returncode
    seen["gone"] = rt.state(cid) is None
    missing = rt.run("state", cid)
    seen["state.missing"] = (missing.returncode, "does not exist" in missing.stderr)
    seen["delete.missing"] = rt.run("delete", cid).returncode
    seen["start.missing"] = rt.run("start", cid).returncode
    seen["kill.missing"] = rt.run("kill", cid, "TERM").returncode
    out.thread.join(5)
    seen["stdout"] = out.text
    return seen


@pytest.mark.parametrize("root_form", ["separate", "joined"])
def test_lifecycle_matches_runc(node, make_bundle, root_form):
    plain = lifecycle(node("runc", binary="runc"), make_bundle, root_form)
    ours = lifecycle(node("migrt"), make_bundle, root_form)
    assert ours == plain
    assert ours["running.status"] == "running" and ours["stdout"] == "started\n"


def test_run_attached_exit_code(node, make_bundle):
    for rt in (node("runc", binary="runc"), node("migrt")):
        bundle = make_bundle(["sh", "-c", "echo hi; exit 3"])
        p = rt.run("run", "--bundle", bundle, ocitest.uid("run"))
        assert (p.returncode, p.stdout) == (3, "hi\n")


def test_features_and_probes_answer_as_runc(node, migrt_bin):
    rt = node("migrt")
    runc = node("runc", binary="runc")
    f1, f2 = runc.run("features"), rt.run("features")
    assert f2.returncode == 0 and json.loads(f2.stdout) == json.loads(f1.stdout)
    h = rt.run("checkpoint", "--help")
    assert h.returncode == 0 and "--image-path" in h.stdout
    lsm = rt.run("restore", "--lsm-mount-context")
    assert lsm.returncode != 0
    assert "flag needs an argument" in lsm.stderr + lsm.stdout


def test_exec_detach_pid_file(node, make_bundle, tmp_path):
    rt = node("migrt")
    cid = ocitest.uid("ex")
    rc, _, err = rt.create(cid, make_bundle(["sleep", "600"]), start=True)
    assert rc == 0, err.text
    proc = tmp_path / "process.json"
    proc.write_text(json.dumps({"args": ["sleep", "300"], "cwd": "/", "env": ["PATH=/bin"],
                                "user": {"uid": 0, "gid": 0}}))
    pidf = tmp_path / "exec.pid"
    # the detached process keeps the stdio it is given: give it files, not our pipes
    with open(tmp_path / "exec.out", "w") as o:
        p = subprocess.run(rt.cmd("exec", "--process", str(proc), "--detach", "--pid-file",
                                  str(pidf), cid), stdin=subprocess.DEVNULL, stdout=o,
                           stderr=o, timeout=60)
    assert p.returncode == 0, (tmp_path / "exec.out").read_text()
    pid = int(pidf.read_text())
    assert open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0] == b"sleep"
    os.kill(pid, signal.SIGKILL)


def test_log_file_json_error_from_runc(node, tmp_path):
    """A runc failure with --log json: runc's own error line is the last one."""
    rt = node("migrt")
    log = tmp_path / "log.json"
    p = rt.run("--log", str(log), "--log-format", "json", "kill", "nope", "KILL")
    # global flags after --root are fine for runc too
    assert p.returncode == 1
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["level"] == "error" and "does not exist" in last["msg"]


def test_quick_status_says_what_runc_state_says(node, make_bundle):
    """migrt.runc.quick_status (the agent's check after a restore, without starting
    runc) gives runc's own answer in every state a container goes through, and
    quick_pids (migrate's, frozen) the processes `runc ps` lists."""
    from migrt.runc import quick_pids, quick_status
    rt = node("runc", binary="runc")
    cid = ocitest.uid("qs")
    bundle = make_bundle(["sh", "-c", "sleep 600 & sleep 601 & wait"])
    assert rt.create(cid, bundle)[0] == 0

    def both():
        st = rt.state(cid)
        return (st["status"], st["pid"]), quick_status(rt.root, cid)
    seen = []
    for step in (None, ("start",), ("pause",), ("resume",), ("kill", "KILL")):
        if step:
            assert rt.run(step[0], cid, *step[1:]).returncode == 0
        if step == ("kill", "KILL"):
            ocitest.wait_for(lambda: rt.state(cid)["status"] == "stopped", what="stopped")
        theirs, ours = both()
        seen.append(theirs[0])
        assert ours == theirs, (step, ours, theirs)
        if theirs[0] in ("running", "paused"):
            # and its processes, as `runc ps` lists them (the shell and its two sleeps)
            ocitest.wait_for(lambda: len(quick_pids(rt.root, cid)) == 3, what="3 processes")
            ps = json.loads(rt.run("ps", "--format", "json", cid).stdout)
            assert quick_pids(rt.root, cid) == sorted(ps) and len(ps) == 3, ps
    assert seen == ["created", "running", "paused", "running", "stopped"]
    rt.run("delete", cid)
    assert quick_status(rt.root, cid) is None
