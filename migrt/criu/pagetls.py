"""Mutual TLS for the memory pages of a lazy migration.

In `migrt migrate --lazy` the destination's `criu lazy-pages` fetches the container's
memory from a CRIU page server on the source, over CRIU's own TCP connection, not
migrt's. Left plain, anyone who reaches that port first could read the container's
memory. CRIU can wrap it in TLS (GnuTLS, X.509, and the server demands a client
certificate), but needs certificates: each migration makes its own.

Both ends make a fresh ECDSA P-256 key and a self-signed certificate for it, and
swap the certificates inside the precheck, which runs over migrt's authenticated
connection (the shared secret). Each end then trusts exactly the other's certificate
(CRIU's --tls-cacert), so the page server only serves the agent that was prechecked,
and the lazy-pages daemon only takes pages from that source. Names are not checked
(--tls-no-cn-verify): the pinned certificate is the identity. Keys stay in root-only
dirs of that migration and go with it.
"""
import datetime
import os

MAX_PEM = 8192
BEGIN = "-----BEGIN CERTIFICATE-----"


def identity(name):
    """A new key and a self-signed certificate for it: (key PEM, certificate PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=10))
            .not_valid_after(now + datetime.timedelta(days=2))
            # its own trust anchor: a CA that can sign nothing else, and a TLS peer
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def peer_cert(value):
    """The peer's certificate from a precheck message, checked (bytes); ValueError."""
    if not isinstance(value, str) or len(value) > MAX_PEM or not value.startswith(BEGIN):
        raise ValueError("no page-traffic certificate (a migrt agent or migrate too old "
                         "for encrypted lazy pages?)")
    from cryptography import x509
    try:
        x509.load_pem_x509_certificate(value.encode())
    except ValueError as e:
        raise ValueError(f"page-traffic certificate does not parse: {e}") from None
    return value.encode()


def write(directory, key_pem, cert_pem, peer_pem, frames=False):
    """Put the three files in a new root-only dir; returns their paths. `frames`: the
    two ends agreed on the stream in frames after the handshake (migrt.criu.features,
    stream-frames), noted beside them for the lazy-pages daemon (`uses_frames`)."""
    os.makedirs(directory, mode=0o700, exist_ok=False)
    paths = files(directory)
    items = [(paths["key"], key_pem), (paths["cert"], cert_pem), (paths["cacert"], peer_pem)]
    if frames:
        items.append((os.path.join(directory, FRAMES), b"1\n"))
    for path, data in items:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return paths


def files(directory):
    return {"key": os.path.join(directory, "own.key"),
            "cert": os.path.join(directory, "own.crt"),
            "cacert": os.path.join(directory, "peer.crt")}


FRAMES = "frames"       # beside the files: both ends agreed on the stream in frames


def uses_frames(paths):
    return os.path.isfile(os.path.join(os.path.dirname(paths["cert"]), FRAMES))


def frames_possible():
    """This node's CRIU can carry the stream in frames (MIGRT_PAGE_FRAMES=0: never,
    to compare)."""
    if os.environ.get("MIGRT_PAGE_FRAMES", "1") == "0":
        return False
    from migrt.criu import features
    return features.has(features.STREAM_FRAMES)


def conf_lines(paths):
    """CRIU config-file lines (for the source's page server, via migrt.criu.config)."""
    return ["tls", f"tls-cacert {paths['cacert']}", f"tls-cert {paths['cert']}",
            f"tls-key {paths['key']}", "tls-no-cn-verify"]


def criu_args(paths):
    """CRIU command-line options (for the destination's `criu lazy-pages`)."""
    return ["--tls", "--tls-cacert", paths["cacert"], "--tls-cert", paths["cert"],
            "--tls-key", paths["key"], "--tls-no-cn-verify"]
