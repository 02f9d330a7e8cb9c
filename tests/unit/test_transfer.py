"""Sender -> receiver over real loopback TCP: chunks, zstd, xxhash, delta rounds, refusals."""
import json
import os
import socket
import threading

import pytest
import zstandard

from migrt.image import digest, manifest as mf
from migrt.transfer import receiver, sender as snd, wire

SECRET = b"unit-test-secret-0123456789abcdef"


class MiniAgent:
    """Just the data side of the agent: authenticated connections into one Stage."""

    def __init__(self, stage):
        self.stage = stage
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(s,), daemon=True).start()

    def _conn(self, s):
        try:
            c, hello = wire.accept(s, SECRET)
        except (wire.ProtocolError, OSError):
            return
        d = zstandard.ZstdDecompressor()
        try:
            while True:
                kind, payload = c.read_frame()
                if kind == b"J":
                    c.send_json({"error": self.stage.error} if self.stage.error else {"ok": True})
                    return
                try:
                    self.stage.write(payload[0], payload[1], d)
                except receiver.StageError as e:
                    self.stage.fail(str(e))
                    c.send_json({"error": str(e)})
                    return
        except (wire.ProtocolError, OSError):
            pass
        finally:
            c.close()


def manifest(files):
    return {"format": mf.FORMAT, "created": mf.now(), "container": {"id": "c"},
            "node": {"arch": "x86_64", "kernel": "k"}, "chunk_size": digest.CHUNK,
            "files": snd.manifest_files(files), "rootfs": {"kind": "none"}}


def tree(tmp_path, name, files):
    d = tmp_path / name
    for rel, data in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return str(d)


def test_full_then_delta_round(tmp_path):
    stage = receiver.Stage(str(tmp_path / "st" / "image"), str(tmp_path / "st" / "rootfs"))
    agent = MiniAgent(stage)
    pages = bytearray(os.urandom(3 * digest.CHUNK + 5000))
    r1 = tree(tmp_path, "r1", {"pages-1.img": bytes(pages), "core-1.img": b"core",
                               "gone.img": b"x", "migrt/rootfs/files/data/log": b"1\n"})
    s1 = snd.Sender(agent.address, SECRET, "m-0123456789abcdef", streams=3, level=1)
    files = s1.send(r1, lambda: True)
    stage.finish(manifest(files))
    assert (tmp_path / "st" / "image" / "pages-1.img").read_bytes() == bytes(pages)
    assert (tmp_path / "st" / "rootfs" / "files" / "data" / "log").read_bytes() == b"1\n"
    # round 2: two blocks changed, the file grew, one file vanished, one appeared
    pages[100] ^= 1
    pages[2 * digest.CHUNK + 70000] ^= 1
    pages += b"tail" * 1000
    r2 = tree(tmp_path, "r2", {"pages-1.img": bytes(pages), "core-1.img": b"core",
                               "new.img": b"new", "migrt/rootfs/files/data/log": b"1\n2\n"})
    s2 = snd.Sender(agent.address, SECRET, "m-0123456789abcdef", streams=2, level=3)
    files2 = s2.send(r2, lambda: True, base=s1.blocks)
    assert s2.stats.sent_raw < 4 * snd.BLOCK + 10000   # only the changed blocks travelled
    stage.finish(manifest(files2))
    img = tmp_path / "st" / "image"
    assert (img / "pages-1.img").read_bytes() == bytes(pages)
    assert (img / "new.img").read_bytes() == b"new"
    assert not (img / "gone.img").exists()
    assert (tmp_path / "st" / "rootfs" / "files" / "data" / "log").read_bytes() == b"1\n2\n"


def test_pages_through_fifos(tmp_path):
    """A writer standing in for CRIU opens some of the FIFOs made for it, as CRIU opens
    page files: one with pages (not a whole number of chunks), one left empty. Both
    arrive with their digests; the FIFOs it never opened are neither sent nor left."""
    stage = receiver.Stage(str(tmp_path / "st" / "image"), str(tmp_path / "st" / "rootfs"))
    agent = MiniAgent(stage)
    src = tmp_path / "src"
    src.mkdir()
    pipes = snd.PagePipes(str(src), 5, digest.CHUNK)
    pages = os.urandom(2 * digest.CHUNK + 12345)
    done = threading.Event()

    def criu():
        with open(src / "pages-1.img", "wb") as f:    # blocks until read: write in pieces
            for off in range(0, len(pages), 300000):
                f.write(pages[off:off + 300000])
        open(src / "pages-2.img", "wb").close()
        (src / "pages-9.img").write_bytes(pages[:5000])   # beyond the FIFOs: a plain file
        (src / "core-1.img").write_bytes(b"core")
        done.set()
        pipes.wake()

    threading.Thread(target=criu, daemon=True).start()
    s = snd.Sender(agent.address, SECRET, "m-0123456789abcdef", streams=2, level=0)
    files = s.send(str(src), done.is_set, pipes=pipes, wake=done)
    assert sorted(files) == ["core-1.img", "pages-1.img", "pages-2.img", "pages-9.img"]
    assert files["pages-1.img"][0] == len(pages)
    assert files["pages-1.img"][1] == digest.file_digests(str(tree(
        tmp_path, "cmp", {"p": pages}) + "/p"))[2]
    assert sorted(os.listdir(src)) == ["core-1.img", "pages-9.img"]   # no FIFO left
    stage.finish(manifest(files))
    img = tmp_path / "st" / "image"
    assert (img / "pages-1.img").read_bytes() == pages
    assert (img / "pages-2.img").read_bytes() == b""
    assert (img / "pages-9.img").read_bytes() == pages[:5000]


def test_complete_parts_travel_before_the_writer_is_done(tmp_path):
    """What early() names as complete (migrate: the spec and rootfs changes, taken while
    CRIU still dumps) is sent at once: here the writer only finishes once the rootfs
    file has reached the destination, so sending it only at the end never finishes."""
    stage = receiver.Stage(str(tmp_path / "st" / "image"), str(tmp_path / "st" / "rootfs"))
    agent = MiniAgent(stage)
    big = os.urandom(digest.CHUNK * 2 + 777)
    src = tree(tmp_path, "src", {"migrt/rootfs/files/data/big": big, "core-1.img": b"c"})
    arrived = tmp_path / "st" / "rootfs" / "files" / "data" / "big"

    def finished():
        return arrived.exists() and arrived.stat().st_size == len(big)

    s = snd.Sender(agent.address, SECRET, "m-0123456789abcdef", streams=2, level=0)
    out = []
    t = threading.Thread(target=lambda: out.append(
        s.send(src, finished, early=lambda: ("migrt/",))), daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive() and out, "the complete part waited for the end of the dump"
    stage.finish(manifest(out[0]))
    assert arrived.read_bytes() == big
    assert (tmp_path / "st" / "image" / "core-1.img").read_bytes() == b"c"


def test_fifo_writer_is_drained_after_a_failure(tmp_path):
    """The transfer fails (the agent refuses the first chunk): CRIU must still be able
    to write all of its pages and finish, or it would hold the container frozen."""
    stage = receiver.Stage(str(tmp_path / "i"), str(tmp_path / "r"), quota=1000)
    agent = MiniAgent(stage)
    src = tmp_path / "src"
    src.mkdir()
    pipes = snd.PagePipes(str(src), 2, digest.CHUNK)
    done = threading.Event()
    wrote = []

    def criu():
        with open(src / "pages-1.img", "wb") as f:
            for _ in range(40):
                f.write(b"x" * digest.CHUNK)
        wrote.append(True)
        done.set()
        pipes.wake()

    threading.Thread(target=criu, daemon=True).start()
    s = snd.Sender(agent.address, SECRET, "m-0123456789abcdef", streams=2, level=0)
    out = []

    def send():
        try:
            s.send(str(src), done.is_set, pipes=pipes, wake=done)
        except snd.TransferError as e:
            out.append(str(e))

    t = threading.Thread(target=send, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "send() never returned: the writer was left blocked"
    assert wrote and out and "quota" in out[0], out
    assert os.listdir(src) == []


def test_damaged_chunk_is_refused(tmp_path):
    stage = receiver.Stage(str(tmp_path / "i"), str(tmp_path / "r"))
    data = os.urandom(5000)
    head = {"p": "pages-1.img", "o": 0, "n": len(data), "h": digest.chunk_digest(data), "z": 0,
            "c": 0}
    bad = bytearray(data)
    bad[10] ^= 1
    with pytest.raises(receiver.StageError, match="pages-1.img: chunk at offset 0 arrived damaged"):
        stage.write(head, bytes(bad), zstandard.ZstdDecompressor())
    z = zstandard.ZstdCompressor().compress(data)
    with pytest.raises(receiver.StageError, match="does not decompress|damaged"):
        stage.write(dict(head, z=1), z[:-3] + b"xyz", zstandard.ZstdDecompressor())


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "a/../../b", "a//b", "./a", ""])
def test_paths_escaping_staging_are_refused(tmp_path, rel):
    stage = receiver.Stage(str(tmp_path / "i"), str(tmp_path / "r"))
    with pytest.raises(receiver.StageError, match="refusing path"):
        stage.write({"p": rel, "o": 0, "n": 1, "h": digest.chunk_digest(b"x"), "z": 0}, b"x",
                    zstandard.ZstdDecompressor())


def test_quota(tmp_path):
    stage = receiver.Stage(str(tmp_path / "i"), str(tmp_path / "r"), quota=1000)
    data = b"y" * 800
    head = {"p": "a.img", "o": 0, "n": 800, "h": digest.chunk_digest(data), "z": 0}
    stage.write(head, data, None)
    with pytest.raises(receiver.StageError, match="no room on the destination"):
        stage.write(dict(head, o=800), data, None)


def test_manifest_mismatch_names_file(tmp_path):
    stage = receiver.Stage(str(tmp_path / "st" / "i"), str(tmp_path / "st" / "r"))
    agent = MiniAgent(stage)
    r = tree(tmp_path, "r", {"core-1.img": b"abc", "pages-1.img": b"p" * 10})
    files = snd.Sender(agent.address, SECRET, "m-0123456789abcdef", streams=1).send(r, lambda: True)
    files["pages-1.img"] = (10, [digest.chunk_digest(b"q" * 10)])
    with pytest.raises(receiver.StageError, match="pages-1.img: chunk 0 does not match"):
        stage.finish(manifest(files))


def test_wrong_secret(tmp_path):
    stage = receiver.Stage(str(tmp_path / "i"), str(tmp_path / "r"))
    agent = MiniAgent(stage)
    with pytest.raises(wire.AuthError):
        wire.connect(agent.address, b"another-secret-entirely-0000000", {"op": "data"})
    assert not os.listdir(tmp_path / "i")


# ---------------------------------------------------------------- sealed records

def sealed_pair():
    a, b = socket.socketpair()
    k1, k2 = os.urandom(32), os.urandom(32)
    return wire._Sealed(a, k1, k2), wire._Sealed(b, k2, k1), a, b


def raw_records(n_records, payloads):
    """What a sealed sender puts on the wire for these payloads, record by record."""
    a, b = socket.socketpair()
    k = os.urandom(32)
    s = wire._Sealed(a, k, os.urandom(32))
    out = []
    for p in payloads:
        s.sendall(p)
        hdr = b.recv(wire._Sealed.HEAD, socket.MSG_WAITALL)
        body = b.recv(len(p) + 16, socket.MSG_WAITALL)
        out.append(hdr + body)
    a.close()
    b.close()
    return k, out


def receiver_for(key, wire_bytes):
    a, b = socket.socketpair()
    a.sendall(wire_bytes)
    a.close()
    return wire._Sealed(b, os.urandom(32), key)


def test_sealed_records_round_trip_both_ways():
    x, y, a, b = sealed_pair()
    big = bytes(range(256)) * 4096

    def send():
        x.sendall(b"hello")
        x.sendall(big)
    t = threading.Thread(target=send)
    t.start()
    assert y.read(5) == b"hello"
    assert bytes(y.read_view(1 << 20)) == big
    t.join()
    y.sendall(b"back")
    assert x.read(4) == b"back"
    a.close()
    b.close()


def test_chunk_views_survive_the_next_record():
    """Chunk records are decrypted into buffers the connection keeps: the view of one
    chunk must still hold its bytes while the next chunk is read (the agent writes a
    chunk out before reading on, but must never see it overwritten early)."""
    x, y, a, b = sealed_pair()
    chunks = [os.urandom(1 << 20) for _ in range(4)] + [os.urandom(3 << 20)]
    t = threading.Thread(target=lambda: [x.sendall(c) for c in chunks], daemon=True)
    t.start()
    prev = None
    for i, c in enumerate(chunks):
        v = y.read_view(len(c))
        assert bytes(v) == c
        if prev is not None:
            assert bytes(prev) == chunks[i - 1]
        prev = v
    t.join(10)
    a.close()
    b.close()


@pytest.mark.parametrize("damage", ["flip", "flip-length", "reorder", "replay", "drop"])
def test_sealed_records_refuse_what_was_tampered_with(damage):
    key, recs = raw_records(3, [b"one", b"two", b"three"])
    if damage in ("flip", "flip-length"):
        r = bytearray(recs[1])
        r[0 if damage == "flip-length" else 22] ^= 1
        stream = recs[0] + bytes(r) + recs[2]
    elif damage == "reorder":
        stream = recs[0] + recs[2] + recs[1]
    elif damage == "replay":
        stream = recs[0] + recs[0] + recs[1]
    else:
        stream = recs[0] + recs[2]
    y = receiver_for(key, stream)
    assert y.read(3) == b"one"
    with pytest.raises(wire.ProtocolError, match="failed its check"):
        y.read(3)


def test_sealed_records_refuse_another_key():
    key, recs = raw_records(1, [b"secret memory"])
    y = receiver_for(os.urandom(32), recs[0])
    with pytest.raises(wire.ProtocolError, match="failed its check"):
        y.read(13)


def test_data_connection_leaves_tls_for_sealed_records(tmp_path):
    """After the handshake a data connection carries no TLS records: what the agent
    reads is sealed, and what passes through the kernel is not plaintext."""
    stage = receiver.Stage(str(tmp_path / "st" / "image"), str(tmp_path / "st" / "rootfs"))
    agent = MiniAgent(stage)
    c, _ = wire.connect(agent.address, SECRET, {"op": "data", "mid": "m-0123456789abcdef"})
    assert isinstance(c.rfile, wire._Sealed)
    assert getattr(c.sock, "_sslobj", None) is None
    c.send_json({"op": "eof"})
    assert c.read_json() == {"ok": True}
    c.close()


def test_a_stream_failing_early_does_not_leave_send_waiting(tmp_path):
    """The destination refuses the first chunk (quota) while many more are queued: the
    sender must come back with the reason, not wait forever on a full job queue."""
    stage = receiver.Stage(str(tmp_path / "st" / "image"), str(tmp_path / "st" / "rootfs"),
                           quota=1)
    agent = MiniAgent(stage)
    r = tree(tmp_path, "r", {"pages-1.img": b"\1" * (40 * digest.CHUNK)})
    s = snd.Sender(agent.address, SECRET, "m-0123456789abcdef", streams=1, level=0)
    result = {}

    def run():
        try:
            s.send(r, lambda: True)
        except snd.TransferError as e:
            result["error"] = str(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "send() still waiting after its only stream failed"
    assert "quota" in result.get("error", ""), result


def test_an_unexpected_error_in_a_stream_is_the_transfers_error(tmp_path, monkeypatch):
    """Whatever a stream's worker runs into ends the transfer with that error, named: it
    once died with its traceback on stderr, and send() then failed on the digests it
    never recorded ("failed during transfer: KeyError: 0")."""
    stage = receiver.Stage(str(tmp_path / "st" / "i"), str(tmp_path / "st" / "r"))
    agent = MiniAgent(stage)
    r = tree(tmp_path, "r", {"core-1.img": b"abc", "pages-1.img": b"p" * 10})

    def broken(self, head, data):
        raise NotImplementedError("sendmsg not allowed here")
    monkeypatch.setattr(snd.wire.Conn, "send_data", broken)
    s = snd.Sender(agent.address, SECRET, "m-0123456789abcdef", streams=2, level=0)
    with pytest.raises(snd.TransferError, match="NotImplementedError: sendmsg not allowed"):
        s.send(r, lambda: True)


def test_migrate_unwinds_on_signals_but_respects_nohup(monkeypatch):
    """SIGTERM and SIGHUP unwind a migration like Ctrl-C (migrt.migration.migrate), except
    a signal the caller ignores: under nohup a closed terminal must not stop it."""
    import signal
    import types
    from migrt.migration import migrate as mig
    seen = {}

    class Fake:
        def __init__(self, *a):
            pass

        def run(self):
            seen.update(hup=signal.getsignal(signal.SIGHUP), term=signal.getsignal(signal.SIGTERM))
            return {}
    monkeypatch.setattr(mig, "Migration", Fake)
    monkeypatch.setattr(mig.recovery, "resolve_pending", lambda *a: None)
    old_term = signal.getsignal(signal.SIGTERM)
    old_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        mig.migrate("/root", "c", types.SimpleNamespace(secret=b"s"))
        assert seen["hup"] is signal.SIG_IGN
        assert seen["term"] is mig._interrupt
        assert signal.getsignal(signal.SIGTERM) is old_term       # put back afterwards
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        mig.migrate("/root", "c", types.SimpleNamespace(secret=b"s"))
        assert seen["hup"] is mig._interrupt
    finally:
        signal.signal(signal.SIGHUP, old_hup)


def test_delta_chunk_checked_as_its_last_patch_lands(tmp_path):
    """A delta's last patch of a chunk (marked "e") has the agent hash that chunk at
    once, so the commit does not read it back; a patch of it written afterwards sends
    it back to the commit's check, and a wrong result still fails there."""
    stage = receiver.Stage(str(tmp_path / "i"), str(tmp_path / "r"))
    d = zstandard.ZstdDecompressor()
    base = os.urandom(digest.CHUNK)
    stage.write({"p": "pages-1.img", "o": 0, "n": len(base), "h": digest.chunk_digest(base),
                 "z": 0, "c": 0}, base, d)
    new = bytearray(base)
    new[10:20] = b"x" * 10

    def patch(off, data, **kw):
        stage.write(dict({"p": "pages-1.img", "o": off, "n": len(data),
                          "h": digest.chunk_digest(data), "z": 0}, **kw), data, d)
    patch(0, bytes(new[:100]), e=0)
    assert 0 not in stage.touched["pages-1.img"]
    assert stage.known["pages-1.img"][0] == digest.chunk_digest(bytes(new))
    new[5000] ^= 1
    patch(5000, bytes(new[5000:5001]))                  # a patch after the "last" one
    assert 0 in stage.touched["pages-1.img"]
    files = {"pages-1.img": (len(new), [digest.chunk_digest(bytes(new))])}
    stage.finish(manifest(files))                       # re-hashed at the commit: good
    assert (tmp_path / "i" / "pages-1.img").read_bytes() == bytes(new)
    with pytest.raises(receiver.StageError, match="chunk 0 does not match"):
        patch(0, bytes([new[0] ^ 0xff]), e=0)     # (a fixed byte would match 1 time in 256)
        stage.finish(manifest(files))


def test_full_disk_said_even_when_criu_logged_half_of_it(tmp_path, monkeypatch):
    """A dump on a full disk: CRIU's log, on the same disk, may hold only the start of
    its ENOSPC line. migrate still says "No space left on device" for the dump's path
    (from the filesystem's free space), and only once when CRIU's line is whole."""
    from migrt.migration import migrate as mig

    class Full:
        f_bavail, f_frsize = 3, 4096
    monkeypatch.setattr(mig.os, "statvfs", lambda p: Full())
    cut = ["Error (criu/bfd.c:131): bfd: Error flushing image: No space left on devi"]
    said = mig._full_disk(str(tmp_path), cut)
    assert said == f"; {tmp_path}: No space left on device (its filesystem is full)"
    whole = ["Error (criu/bfd.c:131): bfd: Error flushing image: No space left on device"]
    assert mig._full_disk(str(tmp_path), whole) == ""
