"""A tiny PostgreSQL client (protocol 3.0, trust authentication, simple queries)."""
import struct


class PgError(Exception):
    pass


class Pg:
    def __init__(self, sock, user="postgres", database="postgres"):
        self.sock = sock
        self.buf = b""
        params = f"user\0{user}\0database\0{database}\0\0".encode()
        self.sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
        while True:
            kind, body = self._msg()
            if kind == b"R" and struct.unpack("!i", body[:4])[0] != 0:
                raise PgError("the server asks for a password (trust expected)")
            if kind == b"E":
                raise PgError(self._error(body))
            if kind == b"Z":
                return

    def _read(self, n):
        while len(self.buf) < n:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("postgres closed the connection")
            self.buf += data
        v, self.buf = self.buf[:n], self.buf[n:]
        return v

    def _msg(self):
        head = self._read(5)
        n = struct.unpack("!i", head[1:])[0]
        return head[:1], self._read(n - 4)

    @staticmethod
    def _error(body):
        fields = dict((f[:1], f[1:].decode(errors="replace")) for f in body.split(b"\0") if f)
        return f"{fields.get(b'C', '?')}: {fields.get(b'M', '')}"

    def query(self, sql):
        """Run sql; returns (command tag, rows as lists of str or None)."""
        q = sql.encode() + b"\0"
        self.sock.sendall(b"Q" + struct.pack("!i", 4 + len(q)) + q)
        rows, tag, err = [], None, None
        while True:
            kind, body = self._msg()
            if kind == b"D":
                n = struct.unpack("!h", body[:2])[0]
                pos, row = 2, []
                for _ in range(n):
                    ln = struct.unpack("!i", body[pos:pos + 4])[0]
                    pos += 4
                    if ln < 0:
                        row.append(None)
                    else:
                        row.append(body[pos:pos + ln].decode())
                        pos += ln
                rows.append(row)
            elif kind == b"C":
                tag = body.rstrip(b"\0").decode()
            elif kind == b"E":
                err = self._error(body)
            elif kind == b"Z":
                if err:
                    raise PgError(err)
                return tag, rows

    def close(self):
        try:
            self.sock.sendall(b"X" + struct.pack("!i", 4))
        except OSError:
            pass
        self.sock.close()
