"""Staged migrations are removed after a restore is released, at agent start-up when
half-received, and after the time limit."""
import os
import time

from migrt.agent import staging as stg


def staged(tmp_path, state, age=0.0, **extra):
    s = stg.Staged(stg.new_mid(), str(tmp_path / "tmpfs"), str(tmp_path / "disk"))
    s.create()
    os.makedirs(s.image_dir)
    (open(os.path.join(s.image_dir, "pages-1.img"), "wb")).write(b"x" * 100)
    os.makedirs(s.rootfs_dir, exist_ok=True)
    rec = s.read()
    rec.update(state=state, **extra)
    s.write(rec)
    if age:
        rec = s.read()
        rec["updated"] = rec["created"] = time.time() - age
        with open(s.record_path, "w") as f:
            import json
            json.dump(rec, f)
    return s


def test_sweep_by_age_and_state(tmp_path):
    young = staged(tmp_path, "staged")
    old = staged(tmp_path, "staged", age=1000)
    failed = staged(tmp_path, "failed")
    gone = stg.sweep(str(tmp_path / "tmpfs"), ttl=600, disk=str(tmp_path / "disk"))
    assert old.mid in gone and failed.mid in gone and young.mid not in gone
    assert os.path.exists(young.image_dir)
    assert not os.path.exists(old.dir) and not os.path.exists(old.disk_dir)


def test_startup_removes_half_received(tmp_path):
    half = staged(tmp_path, "receiving")
    active = staged(tmp_path, "receiving")
    stg.sweep(str(tmp_path / "tmpfs"), ttl=600, active={active.mid}, startup=True,
              disk=str(tmp_path / "disk"))
    assert not os.path.exists(half.dir)
    assert os.path.exists(active.dir)


def test_disk_dirs_without_record_go(tmp_path):
    s = staged(tmp_path, "staged")
    import shutil
    shutil.rmtree(s.dir)           # tmpfs lost (reboot)
    stg.sweep_disk(str(tmp_path / "tmpfs"), str(tmp_path / "disk"))
    assert not os.path.exists(s.disk_dir)


def test_mid_is_validated():
    for bad in ("../x", "m-", "m-XYZ", "m-0123/../..", ""):
        assert not stg.valid_mid(bad)
    assert stg.valid_mid(stg.new_mid())


def test_a_migration_being_created_is_not_swept(tmp_path):
    """A staged dir whose record is not written yet (Staged.create makes the dir first)
    is as old as its dir: the janitor running at that moment leaves it alone; one left
    without a record for longer than the time limit goes."""
    young = stg.Staged(stg.new_mid(), str(tmp_path / "tmpfs"), str(tmp_path / "disk"))
    os.makedirs(young.dir)
    stale = stg.Staged(stg.new_mid(), str(tmp_path / "tmpfs"), str(tmp_path / "disk"))
    os.makedirs(stale.dir)
    os.utime(stale.dir, (time.time() - 1000, time.time() - 1000))
    gone = stg.sweep(str(tmp_path / "tmpfs"), ttl=600, disk=str(tmp_path / "disk"))
    assert gone == [stale.mid]
    assert os.path.isdir(young.dir) and not os.path.exists(stale.dir)
