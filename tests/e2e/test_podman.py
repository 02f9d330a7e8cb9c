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
    with tarfile.open(archive) as t:      # podman's own archive (Python 3.11.2: no filter=)
        t.extractall(checkpoint_dir)
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


# the file's content is not in the command line (which podman's config.dump carries)
WRITER = ("echo made-$((6*7)) > /data-new.txt; rm -f /bin/vi; " + COUNTER)


def _tar_names(path):
    """Member names of a podman archive (zstd by default, or plain)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"\x28\xb5\x2f\xfd":
        import io
        import zstandard
        with open(path, "rb") as f:
            data = zstandard.ZstdDecompressor().stream_reader(f).read()
        return tarfile.open(fileobj=io.BytesIO(data)).getnames()
    with tarfile.open(path) as t:
        return t.getnames()


def test_podman_export_archive_restores_through_marker(podman, checkpoint_dir):
    """podman's own archive (zstd, its default), named by the marker as it is: the .tar
    itself, unpacked privately; rootfs-diff.tar and deleted.files applied."""
    podman("run", "-d", "--name", "src", "--network", "none", *LIMITS, IMAGE, "sh", "-c", WRITER)
    wait_for(lambda: len(podman.numbers("src")) >= 5, what="the counter's log")
    archive = os.path.join(checkpoint_dir, "src.tar.zst")
    podman("container", "checkpoint", "--export", archive, "src")
    last = podman.numbers("src")[-1]
    names = _tar_names(archive)
    assert "rootfs-diff.tar" in names and "checkpoint/inventory.img" in names
    # migrt added no copy of the rootfs to the images podman packed
    assert not [n for n in names if n.startswith("checkpoint/migrt/rootfs/")], names

    run_counter(podman, "dst", "--env", f"MIGRT_RESTORE_FROM={archive}")
    wait_for(lambda: len(podman.numbers("dst")) >= 3, what="the restored counter's log")
    got = podman.numbers("dst")
    assert got[0] == last + 1, f"checkpointed at {last}, new container starts {got[:3]}"
    assert podman("exec", "dst", "cat", "/data-new.txt").stdout == "made-42\n"
    assert podman("exec", "dst", "ls", "/bin/vi", check=False).returncode != 0
    # and `migrt image inspect` reads podman's archive as it is
    p = subprocess.run([podman.runtime, "image", "inspect", "--json", archive],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    import json
    info = json.loads(p.stdout)
    assert info["container"]["name"] == "src" and "podman" in info["format"]
    assert "data-new.txt" in info["rootfs"]["changed"] and "bin/vi" in info["rootfs"]["deleted"]


def test_podman_export_ignore_rootfs_exports_no_files(podman, tmp_path):
    podman("run", "-d", "--name", "c1", "--network", "none", *LIMITS, IMAGE, "sh", "-c", WRITER)
    wait_for(lambda: len(podman.numbers("c1")) >= 3, what="the counter's log")
    archive = str(tmp_path / "c1.tar")
    podman("container", "checkpoint", "--compress", "none", "--ignore-rootfs", "--export",
           archive, "c1")
    names = _tar_names(archive)
    assert "checkpoint/inventory.img" in names
    assert "rootfs-diff.tar" not in names
    leaked = [n for n in names if "data-new" in n or n.startswith("checkpoint/migrt/rootfs/files")]
    assert leaked == [], leaked
    with tarfile.open(archive) as t:
        for m in t.getmembers():
            if m.isfile():
                assert b"made-42" not in t.extractfile(m).read(), m.name


def test_podman_failed_marker_restore_says_what_failed(podman, checkpoint_dir, tmp_path):
    """A restore CRIU fails on (a file the checkpoint needs is gone) must reach podman's
    user as migrt's message, not as "command not found" (podman reads a quoted
    "No such file or directory" as a missing executable)."""
    podman("run", "-d", "--name", "src", "--network", "none", *LIMITS, IMAGE, "sh", "-c",
           "exec 3>>/data-keep.log; " + COUNTER)
    wait_for(lambda: len(podman.numbers("src")) >= 3, what="the counter's log")
    archive = os.path.join(checkpoint_dir, "src.tar")
    podman("container", "checkpoint", "--compress", "none", "--ignore-rootfs", "--export",
           archive, "src")
    # the fresh container lacks /data-keep.log, which the checkpointed shell holds open
    p = podman("run", "-d", "--name", "dst", "--network", "none", *LIMITS, "--env",
               f"MIGRT_RESTORE_FROM={archive}", IMAGE, "sh", "-c", COUNTER, check=False)
    assert p.returncode != 0
    assert p.returncode != 127 and "command that was not found" not in p.stderr, p.stderr
    assert "restore of" in p.stderr and "data-keep.log" in p.stderr, p.stderr
    assert "ENOENT (the file is missing)" in p.stderr, p.stderr


def test_migrt_logs_finds_podman_names_and_short_ids(podman, tmp_path):
    """podman knows names, runtimes only ids: `migrt logs NAME` asks podman (here through
    a storage.conf naming this test's storage, as a node's own podman needs none)."""
    run_counter(podman, "named1")
    wait_for(lambda: len(podman.numbers("named1")) >= 3, what="the counter's log")
    full = podman("inspect", "-f", "{{.Id}}", "named1").stdout.strip()
    podman("container", "checkpoint", "--keep", "named1")
    conf = tmp_path / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "overlay"\n'
                    f'graphroot = "{os.path.join(podman.base, "storage")}"\n'
                    f'runroot = "{os.path.join(podman.base, "run")}"\n')
    # the record was made by the runtime podman ran, in the node's record dir
    records = os.environ.get("MIGRT_LOG_DIR", "/var/lib/migrt/containers")
    env = dict(os.environ, MIGRT_LOG_DIR=records, CONTAINERS_STORAGE_CONF=str(conf))
    try:
        for query in ("named1", full[:12]):
            p = subprocess.run([podman.runtime, "logs", "--json", query], capture_output=True,
                               text=True, env=env)
            assert p.returncode == 0, (query, p.stderr)
            import json
            assert "checkpoint" in [json.loads(x)["event"] for x in p.stdout.splitlines()]
        p = subprocess.run([podman.runtime, "logs"], capture_output=True, text=True, env=env)
        assert full[:12] in p.stdout
    finally:
        for n in os.listdir(records):
            if n.startswith(full):
                shutil.rmtree(os.path.join(records, n), ignore_errors=True)
