"""Fuzz the parsers a peer or a checkpoint author controls (hypothesis, bounded).

- the image manifest (migrt.image.manifest.parse): whatever bytes it is given, it
  either returns a manifest that satisfies the schema (no absolute or `..` paths) or
  raises CheckpointError; never anything else;
- the wire protocol (migrt.transfer.wire.Conn.read_frame / accept): whatever an
  unauthenticated or authenticated peer sends, the agent side gets a frame within the
  protocol's size limits or a ProtocolError, never another exception;
- the staging path check and chunk writer (migrt.transfer.receiver.Stage): no chunk
  header, however crafted, writes outside the staging dirs.

Each property has a fixed example budget (max_examples) and no per-example deadline,
so the whole file takes seconds; MIGRT_FUZZ_EXAMPLES raises the budget for a long run.
"""
import json
import os
import socket
import struct
import threading

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from migrt.errors import CheckpointError
from migrt.image import manifest as mf

EXAMPLES = int(os.environ.get("MIGRT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def good_manifest():
    return {
        "format": mf.FORMAT, "created": "2026-01-01T00:00:00Z",
        "container": {"id": "c1", "bundle": "/b", "pid": 1, "status": "running"},
        "node": {"arch": "x86_64", "kernel": "6.18", "cpu_flags": ["sse2"]},
        "criu_flags": [], "chunk_size": 1 << 20,
        "files": [{"path": "pages-1.img", "size": 5, "xxh3": "0" * 32, "chunks": ["0" * 16]},
                  {"path": "migrt/rootfs/data/x", "size": 0, "xxh3": "1" * 32, "chunks": []}],
        "rootfs": {"kind": "since-start", "entries": [
            {"path": "data/x", "type": "file", "mode": 0o644, "uid": 0, "gid": 0, "mtime": 1}],
            "deleted": [], "listings": {}},
    }


def check_parse(data):
    try:
        m = mf.parse(data)
    except CheckpointError as e:
        assert str(e).startswith(mf.MANIFEST)
        return None
    assert isinstance(m, dict) and m["format"] == mf.FORMAT
    for e in m["files"] + m["rootfs"].get("entries", []):
        p = e["path"]
        assert not p.startswith("/") and ".." not in p.split("/"), p
    return m


def test_good_manifest_is_accepted():
    assert check_parse(json.dumps(good_manifest())) is not None


@FUZZ
@given(st.binary(max_size=4096))
@example(b"[" * 100000)
@example(b'{"a":' * 5000)
@example(b"\xff\xfe{}")
def test_manifest_parse_random_bytes(data):
    check_parse(data)


PATHS = st.sampled_from(["../etc/passwd", "/etc/shadow", "a/../../b", "..", "a/..", "ok.img",
                         "migrt/rootfs/../../x", "", "a//b", "x\0y"])
JSONV = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                     | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                          max_size=4),
                     max_leaves=20)


@FUZZ
@given(st.data())
def test_manifest_parse_mutated(data):
    """Structure-aware: take a valid manifest and replace, delete or retype one field."""
    m = good_manifest()
    node = m
    path = []
    for _ in range(data.draw(st.integers(1, 4))):
        if isinstance(node, dict) and node:
            k = data.draw(st.sampled_from(sorted(node)))
        elif isinstance(node, list) and node:
            k = data.draw(st.integers(0, len(node) - 1))
        else:
            break
        path.append((node, k))
        node = node[k]
    parent, key = path[-1]
    action = data.draw(st.sampled_from(["replace", "delete", "path"]))
    if action == "delete" and isinstance(parent, dict):
        del parent[key]
    elif action == "path":
        parent[key] = data.draw(PATHS)
    else:
        parent[key] = data.draw(JSONV)
    check_parse(json.dumps(m))


@FUZZ
@given(st.binary(min_size=1, max_size=64), st.integers(0, 4000))
def test_manifest_parse_bitflips(flip, pos):
    raw = bytearray(json.dumps(good_manifest()).encode())
    for i, b in enumerate(flip):
        raw[(pos + i * 7) % len(raw)] ^= b or 1
    check_parse(bytes(raw))


# ---------------------------------------------------------------- wire protocol

wire = pytest.importorskip("migrt.transfer.wire")


def feed(data, fn):
    """Run fn(conn) on one end of a socketpair while `data` is written to the other."""
    a, b = socket.socketpair()
    a.settimeout(10)

    def writer():
        try:
            b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    conn = wire.Conn(a)
    try:
        return fn(conn)
    finally:
        conn.close()
        b.close()
        t.join(10)


def frame(kind, payload):
    return struct.pack(">cI", kind, len(payload)) + payload


def data_frame(head, body):
    h = json.dumps(head).encode() if isinstance(head, dict) else head
    return frame(b"D", struct.pack(">H", len(h)) + h + body)


def read_all_frames(conn):
    got = []
    while True:
        try:
            kind, payload = conn.read_frame()
        except wire.ProtocolError:
            return got
        assert kind in (b"J", b"D")
        if kind == b"J":
            assert isinstance(payload, dict)
        else:
            head, body = payload
            assert isinstance(head, dict) and len(body) <= wire.MAX_DATA
        got.append(kind)


FRAMES = st.one_of(
    st.builds(lambda p: frame(b"J", p), st.binary(max_size=200)),
    st.builds(lambda d: frame(b"J", json.dumps(d).encode()), JSONV),
    st.builds(data_frame, st.dictionaries(st.text(max_size=4), JSONV, max_size=4),
              st.binary(max_size=100)),
    st.builds(data_frame, st.binary(max_size=40), st.binary(max_size=40)),
    st.builds(lambda k, n: struct.pack(">cI", k, n), st.binary(min_size=1, max_size=1),
              st.integers(0, 2**32 - 1)),
    st.binary(max_size=64),
)


@FUZZ
@given(st.lists(FRAMES, max_size=6))
@example([frame(b"J", b"[" * 100000)])
@example([data_frame(b"[" * 60000, b"")])
@example([struct.pack(">cI", b"J", 2**32 - 1)])
@example([struct.pack(">cI", b"D", 1) + b"x"])
def test_wire_read_frame_never_crashes(frames):
    feed(b"".join(frames), read_all_frames)


@FUZZ
@given(st.lists(FRAMES, max_size=3))
@example([frame(b"J", b"[" * 4000)])
@example([frame(b"J", json.dumps({"proto": wire.PROTOCOL, "nonce": "x"}).encode()),
          frame(b"J", json.dumps({"mac": "00" * 32}).encode())])
def test_wire_handshake_refuses_garbage(frames):
    """The server side of the handshake, fed by a peer without the secret."""
    a, b = socket.socketpair()

    def writer():
        try:
            b.sendall(b"".join(frames))
            b.shutdown(socket.SHUT_WR)
            while b.recv(65536):
                pass
        except OSError:
            pass
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        with pytest.raises((wire.ProtocolError, OSError)):
            wire.accept(a, b"s" * 32, timeout=5)
    finally:
        a.close()
        t.join(10)
        b.close()


# ---------------------------------------------------------------- staging writes

receiver = pytest.importorskip("migrt.transfer.receiver")


@FUZZ
@given(p=st.one_of(PATHS, st.text(max_size=30)),
       o=st.one_of(st.integers(-5, 1 << 40), st.text(max_size=3), st.none()),
       n=st.one_of(st.integers(-5, 1 << 30), st.none()), z=st.sampled_from([0, 1, "x", None]),
       body=st.binary(max_size=64))
def test_stage_write_stays_inside(tmp_path_factory, p, o, n, z, body):
    import xxhash
    import zstandard
    top = tmp_path_factory.mktemp("stage")
    img, rfs = str(top / "img"), str(top / "disk")
    s = receiver.Stage(img, rfs, quota=1 << 20)
    head = {"p": p, "o": o, "n": n if n is not None else len(body),
            "h": xxhash.xxh3_64_hexdigest(body), "z": z}
    try:
        s.write(head, body, zstandard.ZstdDecompressor())
    except receiver.StageError:
        pass
    finally:
        s.close()
    for dirpath, dirs, files in os.walk(str(top)):
        for f in files + dirs:
            full = os.path.realpath(os.path.join(dirpath, f))
            assert full.startswith((img + "/", rfs + "/")) or full in (img, rfs), full
    assert s.written <= 1 << 20
