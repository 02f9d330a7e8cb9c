"""Secrets at rest and in flight: checkpoint images hold a process's memory, environment
and keys, so neither the disk nor the wire between nodes may see them in the clear.

In flight: every connection between `migrt migrate` and `migrt agent` is TLS 1.3 keyed
by the agents' shared secret (an external PSK, RFC 8446 section 2.2, with (EC)DHE: each
connection gets fresh keys, and a peer without the secret cannot finish the handshake).
No certificates to distribute: the secret the agents already share is the credential.
Python's own ssl module does it (3.13: set_psk_*_callback), so the wire needs no
library beyond the standard one.

At rest: `encrypt_image` turns a checkpoint directory into one whose every file is
AES-256-GCM (the `cryptography` library), cut into 1 MiB chunks so that a file of any
size streams through bounded memory. Each file has its own key, derived with HKDF from
the named key and a random salt; each chunk's nonce is its index and its associated
data names the file, the index and whether it is the last chunk, so that a chunk moved,
dropped, reordered or cut off fails authentication like a flipped bit. Keys are
named (`migrt image encrypt --key NAME`): `node` is the node key (made on first use),
any other name a key made for one migration or one workload. They live in
MIGRT_KEY_DIR (default /etc/migrt/keys), one file per key, root-only. An encrypted image is restored through the marker
`MIGRT_RESTORE_FROM=encrypted:<dir>` (migrt.runtime.sources.encrypted), which decrypts into a
root-only tmpfs dir, restores, and removes the plaintext.
"""
import hashlib
import hmac
import json
import os
import shutil
import struct

from migrt.errors import CheckpointError

KEY_DIR = "/etc/migrt/keys"
NODE_KEY = "node"
FORMAT = "migrt-encrypted/1"
HEADER = "migrt-encryption.json"
MAGIC = b"MIGRTENC1\n"
CHUNK = 1 << 20
TAG = 16
KEY_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
PSK_IDENTITY = "migrt/1"


class KeyFileError(CheckpointError):
    """A key is missing, unreadable, too open or wrong."""


# ---------------------------------------------------------------- key derivation

def hkdf(key, salt, info, length=32):
    """HKDF-SHA256 (RFC 5869) with the standard library only."""
    prk = hmac.new(salt or b"\0" * 32, key, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


# ---------------------------------------------------------------- in flight

def psk(secret):
    """The TLS pre-shared key of a shared secret (never the secret itself)."""
    return hkdf(secret, b"migrt tls psk salt", b"migrt/1 tls-1.3 external psk")


def _context(server, secret):
    import ssl
    if not getattr(ssl, "HAS_PSK", False):
        raise OSError("this Python's ssl module has no TLS-PSK support (Python 3.13+ needed)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    key = psk(secret)
    if server:
        ctx.num_tickets = 0     # no resumption; and nothing pending when data conns leave TLS
        ctx.set_psk_server_callback(lambda identity: key if identity == PSK_IDENTITY else b"",
                                    PSK_IDENTITY)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE      # the PSK authenticates the server
        ctx.set_psk_client_callback(lambda hint: (PSK_IDENTITY, key))
    return ctx


def wrap_client(sock, secret):
    """TLS 1.3-PSK over a connected socket; ssl.SSLError if the agent's secret differs."""
    return _context(False, secret).wrap_socket(sock)


def wrap_server(sock, secret):
    """Server side; ssl.SSLError if the peer does not hold the secret."""
    return _context(True, secret).wrap_socket(sock, server_side=True)


# ---------------------------------------------------------------- keys

def key_dir():
    return os.environ.get("MIGRT_KEY_DIR", KEY_DIR)


def key_path(name):
    if not name or set(name) - KEY_NAME_OK or name.startswith("."):
        raise KeyFileError(f"bad key name {name!r} (letters, digits, . _ -)")
    return os.path.join(key_dir(), name + ".key")


def load_key(name):
    """The 32 bytes of a named key; refused if the file is open to others."""
    p = key_path(name)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(f"key {name!r} not found ({p})")
    except OSError as e:
        raise KeyFileError(f"key {name!r}: cannot read {p}: {e.strerror}")
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_mode & 0o077:
            raise KeyFileError(f"key file {p} is readable by others (chmod 600 it)")
        if st.st_uid != os.geteuid():
            raise KeyFileError(f"key file {p} is not owned by this user")
        raw = f.read(200).strip()
    if len(raw) == 64:
        try:
            raw = bytes.fromhex(raw.decode())
        except ValueError:
            pass
    if len(raw) != 32:
        raise KeyFileError(f"key file {p} must hold 32 bytes (raw, or 64 hex digits)")
    return raw


def make_key(name, exist_ok=True):
    """Create a random key (root-only) unless it exists; return its path."""
    p = key_path(name)
    os.makedirs(os.path.dirname(p), mode=0o700, exist_ok=True)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        if not exist_ok:
            raise KeyFileError(f"key {name!r} exists ({p})")
        return p
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32).hex().encode() + b"\n")
    return p


def key_check(key):
    """A value that tells a wrong key from a damaged file, and reveals nothing."""
    return hmac.new(key, b"migrt key check", hashlib.sha256).hexdigest()[:16]


# ---------------------------------------------------------------- at rest

def _aad(rel, index, last):
    return b"%s\0%d\0%d" % (rel.encode(), index, 1 if last else 0)


def _nonce(index):
    return struct.pack(">4xQ", index)


def _open_new(path):
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")


def encrypt_file(key, src, dst, rel):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    salt = os.urandom(16)
    aead = AESGCM(hkdf(key, salt, b"migrt image file"))
    with open(src, "rb", buffering=0) as f, _open_new(dst) as out:
        out.write(MAGIC + salt + struct.pack(">I", CHUNK))
        index = 0
        data = f.read(CHUNK)
        while True:
            nxt = f.read(CHUNK) if len(data) == CHUNK else b""
            last = not nxt
            out.write(aead.encrypt(_nonce(index), data, _aad(rel, index, last)))
            if last:
                break
            data, index = nxt, index + 1


def decrypt_file(key, src, dst, rel):
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    with open(src, "rb", buffering=0) as f, _open_new(dst) as out:
        head = f.read(len(MAGIC) + 20)
        if len(head) < len(MAGIC) + 20 or not head.startswith(MAGIC):
            raise CheckpointError(f"{src}: not an encrypted image file (damaged or tampered)")
        salt = head[len(MAGIC):len(MAGIC) + 16]
        (chunk,) = struct.unpack(">I", head[-4:])
        if chunk != CHUNK:
            raise CheckpointError(f"{src}: unknown chunk size {chunk} (damaged or tampered)")
        aead = AESGCM(hkdf(key, salt, b"migrt image file"))
        index = 0
        block = f.read(CHUNK + TAG)
        while True:
            nxt = f.read(CHUNK + TAG) if len(block) == CHUNK + TAG else b""
            last = not nxt
            try:
                out.write(aead.decrypt(_nonce(index), block, _aad(rel, index, last)))
            except InvalidTag:
                raise CheckpointError(f"{src}: chunk {index} (offset {index * CHUNK}) fails "
                                      f"authentication (damaged, truncated or tampered)")
            if last:
                break
            block, index = nxt, index + 1


def _files(top):
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for n in sorted(filenames):
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, top)
            if os.path.islink(p) or not os.path.isfile(p):
                raise CheckpointError(f"{p}: not a regular file; refusing to encrypt")
            out.append(rel)
    return out


def encrypt_image(src, dst, key_name=NODE_KEY, create_key=None):
    """Encrypt every file of checkpoint dir `src` into new dir `dst` (root-only).

    create_key: make the key if it does not exist (default: only for the node key).
    """
    if create_key or (create_key is None and key_name == NODE_KEY):
        make_key(key_name)
    key = load_key(key_name)
    if os.path.exists(dst):
        raise CheckpointError(f"{dst} exists; refusing to overwrite")
    tmp = dst + ".encrypting"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp, mode=0o700)
    try:
        files = _files(src)
        for rel in files:
            encrypt_file(key, os.path.join(src, rel), os.path.join(tmp, rel), rel)
        header = {"format": FORMAT, "key": key_name, "key_check": key_check(key),
                  "cipher": "AES-256-GCM", "chunk": CHUNK, "files": files}
        with _open_new(os.path.join(tmp, HEADER)) as f:
            f.write(json.dumps(header, indent=1).encode())
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return header


def read_header(src):
    p = os.path.join(src, HEADER)
    try:
        with open(p, "rb") as f:
            h = json.loads(f.read(1 << 24))
    except FileNotFoundError:
        raise CheckpointError(f"{src}: not an encrypted checkpoint (no {HEADER})")
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{p}: unreadable ({e})")
    ok = (isinstance(h, dict) and h.get("format") == FORMAT and isinstance(h.get("key"), str)
          and isinstance(h.get("files"), list)
          and all(isinstance(r, str) and r and not r.startswith("/")
                  and ".." not in r.split("/") and r != HEADER for r in h["files"]))
    if not ok:
        raise CheckpointError(f"{p}: not a valid encryption header (damaged or tampered)")
    return h


def is_encrypted(src):
    return os.path.isfile(os.path.join(src, HEADER))


def decrypt_image(src, dst):
    """Decrypt encrypted checkpoint `src` into new dir `dst`; CheckpointError naming
    the first bad file (or the key) on any failure, with nothing left in dst."""
    h = read_header(src)
    key = load_key(h["key"])
    if not hmac.compare_digest(str(h.get("key_check", "")), key_check(key)):
        raise KeyFileError(f"{src}: encrypted with another key than this node's {h['key']!r}")
    present = set(_files(src)) - {HEADER}
    extra = sorted(present - set(h["files"]))
    if extra:
        raise CheckpointError(f"{os.path.join(src, extra[0])}: not in the encryption header "
                              f"(tampered)")
    os.makedirs(dst, mode=0o700)
    try:
        for rel in h["files"]:
            p = os.path.join(src, rel)
            if not os.path.isfile(p) or os.path.islink(p):
                raise CheckpointError(f"{p}: missing from the encrypted image")
            decrypt_file(key, p, os.path.join(dst, rel), rel)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise
    return h


def main(argv=None):
    """python -m migrt.crypto encrypt|decrypt SRC DST [KEY] / make-key NAME."""
    import sys
    a = list(sys.argv[1:] if argv is None else argv)
    try:
        if a[:1] == ["encrypt"] and len(a) in (3, 4):
            h = encrypt_image(a[1], a[2], a[3] if len(a) == 4 else NODE_KEY)
            print(f"{a[2]}: {len(h['files'])} files encrypted with key {h['key']!r}")
        elif a[:1] == ["decrypt"] and len(a) == 3:
            h = decrypt_image(a[1], a[2])
            print(f"{a[2]}: {len(h['files'])} files decrypted")
        elif a[:1] == ["make-key"] and len(a) == 2:
            print(make_key(a[1], exist_ok=False))
        else:
            print(main.__doc__, file=sys.stderr)
            return 2
    except CheckpointError as e:
        print(f"migrt: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
