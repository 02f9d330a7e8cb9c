"""The migrt image: manifest, digests, rootfs diff, verify naming the first bad file."""
import json
import os
import time

import pytest

from migrt import image
from migrt.errors import CheckpointError
from migrt.image import digest, manifest as mf, rootfs as rfs


def make_bundle(tmp_path):
    b = tmp_path / "bundle"
    (b / "rootfs" / "etc").mkdir(parents=True)
    (b / "rootfs" / "data").mkdir()
    (b / "rootfs" / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (b / "rootfs" / "etc" / "gone").write_text("x")
    (b / "config.json").write_text(json.dumps({"root": {"path": "rootfs"}, "process": {}}))
    return b


def make_image(tmp_path, created_ns=None):
    b = make_bundle(tmp_path)
    time.sleep(0.02)
    created = created_ns or time.time_ns()
    time.sleep(0.02)
    (b / "rootfs" / "data" / "counter.log").write_text("1\n2\n3\n")
    (b / "rootfs" / "etc" / "gone").unlink()
    os.symlink("counter.log", b / "rootfs" / "data" / "link")
    img = tmp_path / "img"
    img.mkdir()
    (img / "pages-1.img").write_bytes(os.urandom(3 * digest.CHUNK + 100))
    (img / "core-1.img").write_bytes(b"core")
    secs, ns = divmod(created, 10**9)
    state = {"pid": 1, "status": "paused",
             "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns:09d}Z"}
    m = image.capture(str(img), "c1", state, str(b), ["--leave-running"])
    return b, img, m


def test_rfc3339():
    assert image.parse_rfc3339_ns("1970-01-01T00:00:01.5Z") == 1_500_000_000
    assert image.parse_rfc3339_ns("1970-01-01T01:00:01+01:00") == 1_000_000_000
    assert image.parse_rfc3339_ns("junk") is None


def test_capture_and_verify(tmp_path):
    b, img, m = make_image(tmp_path)
    paths = [e["path"] for e in m["files"]]
    assert "pages-1.img" in paths and "migrt/config.json" in paths
    assert "migrt/rootfs/files/data/counter.log" in paths
    changed = [e["path"] for e in m["rootfs"]["entries"]]
    assert "data/counter.log" in changed and "data/link" in changed
    assert "etc/hosts" not in changed
    assert "gone" not in m["rootfs"]["listings"]["etc"]
    assert oct(os.stat(img).st_mode & 0o777) == "0o700"
    assert os.stat(img / "pages-1.img").st_mode & 0o077 == 0
    assert image.verify_image(str(img), full=True)["container"]["id"] == "c1"
    info = image.inspect(str(img))
    assert info["sizes"]["memory"] == 3 * digest.CHUNK + 100


@pytest.mark.parametrize("damage,expect", [
    ("flip", "pages-1.img: chunk 2"),
    ("truncate", "pages-1.img: truncated"),
    ("delete", "core-1.img: missing"),
    ("extra", "evil.img: not in the manifest"),
    ("manifest", "manifest.json: not valid JSON"),
    ("schema", "invalid manifest at files/0/size"),
    ("perm", "core-1.img: writable by group or others"),
    ("rootfs", "counter.log: longer than recorded"),
])
def test_damage_is_named(tmp_path, damage, expect):
    b, img, m = make_image(tmp_path)
    p = img / "pages-1.img"
    if damage == "flip":
        with open(p, "r+b") as f:
            f.seek(2 * digest.CHUNK + 7)
            c = f.read(1)
            f.seek(2 * digest.CHUNK + 7)
            f.write(bytes([c[0] ^ 1]))
    elif damage == "truncate":
        os.truncate(p, 1000)
    elif damage == "delete":
        (img / "core-1.img").unlink()
    elif damage == "extra":
        (img / "evil.img").write_bytes(b"x")
        os.chmod(img / "evil.img", 0o600)
    elif damage == "manifest":
        (img / "migrt" / "manifest.json").write_text("{not json")
    elif damage == "schema":
        d = json.loads((img / "migrt" / "manifest.json").read_text())
        d["files"][0]["size"] = -1
        (img / "migrt" / "manifest.json").write_text(json.dumps(d))
    elif damage == "perm":
        os.chmod(img / "core-1.img", 0o666)
    elif damage == "rootfs":
        with open(img / "migrt/rootfs/files/data/counter.log", "a") as f:
            f.write("4\n")
    with pytest.raises(CheckpointError, match=expect):
        image.verify_image(str(img), full=True)


def test_manifest_refuses_escaping_paths(tmp_path):
    b, img, m = make_image(tmp_path)
    m["files"][0]["path"] = "../../etc/shadow"
    with pytest.raises(CheckpointError):
        mf.parse(json.dumps(m))


def test_stamp_fast_path_notices_writes(tmp_path):
    b, img, m = make_image(tmp_path)
    image.stamp_verified(str(img), m)
    image.verify_image(str(img))
    with open(img / "core-1.img", "r+b") as f:
        f.write(b"X")
    with pytest.raises(CheckpointError, match="core-1.img"):
        image.verify_image(str(img))


def test_manifest_changed_after_the_stamp_is_validated_again(tmp_path):
    """verify_image skips the schema only for the manifest the agent validated (its
    size, ctime and inode recorded in the stamp): one written since is checked again,
    and an escaping path in it refused."""
    b, img, m = make_image(tmp_path)
    image.stamp_verified(str(img), m)
    assert image.verify_image(str(img)) == m
    path = img / "migrt" / "manifest.json"
    d = json.loads(path.read_text())
    d["files"][0]["path"] = "../../etc/shadow"
    path.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="invalid manifest"):
        image.verify_image(str(img))


def test_apply_rootfs_renames(tmp_path):
    b, img, m = make_image(tmp_path)
    dest = tmp_path / "dest"
    (dest / "rootfs" / "etc").mkdir(parents=True)
    (dest / "rootfs" / "data").mkdir()
    (dest / "rootfs" / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (dest / "rootfs" / "etc" / "gone").write_text("x")
    (dest / "config.json").write_text((b / "config.json").read_text())
    src_file = img / "migrt/rootfs/files/data/counter.log"
    ino = os.stat(src_file).st_ino
    copied = image.apply_rootfs(str(img), str(dest))
    assert copied == 0
    got = dest / "rootfs" / "data" / "counter.log"
    assert got.read_text() == "1\n2\n3\n" and os.stat(got).st_ino == ino
    assert os.readlink(dest / "rootfs" / "data" / "link") == "counter.log"
    assert not (dest / "rootfs" / "etc" / "gone").exists()
    assert (dest / "rootfs" / "etc" / "hosts").exists()


def test_base_diff(tmp_path):
    base = tmp_path / "base"
    (base / "a").mkdir(parents=True)
    (base / "a" / "keep").write_text("k")
    (base / "a" / "del").write_text("d")
    root = tmp_path / "root"
    import shutil
    shutil.copytree(base, root)
    (root / "a" / "del").unlink()
    (root / "a" / "new").write_text("n")
    kind, src, entries, deleted, _ = rfs.diff(str(root), base=str(base))
    assert kind == "base"
    assert [e["path"] for e in entries if e["type"] == "file"] == ["a/new"]
    assert deleted == ["a/del"]
    with pytest.raises(ValueError):
        rfs._inside(str(root), "../x")


def test_namespace_binding(tmp_path, monkeypatch):
    """Only a pod of another namespace is refused: a bundle outside Kubernetes (root on
    the node), an image without a recorded namespace, or a node that allows it pass."""
    import json
    import pytest
    from migrt.runtime import checkpoints
    from migrt.errors import CheckpointError
    (tmp_path / "migrt").mkdir()
    (tmp_path / "migrt" / "manifest.json").write_text(
        json.dumps({"container": {"id": "c", "namespace": "team-a"}}))

    def pod(ns, key="io.kubernetes.cri.sandbox-namespace"):
        return {"annotations": {key: ns}} if ns else {}
    checkpoints.check_namespace(str(tmp_path), pod("team-a"), "m")
    checkpoints.check_namespace(str(tmp_path), pod("team-a", "io.kubernetes.pod.namespace"), "m")
    checkpoints.check_namespace(str(tmp_path), pod(None), "m")
    with pytest.raises(CheckpointError, match="namespace 'team-a'; this pod is in 'team-b'"):
        checkpoints.check_namespace(str(tmp_path), pod("team-b"), "m")
    monkeypatch.setenv("MIGRT_ALLOW_CROSS_NAMESPACE", "1")
    checkpoints.check_namespace(str(tmp_path), pod("team-b"), "m")
    monkeypatch.delenv("MIGRT_ALLOW_CROSS_NAMESPACE")
    (tmp_path / "migrt" / "manifest.json").write_text(json.dumps({"container": {"id": "c"}}))
    checkpoints.check_namespace(str(tmp_path), pod("team-b"), "m")


def _file_entries():
    """Good "files" entries and many broken ones: each a change of one property."""
    good = {"path": "pages-1.img", "size": 8192, "xxh3": "0123456789abcdef",
            "chunks": ["0123456789abcdef", "f" * 32]}
    values = ["", "a", "x" * 4096, "x" * 4097, "/abs", "a/../b", "..", "../a", "a/..",
              "a/..b", "..a/b", "a/.../b", "dir/file.img", "0123456789abcdef",
              "0123456789ABCDEF", "0123456789abcde", "f" * 33, "f" * 32, "g" * 16,
              " 0123456789abcdef", 0, -1, 1, 2 ** 40, True, None, 1.5, [], {},
              ["0123456789abcdef"], ["0123456789abcdeg"], [1], ["f" * 16, None]]
    out = [good, dict(good, chunks=[]), dict(good, size=0), [], "x", None, {}]
    for key in good:
        out.append({k: v for k, v in good.items() if k != key})
        for v in values:
            out.append(dict(good, **{key: v}))
    out.append(dict(good, extra=1))
    return out


def test_file_entries_are_checked_as_the_schema_says():
    """The manifest's "files" entries are checked by hand (jsonschema was slow there): on
    every good entry and every entry broken in one property, the hand check and
    jsonschema with the schema's own rule for an entry give the same verdict."""
    import jsonschema
    rule = mf.SCHEMA["properties"]["files"]["items"]
    check = jsonschema.validators.validator_for(mf.SCHEMA)(rule)
    entries = _file_entries()
    assert len(entries) > 140
    for e in entries:
        assert (mf.file_entry_error(e) is None) == check.is_valid(e), e


@pytest.mark.parametrize("entry, where", [
    ({"path": "../x", "size": 1, "xxh3": "0" * 16, "chunks": []}, "files/1/path"),
    ({"path": "x", "size": 1.0, "xxh3": "0" * 16, "chunks": []}, "files/1/size"),
    ({"path": "x", "size": 1, "xxh3": "0" * 16 + "\n", "chunks": []}, "files/1/xxh3"),
    ({"path": "x", "size": 1, "xxh3": "0" * 16, "chunks": ["0" * 16, "nothex" * 3]},
     "files/1/chunks/1"),
])
def test_a_bad_file_entry_is_named_in_the_error(entry, where):
    """A bad entry is refused with where it is; also where jsonschema alone would let it
    through (12.0 as a size, a digest with a newline after it)."""
    good = {"path": "a", "size": 0, "xxh3": "0" * 16, "chunks": []}
    m = {"format": mf.FORMAT, "created": "now", "container": {"id": "c"},
         "node": {"arch": "x86_64", "kernel": "6"}, "chunk_size": 1 << 22,
         "files": [good, entry], "rootfs": {"kind": "none"}}
    mf.parse(json.dumps(dict(m, files=[good])))
    with pytest.raises(CheckpointError, match=f"invalid manifest at {where}:"):
        mf.parse(json.dumps(m))


def test_rootfs_changes_leave_out_criu_temp_dirs_and_what_vanishes(tmp_path, monkeypatch):
    """The rootfs changes are taken while CRIU dumps: CRIU makes and removes its own
    /tmp/cr-tmpfs.XXXXXX in the container's rootfs meanwhile (seen in CI: the walk saw
    it, its listing failed). Neither it nor an entry gone since the walk is carried, and
    the rest of the diff is as it was."""
    root = tmp_path / "rootfs"
    (root / "tmp").mkdir(parents=True)
    since = time.time_ns() - 1
    (root / "tmp" / "mine").write_text("the container's")
    (root / "tmp" / "cr-tmpfs.Ab3dE9").mkdir()
    (root / "tmp" / "cr-tmpfs.Ab3dE9" / "x").write_text("")
    (root / "etc").mkdir()
    (root / "etc" / "vanishing").mkdir()
    real = os.listdir

    def listdir(p):
        if str(p).endswith("vanishing"):
            raise FileNotFoundError(2, "gone", str(p))
        return real(p)
    monkeypatch.setattr(rfs.os, "listdir", listdir)
    kind, _, entries, deleted, listings = rfs.diff(str(root), since_ns=since)
    paths = {e["path"] for e in entries}
    assert kind == "since-start"
    assert "tmp/mine" in paths and "tmp" in paths and "etc" in paths
    assert not any("cr-tmpfs" in p for p in paths), paths
    assert "etc/vanishing" not in paths
    assert listings["tmp"] == ["mine"], listings
