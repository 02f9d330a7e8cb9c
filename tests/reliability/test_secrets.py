"""Secrets at rest and in flight (real runc and CRIU).

- a checkpoint encrypted at rest (migrt.crypto, node key or a named key) holds none of
  the workload's secrets in the clear, restores through `encrypted:<dir>` with the
  counter carrying on, and leaves no plaintext behind;
- a flipped bit, a truncated file, swapped chunks or another node's key are refused
  before restore, naming the file, and nothing is created;
- image files and dirs are root-only; no environment value or key shows in any log
  migrt, runc or CRIU wrote.
"""
import json
import os
import shutil
import stat

import pytest

import leaks
import ocitest
from migrt import crypto

SECRET = "s3cr3t-" + os.urandom(6).hex()


@pytest.fixture
def keys(tmp_path, monkeypatch):
    d = tmp_path / "keys"
    monkeypatch.setenv("MIGRT_KEY_DIR", str(d))
    return str(d)


@pytest.fixture
def rt(tmp_path, migrt_launcher, keys):
    r = ocitest.Runtime(migrt_launcher, str(tmp_path / "root"), env={"MIGRT_KEY_DIR": keys})
    yield r
    r.cleanup()


def counter_with_secret(rt, make_bundle):
    cid = ocitest.uid("sec")
    # the secret lives in the workload's environment and in its shell memory
    prog = f"S=$API_TOKEN; {ocitest.COUNTER}"
    bundle = make_bundle(["sh", "-c", prog], name=cid, env=[f"API_TOKEN={SECRET}"])
    rc, out, err = rt.create(cid, bundle, start=True)
    assert rc == 0, err.text
    ocitest.wait_for(lambda: ocitest.last_count(out) >= 3, what="counter")
    return cid, bundle, out


def grep_tree(top, needle):
    hits = []
    for p in leaks.files(top):
        try:
            with open(p, "rb") as f:
                if needle in f.read():
                    hits.append(p)
        except OSError:
            pass
    return hits


def test_encrypted_checkpoint_restores_and_hides_secrets(rt, make_bundle, tmp_path, keys):
    cid, bundle, out = counter_with_secret(rt, make_bundle)
    plain = str(tmp_path / "plain-ckpt")
    p = rt.run("checkpoint", "--image-path", plain, cid)
    assert p.returncode == 0, p.stderr
    out.thread.join(10)
    before = ocitest.last_count(out)
    # the check below could fail: the plain image does hold the secret
    assert grep_tree(plain, SECRET.encode()), "expected the secret in the plain image"
    enc = str(tmp_path / "enc-ckpt")
    p = rt.run("image", "encrypt", plain, enc)             # node key, made on first use
    assert p.returncode == 0 and "encrypted with key 'node'" in p.stdout, p.stderr
    shutil.rmtree(plain)
    assert grep_tree(enc, SECRET.encode()) == []
    assert oct(os.stat(os.path.join(keys, "node.key")).st_mode & 0o777) == "0o600"
    for f in leaks.files(enc):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600 and os.stat(f).st_uid == 0, f

    ocitest.bundlekit.set_env(bundle, "MIGRT_RESTORE_FROM", f"encrypted:{enc}")
    rc, out2, err = rt.create(cid, bundle)
    assert rc == 0, err.text
    assert rt.run("start", cid).returncode == 0
    ocitest.wait_for(lambda: ocitest.last_count(out2) > before + 2, what="restored counter")
    nums = [int(x) for x in out2.lines() if x.isdigit()]
    assert nums[0] == before + 1
    # the plaintext went as soon as CRIU had read it
    plain_root = os.path.join(os.environ.get("MIGRT_STATE_DIR", "/run/migrt"), "plain")
    assert [n for n in os.listdir(plain_root) if n.split("-")[0].isdigit()
            and not os.path.exists(f"/proc/{n.split('-')[0]}")] == []
    environ = rt.exec_out(cid, "cat", "/proc/1/environ")
    assert SECRET in environ and "MIGRT_RESTORE_FROM" not in environ


def test_named_key_wrong_key_and_damage_refused(rt, make_bundle, tmp_path, keys):
    cid, bundle, out = counter_with_secret(rt, make_bundle)
    plain = str(tmp_path / "plain-ckpt")
    assert rt.run("checkpoint", "--image-path", plain, cid).returncode == 0
    good = str(tmp_path / "enc")
    p = rt.run("image", "encrypt", "--key", "mig-1", "--new-key", plain, good)
    assert p.returncode == 0, p.stderr
    dec = str(tmp_path / "dec")
    assert rt.run("image", "decrypt", good, dec).returncode == 0
    assert sorted(os.listdir(dec)) == sorted(os.listdir(plain))
    pages = sorted(f for f in os.listdir(good) if f.startswith("pages-"))[0]

    def variant(name, damage):
        d = str(tmp_path / name)
        shutil.copytree(good, d)
        damage(d)
        return d

    def flip(d):
        p = os.path.join(d, pages)
        data = bytearray(open(p, "rb").read())
        data[len(data) // 2] ^= 0x01
        open(p, "wb").write(bytes(data))

    def truncate(d):
        p = os.path.join(d, pages)
        os.truncate(p, os.path.getsize(p) - 100)

    def swap(d):                      # another file's valid ciphertext under this name
        a = os.path.join(d, "inventory.img")
        b = os.path.join(d, pages)
        shutil.copyfile(b, a)

    def rekey(d):                     # the key file replaced by another key
        os.unlink(os.path.join(keys, "mig-1.key"))
        crypto.make_key("mig-1")

    cases = [("flip", flip, pages), ("truncate", truncate, pages),
             ("swap", swap, "inventory.img"), ("rekey", rekey, "another key")]
    for name, damage, expect in cases:
        d = variant(name, damage)
        ocitest.bundlekit.set_env(bundle, "MIGRT_RESTORE_FROM", f"encrypted:{d}")
        log = str(tmp_path / f"{name}.log.json")
        rc, _, err = rt.create(f"{cid}-{name}", bundle, log=log)
        assert rc != 0
        msg = json.loads(open(log).read().splitlines()[-1])["msg"]
        assert expect in msg, (name, msg)
        assert rt.state(f"{cid}-{name}") is None
    # nothing decrypted is left anywhere
    plain_root = os.path.join(os.environ.get("MIGRT_STATE_DIR", "/run/migrt"), "plain")
    mine = [n for n in os.listdir(plain_root) if grep_tree(os.path.join(plain_root, n),
                                                             SECRET.encode())]
    assert mine == []


def test_image_files_root_only_and_no_secret_in_logs(rt, make_bundle, tmp_path):
    cid, bundle, out = counter_with_secret(rt, make_bundle)
    image = str(tmp_path / "ckpt")
    log = str(tmp_path / "runc-log.json")
    p = rt.run("--log", log, "--log-format", "json", "checkpoint", "--image-path", image, cid)
    assert p.returncode == 0, p.stderr
    for dirpath, dirs, files in os.walk(image):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            assert stat.S_IMODE(st.st_mode) & 0o077 == 0, (f, oct(st.st_mode))
    ocitest.bundlekit.set_env(bundle, "MIGRT_RESTORE_FROM", image)
    rc, out2, err = rt.create(cid, bundle, log=log)
    assert rc == 0, err.text
    # a failing restore too: its message quotes CRIU's log
    bad = str(tmp_path / "bad")
    shutil.copytree(image, bad)
    shutil.rmtree(os.path.join(bad, "migrt"))
    ocitest.bundlekit.set_env(bundle, "MIGRT_RESTORE_FROM", bad)
    rc, _, err3 = rt.create(cid + "-x", bundle, log=log)
    rec = json.load(open(os.path.join(rt.root, cid, "migrt.json")))
    logs = [log] + [p for p in leaks.files(rec["work"]) if p.endswith(".log")] \
        + [p for p in leaks.files(image) if p.endswith(".log")]
    assert any(p.endswith("restore.log") for p in logs) and any(p.endswith("dump.log") for p in logs)
    for p in logs:
        assert SECRET not in open(p, errors="replace").read(), p
    assert SECRET not in err.text + err3.text


def test_migration_wire_and_logs_hold_no_secret(tmp_path, migrt_launcher, make_bundle):
    """Migrate a workload holding a secret, uncompressed (zstd level 0), through a proxy
    that records every byte the source sends: the secret is in the workload's memory
    pages, and not on the wire, in the agent's log, or in migrate's output."""
    import subprocess
    import migr
    nodes = migr.Nodes(migrt_launcher, tmp_path, make_bundle)
    try:
        ag = nodes.agent()
        px = migr.Proxy(ag.port)
        px.captured = bytearray()
        cid, bundle, dest, out = nodes.counter(extra_env=[f"API_TOKEN={SECRET}"])
        # the pages do hold it: a local checkpoint of the same kind of workload shows it
        probe_id, probe_bundle, probe_dest, probe_out = nodes.counter(
            extra_env=[f"API_TOKEN={SECRET}"])
        img = str(tmp_path / "probe-img")
        assert nodes.a.run("checkpoint", "--leave-running", "--image-path", img,
                           probe_id).returncode == 0
        assert grep_tree(img, SECRET.encode()), "expected the secret in the memory pages"
        argv = nodes.migrate_argv(cid, dest, ag, "--zstd-level", "0")
        argv[argv.index("--to") + 1] = px.address
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        out.thread.join(15)
        nums = migr.wait_dest_counting(ag, cid, ocitest.last_count(out))
        assert nums[0] == ocitest.last_count(out) + 1
        wire = bytes(px.captured)
        assert len(wire) > 100_000                      # the image did go through it
        assert SECRET.encode() not in wire
        secret_value = open(nodes.secret_file).read().strip()
        for text, what in ((ag.log(), "agent log"), (p.stdout + p.stderr, "migrate output")):
            assert SECRET not in text and secret_value not in text, what
        for path in leaks.files(ag.dir):
            if path.startswith(ag.logs):
                continue                                 # the workload's own stdout
            data = open(path, "rb").read()
            assert SECRET.encode() not in data and secret_value.encode() not in data, path
        px.close()
    finally:
        nodes.cleanup()
