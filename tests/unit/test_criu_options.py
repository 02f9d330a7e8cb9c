"""What migrate hands CRIU beyond runc's flags (migrt.criu.config) and the certificates of
lazy mode's page traffic (migrt.criu.pagetls)."""
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from migrt.criu import config as criuconf
from migrt.criu import pagetls


def test_env_points_criu_at_our_lines_and_keeps_the_callers_config(tmp_path):
    base = {"PATH": "/usr/bin"}
    assert criuconf.env(str(tmp_path), [], base) == base       # nothing to add: no file
    env = criuconf.env(str(tmp_path), ["network-lock nftables", "tls"], base)
    conf = env["CRIU_CONFIG_FILE"]
    assert open(conf).read() == "network-lock nftables\ntls\n"
    assert os.stat(conf).st_mode & 0o077 == 0
    # a config file the caller already gives CRIU keeps its lines, after ours, so that
    # its own choices are the ones CRIU takes (a later line wins)
    theirs = tmp_path / "theirs.conf"
    theirs.write_text("tcp-established\nnetwork-lock iptables\n")
    env = criuconf.env(str(tmp_path), ["network-lock nftables"],
                       dict(base, CRIU_CONFIG_FILE=str(theirs)))
    assert open(env["CRIU_CONFIG_FILE"]).read().splitlines() == [
        "network-lock nftables", "tcp-established", "network-lock iptables"]


def test_identity_is_a_fresh_pinnable_tls_peer():
    key_pem, cert_pem = pagetls.identity("migrt page server web")
    key = serialization.load_pem_private_key(key_pem, None)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.issuer == cert.subject                      # its own trust anchor
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0                   # that can sign nothing else
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {u._name for u in eku} == {"serverAuth", "clientAuth"}
    # every migration its own key
    assert pagetls.identity("migrt page server web")[0] != key_pem


@pytest.mark.parametrize("bad", [None, 7, "", "-----BEGIN CERTIFICATE-----\nnot base64\n",
                                 "-----BEGIN PRIVATE KEY-----\n", "x" * 9000])
def test_a_peer_certificate_that_is_not_one_is_refused(bad):
    with pytest.raises(ValueError):
        pagetls.peer_cert(bad)


def test_files_are_root_only_and_criu_gets_all_of_them(tmp_path):
    key_pem, cert_pem = pagetls.identity("a")
    peer = pagetls.peer_cert(pagetls.identity("b")[1].decode())
    paths = pagetls.write(str(tmp_path / "tls"), key_pem, cert_pem, peer)
    assert stat.S_IMODE(os.stat(tmp_path / "tls").st_mode) == 0o700
    for p in paths.values():
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert open(paths["cacert"], "rb").read() == peer
    args = pagetls.criu_args(paths)
    lines = pagetls.conf_lines(paths)
    for p in paths.values():
        assert p in args and any(ln.endswith(" " + p) for ln in lines)
    assert "--tls" in args and "tls" in lines
    with pytest.raises(FileExistsError):                  # never over an older identity
        pagetls.write(str(tmp_path / "tls"), key_pem, cert_pem, peer)
