"""migrt through the real podman: `podman --runtime <migrt>` (conmon calls it as runc).

Each test has podman storage of its own (root, runroot) under /run and removes it.
Here podman needs `--ulimit nofile=... --ulimit nproc=...`: its defaults exceed this
machine's hard limits, and runc refuses to raise them (with runc alone as well).
"""
import os
import shutil
import subprocess
import tarfile
import tempfile
import time

import pytest

import harness
from harness import IMAGE, wait_for

COUNTER = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done"
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


class Podman:
    def __init__(self, base, runtime):
        self.base = base
        self.runtime = runtime
        self.glob = ["podman", "--root", os.path.join(base, "storage"),
                     "--runroot", os.path.join(base, "run"), "--cgroup-manager", "cgroupfs",
                     "--events-backend", "file", "--storage-driver", "overlay",
                     "--runtime", runtime]

    def __call__(self, *args, check=True, timeout=120):
        p = subprocess.run(self.glob + list(args), capture_output=True, text=True,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({p.returncode}): "
                                 f"{p.stderr.strip()}")
        return p

    def numbers(self, name):
        out = self("logs", name, check=False).stdout
        return [int(x) for x in out.split() if x.isdigit()]

    def users(self):
        """pids of podman/conmon processes still working on this storage (conmon runs
        `podman container cleanup` after a container exits, asynchronously)."""
        pids = []
        for pid in os.listdir("/proc"):
            if pid.isdigit() and int(pid) != os.getpid():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if self.base.encode() in f.read():
                            pids.append(int(pid))
                except OSError:
                    pass
        return pids

    def cleanup(self):
        self("rm", "--all", "--force", "--time", "0", check=False)
        end = time.monotonic() + 20
        while self.users() and time.monotonic() < end:
            time.sleep(0.1)
        harness.unmount_under(self.base)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(params=["launcher"])
def podman(request, images, migrt_launcher):
    """podman with migrt as --runtime: its launcher, or (param "front") the proposed
    shell front door migrt/front/front.sh before it."""
    if not shutil.which("podman") or not shutil.which("conmon"):
        pytest.skip("requires podman and conmon")
    runtime = migrt_launcher
    if request.param == "front":
        runtime = request.getfixturevalue("front")
    pm = Podman(tempfile.mkdtemp(prefix="migrt-podman-", dir="/run"), runtime)
    try:
        pm("load", "-i", images["busybox"])
        yield pm
    finally:
        pm.cleanup()


def run_counter(pm, name, *extra):
    pm("run", "-d", "--name", name, "--network", "none", *LIMITS, *extra, IMAGE,
       "sh", "-c", COUNTER)


def test_podman_run_exec_stop_rm(podman):
    run_counter(podman, "c1")
    wait_for(lambda: len(podman.numbers("c1")) >= 3, what="the counter's log")
    assert podman("exec", "c1", "sh", "-c", "echo hi; exit 5", check=False).returncode == 5
    assert podman("inspect", "-f", "{{.State.Status}}", "c1").stdout.strip() == "running"
    podman("stop", "-t", "1", "c1")
    assert podman("inspect", "-f", "{{.State.Status}}", "c1").stdout.strip() == "exited"
    podman("rm", "c1")
    assert "c1" not in podman("ps", "-a", "--format", "{{.Names}}").stdout.split()


@pytest.mark.parametrize("podman", ["launcher", "front"], indirect=True)
def test_podman_checkpoint_export_and_restore_import(podman, tmp_path):
    run_counter(podman, "c1")
    wait_for(lambda: len(podman.numbers("c1")) >= 5, what="the counter's log")
    archive = str(tmp_path / "c1.tar.gz")
    podman("container", "checkpoint", "--export", archive, "c1")
    last = podman.numbers("c1")[-1]
    assert podman("inspect", "-f", "{{.State.Status}}", "c1").stdout.strip() == "exited"
    podman("rm", "c1")

    podman("container", "restore", "--import", archive)
    assert podman("inspect", "-f", "{{.State.Status}}", "c1").stdout.strip() == "running"
    wait_for(lambda: [n for n in podman.numbers("c1") if n > last][:3], what="new output")
    after = [n for n in podman.numbers("c1") if n > last]
    assert after[0] == last + 1, f"checkpointed at {last}, went on at {after[:3]}"
    podman("rm", "-f", "-t", "0", "c1")


def test_podman_run_with_marker_restores(podman, checkpoint_dir, tmp_path):
    """A podman checkpoint, unpacked where migrt accepts markers, restored by a plain
    `podman run` of a new container carrying MIGRT_RESTORE_FROM."""
    run_counter(podman, "src")
    wait_for(lambda: len(podman.numbers("src")) >= 5, what="the counter's log")
    archive = str(tmp_path / "src.tar")
    podman("container", "checkpoint", "--compress", "none", "--export", archive, "src")
    last = podman.numbers("src")[-1]
    with tarfile.open(archive) as t:
        t.extractall(checkpoint_dir, filter="tar")
    images = os.path.join(checkpoint_dir, "checkpoint")

    run_counter(podman, "dst", "--env", f"MIGRT_RESTORE_FROM={images}")
    wait_for(lambda: len(podman.numbers("dst")) >= 3, what="the restored counter's log")
    got = podman.numbers("dst")
    assert got[0] == last + 1, f"checkpointed at {last}, new container starts {got[:3]}"
    env = podman("exec", "dst", "cat", "/proc/1/environ").stdout
    assert "MIGRT_RESTORE_FROM" not in env

    p = podman("run", "-d", "--name", "bad", "--network", "none", *LIMITS, "--env",
               f"MIGRT_RESTORE_FROM={checkpoint_dir}/missing", IMAGE, "true", check=False)
    assert p.returncode != 0
    assert f"checkpoint {checkpoint_dir}/missing does not exist" in p.stderr, p.stderr
