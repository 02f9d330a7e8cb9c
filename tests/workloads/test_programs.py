"""Programs of Debian's python3 and sqlite, migrated while they work:
- SQLite in WAL mode, a writer holding the write lock and a reader (file locks, -shm map);
- a multi-threaded program (8 counting threads, futex waits);
- two processes sharing a file in /dev/shm and a UNIX socket pair;
- a process of 1 GiB in 4096 mappings.
What a program prints on node A comes through its pipe; on node B the agent keeps it.
"""
import os
import re
import shutil
import subprocess

import pytest

import ocitest
import wl

PROGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "progs")


def with_prog(name):
    def build(root):
        shutil.copy(os.path.join(PROGS, name), os.path.join(root, "data", name))
    return build


def lines(text, tag):
    return [ln.split()[1:] for ln in text.splitlines() if ln.startswith(tag + " ")]


class Prog:
    def __init__(self, cluster, name, args=(), shm_size=None, ready=None, argv=None):
        self.cl = cluster
        self.cid, self.addr, self.dst = cluster.container(
            name.split(".")[0].replace("_", "-").lower(), with_prog(name),
            (argv or ["python3", "-u"]) + [f"/data/{name}", *args],
            **({"shm_size": shm_size} if shm_size else {}))
        self.ready = ready

    def src(self):
        return self.cl.source_output(self.cid)[0]

    def dst_out(self):
        return self.cl.dest_output(self.cid)

    def wait_src(self, pred, what, timeout=60):
        def ok():
            if "BAD" in self.src() or "ERROR" in self.src():
                raise AssertionError(f"{self.cid} on node A: {self.src()[-1000:]}")
            if (self.cl.a.state(self.cid) or {}).get("status") != "running":
                raise AssertionError(f"{self.cid} stopped: {self.cl.source_output(self.cid)}")
            return pred(self.src())
        ocitest.wait_for(ok, timeout=timeout, interval=0.1, what=what)

    def wait_dst(self, pred, what, timeout=60):
        ocitest.wait_for(lambda: pred(self.dst_out()), timeout=timeout, interval=0.1,
                         what=f"{what}; node B printed: {self.dst_out()[-1000:]!r}")

    def migrate(self, mode):
        mig = self.cl.migrate(self.cid, self.addr, self.dst, mode)
        wl.assert_moved(self.cl, self.cid, mig)
        return mig

    def exec_b(self, *argv):
        p = self.cl.b.run("exec", self.cid, *argv)
        assert p.returncode == 0, p.stderr
        return p.stdout


def consecutive(nums):
    return all(b == a + 1 for a, b in zip(nums, nums[1:]))


# CRIU as Debian ships it (4.2.1), without packaging/criu-patches: it restores a process
# without its POSIX lock on a file the process maps. Built once by build_lockdrop_criu.sh
# (about 2 min) and kept between runs.
LOCKDROP_CRIU = os.environ.get("MIGRT_TEST_LOCKDROP_CRIU",
                               "/var/tmp/migrt-test/criu-4.2.1-unpatched")


@pytest.fixture(scope="session")
def lockdrop_criu():
    if not os.access(LOCKDROP_CRIU, os.X_OK):
        subprocess.run([os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                     "build_lockdrop_criu.sh"), LOCKDROP_CRIU],
                       check=True, timeout=900)
    return LOCKDROP_CRIU


def test_sqlite_wal_is_refused_with_a_criu_that_drops_the_lock(cluster, lockdrop_criu):
    """A destination whose CRIU restores a process without its POSIX lock on a file it
    maps shared (4.2.1 as released): SQLite in WAL mode holds exactly such locks, so the
    destination's agent, having probed its CRIU, refuses the container in the precheck,
    and migrate says so in one line, before anything is frozen; it runs on at node A."""
    # node B restores: its agent (and, for the source's part, migrate) runs that CRIU
    cluster.agent.stop()
    cluster.agent_env["MIGRT_CRIU"] = lockdrop_criu
    cluster.start_agent()
    p = Prog(cluster, "sqlite_writer.py")
    p.wait_src(lambda t: len(lines(t, "W")) >= 30 and lines(t, "R"), "rows committed")
    mig = cluster.migrate(p.cid, p.addr, p.dst, "full")
    assert mig.proc.returncode == 3, mig.why()
    err = mig.proc.stderr.strip().splitlines()
    assert len(err) == 1 and "POSIX lock" in err[0] and "db.sqlite-shm" in err[0] \
        and lockdrop_criu in err[0] and "nothing was frozen" in err[0], err
    assert cluster.b.state(p.cid) is None
    n = len(lines(p.src(), "W"))
    p.wait_src(lambda t: len(lines(t, "W")) >= n + 10, "the writer going on at node A")
    assert (cluster.a.state(p.cid) or {}).get("status") == "running"


def test_sqlite_wal(cluster, mode):
    """SQLite in WAL mode moves intact with install.sh's CRIU (packaging/criu-patches):
    migrate probes that it keeps the -shm locks and goes ahead (no override set)."""
    p = Prog(cluster, "sqlite_writer.py")
    p.wait_src(lambda t: len(lines(t, "W")) >= 30 and lines(t, "R"), "rows committed")
    p.migrate(mode)
    before = [int(x[0]) for x in lines(p.src(), "W")]
    p.wait_dst(lambda t: len(lines(t, "W")) >= 30 and len(lines(t, "R")) >= 10,
               "the writer and the reader going on on node B")
    out = p.dst_out()
    assert "ERROR" not in out, out[-2000:]
    after = [int(x[0]) for x in lines(out, "W")]
    # one sequence of commits across both nodes: none lost, none twice
    assert consecutive(before + after), (before[-3:], after[:3])
    # both processes hold their POSIX locks on node B: every open WAL connection keeps a
    # read lock on byte 128 of the -shm file (SQLite's "DMS" byte) for as long as it is
    # open; a connection that finds that byte unlocked takes itself for the first one and
    # truncates the -shm under the others' mappings
    pids = set(cluster.dest_pids(p.cid))
    assert len(pids) == 2, pids
    shm = os.stat(os.path.join(p.dst, "rootfs", "data", "db.sqlite-shm")).st_ino
    with open("/proc/locks") as f:           # "N: -> ..." lines are waiters, not holders
        locks = [ln.split() for ln in f if "->" not in ln.split()[:2]]
    dms = {int(x[4]) for x in locks if x[1] == "POSIX" and x[3] == "READ"
           and int(x[5].rsplit(":", 1)[1]) == shm and x[6] == x[7] == "128"}
    assert pids <= dms, (f"processes without their read lock on the -shm's byte 128 on "
                         f"node B: {sorted(pids - dms)}; their locks: "
                         f"{[' '.join(x[1:]) for x in locks if int(x[4]) in pids]}")
    # the database is whole, and every printed commit is in it
    check = p.exec_b("python3", "-c",
                     "import sqlite3; db = sqlite3.connect('/data/db.sqlite', timeout=60);"
                     "print(db.execute('PRAGMA integrity_check').fetchone()[0]);"
                     "print(*db.execute('SELECT count(*), max(n) FROM t').fetchone())")
    status, counts = check.split("\n")[:2]
    count, hi = map(int, counts.split())
    assert status == "ok" and count == hi and hi >= after[-1], check


def test_threads(cluster, mode):
    p = Prog(cluster, "threads.py")
    p.wait_src(lambda t: len(lines(t, "T")) >= 10, "threads counting")
    p.migrate(mode)
    last = [int(x) for x in lines(p.src(), "T")[-1]]
    p.wait_dst(lambda t: len(lines(t, "T")) >= 10, "threads counting on node B")
    rows = [[int(x) for x in r] for r in lines(p.dst_out(), "T")]
    for r in rows:
        assert r[0] == sum(r[1:9]), f"total {r[0]} is not the sum of {r[1:9]}"
        assert r[9] == 10, f"{r[9]} threads, not 10"
    # every thread carried on from where it was on node A, and moves on node B
    first, end = rows[0], rows[-1]
    assert all(f >= s for f, s in zip(first[1:9], last[1:9])), (last, first)
    assert all(e > s for e, s in zip(end[1:9], last[1:9])), (last, end)
    assert end[10] > last[10]


def test_shm_socketpair(cluster, mode):
    p = Prog(cluster, "shm_pair.py")
    p.wait_src(lambda t: len(lines(t, "S")) >= 5, "rounds through /dev/shm and the socket")
    p.migrate(mode)
    before = [int(x[0]) for x in lines(p.src(), "S")]
    p.wait_dst(lambda t: len(lines(t, "S")) >= 10, "rounds on node B")
    out = p.dst_out()
    assert "BAD" not in out, out[-2000:]
    after = [int(x[0]) for x in lines(out, "S")]
    nums = before + after
    assert all(b == a + 10 for a, b in zip(nums, nums[1:])), (before[-3:], after[:3])
    assert len(cluster.dest_pids(p.cid)) == 2
    assert p.exec_b("stat", "-c", "%s", "/dev/shm/wl-seg").strip() == str(512 << 10)


def test_lazy_memory_freed_and_forked_while_it_streams(cluster):
    """--lazy, while CRIU's lazy-pages daemon still streams the memory in (several
    requests in flight, packaging/criu-patches/lazy-pages-stream.patch): the program
    frees a window in every 4 MiB of a 256 MiB mapping (MADV_DONTNEED, which splits
    requests in flight), writes it again, checks all of it and 1024 small mappings, and
    forks children that read it. Every byte is right on node B, the children are too,
    and the migration ends: the source is released once every page was served (a
    request split in flight used to stay pending for ever with CRIU 4.2.1: the
    daemon never finished and the process hung on the first page of its tail)."""
    p = Prog(cluster, "churn.py")
    p.wait_src(lambda t: len(lines(t, "C")) >= 2, "churn passes", timeout=120)
    mig = p.migrate("lazy")
    assert "pages_served_after_restore" in mig.report["phases"], mig.report["phases"]
    assert cluster.a.state(p.cid) is None, "the source must be gone once every page was served"
    last = int(lines(p.src(), "C")[-1][0])
    # three whole passes on node B, one with a child: every page came back right
    p.wait_dst(lambda t: len([x for x in lines(t, "C") if int(x[0]) > last + 2]) >= 1
               or "BAD" in t, "three full passes on node B", timeout=120)
    out = p.dst_out()
    assert "BAD" not in out, out[-2000:]
    passes = [int(x[0]) for x in lines(out, "C")]
    assert consecutive([last] + passes), (last, passes[:3])
    pid = cluster.dest_pids(p.cid)[0]
    with open(f"/proc/{pid}/maps") as f:
        assert sum(1 for _ in f) >= 2048          # the small mappings and their neighbours


def test_big_process(cluster, mode):
    p = Prog(cluster, "bigmem.py", ["4096"], shm_size="1200m")
    p.wait_src(lambda t: len(lines(t, "P")) >= 1, "1 GiB filled and checked once",
               timeout=120)
    maps = int(lines(p.src(), "READY")[0][0])
    assert maps > 4096
    mig = p.migrate(mode)
    if mode == "lazy":
        # half of it is shared (one object per mapping): in the dump, and said why
        said = mig.report.get("warning") or ""
        n = re.search(r"\((\d+) shared memory objects, which CRIU does not serve lazily", said)
        assert n and int(n.group(1)) >= 2048, said
        assert mig.report["lazy_pages_in_image"] >= 512 << 20, mig.report
    last = int(lines(p.src(), "P")[-1][0])
    # two whole passes over the 1 GiB on node B: every page came back right
    p.wait_dst(lambda t: len([x for x in lines(t, "P") if int(x[0]) > last + 1]) >= 1
               or "BAD" in t, "two full passes on node B", timeout=120)
    out = p.dst_out()
    assert "BAD" not in out, out[-2000:]
    passes = [int(x[0]) for x in lines(out, "P")]
    assert consecutive([last] + passes), (last, passes[:3])
    pid = cluster.dest_pids(p.cid)[0]
    with open(f"/proc/{pid}/maps") as f:
        # all 4096 of the program's own; the loader's and vdso's few may differ
        assert sum(1 for _ in f) >= 4096
    with open(f"/proc/{pid}/status") as f:
        st = dict(ln.split(":", 1) for ln in f)
    assert int(st["VmRSS"].split()[0]) >= 1 << 20, st["VmRSS"]


# A JVM (Debian's OpenJDK 17, the source file run by the launcher): its heap in the
# container's anonymous memory, its compiler, collector and own threads, class data
# mapped from /usr.
JVM = ["java", "-Xms400m", "-Xmx400m", "-XX:+UseSerialGC", "-XX:-UsePerfData"]


def test_jvm(cluster, mode):
    """A JVM holding 256 MiB in long[] chunks it rewrites and checks every round: after
    the move every value is right, the rounds go on from where they were, and every
    thread of the JVM is there."""
    p = Prog(cluster, "Heap.java", ["256"], argv=JVM)
    p.wait_src(lambda t: len(lines(t, "J")) >= 3, "the JVM's heap filled and checked",
               timeout=180)
    p.migrate(mode)
    last = int(lines(p.src(), "J")[-1][0])
    p.wait_dst(lambda t: len([x for x in lines(t, "J") if int(x[0]) > last + 2]) >= 1
               or "BAD" in t, "three more checked rounds on node B", timeout=120)
    out = p.dst_out()
    assert "BAD" not in out, out[-2000:]
    rounds = [int(x[0]) for x in lines(out, "J")]
    assert consecutive([last] + rounds), (last, rounds[:3])
    pid = cluster.b.state(p.cid)["pid"]
    names = set()
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/comm") as f:
            names.add(f.read().strip())
    assert {"VM Thread", "Finalizer", "Signal Dispatch"} <= names, names
    assert sum(1 for n in names if n.startswith("Thread-")) == 4, names
