"""Framing and authentication between `migrt migrate` and `migrt agent`.

A frame is one type byte, a 4-byte big-endian length and the payload: `J` frames carry
a JSON object, `D` frames a data chunk (a 2-byte header length, a JSON header and the
zstd-compressed bytes). Every connection is TLS 1.3 keyed by the shared secret
(migrt.crypto: authenticated and encrypted, fresh keys per connection); inside it,
before anything else both ends prove they hold the shared secret
with an HMAC over each other's random nonce; a peer that fails gets one error frame and
the connection is closed before it can send a single byte of data.

Data connections then leave TLS for sealed records: TLS cuts a stream into 16 KiB
records, and Python's per-record handling doubled the CPU a migration spends per byte
(tests/bench/bench_transfer.py). So inside the authenticated TLS session the client
sends two fresh random 256-bit keys (one per direction); both ends close TLS
(close_notify) and go on over the same TCP connection with one AES-256-GCM record per
write: the record's length sealed on its own (so that a damaged length fails at once),
then the sealed body; nonces are a per-direction record counter. A record that was
altered, dropped, replayed or reordered fails its tag. The keys never leave the TLS session, which also keeps its
forward secrecy.
"""
import errno
import hashlib
import hmac
import json
import os
import socket
import ssl
import struct
import time

from migrt import crypto

PROTOCOL = "migrt/2"
MAX_JSON = 32 << 20
MAX_DATA = 80 << 20
HELLO_MAX = 4096
_HDR = struct.Struct(">cI")


class ProtocolError(Exception):
    """The peer broke the protocol, closed the connection, or refused us."""


class AuthError(ProtocolError):
    """The peer does not hold the shared secret (or we do not hold theirs)."""


def load_secret(path=None, value=None):
    if value:
        return value.encode() if isinstance(value, str) else value
    path = path or os.environ.get("MIGRT_SECRET_FILE")
    if path:
        import stat
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ProtocolError(f"secret file {path} is not a regular file")
            if st.st_uid not in (0, os.geteuid()):
                raise ProtocolError(f"secret file {path} belongs to uid {st.st_uid}, not to "
                                    f"this user or root (anyone who owns it can change it)")
            if st.st_mode & 0o077:
                raise ProtocolError(f"secret file {path} is readable by others (chmod 600 it)")
            s = f.read(1 << 16).strip()
        if len(s) < 16:
            raise ProtocolError(f"secret file {path}: the secret must be at least 16 bytes")
        return s
    env = os.environ.get("MIGRT_SECRET")
    if env:
        return env.encode()
    raise ProtocolError("no shared secret: use --secret-file (or MIGRT_SECRET_FILE)")


SEAL_MAX = MAX_DATA + (1 << 16)
# records of these sizes (data chunks) go through buffers kept per connection
REUSE_MIN, REUSE_MAX = 64 << 10, 8 << 20


class _Sealed:
    """A plain TCP socket carrying AES-256-GCM records (see the module's doc)."""

    def __init__(self, sock, send_key, recv_key):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        self.sock = sock
        self._enc, self._dec = AESGCM(send_key), AESGCM(recv_key)
        self._sent = self._got = 0
        self._plain = memoryview(b"")
        # Buffers kept across records (chunk-sized records come one after another):
        # fresh 1 MiB buffers per record cost zeroing and page faults on both ends.
        self._bufs = {}
        self._turn = 0

    # Each record: its length sealed on its own (4 bytes + tag), then the body sealed with
    # that header as associated data. A damaged length fails at once instead of leaving
    # the reader waiting for bytes that will never come. Nonces: a direction's record
    # counter, 0x01-prefixed for the header and 0x00-prefixed for the body.
    HEAD = 4 + 16

    def _buf(self, key, n):
        """A view of exactly n bytes over the buffer kept under key (grown if short)."""
        b = self._bufs.get(key)
        if b is None or len(b) < n:
            b = self._bufs[key] = bytearray(n)
        return memoryview(b)[:n]

    def sendall(self, data):
        ctr = self._sent.to_bytes(11, "big")
        self._sent += 1
        n = len(data) + 16
        if REUSE_MIN <= n <= REUSE_MAX:
            body = self._buf("send", n)
            self._enc.encrypt_into(b"\0" + ctr, data, None, body)
        else:
            body = self._enc.encrypt(b"\0" + ctr, data, None)
        head = self._enc.encrypt(b"\1" + ctr, struct.pack(">I", len(body)), None)
        self.sock.sendall(head)
        self.sock.sendall(body)

    def _recv_exact(self, buf):
        mv, got = memoryview(buf), 0
        while got < len(buf):
            n = self.sock.recv_into(mv[got:])
            if not n:
                return False
            got += n
        return True

    def _record(self):
        from cryptography.exceptions import InvalidTag
        head = bytearray(self.HEAD)
        if not self._recv_exact(head):
            return False
        ctr = self._got.to_bytes(11, "big")
        try:
            (n,) = struct.unpack(">I", self._dec.decrypt(b"\1" + ctr, head, None))
        except InvalidTag:
            raise ProtocolError("a sealed record failed its check (altered, replayed or "
                                "out of order)")
        if n < 16 or n > SEAL_MAX:
            raise ProtocolError(f"sealed record of bad size ({n} bytes)")
        reuse = REUSE_MIN <= n <= REUSE_MAX
        body = self._buf("recv", n) if reuse else bytearray(n)
        if not self._recv_exact(body):
            return False
        try:
            if reuse:
                # two plaintext buffers in turn: a view handed out by read_view stays
                # good while the next record is read
                self._turn ^= 1
                plain = self._buf(self._turn, n - 16)
                self._dec.decrypt_into(b"\0" + ctr, body, None, plain)
                self._plain = plain
            else:
                self._plain = memoryview(self._dec.decrypt(b"\0" + ctr, body, None))
        except InvalidTag:
            raise ProtocolError("a sealed record failed its check (altered, replayed or "
                                "out of order)")
        self._got += 1
        return True

    def readinto(self, buf):
        """Fill buf entirely; returns how many bytes (fewer only at end of stream)."""
        mv, got = memoryview(buf), 0
        while got < len(mv):
            if not self._plain:
                if not self._record():
                    break
            n = min(len(self._plain), len(mv) - got)
            mv[got:got + n] = self._plain[:n]
            self._plain = self._plain[n:]
            got += n
        return got

    def read(self, n):
        b = bytearray(n)
        return bytes(b[:self.readinto(b)])

    def read_view(self, n):
        if not self._plain and not self._record():
            return memoryview(b"")
        if len(self._plain) == n:
            v, self._plain = self._plain, memoryview(b"")
            return v
        b = bytearray(n)
        return memoryview(b)[:self.readinto(b)]

    def close(self):
        pass


LINGER_BYTES = 64 << 20


class Conn:
    """A socket with frame helpers."""

    linger = 0.0        # seconds close() drains first (set where a refusal was sent)

    def __init__(self, sock):
        self.sock = sock
        self.rfile = sock.makefile("rb", buffering=1 << 20)
        self._out = sock

    def seal(self, send_key, recv_key):
        """Leave TLS for sealed records (both ends at the same point of the protocol)."""
        self.rfile.close()
        raw = self.sock.unwrap()
        self.sock = raw
        self.rfile = self._out = _Sealed(raw, send_key, recv_key)

    def _read_exact(self, n):
        try:
            b = self.rfile.read(n)
        except ssl.SSLError as e:
            raise ProtocolError(_damaged(e))
        if b is None or len(b) != n:
            raise ProtocolError("connection closed by peer")
        return b

    def _read_view(self, n):
        """n bytes as a memoryview, read straight into place (a sealed record that is
        exactly the chunk is not copied at all). The view may be over a buffer the
        connection reuses: use it before reading the frame after next."""
        view = getattr(self.rfile, "read_view", None)
        try:
            if view is not None:
                v = view(n)
            else:
                buf = bytearray(n)
                v = memoryview(buf)[:self.rfile.readinto(buf)]
        except ssl.SSLError as e:
            raise ProtocolError(_damaged(e))
        if len(v) != n:
            raise ProtocolError("connection closed by peer")
        return v

    def read_frame(self, max_json=MAX_JSON):
        kind, n = _HDR.unpack(self._read_exact(_HDR.size))
        if kind == b"J":
            if n > max_json:
                raise ProtocolError(f"control message too large ({n} bytes)")
            try:
                msg = json.loads(self._read_exact(n))
            except (ValueError, RecursionError):
                raise ProtocolError("malformed control message")
            if not isinstance(msg, dict):
                raise ProtocolError("malformed control message")
            return kind, msg
        if kind == b"D":
            if n > MAX_DATA or n < 2:
                raise ProtocolError(f"data frame of bad size ({n} bytes)")
            (hl,) = struct.unpack(">H", self._read_exact(2))
            if hl > n - 2:
                raise ProtocolError("malformed data header")
            try:
                head = json.loads(self._read_exact(hl))
            except (ValueError, RecursionError):
                raise ProtocolError("malformed data header")
            if not isinstance(head, dict):
                raise ProtocolError("malformed data header")
            return kind, (head, self._read_view(n - 2 - hl))
        raise ProtocolError(f"unknown frame type {kind!r}")

    def read_json(self, max_json=MAX_JSON):
        kind, msg = self.read_frame(max_json)
        if kind != b"J":
            raise ProtocolError("expected a control message")
        if msg.get("error"):
            raise ProtocolError(msg["error"])
        return msg

    def send_json(self, msg):
        b = json.dumps(msg, separators=(",", ":")).encode()
        self._out.sendall(_HDR.pack(b"J", len(b)) + b)

    def send_data(self, head, data):
        h = json.dumps(head, separators=(",", ":")).encode()
        n = 2 + len(h) + len(data)
        self._out.sendall(_HDR.pack(b"D", n) + struct.pack(">H", len(h)) + h)
        self._out.sendall(data)

    def _drain(self, seconds):
        try:
            self.sock.shutdown(socket.SHUT_WR)
            end = time.monotonic() + seconds
            budget = LINGER_BYTES
            buf = bytearray(1 << 20)
            while budget > 0:
                left = end - time.monotonic()
                if left <= 0:
                    return
                self.sock.settimeout(left)
                n = self.sock.recv_into(buf)
                if not n:
                    return
                budget -= n
        except (OSError, ValueError):
            return

    def close(self, linger=0.0):
        """Close. With linger, first drain what the peer is still sending (for at most
        linger seconds and LINGER_BYTES): a reply sent just before closing on unread
        input is otherwise lost to the TCP reset the close triggers."""
        if linger:
            self._drain(linger)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.rfile.close()
        except OSError:
            pass
        self.sock.close()


def _damaged(e):
    """A TLS record that failed its check: the connection was altered on the way."""
    return (f"the connection was damaged on the way (a TLS record failed its check: "
            f"{getattr(e, 'reason', None) or type(e).__name__})")


def _mac(secret, label, a, b):
    return hmac.new(secret, f"{PROTOCOL}|{label}|{a}|{b}".encode(), hashlib.sha256).hexdigest()


# Seconds without an acknowledgement (of data, or of keepalive probes on an idle
# connection) after which the peer counts as gone. Without it a peer that vanishes
# without a reset (a host powered off, a partition) blocks a send for the kernel's
# ~15 minutes of retransmissions, and a wait for a reply forever: with the source frozen.
PEER_TIMEOUT = 20.0


def peer_timeout():
    try:
        t = float(os.environ.get("MIGRT_PEER_TIMEOUT") or PEER_TIMEOUT)
    except ValueError:
        t = PEER_TIMEOUT
    return max(1.0, t)


def explain(e):
    """An error of a connection to a peer, in words (a timed-out peer says how long)."""
    if isinstance(e, OSError) and e.errno == errno.ETIMEDOUT:
        return (f"no answer for {peer_timeout():.0f}s (the peer's host is down or the network "
                f"between is cut)")
    return str(e)


def _tune(sock):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = peer_timeout()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(t / 4)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(t / 8)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 8)
    # (with keepalive on, this also decides when unanswered probes end the connection)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(t * 1000))
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass


def connect(address, secret, hello, timeout=10.0):
    """Connect to an agent and authenticate both ways. Returns (Conn, server hello)."""
    host, _, port = address.rpartition(":")
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except (OSError, ValueError) as e:
        raise ProtocolError(f"cannot reach agent {address}: {getattr(e, 'strerror', None) or e}")
    _tune(sock)
    try:    # TLS 1.3 keyed by the shared secret: authenticated and encrypted (migrt.crypto)
        sock = crypto.wrap_client(sock, secret)
    except ssl.SSLError:
        sock.close()
        raise AuthError(f"agent {address} failed authentication (different shared secret?)")
    except OSError as e:
        sock.close()
        raise ProtocolError(f"agent {address}: TLS handshake failed: {e}")
    sock.settimeout(None)
    c = Conn(sock)
    try:
        nonce = os.urandom(16).hex()
        c.send_json(dict(hello, proto=PROTOCOL, nonce=nonce))
        srv = c.read_json(HELLO_MAX)
        if not hmac.compare_digest(str(srv.get("mac", "")),
                                   _mac(secret, "server", nonce, srv.get("nonce", ""))):
            raise AuthError(f"agent {address} failed authentication (different shared secret?)")
        sealed = hello.get("op") == "data"
        reply = {"mac": _mac(secret, "client", srv["nonce"], nonce)}
        if sealed:
            keys = os.urandom(64)       # client->agent, agent->client
            reply["keys"] = keys.hex()
        c.send_json(reply)
        ok = c.read_json(HELLO_MAX)
        if not ok.get("ok"):
            raise AuthError(f"agent {address} refused us")
        if sealed:
            c.seal(keys[:32], keys[32:])
        return c, ok
    except ProtocolError as e:
        c.close()
        if isinstance(e, AuthError) or "authentication" in str(e):
            raise AuthError(str(e) if "agent" in str(e) else f"agent {address}: {e}")
        raise
    except OSError as e:
        c.close()
        raise ProtocolError(f"agent {address}: {e}")


def accept(sock, secret, timeout=10.0):
    """Server side of the handshake. Returns (Conn, client hello) or raises AuthError."""
    sock.settimeout(timeout)
    _tune(sock)
    try:    # TLS 1.3 keyed by the shared secret: authenticated and encrypted (migrt.crypto)
        sock = crypto.wrap_server(sock, secret)
    except ssl.SSLError:
        sock.close()
        raise AuthError("peer failed authentication (TLS-PSK handshake)")
    except OSError:
        sock.close()
        raise
    c = Conn(sock)
    try:
        hello = c.read_json(HELLO_MAX)
        if hello.get("proto") != PROTOCOL:
            raise ProtocolError(f"unknown protocol {hello.get('proto')!r}")
        nonce = os.urandom(16).hex()
        c.send_json({"nonce": nonce, "mac": _mac(secret, "server", hello.get("nonce", ""), nonce)})
        reply = c.read_json(HELLO_MAX)
        if not hmac.compare_digest(str(reply.get("mac", "")),
                                   _mac(secret, "client", nonce, hello.get("nonce", ""))):
            try:
                c.send_json({"error": "authentication failed"})
            except OSError:
                pass
            raise AuthError("peer failed authentication")
        keys = None
        if hello.get("op") == "data":
            try:
                keys = bytes.fromhex(str(reply.get("keys", "")))
            except ValueError:
                keys = b""
            if len(keys) != 64:
                raise ProtocolError("data connection without its record keys")
        c.send_json({"ok": True})
        if keys:
            c.seal(keys[32:], keys[:32])
        c.sock.settimeout(None)
        return c, hello
    except (ProtocolError, OSError, socket.timeout):
        c.close()
        raise
