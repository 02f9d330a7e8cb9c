"""Issue 15: trust nothing the unprivileged side or the network says (real agent, runc, CRIU).

- the agent's network side (`--user nobody`) writes a staged record naming another runc
  root's container and a root-only file: the root side deletes nothing and reads nothing
  (the probe: the janitor deleted container `victim` and printed the file);
- a byte flipped in a data stream ends the migration at once (rolled back, one line),
  not after --peer-timeout with the source frozen;
- a byte flipped in a TLS record is "the connection was damaged", never an internal error;
- `migrt agent` without --listen is refused in one line; a secret file of another uid is
  refused; what the agent writes (container logs, its records) is owner-only.
"""
import json
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

import migr
import ocitest
from migrt.transfer import wire


@pytest.fixture
def shared_dir():
    """Staging dirs the unprivileged side can reach (pytest's temp root is 0700)."""
    d = f"/tmp/migrt-untrusted-{os.urandom(4).hex()}"
    os.makedirs(d, mode=0o711)
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_nobody(script):
    return subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                           "sh", "-c", script], capture_output=True, text=True, timeout=30)


def test_network_side_cannot_make_root_delete_or_read(tmp_path, migrt_launcher, make_bundle,
                                                       shared_dir):
    nodes = migr.Nodes(migrt_launcher, tmp_path, make_bundle)
    try:
        # a container of another runc root, and a file only root may read
        victim = ocitest.uid("victim")
        vb = make_bundle(["sh", "-c", "sleep 600"], name=victim)
        rc, _, err = nodes.a.create(victim, vb, start=True)
        assert rc == 0, err.text
        secret = tmp_path / "root-only.txt"
        secret.write_text("ROOT-ONLY-CONTENT Error (x): y\n")
        secret.chmod(0o600)
        ag = migr.Agent(migrt_launcher, str(tmp_path), "hostile", nodes.b.root,
                        nodes.secret_file, user="nobody", ttl=8)     # janitor every 2 s
        ag.staging = os.path.join(shared_dir, "staging")
        ag.disk = os.path.join(shared_dir, "disk")
        ag.env["MIGRT_STAGING"] = ag.staging
        ag.start()
        nodes.agents.append(ag)
        mid = "m-00000000deadbeef"
        rec = {"mid": mid, "state": "filling", "fill_pid": 1, "fill_status": "/nonexistent",
               "fill_log": str(secret), "container": victim, "root": nodes.a.root,
               "disk_dir": "/etc", "updated": time.time() + 3600}
        p = as_nobody(f"mkdir -p {ag.staging}/{mid} && cat > {ag.staging}/{mid}/migration.json "
                      f"<<'EOF'\n{json.dumps(rec)}\nEOF")
        assert p.returncode == 0, p.stderr
        # a few janitor rounds (the probe saw the delete 26 s after, with a 30 s period)
        ocitest.wait_for(lambda: f"{mid}: memory fill" in ag.log(), timeout=20,
                         what="the janitor's look at the hostile record")
        time.sleep(2)
        assert (nodes.a.state(victim) or {}).get("status") == "running"
        assert "ROOT-ONLY-CONTENT" not in ag.log()
        assert os.path.isdir("/etc")
    finally:
        nodes.cleanup()


@pytest.mark.parametrize("offset", [30_000, 90_000])
def test_a_damaged_data_record_rolls_back_at_once(tmp_path, migrt_launcher, make_bundle,
                                                  offset):
    nodes = migr.Nodes(migrt_launcher, tmp_path, make_bundle)
    try:
        ag = nodes.agent()
        px = migr.Proxy(ag.port)
        # 64 MiB of incompressible rootfs changes: far more than the sockets on the way
        # hold, so the source is still sending when the agent stops reading
        cmd = ["sh", "-c", "head -c 67108864 /dev/urandom > /big; " + ocitest.COUNTER]
        cid = ocitest.uid("flip")
        bundle = make_bundle(cmd, name=cid)
        dest = make_bundle(cmd, name=cid + "-dst")
        rc, out, err = nodes.a.create(cid, bundle, start=True)
        assert rc == 0, err.text
        ocitest.wait_for(lambda: ocitest.last_count(out) >= 3, timeout=30, what="counter")
        argv = nodes.migrate_argv(cid, dest, ag, "--zstd-level", "0")
        argv[argv.index("--to") + 1] = px.address
        px.flip_at(offset)
        # a peer timeout far beyond the bound below: waiting it out fails the test
        p = subprocess.run(argv, capture_output=True, text=True, timeout=50,
                           env=dict(os.environ, MIGRT_PEER_TIMEOUT="120"))
        assert px.flipped
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 4 and len(lines) == 1, p.stderr
        assert "source was resumed" in lines[0]
        assert migr.copies(nodes, cid) == {"a": "running", "b": None}
        n = ocitest.last_count(out)
        ocitest.wait_for(lambda: ocitest.last_count(out) > n + 2, what="source counting")
        print(f"\nDAMAGED RECORD at {offset}: {lines[0][:200]}")
        px.close()
    finally:
        nodes.cleanup()


def test_a_damaged_tls_record_is_a_protocol_error():
    """The precheck reply with one byte flipped: ssl.SSLError became `internal error`
    (exit 1); it is a ProtocolError, which migrate reports as a refusal (exit 3)."""
    secret = b"x" * 32
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    relay = socket.socket()
    relay.bind(("127.0.0.1", 0))
    relay.listen(1)
    flip = threading.Event()

    def serve():
        s, _ = lsock.accept()
        conn, hello = wire.accept(s, secret)
        conn.read_json()
        conn.send_json({"ok": True, "mid": "m-0123456789abcdef", "facts": "x" * 4000})
        time.sleep(1)
        conn.close()

    def pump(a, b, down):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                if down and flip.is_set():
                    data = bytearray(data)
                    data[len(data) // 2] ^= 0x01
                    flip.clear()
                b.sendall(bytes(data))
        except OSError:
            pass
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def relay_one():
        c, _ = relay.accept()
        t = socket.create_connection(lsock.getsockname())
        threading.Thread(target=pump, args=(c, t, False), daemon=True).start()
        threading.Thread(target=pump, args=(t, c, True), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    threading.Thread(target=relay_one, daemon=True).start()
    conn, _ = wire.connect("127.0.0.1:%d" % relay.getsockname()[1], secret, {"op": "control"})
    flip.set()
    conn.send_json({"op": "precheck"})
    with pytest.raises(wire.ProtocolError) as e:
        conn.read_json()
    assert "damaged" in str(e.value)
    conn.close()


def test_agent_needs_an_address_to_listen_on(migrt_launcher, tmp_path):
    secret = migr.write_secret(str(tmp_path / "secret"))
    env = {k: v for k, v in os.environ.items() if k != "MIGRT_LISTEN"}
    p = subprocess.run([migrt_launcher, "agent", "--secret-file", secret, "--staging",
                        str(tmp_path / "s"), "--disk", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=30, env=env)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and any("--listen" in ln for ln in lines), p.stderr
    assert not os.path.exists(tmp_path / "s")


def test_a_secret_file_of_another_user_is_refused(tmp_path):
    path = migr.write_secret(str(tmp_path / "secret"))
    assert wire.load_secret(path)
    os.chown(path, 65534, 65534)
    with pytest.raises(wire.ProtocolError) as e:
        wire.load_secret(path)
    assert "belongs to uid 65534" in str(e.value)
    os.chown(path, 0, 0)
    os.chmod(path, 0o640)
    with pytest.raises(wire.ProtocolError):
        wire.load_secret(path)


def test_what_a_migration_leaves_is_owner_only(tmp_path, migrt_launcher, make_bundle):
    """The restored container's stdout log, the agent's records, the restore's work dir:
    none readable by group or others (they were 0644 and 0755)."""
    nodes = migr.Nodes(migrt_launcher, tmp_path, make_bundle)
    try:
        ag = nodes.agent()
        cid, bundle, dest, out = nodes.counter()
        p, report = nodes.migrate(cid, dest, ag)
        assert p.returncode == 0, p.stderr + ag.log()
        ocitest.wait_for(lambda: os.path.exists(os.path.join(ag.logs, f"{cid}.log")),
                         what="container log")
        loose = []
        rec = json.load(open(os.path.join(nodes.b.root, cid, "migrt.json")))
        for top in (ag.logs, ag.staging, ag.disk, rec["work"]):
            for dirpath, dirnames, names in os.walk(top):
                for n in [dirpath] + [os.path.join(dirpath, x) for x in names]:
                    st = os.lstat(n)
                    if st.st_mode & 0o077 and not os.path.islink(n):
                        loose.append((n, oct(st.st_mode & 0o777)))
        assert loose == []
        # the destination bundle keeps what its owner wrote: no marker of the agent's
        spec = json.load(open(os.path.join(dest, "config.json")))
        assert not any(e.startswith("MIGRT_RESTORE_FROM=") for e in spec["process"]["env"])
        # and once deleted, nothing of its restore stays on the node
        nodes.b.run("kill", cid, "KILL")
        ocitest.wait_for(lambda: (nodes.b.state(cid) or {}).get("status") != "running")
        assert nodes.b.run("delete", "--force", cid).returncode == 0
        assert not os.path.exists(rec["work"])
    finally:
        nodes.cleanup()


def restore_work_dirs(root, cid):
    import glob
    import hashlib
    key = hashlib.sha1(f"{os.path.realpath(root)}\0{cid}".encode()).hexdigest()[:16]
    top = os.path.join(os.environ.get("MIGRT_STATE_DIR", "/run/migrt"), "work")
    return glob.glob(os.path.join(top, key)) + glob.glob(os.path.join(top, key + "-*"))


def test_one_id_migrated_there_back_and_there_again(tmp_path, migrt_launcher, make_bundle):
    """Issue 12/15: a restore's work dir was keyed by runc root and container id, reused,
    and never removed once the container left: the next restore of that id on that node
    found the last one's lazy-pages.socket (and connected to nothing) and its
    lazy-pages.status of 0 (a killed fill counted as finished). With a lazy-pages daemon
    that is slow to start, A -> B -> A -> B of one id: every restore gets a fresh work dir,
    and a node the container left keeps none."""
    real = shutil.which("criu")
    slow = tmp_path / "slow-criu"
    slow.write_text(f'#!/bin/sh\n[ "$1" = lazy-pages ] && sleep 1\nexec {real} "$@"\n')
    slow.chmod(0o755)
    nodes = migr.Nodes(migrt_launcher, tmp_path, make_bundle)
    try:
        slow_fill = {"MIGRT_CRIU": str(slow), "MIGRT_LOCAL_FILL_MIN": "0"}
        ag_b = nodes.agent(env=slow_fill)
        ag_a = migr.Agent(migrt_launcher, str(tmp_path), "a", nodes.a.root, nodes.secret_file,
                          env=slow_fill).start()
        nodes.agents.append(ag_a)
        cid, bundle, dest, out = nodes.counter()

        def migrate(src_root, to, dest_bundle, dest_root):
            argv = [migrt_launcher, "--root", src_root, "migrate", cid, "--to", to.address,
                    "--secret-file", nodes.secret_file, "--bundle", dest_bundle,
                    "--dest-root", dest_root, "--json"]
            p = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                               stdin=subprocess.DEVNULL)
            assert p.returncode == 0, p.stderr + to.log()
            return json.loads(p.stdout)

        migrate(nodes.a.root, ag_b, dest, nodes.b.root)
        out.thread.join(15)
        last = max(migr.wait_dest_counting(ag_b, cid, ocitest.last_count(out)))
        assert restore_work_dirs(nodes.a.root, cid) == []
        back = make_bundle(["sh", "-c", ocitest.COUNTER], name=cid + "-back")
        migrate(nodes.b.root, ag_a, back, nodes.a.root)
        last = max(migr.wait_dest_counting(ag_a, cid, last))
        assert restore_work_dirs(nodes.b.root, cid) == []      # it left B: nothing stays
        again = make_bundle(["sh", "-c", ocitest.COUNTER], name=cid + "-dst2")
        migrate(nodes.a.root, ag_b, again, nodes.b.root)
        migr.wait_dest_counting(ag_b, cid, last)
        assert restore_work_dirs(nodes.a.root, cid) == []
        assert len(restore_work_dirs(nodes.b.root, cid)) == 1  # the running copy's own
        assert migr.copies(nodes, cid) == {"a": None, "b": "running"}
    finally:
        nodes.cleanup()
