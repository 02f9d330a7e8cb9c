"""redis-server with 100,000 keys, migrated while a client INCRs on one connection."""
import hashlib
import threading
import time

import wl
from resp import Resp

PORT = 6379
KEYS = 100_000
CONF = """bind 0.0.0.0
port 6379
protected-mode no
daemonize no
save ""
appendonly no
dir /data
logfile ""
"""


def value(i):
    return hashlib.blake2b(b"%d" % i, digest_size=12).hexdigest().encode()


def base(root):
    with open(f"{root}/data/redis.conf", "w") as f:
        f.write(CONF)


def load(r):
    for lo in range(0, KEYS, 5000):
        r.send(*[("SET", f"key:{i}", value(i)) for i in range(lo, lo + 5000)])
        for _ in range(5000):
            assert r.reply() == "OK"


def check_all(r):
    """Every key, read back with MGET: the keys that differ (none expected)."""
    bad = []
    for lo in range(0, KEYS, 5000):
        got = r.call("MGET", *[f"key:{i}" for i in range(lo, lo + 5000)])
        bad += [lo + j for j, v in enumerate(got) if v != value(lo + j)]
    return bad


class Incr(threading.Thread):
    """INCR in a loop on one connection: each reply must be the previous one plus 1."""

    def __init__(self, sock):
        super().__init__(daemon=True)
        self.r = Resp(sock)
        self.replies = []
        self.times = []
        self.error = None
        self.stop = threading.Event()

    def run(self):
        try:
            while not self.stop.is_set():
                self.replies.append(self.r.call("INCR", "seq"))
                self.times.append(time.monotonic())
        except Exception as e:  # noqa: BLE001 - the test reports it
            self.error = repr(e)

    def longest_gap(self):
        return max((b - a for a, b in zip(self.times, self.times[1:])), default=0.0)


def run(cluster, mode):
    """One migration of redis under an INCR loop; returns what the client saw."""
    cid, addr, dst = cluster.container("redis", base, ["redis-server", "/data/redis.conf"])
    cluster.wait_serving(cid, addr, PORT)
    r = Resp(wl.connect(cluster.net, addr.ip, PORT, timeout=60))
    load(r)
    idle = Resp(wl.connect(cluster.net, addr.ip, PORT, timeout=60))
    assert idle.call("PING") == "PONG"
    incr = Incr(wl.connect(cluster.net, addr.ip, PORT, timeout=60))
    incr.start()
    wl.ocitest.wait_for(lambda: len(incr.replies) > 200, what="INCR loop running")
    mig = cluster.migrate(cid, addr, dst, mode)
    if mig.ok:
        seen = len(incr.replies)
        try:
            wl.ocitest.wait_for(lambda: len(incr.replies) > seen + 200 or incr.error,
                                timeout=30, what="INCR going on after the migration")
        except AssertionError:
            pass
    incr.stop.set()
    incr.join(60)
    return cid, addr, mig, r, idle, incr


def test_redis(cluster, mode):
    cid, addr, mig, r, idle, incr = run(cluster, mode)
    wl.assert_moved(cluster, cid, mig)
    assert incr.error is None, f"the INCR connection failed: {incr.error}"
    assert not incr.is_alive()
    seq = incr.replies
    assert seq[0] == 1 and all(b == a + 1 for a, b in zip(seq, seq[1:])), \
        [(a, b) for a, b in zip(seq, seq[1:]) if b != a + 1][:5]
    assert seq[-1] > 400
    # the connection that loaded the keys and the idle one both still work on node B
    assert idle.call("PING") == "PONG"
    assert idle.call("GET", "seq") == str(seq[-1]).encode()
    assert r.call("DBSIZE") == KEYS + 1
    assert check_all(r) == []
    # and a new connection is accepted at the same address
    fresh = Resp(wl.connect(cluster.net, addr.ip, PORT))
    assert fresh.call("GET", "key:99999") == value(99999)

