"""migrt.agent.fill: when is the memory of a local lazy restore all back, and what
happens when the daemon that brings it in fails (no root, no CRIU: a stand-in daemon
that is a real process named like one, and a stand-in runc that records its call)."""
import json
import os
import subprocess
import sys
import time

import pytest

from migrt.agent import fill, staging as stg


@pytest.fixture
def staged(tmp_path):
    s = stg.Staged(stg.new_mid(), str(tmp_path / "staging"), str(tmp_path / "disk"))
    s.create(container="web")
    return s


@pytest.fixture
def runc(tmp_path):
    log = tmp_path / "runc.calls"
    path = tmp_path / "runc"
    path.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    path.chmod(0o755)
    return str(path), log


@pytest.fixture(autouse=True)
def no_leftover_daemons():
    yield
    for p in STARTED:                    # a failed test must not leave one waiting
        if p.poll() is None:
            p.kill()
            p.wait()
    STARTED.clear()


STARTED = []


def daemon(status_path, code, wait_for):
    """A process whose command line says lazy-pages, as the shell around the real
    daemon does; it writes `code` where the fill status goes once `wait_for` exists."""
    prog = ("import os, sys, time\n"
            "while not os.path.exists(sys.argv[3]): time.sleep(0.01)\n"
            "open(sys.argv[1], 'w').write(sys.argv[2])\n")
    p = subprocess.Popen([sys.executable, "-c", prog, status_path, code, wait_for,
                          "lazy-pages"])
    STARTED.append(p)
    end = time.monotonic() + 10          # (a fork not yet exec'd shows its parent's line)
    while p.poll() is None and b"lazy-pages" not in open(f"/proc/{p.pid}/cmdline", "rb").read():
        assert time.monotonic() < end
        time.sleep(0.005)
    return p


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    from migrt.runtime import lifecycle
    monkeypatch.setattr(lifecycle, "STATE_DIR", str(tmp_path / "state"))
    os.makedirs(lifecycle.work_top())
    return lifecycle.work_top()


MINE = {}


def filling(staged, tmp_path, proc):
    """A container `web` restored into <tmp>/root for this migration: migrt's record in
    its runc state dir (the daemon's pid, the restore's work dir) and the agent's own."""
    from migrt.runtime import lifecycle
    work = os.path.join(lifecycle.work_top(), "0123456789abcdef-x")
    os.makedirs(work, exist_ok=True)
    for name in ("status", "lazy-pages.log"):
        src = tmp_path / name
        if src.exists():
            os.replace(src, os.path.join(work, {"status": lifecycle.FILL_STATUS}.get(name, name)))
    os.makedirs(tmp_path / "root" / "web", exist_ok=True)
    (tmp_path / "root" / "web" / "migrt.json").write_text(
        '{"work": "%s", "lazy_pid": %d}' % (work, proc.pid))
    staged.update(state=fill.FILLING, container="web")
    MINE.clear()
    MINE.update(container="web", root=str(tmp_path / "root"))
    return work


def status_path(tmp_path):
    from migrt.runtime import lifecycle
    return os.path.join(lifecycle.work_top(), "0123456789abcdef-x", lifecycle.FILL_STATUS)


def test_filling_until_the_daemon_is_done_then_restored(staged, tmp_path, runc):
    go = tmp_path / "go"
    os.makedirs(os.path.dirname(status_path(tmp_path)), exist_ok=True)
    p = daemon(status_path(tmp_path), "0", str(go))
    filling(staged, tmp_path, p)
    assert fill.check(staged, MINE, runc[0]) == (fill.FILLING, None)
    go.touch()
    p.wait(10)
    assert fill.check(staged, MINE, runc[0]) == ("restored", None)
    assert staged.read()["state"] == "restored"
    assert not runc[1].exists()                   # nothing was stopped


def test_a_failed_fill_stops_the_copy_and_says_why(staged, tmp_path, runc):
    (tmp_path / "lazy-pages.log").write_text(
        "(00.1) Warn: something\n(00.2) Error (criu/uffd.c:1): uffd: no page for 7f00\n")
    go = tmp_path / "go"
    go.touch()
    os.makedirs(os.path.dirname(status_path(tmp_path)), exist_ok=True)
    os.replace(tmp_path / "lazy-pages.log", os.path.join(os.path.dirname(status_path(tmp_path)),
                                                         "lazy-pages.log"))
    p = daemon(status_path(tmp_path), "1", str(go))
    filling(staged, tmp_path, p)
    p.wait(10)
    state, why = fill.check(staged, MINE, runc[0])
    assert state == "failed"
    assert "criu lazy-pages exited 1" in why and "no page for 7f00" in why
    assert runc[1].read_text().split() == ["--root", str(tmp_path / "root"), "delete",
                                           "--force", "web"]
    assert staged.read()["state"] == "failed" and staged.read()["error"] == why


def test_a_daemon_killed_before_it_could_say_counts_as_failed(staged, tmp_path, runc):
    p = subprocess.Popen(["sleep", "30"])
    filling(staged, tmp_path, p)
    # a live process that is not a lazy-pages daemon (a reused pid) does not count
    state, why = fill.check(staged, MINE, runc[0])
    assert state == "failed" and "was killed" in why
    p.kill()
    p.wait()


def test_other_states_pass_through(staged, runc):
    staged.update(state="staged")
    assert fill.check(staged, MINE, runc[0]) == ("staged", None)


def test_only_a_source_that_waits_for_the_fill_gets_one(monkeypatch):
    """An older `migrt migrate` releases the source, and the staged image, as soon as
    the container runs: its migrations are restored with all their memory first."""
    from migrt.runtime.sources import staged as src
    monkeypatch.setattr(src, "local_lazy", lambda: True)
    assert src.fill_locally({"fill_ok": True})
    assert not src.fill_locally({})                                   # no caps: older
    assert not src.fill_locally({"fill_ok": True, "lazy_address": "10.0.0.1:7071"})
    monkeypatch.setattr(src, "local_lazy", lambda: False)             # eager node
    assert not src.fill_locally({"fill_ok": True})


def test_eager_restore_setting(monkeypatch):
    from migrt.runtime.sources import staged as src
    monkeypatch.setenv("MIGRT_EAGER_RESTORE", "1")
    assert src.local_lazy() is False


def test_the_staged_record_names_nothing_root_acts_on(staged, tmp_path, runc):
    """Issue 15: the staged record belongs to the agent's network side (an unprivileged
    user with --user). Its fill fields once made root delete any container and read any
    file into the agent's log; now the root side acts only on its own record."""
    secret = tmp_path / "root-only.txt"
    secret.write_text("TOP-SECRET-LINE Error (x): y\n")
    secret.chmod(0o600)
    staged.update(state=fill.FILLING, fill_pid=1, fill_status="/nonexistent",
                  fill_log=str(secret), container="victim", root=str(tmp_path / "other-root"))
    state, why = fill.check(staged, None, runc[0])          # root restored nothing for it
    assert state == "failed" and "TOP-SECRET" not in why
    assert not runc[1].exists()                             # no runc call at all
    # and with a restore of its own, it is that container, in that root, that is looked at
    staged.update(state=fill.FILLING, container="victim", root="/elsewhere",
                  fill_log=str(secret))
    p = subprocess.Popen(["sleep", "30"])
    STARTED.append(p)
    filling(staged, tmp_path, p)
    staged.update(container="victim", root="/elsewhere", fill_log=str(secret))
    state, why = fill.check(staged, MINE, runc[0])
    assert state == "failed" and "TOP-SECRET" not in why
    assert runc[1].read_text().split() == ["--root", str(tmp_path / "root"), "delete",
                                           "--force", "web"]


def test_staged_disk_dir_is_derived_not_read(tmp_path):
    s = stg.Staged(stg.new_mid(), str(tmp_path / "staging"), str(tmp_path / "disk"))
    s.create()
    s.update(disk_dir="/etc")
    again = stg.Staged(s.mid, str(tmp_path / "staging"), str(tmp_path / "disk"))
    assert again.disk_dir == str(tmp_path / "disk" / s.mid)
    assert again.rootfs_dir.startswith(str(tmp_path / "disk") + "/")


def test_root_writes_no_record_through_a_planted_link(tmp_path):
    s = stg.Staged(stg.new_mid(), str(tmp_path / "staging"), str(tmp_path / "disk"))
    s.create()
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, s.record_path + ".tmp")
    s.update(state="failed")
    assert victim.read_text() == "keep" and s.read()["state"] == "failed"
    os.unlink(s.record_path)
    os.mkfifo(s.record_path)                      # a FIFO does not hang a reader
    assert s.read() is None


def test_a_staged_dir_swapped_for_a_link_is_refused(tmp_path, monkeypatch):
    """The network side owns the staged dirs: root must not be sent elsewhere (another
    checkpoint, /etc) through a link it put in their place."""
    from migrt.errors import CheckpointError
    from migrt.runtime.sources import staged as src
    s = stg.Staged(stg.new_mid(), str(tmp_path / "staging"), str(tmp_path / "disk"))
    s.create()
    s.update(state="staged")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rmdir(s.image_dir) if os.path.isdir(s.image_dir) else None
    os.symlink(elsewhere, s.image_dir)
    monkeypatch.setenv("MIGRT_STAGING", str(tmp_path / "staging"))
    monkeypatch.setenv("MIGRT_STAGING_DISK", str(tmp_path / "disk"))
    with pytest.raises(CheckpointError) as e:
        src.resolve(s.mid, str(tmp_path / "bundle"))
    assert "symlink" in str(e.value)
    os.unlink(s.image_dir)
    moved = tmp_path / "moved"
    os.rename(s.dir, moved)
    os.symlink(moved, s.dir)                  # the whole dir: no record read or written
    assert s.read() is None
    with pytest.raises(OSError):
        s.update(state="failed")
    assert json.loads((moved / "migration.json").read_text())["state"] == "staged"


def test_the_runtime_finds_the_agents_disk_dir_from_roots_note(tmp_path, monkeypatch):
    """containerd runs the restore of a `staged:` marker without the agent's settings:
    the disk dir comes from the agent's root-owned note, not from the staged record."""
    monkeypatch.setenv("MIGRT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("MIGRT_STAGING_DISK", raising=False)
    staging = str(tmp_path / "staging")
    assert stg.disk_root(staging) == stg.DEFAULT_DISK
    stg.note_disk(staging, str(tmp_path / "disk"))
    assert stg.disk_root(staging) == str(tmp_path / "disk")
    assert stg.disk_root(str(tmp_path / "other")) == stg.DEFAULT_DISK
    note = stg._disk_note(staging)
    os.chown(note, 65534, 65534)                  # a note root did not write: ignored
    assert stg.disk_root(staging) == stg.DEFAULT_DISK


def test_small_memory_is_restored_whole(monkeypatch):
    """Starting a lazy-pages daemon costs the downtime more than restoring a few MiB of
    pages: below MIGRT_LOCAL_FILL_MIN (32 MiB) the memory is restored with the rest."""
    from migrt.runtime.sources import staged as src
    monkeypatch.setattr(src, "local_lazy", lambda: True)
    monkeypatch.delenv("MIGRT_LOCAL_FILL_MIN", raising=False)
    m = {"files": [{"path": "pages-1.img", "size": 150 << 10},
                   {"path": "migrt/rootfs/files/big", "size": 1 << 30},
                   {"path": "core-1.img", "size": 4096}]}
    assert src.memory_bytes(m) == 150 << 10
    assert not src.fill_locally({"fill_ok": True}, src.memory_bytes(m))
    assert src.fill_locally({"fill_ok": True}, 64 << 20)
    monkeypatch.setenv("MIGRT_LOCAL_FILL_MIN", "0")
    assert src.fill_locally({"fill_ok": True}, src.memory_bytes(m))
