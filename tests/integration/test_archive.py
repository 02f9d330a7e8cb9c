"""Engine checkpoint archives (podman, CRI-O, kubelet layout) through the restore marker
and `migrt image export|inspect|verify`: real runc and CRIU, busybox bundles.

An archive is the layout `podman container checkpoint --export` writes: checkpoint/
(CRIU's images), config.dump, spec.dump, rootfs-diff.tar, deleted.files. These tests
make one from a real `runc checkpoint` the way an engine does (tests/e2e/test_podman.py
uses podman's own), and `migrt image export` writes one from a migrt image.
"""
import io
import json
import os
import shutil
import subprocess
import tarfile

import pytest

import ocitest

CHECKPOINTCTL = os.environ.get("MIGRT_TEST_CHECKPOINTCTL",
                               "/opt/migrt/test/checkpointctl/checkpointctl")
# Writes a file into its rootfs (and deletes one) before counting.
CHANGER = ("echo made-here > /data/new.txt; rm -f /bin/vi; " + ocitest.COUNTER)


@pytest.fixture
def rt(node, migrt_launcher, tmp_path):
    r = node("migrt", binary=migrt_launcher)
    r.env["MIGRT_UNPACK_DIR"] = str(tmp_path / "unpacked")
    return r


def unpacked_left(rt):
    d = rt.env["MIGRT_UNPACK_DIR"]
    return os.listdir(d) if os.path.isdir(d) else []


def start(rt, make_bundle, script=CHANGER):
    cid = ocitest.uid("arc")
    bundle = make_bundle(["sh", "-c", script], name=cid)
    rc, out, err = rt.create(cid, bundle, start=True)
    assert rc == 0, err.text
    ocitest.wait_for(lambda: ocitest.last_count(out) >= 5, what="counter")
    return cid, bundle, out


def engine_archive(rt, cid, bundle, dest, compress="none", rootfs_diff=None, deleted=None):
    """Checkpoint with plain runc (no migrt files) and pack it as podman does."""
    work = dest + ".d"
    os.makedirs(work)
    p = subprocess.run(["runc", "--root", rt.root, "checkpoint", "--image-path",
                        os.path.join(work, "checkpoint"), cid], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    spec = json.load(open(os.path.join(bundle, "config.json")))
    spec.setdefault("annotations", {})["io.container.manager"] = "libpod"
    with open(os.path.join(work, "spec.dump"), "w") as f:
        json.dump(spec, f)
    with open(os.path.join(work, "config.dump"), "w") as f:
        json.dump({"id": cid, "name": cid, "rootfsImageName": "busybox", "runtime": "runc",
                   "createdTime": "2026-12-06T08:00:00Z"}, f)
    rootfs = os.path.join(bundle, "rootfs")
    if rootfs_diff is None:
        with tarfile.open(os.path.join(work, "rootfs-diff.tar"), "w") as t:
            t.add(os.path.join(rootfs, "data"), "data", recursive=True)
            if os.path.exists(os.path.join(rootfs, "tmp", "count")):   # may be open
                t.add(os.path.join(rootfs, "tmp", "count"), "tmp/count")
    else:
        with open(os.path.join(work, "rootfs-diff.tar"), "wb") as f:
            f.write(rootfs_diff)
    with open(os.path.join(work, "deleted.files"), "w") as f:
        json.dump(["/bin/vi"] if deleted is None else deleted, f)
    with open(os.path.join(work, "network.status"), "w") as f:
        f.write("null")
    mode = {"none": "w", "gzip": "w:gz"}[compress]
    with tarfile.open(dest, mode) as t:
        for n in sorted(os.listdir(work)):
            t.add(os.path.join(work, n), n)
    return work


def fresh_bundle(make_bundle, cid, image):
    """A new bundle from the pristine busybox rootfs, its marker naming `image`."""
    bundle = make_bundle(["sh", "-c", "echo fresh; sleep 1000"], name=cid + "-r")
    ocitest.bundlekit.set_env(bundle, "MIGRT_RESTORE_FROM", image)
    return bundle


def restored_ok(rt, cid, bundle, out, before):
    ocitest.wait_for(lambda: ocitest.last_count(out) > before + 2, what="restored counter")
    nums = [int(x) for x in out.lines() if x.isdigit()]
    assert nums[0] == before + 1, nums[:3]
    root = os.path.join(bundle, "rootfs")
    assert open(os.path.join(root, "data", "new.txt")).read() == "made-here\n"
    assert not os.path.lexists(os.path.join(root, "bin", "vi"))
    assert os.path.exists(os.path.join(root, "bin", "sh"))


@pytest.mark.parametrize("compress", ["none", "gzip"])
def test_marker_takes_engine_archive_tar(rt, make_bundle, tmp_path, compress):
    cid, bundle, out = start(rt, make_bundle)
    arc = str(tmp_path / f"c.tar{'.gz' if compress == 'gzip' else ''}")
    engine_archive(rt, cid, bundle, arc, compress=compress)
    before = ocitest.last_count(out)
    nb = fresh_bundle(make_bundle, cid, arc)
    rc, out2, err = rt.create(cid + "r", nb, start=True)
    assert rc == 0, err.text
    restored_ok(rt, cid + "r", nb, out2, before)
    assert unpacked_left(rt) == []      # the private unpacked copy went once it ran


def test_marker_takes_unpacked_archive_dir(rt, make_bundle, tmp_path):
    cid, bundle, out = start(rt, make_bundle)
    arc = str(tmp_path / "c.tar")
    root = engine_archive(rt, cid, bundle, arc)
    before = ocitest.last_count(out)
    nb = fresh_bundle(make_bundle, cid, root)
    rc, out2, err = rt.create(cid + "r", nb, start=True)
    assert rc == 0, err.text
    restored_ok(rt, cid + "r", nb, out2, before)
    assert os.path.isfile(os.path.join(root, "rootfs-diff.tar"))    # the user's dir is kept


def hostile_diff(name, kind="file", link=""):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        ti = tarfile.TarInfo(name)
        if kind == "symlink":
            ti.type, ti.linkname = tarfile.SYMTYPE, link
            t.addfile(ti)
        elif kind == "dev":
            ti.type, ti.devmajor, ti.devminor = tarfile.BLKTYPE, 8, 0
            t.addfile(ti)
        else:
            data = b"owned\n"
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("case", ["dotdot", "deleted", "via-symlink", "device", "outer-link"])
def test_hostile_archive_refused_in_one_line(rt, make_bundle, tmp_path, case):
    cid, bundle, out = start(rt, make_bundle)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("mine\n")
    arc = str(tmp_path / "bad.tar")
    kw = {}
    if case == "dotdot":
        kw["rootfs_diff"] = hostile_diff("../../../../../../" + str(victim / "owned"))
    elif case == "deleted":
        kw["deleted"] = ["/../../../../../../" + str(victim / "keep")]
    elif case == "via-symlink":
        # the rootfs already has a symlink to the host path: writing through it must fail
        os.symlink(str(victim), os.path.join(bundle, "rootfs", "escape"))
        kw["rootfs_diff"] = hostile_diff("escape/owned")
    elif case == "device":
        kw["rootfs_diff"] = hostile_diff("data/disk", kind="dev")
    work = engine_archive(rt, cid, bundle, arc, **kw)
    if case == "outer-link":
        with tarfile.open(arc, "a") as t:
            ti = tarfile.TarInfo("checkpoint/evil")
            ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/shadow"
            t.addfile(ti)
    nb = fresh_bundle(make_bundle, cid, arc)
    if case == "via-symlink":
        os.symlink(str(victim), os.path.join(nb, "rootfs", "escape"))
    log = str(tmp_path / "log.json")
    rc, _, err = rt.create(cid + "r", nb, log=log)
    assert rc != 0
    lines = [l for l in err.text.splitlines() if l.strip()]
    assert len(lines) == 1 and "refusing" in lines[0], err.text
    assert sorted(os.listdir(victim)) == ["keep"]
    assert (victim / "keep").read_text() == "mine\n"
    assert rt.state(cid + "r") is None
    last = [json.loads(l) for l in open(log) if l.strip()][-1]
    assert last["level"] == "error" and "refusing" in last["msg"]
    assert unpacked_left(rt) == []


def test_archive_outside_allowed_dirs_refused(rt, make_bundle, tmp_path):
    cid, bundle, out = start(rt, make_bundle)
    arc = str(tmp_path / "c.tar")
    engine_archive(rt, cid, bundle, arc)
    nb = fresh_bundle(make_bundle, cid, arc)
    rt.env["MIGRT_CHECKPOINT_DIRS"] = "/var/lib/migrt/checkpoints"
    rc, _, err = rt.create(cid + "r", nb)
    assert rc != 0 and "outside the allowed checkpoint locations" in err.text, err.text


def test_archive_pod_namespace_enforced(rt, make_bundle, tmp_path):
    cid, bundle, out = start(rt, make_bundle)
    arc = str(tmp_path / "c.tar")
    work = engine_archive(rt, cid, bundle, arc)
    spec = json.load(open(os.path.join(work, "spec.dump")))
    spec["annotations"]["io.kubernetes.pod.namespace"] = "team-a"
    with open(os.path.join(work, "spec.dump"), "w") as f:
        json.dump(spec, f)
    nb = fresh_bundle(make_bundle, cid, work)
    _annotate(nb)
    rc, _, err = rt.create(cid + "r", nb)
    assert rc != 0 and "namespace 'team-a'" in err.text and "'team-b'" in err.text, err.text


def _annotate(bundle):
    p = os.path.join(bundle, "config.json")
    spec = json.load(open(p))
    spec.setdefault("annotations", {})["io.kubernetes.cri.sandbox-namespace"] = "team-b"
    with open(p, "w") as f:
        json.dump(spec, f)


def migrt_cli(rt, *args):
    return subprocess.run([rt.binary, *args], capture_output=True, text=True, env=rt.env,
                          timeout=120)


def need_checkpointctl():
    """Debian's checkpointctl; fetched (not installed) by tests/tools/get-checkpointctl.sh."""
    if not os.access(CHECKPOINTCTL, os.X_OK) and "MIGRT_TEST_CHECKPOINTCTL" not in os.environ:
        tool = os.path.join(os.path.dirname(__file__), "..", "tools", "get-checkpointctl.sh")
        subprocess.run(["sh", tool, os.path.dirname(CHECKPOINTCTL)], capture_output=True,
                       timeout=300)
    if not os.access(CHECKPOINTCTL, os.X_OK):
        if os.environ.get("MIGRT_NO_SKIP") == "1":
            pytest.fail(f"checkpointctl not found at {CHECKPOINTCTL} "
                        f"(tests/tools/get-checkpointctl.sh puts Debian's there)")
        pytest.skip(f"requires Debian's checkpointctl ({CHECKPOINTCTL})")


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_export_reads_in_checkpointctl_and_restores(rt, make_bundle, tmp_path, compress, rootfs):
    """deleted.files names what migrt knows was deleted: with the image's unchanged
    rootfs named (MIGRT_ROOTFS_BASE) or an overlay, by name (a plain rootfs dir records
    each changed directory's listing instead, which only a migrt restore reads)."""
    need_checkpointctl()
    rt.env["MIGRT_ROOTFS_BASE"] = rootfs
    cid, bundle, out = start(rt, make_bundle)
    image = str(tmp_path / "ckpt")
    p = rt.run("checkpoint", "--image-path", image, cid)
    assert p.returncode == 0, p.stderr
    before = ocitest.last_count(out)
    arc = str(tmp_path / "exported.tar")
    p = migrt_cli(rt, "image", "export", "--compress", compress, image, arc)
    assert p.returncode == 0, p.stderr
    show = subprocess.run([CHECKPOINTCTL, "show", arc], capture_output=True, text=True)
    assert show.returncode == 0, show.stderr
    assert cid[:12] in show.stdout and "runc" in show.stdout, show.stdout
    insp = subprocess.run([CHECKPOINTCTL, "inspect", arc, "--ps-tree", "--format", "json"],
                          capture_output=True, text=True)
    assert insp.returncode == 0, insp.stderr
    doc = json.loads(insp.stdout)
    assert "sh" in json.dumps(doc), insp.stdout[:500]
    # the rootfs changes travel as podman expects them too
    with (tarfile.open(arc) if compress == "none" else _zstd_tar(arc)) as t:
        names = t.getnames()
        diff = tarfile.open(fileobj=t.extractfile("rootfs-diff.tar"))
        assert "data/new.txt" in diff.getnames()
        assert json.loads(t.extractfile("deleted.files").read()) == ["/bin/vi"]
    assert "checkpoint/inventory.img" in names and "config.dump" in names
    # and it restores through the marker, verified against its migrt manifest
    nb = fresh_bundle(make_bundle, cid, arc)
    rc, out2, err = rt.create(cid + "r", nb, start=True)
    assert rc == 0, err.text
    restored_ok(rt, cid + "r", nb, out2, before)
    assert unpacked_left(rt) == []


def _zstd_tar(path):
    import zstandard
    data = zstandard.ZstdDecompressor().stream_reader(open(path, "rb")).read()
    return tarfile.open(fileobj=io.BytesIO(data))


def test_inspect_and_verify_read_every_form(rt, make_bundle, tmp_path):
    cid, bundle, out = start(rt, make_bundle)
    arc = str(tmp_path / "c.tar.gz")
    root = engine_archive(rt, cid, bundle, arc, compress="gzip")
    forms = {"runc": os.path.join(root, "checkpoint"), "archive": arc, "archive-dir": root}
    for kind, path in forms.items():
        p = migrt_cli(rt, "image", "inspect", "--json", path)
        assert p.returncode == 0, (kind, p.stderr)
        info = json.loads(p.stdout)
        assert [pr["comm"] for pr in info["processes"]][:1] == ["sh"], info["processes"]
        if kind != "runc":
            assert info["container"]["id"] == cid and "podman" in info["format"]
            assert "data/new.txt" in info["rootfs"]["changed"]
            assert info["rootfs"]["deleted"] == ["bin/vi"]
        p = migrt_cli(rt, "image", "inspect", path)
        assert p.returncode == 0 and "processes" in p.stdout, p.stderr
        p = migrt_cli(rt, "image", "verify", "--json", path)
        assert p.returncode == 0, (kind, p.stderr)
        r = json.loads(p.stdout)
        assert r["ok"] is True and r["digests"] is False and r["files"] > 5
    # a damaged one: no pstree.img
    os.unlink(os.path.join(root, "checkpoint", "pstree.img"))
    p = migrt_cli(rt, "image", "verify", "--json", root)
    assert p.returncode == 1
    r = json.loads(p.stdout)
    assert r["ok"] is False and "missing pstree.img" in r["error"]
    p = migrt_cli(rt, "image", "inspect", "/nonexistent/ckpt")
    assert p.returncode == 1 and "/nonexistent/ckpt does not exist" in p.stderr, p.stderr


def test_checkpoint_refused_by_runc_keeps_runcs_message_last(rt, make_bundle, tmp_path):
    """runc refuses some arguments before CRIU runs; containerd shows the last error line
    of --log: it must be runc's, not a migrt line naming a dump.log that was never made."""
    cid, bundle, out = start(rt, make_bundle, script=ocitest.COUNTER)
    log = str(tmp_path / "log.json")
    work = str(tmp_path / "work")
    p = rt.run("--log", log, "--log-format", "json", "checkpoint", "--image-path",
               str(tmp_path / "img"), "--work-path", work, "--parent-path", "/abs/parent", cid)
    assert p.returncode != 0
    errors = [json.loads(l) for l in open(log) if l.strip()]
    errors = [e for e in errors if e.get("level") == "error"]
    assert errors and "parent-path" in errors[-1]["msg"], errors
    assert "dump.log" not in p.stderr and "dump.log" not in json.dumps(errors), p.stderr
    assert rt.state(cid)["status"] == "running"


def test_image_ls_rm_gc_keep_per_container_and_age(rt, make_bundle, tmp_path):
    """Real checkpoints of two containers in an allowed dir: ls lists them, gc keeps the
    newest N of each container (and drops the ones past --max-age), rm refuses anything
    that is not a checkpoint or lies outside the allowed dirs."""
    store = tmp_path / "store"
    store.mkdir()
    rt.env["MIGRT_CHECKPOINT_DIRS"] = str(store)
    rt.env["MIGRT_STAGING"] = str(tmp_path / "staged")
    made = {}
    for name in ("web", "db"):
        cid, bundle, out = start(rt, make_bundle, script=ocitest.COUNTER)
        made[name] = []
        first = str(store / name / "ckpt-0")
        p = rt.run("checkpoint", "--image-path", first, cid)
        assert p.returncode == 0, p.stderr
        for i in range(3):              # three generations of one real checkpoint
            image = str(store / name / f"ckpt-{i}")
            if i:
                shutil.copytree(first, image)
            old = 1_000_000 + i * 1000 + (0 if name == "web" else 10_000_000)
            _set_created(image, old)
            made[name].append(image)
    arc = str(store / "web-export.tar")
    assert migrt_cli(rt, "image", "export", made["web"][0], arc).returncode == 0
    outside = tmp_path / "outside"
    shutil.copytree(made["db"][2], outside)
    p = migrt_cli(rt, "image", "ls", "--json")
    assert p.returncode == 0, p.stderr
    listed = [json.loads(x) for x in p.stdout.splitlines()]
    assert sorted(e["path"] for e in listed) == sorted(made["web"] + made["db"] + [arc])
    assert {e["kind"] for e in listed} == {"migrt", "archive"}
    human = migrt_cli(rt, "image", "ls")
    assert made["db"][2] in human.stdout

    dry = migrt_cli(rt, "image", "gc", "--keep", "1", "--dry-run")
    assert dry.returncode == 0 and "would remove" in dry.stdout
    assert all(os.path.exists(x) for x in made["web"] + made["db"])
    p = migrt_cli(rt, "image", "gc", "--keep", "1", "--json")
    assert p.returncode == 0, p.stderr
    gone = {json.loads(x)["path"] for x in p.stdout.splitlines()}
    # per container: the newest of each stays (the archive is its own: a file name
    # that is not the kubelet's says no container)
    assert made["web"][2] not in gone and made["db"][2] not in gone
    assert {made["web"][0], made["web"][1], made["db"][0], made["db"][1]} <= gone
    assert not any(os.path.exists(x) for x in gone)
    # by age: everything written "long ago" goes, whatever --keep says
    p = migrt_cli(rt, "image", "gc", "--keep", "10", "--max-age", "1d")
    assert p.returncode == 0 and not os.path.exists(made["db"][2]), p.stdout

    plain = store / "notes"
    plain.mkdir()
    p = migrt_cli(rt, "image", "rm", str(plain))
    assert p.returncode == 1 and "is not a checkpoint" in p.stderr and plain.exists()
    p = migrt_cli(rt, "image", "rm", str(tmp_path / "elsewhere"))
    assert p.returncode == 1 and "does not exist" in p.stderr
    p = migrt_cli(rt, "image", "rm", str(outside))
    assert p.returncode == 1 and "outside the allowed" in p.stderr and outside.exists()
    assert os.path.exists(arc)             # new: no --max-age took it
    p = migrt_cli(rt, "image", "rm", arc)
    assert p.returncode == 0 and not os.path.exists(arc)


def _set_created(image, when):
    """Make a migrt image look `when` seconds after the epoch old (its manifest's
    `created` and its mtime), re-sealing nothing: ls/gc read the manifest only."""
    import time as _t
    p = os.path.join(image, "migrt", "manifest.json")
    m = json.load(open(p))
    m["created"] = _t.strftime("%Y-%m-%dT%H:%M:%SZ", _t.gmtime(when))
    with open(p, "w") as f:
        json.dump(m, f)
    os.utime(image, (when, when))


def test_attached_run_from_an_archive_cleans_up_when_it_ends(rt, make_bundle, tmp_path):
    cid, bundle, out = start(rt, make_bundle)
    arc = str(tmp_path / "c.tar")
    engine_archive(rt, cid, bundle, arc)
    before = ocitest.last_count(out)
    nb = fresh_bundle(make_bundle, cid, arc)
    out_r, out_w = os.pipe()
    proc = subprocess.Popen(rt.cmd("run", "--bundle", nb, cid + "r"), stdin=subprocess.PIPE,
                            stdout=out_w, stderr=subprocess.PIPE, env=rt.env)
    os.close(out_w)
    got = ocitest.Output(out_r)
    ocitest.wait_for(lambda: ocitest.last_count(got) > before + 2, what="attached counter")
    assert [int(x) for x in got.lines() if x.isdigit()][0] == before + 1
    rt.run("kill", cid + "r", "KILL")
    assert proc.wait(30) == 137
    assert unpacked_left(rt) == []
