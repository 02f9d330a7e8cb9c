"""The agent under hostile and broken peers (real agent process, loopback TCP).

Wrong or missing credentials, garbage before authentication, idle connections,
oversized frames, endless streams past the quota, paths that try to leave the staging
dirs, a full tmpfs: each gets refused with a clear reason, writes nothing outside the
staging dirs, leaves nothing staged, and the agent keeps serving an honest peer the
whole time. One agent serves the whole module; the last test checks it is still
alive, small, and holds nothing.
"""
import json
import os
import socket
import subprocess
import threading
import time

import psutil
import pytest
import xxhash
import zstandard

import migr
from migrt.image import manifest as mf
from migrt.transfer import wire

QUOTA = 4 << 20
IDLE = int(os.environ.get("MIGRT_IDLE_PEERS", "300"))


@pytest.fixture(scope="module", params=["root", "nobody"])
def setup(request, tmp_path_factory, migrt_launcher):
    """The agent as root, and with its network side as `nobody` (migrt.agent.privsep)."""
    import shutil
    tmp = tmp_path_factory.mktemp("agent-hostile")
    secret_file = migr.write_secret(str(tmp / "secret"))
    with open(secret_file, "rb") as f:
        secret = f.read().strip()
    user = None if request.param == "root" else request.param
    ag = migr.Agent(migrt_launcher, str(tmp), "h", str(tmp / "root"), secret_file,
                    quota=QUOTA, user=user)
    shared = None
    if user:                       # dirs the unprivileged side can reach
        shared = f"/tmp/migrt-privsep-{os.urandom(4).hex()}"
        os.makedirs(shared, mode=0o711)
        os.chmod(shared, 0o711)
        ag.staging, ag.disk = os.path.join(shared, "staging"), os.path.join(shared, "disk")
        ag.env["MIGRT_STAGING"] = ag.staging
    ag.start()
    yield {"agent": ag, "secret": secret, "tmp": tmp, "launcher": migrt_launcher,
           "secret_file": secret_file, "uid": 65534 if user else 0}
    ag.stop()
    if shared:
        shutil.rmtree(shared, ignore_errors=True)


def control(setup, estimate=1 << 20, agent=None):
    ag = agent or setup["agent"]
    c, _ = wire.connect(ag.address, setup["secret"], {"op": "control", "container": "x"})
    c.send_json({"op": "precheck", "container": "x", "mode": "full", "node": mf.node_info(),
                 "estimate": estimate})
    reply = c.read_json()
    return c, reply["mid"]


def honest_precheck(setup, agent=None):
    """An honest peer gets served: precheck answers, then abort drops the session."""
    t0 = time.monotonic()
    c, mid = control(setup, agent=agent)
    c.send_json({"op": "abort"})
    c.read_json()
    c.close()
    return time.monotonic() - t0


def chunk(rel, off, data, compress=True):
    z = zstandard.ZstdCompressor(level=1).compress(data) if compress else data
    return {"p": rel, "o": off, "n": len(data), "h": xxhash.xxh3_64_hexdigest(data),
            "z": 1 if compress else 0}, z


def stream(d, chunks):
    """Send data frames until the agent refuses; return (frames sent, its error)."""
    sent = 0
    try:
        for i in range(chunks):
            head, z = chunk("pages-1.img", i << 20, os.urandom(1 << 20))
            head["c"] = i
            d.send_data(head, z)
            sent += 1
        d.send_json({"op": "eof"})
    except OSError:
        pass                      # the agent closed on us; its reason is in the buffer
    try:
        reply = d.read_json()
    except (wire.ProtocolError, OSError) as e:
        return sent, str(e)
    return sent, reply.get("error")


def no_staged(ag, timeout=10):
    migr.ocitest.wait_for(lambda: not ag.staged_files(), timeout=timeout,
                          what=f"staged files to go: {ag.staged_files()[:3]}")


def test_wrong_or_missing_credentials(setup):
    ag = setup["agent"]
    with pytest.raises(wire.AuthError):
        wire.connect(ag.address, b"not-the-secret-" * 2, {"op": "control"})
    # no TLS at all: the old plaintext hello, or garbage
    for payload in (b'J\x00\x00\x00\x10{"op":"control"}', os.urandom(300), b"GET / HTTP/1.0\r\n\r\n"):
        s = socket.create_connection(("127.0.0.1", ag.port), timeout=10)
        s.sendall(payload)
        s.settimeout(10)
        try:
            got = s.recv(65536)
        except (ConnectionResetError, socket.timeout):
            got = b""
        s.close()
        assert b"mid" not in got and b"ok" not in got
    assert "authentication failed" in ag.log() or "refused" in ag.log()
    assert setup["secret"].decode() not in ag.log()
    assert honest_precheck(setup) < 5
    no_staged(ag)


def test_migrate_with_wrong_or_missing_secret(setup, tmp_path):
    ag = setup["agent"]
    bad = migr.write_secret(str(tmp_path / "bad"))
    loose = migr.write_secret(str(tmp_path / "loose"))
    os.chmod(loose, 0o644)
    runs = {"wrong": ["--secret-file", bad], "loose": ["--secret-file", loose], "missing": []}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRT_SECRET")}
    for name, args in runs.items():
        p = subprocess.run([setup["launcher"], "--root", str(tmp_path / "r"), "migrate", "nosuch",
                            "--to", ag.address, *args], capture_output=True, text=True,
                           env=env, timeout=60)
        assert p.returncode != 0, name
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    # an agent refuses to start on a secret others can read
    p = subprocess.run([setup["launcher"], "agent", "--listen", "127.0.0.1:0", "--secret-file",
                        loose, "--staging", str(tmp_path / "s")], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode != 0 and "readable by others" in p.stderr


def network_side(setup):
    """The agent process that accepts connections (with --user: the root side's child
    running as that user; beside it, as root, the spare restorer of migrt.front.spare)."""
    server = psutil.Process(setup["agent"].proc.pid)
    if setup["uid"]:
        (server,) = [c for c in server.children() if c.uids().effective == setup["uid"]]
    return server


def test_idle_and_garbage_peers_do_not_block_others(setup):
    """Idle peers that never start their handshake (a batch, then a steady 100 new ones
    a second) and peers sending garbage: honest peers are served all along, and what
    the unauthenticated ones hold is bounded (at most 64 handshakes at once; before,
    each idle peer kept a thread for 10 s: 300 peers, 300 threads)."""
    ag = setup["agent"]
    server = network_side(setup)
    before = server.num_threads()
    idle = [socket.create_connection(("127.0.0.1", ag.port)) for _ in range(IDLE)]
    stop = threading.Event()
    peak = [0]

    def trickle():                 # idle peers keep coming while honest ones connect
        while not stop.wait(0.01):
            try:
                idle.append(socket.create_connection(("127.0.0.1", ag.port), timeout=5))
                peak[0] = max(peak[0], server.num_threads())
            except (OSError, psutil.Error):
                pass

    def flood():
        while not stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", ag.port), timeout=5)
                s.sendall(os.urandom(4096))
                s.close()
            except OSError:
                pass
    floods = [threading.Thread(target=flood, daemon=True) for _ in range(3)]
    floods.append(threading.Thread(target=trickle, daemon=True))
    for t in floods:
        t.start()
    try:
        time.sleep(1)
        took = [honest_precheck(setup) for _ in range(5)]
    finally:
        stop.set()
        for t in floods:
            t.join(10)
        for s in idle:
            s.close()
    assert max(took) < 5, took
    # 64 handshakes, plus the honest prechecks' own threads (a control connection and
    # its streams, which may linger while a loaded machine tears them down: CI saw 10);
    # one thread per idle peer, the failure this guards against, would be hundreds
    assert peak[0] - before <= 64 + 16, (before, peak[0])
    print(f"\nAGENT honest prechecks during a flood of {len(idle)} idle and 3 garbage "
          f"peers: {len(took)}, slowest {max(took):.2f}s; agent threads {before}, at most "
          f"{peak[0]} during the flood")


def test_oversized_frames_are_refused(setup):
    ag = setup["agent"]
    for header in (b"J" + (2**32 - 1).to_bytes(4, "big"), b"D" + (2**31).to_bytes(4, "big"),
                   b"X" + (10).to_bytes(4, "big")):
        c, mid = control(setup)
        d, _ = wire.connect(ag.address, setup["secret"], {"op": "data", "mid": mid})
        # an authenticated peer's frame header, inside the data connection's sealed
        # records (raw bytes there would fail the record check first)
        d._out.sendall(header)
        with pytest.raises((wire.ProtocolError, OSError)):
            d.read_json()
        d.close()
        c.close()
    no_staged(ag)
    assert honest_precheck(setup) < 5


def test_endless_stream_stops_at_quota(setup):
    ag = setup["agent"]
    c, mid = control(setup)
    d, _ = wire.connect(ag.address, setup["secret"], {"op": "data", "mid": mid})
    sent, error = stream(d, 64)                  # 64 MiB offered against a 4 MiB quota
    d.close()
    assert "quota" in str(error), error
    # what was staged meanwhile is the agent's alone: files 0600, dirs 0700
    staged_now = ag.staged_files()
    assert staged_now
    for top in (ag.staging, ag.disk):
        for dirpath, dirs, files in os.walk(top):
            st = os.stat(dirpath)
            assert st.st_mode & 0o777 == 0o700 and st.st_uid == setup["uid"], dirpath
            for f in files:
                st = os.stat(os.path.join(dirpath, f))
                assert st.st_mode & 0o077 == 0 and st.st_uid == setup["uid"], (f, oct(st.st_mode))
    staged = sum(os.path.getsize(p) for p in ag.staged_files() if p.endswith(".img"))
    assert staged <= QUOTA
    c.send_json({"op": "commit", "manifest": {"format": "x"}})
    with pytest.raises(wire.ProtocolError):
        c.read_json()
    c.close()
    no_staged(ag)
    assert honest_precheck(setup) < 5
    print(f"\nAGENT endless stream: {sent} MiB offered, at most {staged >> 20} MiB staged "
          f"(quota {QUOTA >> 20} MiB), all removed")


def test_paths_cannot_leave_staging(setup):
    ag = setup["agent"]
    outside = os.path.join(str(setup["tmp"]), "outside-target")
    for rel in ("../../../outside-target", "/etc/migrt-owned", "a/../../x",
                "migrt/rootfs/files/../../../../../outside-target", "..", "x\0y",
                os.path.relpath(outside, ag.staging)):
        c, mid = control(setup)
        d, _ = wire.connect(ag.address, setup["secret"], {"op": "data", "mid": mid})
        head, z = chunk(rel, 0, b"owned")
        try:
            d.send_data(head, z)
            d.send_json({"op": "eof"})
        except OSError:
            pass                  # refused before the eof went out; the reason is still sent
        try:
            reply = d.read_json()
        except wire.ProtocolError as e:
            reply = {"error": str(e)}
        assert "refusing path" in str(reply.get("error")), (rel, reply)
        d.close()
        c.close()
    assert not os.path.exists(outside) and not os.path.exists("/etc/migrt-owned")
    no_staged(ag)


def test_malformed_control_messages(setup):
    ag = setup["agent"]
    c, _ = wire.connect(ag.address, setup["secret"], {"op": "control"})
    c.send_json({"op": "restore", "bundle": "/", "id": "x"})        # not after a precheck
    with pytest.raises(wire.ProtocolError, match="expected precheck"):
        c.read_json()
    c.close()
    for node in ({"arch": "s390x"}, {"arch": mf.node_info()["arch"], "cpu_flags": ["nosuchflag"]},
                 None, "x"):
        c, _ = wire.connect(ag.address, setup["secret"], {"op": "control"})
        c.send_json({"op": "precheck", "node": node, "estimate": 0})
        with pytest.raises(wire.ProtocolError):
            c.read_json()
        c.close()
    d, _ = wire.connect(ag.address, setup["secret"], {"op": "data", "mid": "m-0000000000000000"})
    with pytest.raises(wire.ProtocolError, match="no migration"):
        d.read_json()
    d.close()
    c, mid = control(setup)
    c.send_json({"op": "restore", "bundle": "/nonexistent", "id": "../../x"})
    with pytest.raises(wire.ProtocolError):
        c.read_json()
    c.close()
    no_staged(ag)
    assert honest_precheck(setup) < 5


def test_full_tmpfs(setup, tmp_path):
    """Staging on a 20 MiB tmpfs (the agent keeps 16 MiB in reserve): an honest estimate is refused up front; a peer that
    lies gets "no room" when the tmpfs fills, and the agent removes what it staged."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m,mode=0700", "tmpfs", str(mnt)],
                   check=True)
    ag = None
    try:
        ag = migr.Agent(setup["launcher"], str(tmp_path), "tiny", str(tmp_path / "root"),
                        setup["secret_file"])
        ag.staging = str(mnt / "staging")
        ag.env["MIGRT_STAGING"] = ag.staging
        ag.start()
        c, _ = wire.connect(ag.address, setup["secret"], {"op": "control"})
        c.send_json({"op": "precheck", "node": mf.node_info(), "estimate": 64 << 20})
        with pytest.raises(wire.ProtocolError, match="no room"):
            c.read_json()
        c.close()
        c, mid = control(setup, estimate=0, agent=ag)
        d, _ = wire.connect(ag.address, setup["secret"], {"op": "data", "mid": mid})
        sent, error = stream(d, 32)
        assert "no room" in str(error), error
        d.close()
        c.close()
        no_staged(ag)
        assert honest_precheck(setup, agent=ag) < 5
        assert honest_precheck(setup) < 5          # the other agent never noticed
    finally:
        if ag:
            ag.stop()
        subprocess.run(["umount", str(mnt)])


def test_agent_survived_everything(setup):
    ag = setup["agent"]
    assert ag.proc.poll() is None
    server = network_side(setup)
    rss = server.memory_info().rss
    threads = server.num_threads()
    no_staged(ag)
    assert "Traceback" not in ag.log(), ag.log()[-2000:]
    assert setup["secret"].decode() not in ag.log()
    print(f"\nAGENT ({'network side as uid %d' % setup['uid'] if setup['uid'] else 'root'}) "
          f"after all hostile tests: alive, rss {rss >> 20} MiB, {threads} threads, "
          f"nothing staged")
    assert rss < 300 << 20


def test_full_disk_for_rootfs_changes(setup, tmp_path):
    """The rootfs changes go to the node's disk dir, not tmpfs: a peer filling that gets
    "no room" too, and the agent removes what it wrote there."""
    mnt = tmp_path / "tinydisk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)],
                   check=True)
    ag = None
    try:
        ag = migr.Agent(setup["launcher"], str(tmp_path), "disk", str(tmp_path / "root"),
                        setup["secret_file"])
        ag.disk = str(mnt / "disk")
        ag.start()
        c, mid = control(setup, estimate=0, agent=ag)
        d, _ = wire.connect(ag.address, setup["secret"], {"op": "data", "mid": mid})
        sent = 0
        error = None
        try:
            for i in range(8):
                head, z = chunk("migrt/rootfs/files/data/big", i << 20, os.urandom(1 << 20))
                d.send_data(head, z)
                sent += 1
            d.send_json({"op": "eof"})
        except OSError:
            pass
        try:
            error = d.read_json().get("error")
        except (wire.ProtocolError, OSError) as e:
            error = str(e)
        assert "no room" in str(error), error
        d.close()
        c.close()
        no_staged(ag)
        assert not os.listdir(str(mnt / "disk"))
        assert honest_precheck(setup, agent=ag) < 5
    finally:
        if ag:
            ag.stop()
        subprocess.run(["umount", str(mnt)])
