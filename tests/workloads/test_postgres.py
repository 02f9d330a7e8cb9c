"""PostgreSQL 15 under a writer loop, migrated: every acknowledged row is there exactly
once, and new connections are accepted after.

postgres refuses to run as root ("root" execution of the PostgreSQL server is not
permitted), and CRIU here can only dump root's processes (no CAP_SYS_RESOURCE, see wl.py).
A user namespace that maps the postgres uid to root does not work either: CRIU then
refuses a network namespace that the container's user namespace does not own ("One or
more namespaces doesn't belong to the target user namespace"), and the test's address
lives in a namespace of the host's. So the server runs as root with a preloaded library
(pgroot.c, built here) whose getuid()/geteuid() answer the postgres uid: that only gets
it past its start-up check; every file, socket and process is the real server's. On a
node with CAP_SYS_RESOURCE none of that is needed.
"""
import atexit
import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time

import wl
from pgwire import Pg, PgError

PORT = 5432
PG_UID = 101
SHIM = r"""
#include <sys/types.h>
/* postgres's start-up check refuses uid 0: answer the uid the data dir belongs to */
uid_t getuid(void) { return PG_UID; }
uid_t geteuid(void) { return PG_UID; }
"""


def pg_bin(name):
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    assert found, f"{name} of PostgreSQL not found"
    return found[-1]


_initdb_cache = {}


def base(root):
    """An initdb'd cluster in /data/pg (made once, copied into each base)."""
    key = "pg"
    if key not in _initdb_cache:
        tmp = tempfile.mkdtemp(prefix="migrt-wl-initdb-")
        atexit.register(shutil.rmtree, tmp, True)
        shutil.chown(tmp, "postgres", "postgres")
        subprocess.run(["runuser", "-u", "postgres", "--", pg_bin("initdb"), "-D", f"{tmp}/pg",
                        "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"],
                       check=True, capture_output=True)
        with open(f"{tmp}/pg/pg_hba.conf", "w") as f:
            f.write("local all all trust\nhost all all 0.0.0.0/0 trust\n")
        with open(f"{tmp}/pg/postgresql.auto.conf", "a") as f:
            f.write("listen_addresses = '*'\nport = 5432\nunix_socket_directories = '/tmp'\n"
                    "shared_buffers = 32MB\nlogging_collector = off\nfsync = on\n")
        with open(f"{tmp}/pgroot.c", "w") as f:
            f.write(SHIM)
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", f"-DPG_UID={PG_UID}", "-o",
                        f"{tmp}/pgroot.so", f"{tmp}/pgroot.c"], check=True)
        _initdb_cache[key] = tmp
    tmp = _initdb_cache[key]
    shutil.copytree(f"{tmp}/pg", f"{root}/data/pg", symlinks=True)
    shutil.copy(f"{tmp}/pgroot.so", f"{root}/data/pgroot.so")
    # postgres checks that the data dir belongs to the uid it runs as (the shim's)
    for dirpath, dirs, files in os.walk(f"{root}/data/pg"):
        for n in dirs + files:
            os.lchown(os.path.join(dirpath, n), PG_UID, -1)
    os.chown(f"{root}/data/pg", PG_UID, -1)


class Writer(threading.Thread):
    """INSERT one numbered row per statement (autocommit) on one connection; a row is
    acknowledged when its CommandComplete arrived. After a broken connection it
    reconnects (and says so)."""

    def __init__(self, connect):
        super().__init__(daemon=True)
        self.connect = connect
        self.acked = []
        self.times = []
        self.errors = []
        self.stop = threading.Event()

    def run(self):
        pg, n = None, 0
        while not self.stop.is_set():
            try:
                if pg is None:
                    pg = Pg(self.connect())
                n += 1
                tag, _ = pg.query(f"INSERT INTO t (n) VALUES ({n})")
                if tag == "INSERT 0 1":
                    self.acked.append(n)
                    self.times.append(time.monotonic())
            except Exception as e:  # noqa: BLE001 - kept for the test
                self.errors.append((time.monotonic(), repr(e)))
                if pg:
                    pg.sock.close()
                pg = None
                time.sleep(0.2)


def run(cluster, mode):
    cid, addr, dst = cluster.container(
        "postgres", base, [pg_bin("postgres"), "-D", "/data/pg"],
        env=["LD_PRELOAD=/data/pgroot.so"])
    cluster.wait_serving(cid, addr, PORT)

    def connect():
        return wl.connect(cluster.net, addr.ip, PORT, timeout=30)

    def ready():
        try:
            return Pg(connect())
        except (PgError, OSError) as e:     # 57P03: accepting, but still starting up
            if "57P03" not in str(e) and not isinstance(e, OSError):
                raise
            return None
    setup = wl.ocitest.wait_for(ready, timeout=60, interval=0.2, what="postgres ready")
    setup.query("CREATE TABLE t (n integer NOT NULL, at timestamptz DEFAULT now())")
    w = Writer(connect)
    w.start()
    wl.ocitest.wait_for(lambda: len(w.acked) > 100, timeout=30, what="rows written")
    mig = cluster.migrate(cid, addr, dst, mode)
    if mig.ok:
        n = len(w.acked)
        try:
            wl.ocitest.wait_for(lambda: len(w.acked) > n + 100, timeout=30,
                                what="rows written after the migration")
        except AssertionError:
            pass
    w.stop.set()
    w.join(40)
    return cid, addr, mig, w, connect


def test_postgres(cluster, mode):
    cid, addr, mig, w, connect = run(cluster, mode)
    wl.assert_moved(cluster, cid, mig)
    assert w.errors == [], f"the writer's connection broke: {w.errors[:3]}"
    pg = Pg(connect())          # a new connection, on node B
    _, rows = pg.query("SELECT n, count(*) FROM t GROUP BY n")
    counts = {int(n): int(c) for n, c in rows}
    assert [n for n in w.acked if counts.get(n) != 1] == []
    # nothing but what the writer sent: its numbers 1.. and at most one unacknowledged
    assert set(counts) - set(w.acked) <= {max(w.acked) + 1}
    assert all(c == 1 for c in counts.values())
    assert len([t for t in w.times if t > mig.t1]) >= 100
    tag, _ = pg.query("INSERT INTO t (n) VALUES (-1)")
    assert tag == "INSERT 0 1"
