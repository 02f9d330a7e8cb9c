"""The refusal of a process that holds a POSIX lock on a file it maps shared (CRIU 4.2.1
restores it without the lock): found from /proc as migrate reads it, on this process."""
import fcntl
import mmap
import os

from migrt.migration.migrate import posix_locks_on_shared_maps


def test_lock_on_a_shared_mapping_is_found(tmp_path):
    path = tmp_path / "db-shm"
    path.write_bytes(b"\0" * 4096)
    with open(path, "r+b") as f:
        assert posix_locks_on_shared_maps([os.getpid()]) == []
        fcntl.lockf(f, fcntl.LOCK_SH, 1, 128)            # SQLite's DMS byte
        assert posix_locks_on_shared_maps([os.getpid()]) == []   # locked, not mapped
        m = mmap.mmap(f.fileno(), 4096, mmap.MAP_SHARED)
        try:
            assert posix_locks_on_shared_maps([os.getpid()]) == [(os.getpid(), str(path))]
            fcntl.lockf(f, fcntl.LOCK_UN, 1, 128)
            assert posix_locks_on_shared_maps([os.getpid()]) == []   # mapped, not locked
        finally:
            m.close()


def test_private_mapping_and_flock_are_not_refused(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"\0" * 4096)
    with open(path, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)                    # a flock is the file's, not POSIX
        m = mmap.mmap(f.fileno(), 4096, mmap.MAP_SHARED)
        p = mmap.mmap(f.fileno(), 4096, mmap.MAP_PRIVATE)
        try:
            assert posix_locks_on_shared_maps([os.getpid()]) == []
        finally:
            m.close()
            p.close()
