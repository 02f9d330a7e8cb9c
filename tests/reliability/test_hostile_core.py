"""Hostile and broken input to the runtime core (real runc and CRIU).

- a real migrt image with one byte flipped in any one of its files, truncated, grown,
  with a file added, or with its manifest damaged: refused before runc is called, the
  message naming the file, nothing created, the caller's config.json untouched;
- markers that try to leave the allowed checkpoint locations (`..`, a symlinked
  checkpoint, a symlinked parent, a symlink inside the image, another scheme's
  traversal): refused;
- fuzzed config.json and marker values (hypothesis, bounded): every failure is one
  `migrt:` line with no traceback, nothing is left half-created, nothing is written
  outside the bundle.
"""
import json
import os
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import ocitest

EXAMPLES = int(os.environ.get("MIGRT_FUZZ_EXAMPLES_ROOT", "40"))


@pytest.fixture(scope="module")
def env(tmp_path_factory, rootfs):
    """One real migrt image of a counter, and a runtime for the attempts."""
    tmp = tmp_path_factory.mktemp("hostile")
    launcher = ocitest.build_launcher(str(tmp / "migrt"))
    rt = ocitest.Runtime(launcher, str(tmp / "root"))
    rt._stdin = []
    cid = ocitest.uid("src")
    b = ocitest.bundlekit.make_bundle(str(tmp / cid), ["sh", "-c", ocitest.COUNTER],
                                      rootfs=rootfs, cgroups_path=f"/migrt-test/{cid}")
    rc, out, err = rt.create(cid, b, start=True)
    assert rc == 0, err.text
    ocitest.wait_for(lambda: ocitest.last_count(out) >= 3)
    image = str(tmp / "image")
    p = rt.run("checkpoint", "--image-path", image, cid)
    assert p.returncode == 0, p.stderr
    man = json.load(open(os.path.join(image, "migrt", "manifest.json")))
    yield {"tmp": tmp, "rt": rt, "image": image, "manifest": man, "bundle": b}
    rt.cleanup()


def attempt(env, image_value, tmp_path, cid=None):
    """create with the marker; returns (rc, last error line of the json log, stderr)."""
    rt = env["rt"]
    cid = cid or ocitest.uid("h")
    bundle = str(tmp_path / cid)
    shutil.copytree(env["bundle"], bundle, symlinks=True)
    ocitest.bundlekit.set_env(bundle, "MIGRT_RESTORE_FROM", image_value)
    before = open(os.path.join(bundle, "config.json")).read()
    log = str(tmp_path / f"{cid}.log")
    rc, out, err = rt.create(cid, bundle, log=log)
    msg = None
    if os.path.exists(log):
        lines = open(log).read().splitlines()
        msg = json.loads(lines[-1])["msg"] if lines else None
    if rc != 0:
        assert rt.state(cid) is None
        assert cid not in rt.ids()
        assert open(os.path.join(bundle, "config.json")).read() == before
        assert not os.path.exists(os.path.join(bundle, "config.json.migrt-orig"))
    else:
        rt.run("delete", "--force", cid)
    return rc, msg, err.text


def copy_image(env, tmp_path, name="img"):
    dst = str(tmp_path / name)
    shutil.copytree(env["image"], dst)
    return dst


def test_every_file_bit_flip_is_refused(env, tmp_path):
    files = [e for e in env["manifest"]["files"] if e["size"] > 0]
    assert len(files) >= 5
    refused = 0
    for i, e in enumerate(files):
        img = copy_image(env, tmp_path, f"flip{i}")
        path = os.path.join(img, e["path"])
        data = bytearray(open(path, "rb").read())
        data[(i * 7919) % len(data)] ^= 0x10
        open(path, "wb").write(bytes(data))
        rc, msg, err = attempt(env, img, tmp_path)
        assert rc != 0 and msg and path in msg and "does not match its digest" in msg, msg
        assert "Traceback" not in err
        refused += 1
    print(f"\nHOSTILE bit flips refused: {refused} of {len(files)} files")


@pytest.mark.parametrize("damage", ["truncate", "grow", "add", "remove", "manifest-flip",
                                    "manifest-truncate", "manifest-escape"])
def test_damaged_image_refused(env, tmp_path, damage):
    img = copy_image(env, tmp_path)
    pages = [e["path"] for e in env["manifest"]["files"] if e["path"].startswith("pages-")][0]
    man = os.path.join(img, "migrt", "manifest.json")
    expect = pages
    if damage == "truncate":
        os.truncate(os.path.join(img, pages), os.path.getsize(os.path.join(img, pages)) // 2)
    elif damage == "grow":
        with open(os.path.join(img, pages), "ab") as f:
            f.write(b"\0" * 4096)
    elif damage == "add":
        with open(os.path.join(img, "extra.img"), "wb") as f:
            f.write(b"x")
        os.chmod(os.path.join(img, "extra.img"), 0o600)
        expect = "extra.img"
    elif damage == "remove":
        os.unlink(os.path.join(img, pages))
        expect = pages
    elif damage == "manifest-flip":
        raw = bytearray(open(man, "rb").read())
        raw[raw.index(b'"format"') + 1] ^= 0x20
        open(man, "wb").write(bytes(raw))
        expect = "manifest.json"
    elif damage == "manifest-truncate":
        os.truncate(man, os.path.getsize(man) // 3)
        expect = "manifest.json"
    elif damage == "manifest-escape":
        m = json.load(open(man))
        m["files"][0]["path"] = "../../../../etc/shadow"
        json.dump(m, open(man, "w"))
        expect = "manifest.json"
    rc, msg, err = attempt(env, img, tmp_path)
    assert rc != 0 and msg and expect in msg, msg
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_markers_outside_allowed_locations(env, tmp_path, monkeypatch):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    outside = tmp_path / "outside"
    shutil.copytree(env["image"], outside)                   # a valid image, elsewhere
    (allowed / "link").symlink_to(outside)                   # symlinked checkpoint
    (allowed / "sub").symlink_to(tmp_path)                   # symlinked parent
    env["rt"].env["MIGRT_CHECKPOINT_DIRS"] = str(allowed)
    try:
        for value in (str(outside), f"{allowed}/../outside", str(allowed / "link"),
                      str(allowed / "sub" / "outside"), f"encrypted:{outside}",
                      f"encrypted:{allowed}/../outside", "staged:../../outside",
                      "staged:m-0000000000000000/../../x", "nosuch:scheme", "outside",
                      "/proc/self/root" + str(outside)):
            rc, msg, err = attempt(env, value, tmp_path)
            assert rc != 0, value
            assert msg and ("outside the allowed" in msg or "not a migration id" in msg
                            or "absolute path" in msg or "unknown checkpoint source" in msg
                            or "no such staged" in msg), (value, msg)
            assert "Traceback" not in err
        # and the same image inside the allowed dir restores: the refusals were the path
        shutil.copytree(env["image"], allowed / "ok")
        rc, msg, err = attempt(env, str(allowed / "ok"), tmp_path)
        assert rc == 0, msg
    finally:
        env["rt"].env["MIGRT_CHECKPOINT_DIRS"] = os.environ["MIGRT_CHECKPOINT_DIRS"]


OUTCOMES = {True: 0, False: 0}
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=12))
MARKERS = st.one_of(
    st.sampled_from(["", "/", "/etc", "/tmp/../etc", "staged:", "staged:m-", "encrypted:",
                     "encrypted:/etc", "staged:m-0123456789abcdef", "x:y", ":", "/dev/null",
                     "/proc/1/root", "\n", "/tmp/\x00x"]),
    st.text(max_size=30))


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_config_fails_cleanly(env, tmp_path, data):
    spec = json.load(open(os.path.join(env["bundle"], "config.json")))
    marker = data.draw(MARKERS)
    env_list = [e for e in spec["process"]["env"]] + [f"MIGRT_RESTORE_FROM={marker}"]
    how = data.draw(st.sampled_from(["env-type", "process-type", "env-item", "args", "root",
                                     "marker-only", "raw"]))
    if how == "env-type":
        spec["process"]["env"] = data.draw(SCALARS)
    elif how == "process-type":
        spec["process"] = data.draw(st.one_of(SCALARS, st.lists(SCALARS, max_size=3)))
    elif how == "env-item":
        spec["process"]["env"] = env_list + [data.draw(SCALARS)]
    elif how == "args":
        spec["process"]["env"] = env_list
        spec["process"]["args"] = data.draw(st.one_of(SCALARS, st.lists(SCALARS, max_size=3)))
    elif how == "root":
        spec["process"]["env"] = env_list
        spec["root"] = data.draw(st.one_of(SCALARS, st.fixed_dictionaries(
            {"path": st.sampled_from(["../../../", "/", "rootfs", "/etc"])})))
    else:
        spec["process"]["env"] = env_list
    raw = json.dumps(spec)
    if how == "raw":
        cut = data.draw(st.integers(0, len(raw)))
        raw = raw[:cut] + data.draw(st.text(max_size=5)) + raw[cut:]
    bundle = tmp_path / ocitest.uid("fz")
    bundle.mkdir()
    os.symlink(os.path.join(env["bundle"], "rootfs"), bundle / "rootfs")
    (bundle / "config.json").write_text(raw)
    listing = sorted(os.listdir(bundle))
    cid = ocitest.uid("fz")
    rt = env["rt"]
    # files, not pipes, for stdio: a container that does get created must not hold them
    with open(tmp_path / f"{cid}.out", "w+") as out, open(tmp_path / f"{cid}.err", "w+") as err:
        p = subprocess.run(rt.cmd("create", "--bundle", str(bundle), cid), stdout=out,
                           stderr=err, stdin=subprocess.DEVNULL, timeout=60, env=rt.env)
        err.seek(0)
        stderr = err.read()
    OUTCOMES[p.returncode == 0] += 1
    if p.returncode == 0:
        rt.run("delete", "--force", cid)
        return
    assert "Traceback" not in stderr, stderr
    assert stderr.startswith("migrt: ") or "runc" in stderr or "container" in stderr, stderr
    assert rt.state(cid) is None
    assert (bundle / "config.json").read_bytes() == raw.encode()  # caller's file as it was
    assert sorted(os.listdir(bundle)) == listing                   # nothing new in the bundle


def test_fuzz_outcomes_printed():
    print(f"\nHOSTILE fuzzed configs: {OUTCOMES[False]} refused cleanly, {OUTCOMES[True]} created")


def test_staged_migration_cannot_be_taken_by_another_bundle(tmp_path, migrt_launcher,
                                                            make_bundle):
    """While a migration waits (staged and verified) to be restored into its bundle, a
    container of another bundle on the same node that names it is refused; the
    migration then completes into its own bundle."""
    import re
    import migr
    nodes = migr.Nodes(migrt_launcher, tmp_path, make_bundle)
    try:
        fp = tmp_path / "fp"
        fp.mkdir()
        ag = nodes.agent()
        cid, bundle, dest, out = nodes.counter()
        mig = nodes.spawn_migrate(cid, dest, ag, env={
            "MIGRT_FAILPOINTS": "migrate.before-restore=pause(5)", "MIGRT_FAILPOINT_DIR": str(fp)})
        ocitest.wait_for(lambda: os.listdir(fp), timeout=60, what="staged")
        mid = re.search(r"(m-[0-9a-f]+): staged and verified", ag.log()).group(1)
        thief = make_bundle(["sh", "-c", "cat /proc/1/environ; sleep 60"], name="thief")
        ocitest.bundlekit.set_env(thief, "MIGRT_RESTORE_FROM", f"staged:{mid}")
        rt = ocitest.Runtime(migrt_launcher, nodes.b.root, env={"MIGRT_STAGING": ag.staging})
        log = str(tmp_path / "thief.log")
        rc, _, err = rt.create("thief", thief, log=log)
        assert rc != 0
        msg = json.loads(open(log).read().splitlines()[-1])["msg"]
        assert f"was sent for bundle {dest}" in msg, msg
        assert rt.state("thief") is None
        assert mig.wait(120) == 0, mig.stderr.read().decode()
        out.thread.join(15)
        nums = migr.wait_dest_counting(ag, cid, ocitest.last_count(out))
        assert nums[0] == ocitest.last_count(out) + 1
    finally:
        nodes.cleanup()


@pytest.mark.parametrize("where", ["migrt/manifest.json", "migrt/verified.json", "core"])
def test_a_fifo_in_a_checkpoint_is_refused_not_waited_on(env, tmp_path, where):
    """Issue 15: a FIFO opened for reading blocks until a writer comes: create hung
    forever. Every file of a checkpoint is opened O_NOFOLLOW|O_NONBLOCK and must be a
    regular file."""
    img = copy_image(env, tmp_path, "fifo")
    if where == "core":
        shutil.rmtree(os.path.join(img, "migrt"))         # a plain runc checkpoint
        where = sorted(n for n in os.listdir(img) if n.startswith("core-"))[0]
    path = os.path.join(img, where)
    if os.path.exists(path):
        os.unlink(path)
    os.mkfifo(path, 0o600)
    rt = env["rt"]
    cid = ocitest.uid("fifo")
    bundle = str(tmp_path / cid)
    shutil.copytree(env["bundle"], bundle, symlinks=True)
    ocitest.bundlekit.set_env(bundle, "MIGRT_RESTORE_FROM", img)
    before = open(os.path.join(bundle, "config.json")).read()
    rc, out, err = rt.create(cid, bundle, timeout=60)      # (it hung here)
    lines = [ln for ln in err.text.splitlines() if ln.strip()]
    if where.endswith("verified.json"):
        # the stamp is only a shortcut: a bad one means "check everything", which passes
        assert rc == 0, err.text
        rt.run("delete", "--force", cid)
        return
    assert rc != 0 and len(lines) == 1 and "not a regular file" in lines[0], lines
    assert rt.state(cid) is None
    assert open(os.path.join(bundle, "config.json")).read() == before


def test_a_huge_or_hostile_marker_is_quoted_and_cut(env, tmp_path):
    """Issue 15: a 100 KB marker came back whole in one 100,756-character line, and a
    right-to-left override raw. What is echoed is quoted, escaped and cut."""
    value = "/nowhere/\u202e" + "A" * 100_000 + "\x1b[31m"
    rc, msg, err = attempt(env, value, tmp_path)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc != 0 and len(lines) == 1, lines
    assert len(lines[0]) < 2500 and len(msg) < 2500
    assert "\u202e" not in err and "\x1b" not in err and "\\u202e" in err
