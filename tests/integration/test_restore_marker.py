"""create with MIGRT_RESTORE_FROM restores; start is a no-op; bad markers leave nothing.

Real runc and CRIU on busybox bundles. The workload is ocitest.COUNTER: a shell counter
that prints to stdout and appends to /data/counter.log through fd 3, kept open.
"""
import json
import os
import shutil
import struct
import subprocess
import time

import pytest

import ocitest


@pytest.fixture
def rt(node, migrt_launcher):
    return node("migrt", binary=migrt_launcher)


def run_counter(rt, make_bundle):
    cid = ocitest.uid("ctr")
    bundle = make_bundle(["sh", "-c", ocitest.COUNTER], name=cid)
    rc, out, err = rt.create(cid, bundle, start=True)
    assert rc == 0, err.text
    ocitest.wait_for(lambda: ocitest.last_count(out) >= 5, what="counter")
    return cid, bundle, out


def checkpoint(rt, cid, image):
    p = rt.run("checkpoint", "--image-path", image, cid)
    assert p.returncode == 0, p.stderr
    return image


def counter_log(bundle):
    with open(os.path.join(bundle, "rootfs", "data", "counter.log")) as f:
        return [int(x) for x in f.read().split()]


def test_marker_create_restores_and_state_continues(rt, make_bundle, tmp_path):
    cid, bundle, out = run_counter(rt, make_bundle)
    image = checkpoint(rt, cid, str(tmp_path / "ckpt"))
    before = ocitest.last_count(out)
    assert rt.state(cid) is None                       # runc checkpoint stopped it
    ocitest.bundlekit.set_env(bundle, "MIGRT_RESTORE_FROM", image)
    original = open(os.path.join(bundle, "config.json")).read()
    log = str(tmp_path / "log.json")
    pidfile = os.path.join(bundle, "init.pid")
    rc, out2, err = rt.create(cid, bundle, "--pid-file", pidfile, log=log)
    assert rc == 0, err.text
    st = rt.state(cid)
    assert st["status"] == "running"
    assert int(open(pidfile).read()) == st["pid"]
    # start after a marker create succeeds and does nothing; a second start is runc's
    assert rt.run("start", cid).returncode == 0
    again = rt.run("start", cid)
    assert again.returncode == 1 and "already running" in again.stderr
    ocitest.wait_for(lambda: ocitest.last_count(out2) > before + 3, what="restored counter")
    # stdout of the new container carries on exactly where the old one stopped
    nums = [int(x) for x in out2.lines() if x.isdigit()]
    assert nums[0] == before + 1 and nums == list(range(nums[0], nums[0] + len(nums)))
    # the file the workload kept open on fd 3 got every number, in order, once
    log_nums = counter_log(bundle)
    assert log_nums == list(range(1, len(log_nums) + 1)) and log_nums[-1] > before
    # runc got a spec without the marker; once it is read, the bundle keeps the caller's
    # own config.json and no backup is left (a stale one was put back by a later create)
    assert open(os.path.join(bundle, "config.json")).read() == original
    assert not os.path.exists(os.path.join(bundle, "config.json.migrt-orig"))
    environ = rt.exec_out(cid, "cat", "/proc/1/environ")
    assert "MIGRT_RESTORE_FROM" not in environ
    assert rt.run("kill", cid, "KILL").returncode == 0
    ocitest.wait_for(lambda: rt.state(cid)["status"] == "stopped", what="stopped")
    assert work_dirs(rt.root, cid)                      # its restore's work dir, until...
    assert rt.run("delete", cid).returncode == 0
    assert rt.state(cid) is None
    assert work_dirs(rt.root, cid) == []                # ...the container is deleted


def work_dirs(root, cid):
    import glob
    import hashlib
    key = hashlib.sha1(f"{os.path.realpath(root)}\0{cid}".encode()).hexdigest()[:16]
    state = os.environ.get("MIGRT_STATE_DIR", "/run/migrt")
    return glob.glob(os.path.join(state, "work", key)) + glob.glob(
        os.path.join(state, "work", key + "-*"))


def snapshot(top):
    """Everything a user would compare in a rootfs: each entry's type, mode, owner,
    size, mtime and content or link target."""
    out = {}
    for dirpath, dirnames, names in os.walk(top):
        for n in dirnames + names:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            body = None
            if os.path.islink(p):
                body = os.readlink(p)
            elif os.path.isfile(p):
                body = open(p, "rb").read()
            out[os.path.relpath(p, top)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                            st.st_mtime_ns if not os.path.isdir(p) else 0, body)
    return out


def test_failed_restore_leaves_the_bundle_exactly_as_given(migrt_launcher, make_bundle,
                                                           tmp_path, good_image):
    """Issue 15: the image's rootfs changes were applied before `runc restore` and not
    undone when it failed (a file of the caller's was gone), and a stale
    config.json.migrt-orig from an earlier restore was put back instead of what the
    caller wrote. A failed create leaves the bundle as it was, rootfs included, and no
    work dir."""
    img = copy_image(good_image, tmp_path)
    b = marker_bundle(make_bundle, img)
    rootfs = os.path.join(b, "rootfs")
    os.makedirs(os.path.join(rootfs, "data"), exist_ok=True)
    with open(os.path.join(rootfs, "data", "keep.txt"), "w") as f:   # not in the image's
        f.write("the caller's own file\n")                            # listing of /data
    with open(os.path.join(rootfs, "data", "counter.log"), "w") as f:  # the image replaces
        f.write("mine\n")
    with open(os.path.join(b, "config.json.migrt-orig"), "w") as f:
        f.write('{"stale": "from an earlier restore"}')
    before = open(os.path.join(b, "config.json")).read()
    snap = snapshot(rootfs)
    fake = tmp_path / "fakebin"
    fake.mkdir()
    real = shutil.which("criu")
    (fake / "criu").write_text(                           # runc's CRIU (swrk) fails
        f'#!/bin/sh\ncase "$1" in swrk) exit 1;; esac\nexec {real} "$@"\n')
    (fake / "criu").chmod(0o755)
    # (a `criu` named by MIGRT_CRIU goes first on the PATH runc gets: migrt.runc.sbin_path)
    rt = ocitest.Runtime(migrt_launcher, str(tmp_path / "root-fail"),
                         env=dict(os.environ, MIGRT_CRIU=str(fake / "criu"),
                                  PATH=f"{fake}:{os.environ['PATH']}"))
    try:
        cid = ocitest.uid("undo")
        msg, err = failing_create(rt, cid, b, tmp_path)
        assert msg.startswith(f"restore of {cid} from {img} failed"), msg
        assert snapshot(rootfs) == snap
        assert open(os.path.join(b, "config.json")).read() == before
        assert not os.path.exists(os.path.join(b, "config.json.migrt-orig"))
        assert work_dirs(rt.root, cid) == []
    finally:
        rt.cleanup()


def test_marker_run_restores_attached(rt, make_bundle, tmp_path):
    cid, bundle, out = run_counter(rt, make_bundle)
    image = checkpoint(rt, cid, str(tmp_path / "ckpt"))
    before = ocitest.last_count(out)
    ocitest.bundlekit.set_env(bundle, "MIGRT_RESTORE_FROM", image)
    out_r, out_w = os.pipe()
    proc = subprocess.Popen(rt.cmd("run", "--bundle", bundle, cid), stdin=subprocess.PIPE,
                            stdout=out_w, stderr=subprocess.PIPE)
    os.close(out_w)
    got = ocitest.Output(out_r)
    ocitest.wait_for(lambda: ocitest.last_count(got) > before + 2, what="attached counter")
    assert proc.poll() is None                           # still attached
    assert [int(x) for x in got.lines() if x.isdigit()][0] == before + 1
    rt.run("kill", cid, "KILL")
    assert proc.wait(30) == 137
    assert rt.state(cid) is None                         # run without --keep deletes


def test_delete_after_restore_removes_work_dir(rt, make_bundle, tmp_path):
    cid, bundle, out = run_counter(rt, make_bundle)
    image = checkpoint(rt, cid, str(tmp_path / "ckpt"))
    ocitest.bundlekit.set_env(bundle, "MIGRT_RESTORE_FROM", image)
    rc, _, err = rt.create(cid, bundle)
    assert rc == 0, err.text
    record = json.load(open(os.path.join(rt.root, cid, "migrt.json")))
    assert os.path.isdir(record["work"])
    assert rt.run("delete", "--force", cid).returncode == 0
    assert not os.path.exists(record["work"])
    assert rt.state(cid) is None


# ---------------------------------------------------------------- bad input


def failing_create(rt, cid, bundle, tmp_path):
    log = str(tmp_path / f"{cid}.log.json")
    rc, out, err = rt.create(cid, bundle, log=log)
    assert rc != 0
    last = json.loads(open(log).read().splitlines()[-1])
    assert last["level"] == "error"
    # nothing half-created: state says it does not exist, delete is harmless
    assert rt.state(cid) is None
    d = rt.run("delete", cid)
    assert "does not exist" in d.stderr
    assert rt.run("delete", "--force", cid).returncode in (0, 1)
    assert cid not in rt.ids()
    return last["msg"], err.text


def marker_bundle(make_bundle, value):
    b = make_bundle(["sh", "-c", "echo fresh; sleep 600"])
    ocitest.bundlekit.set_env(b, "MIGRT_RESTORE_FROM", value)
    return b


def test_marker_missing_checkpoint(rt, make_bundle, tmp_path):
    missing = str(tmp_path / "no-such-ckpt")
    b = marker_bundle(make_bundle, missing)
    before = open(os.path.join(b, "config.json")).read()
    msg, err = failing_create(rt, "m1", b, tmp_path)
    assert msg == f"checkpoint {missing} does not exist"
    assert f"migrt: {msg}" in err
    assert open(os.path.join(b, "config.json")).read() == before


@pytest.fixture(scope="module")
def good_image(tmp_path_factory, rootfs):
    """One real checkpoint of a counter, shared by the corruption tests (copied each)."""
    tmp = tmp_path_factory.mktemp("img")
    import ocitest as o
    launcher = o.build_launcher(str(tmp / "migrt"))
    r = o.Runtime(launcher, str(tmp / "root"))
    cid = o.uid("src")
    b = o.bundlekit.make_bundle(str(tmp / cid), ["sh", "-c", o.COUNTER], rootfs=rootfs,
                                cgroups_path=f"/migrt-test/{cid}")
    rc, out, err = r.create(cid, b, start=True)
    assert rc == 0, err.text
    o.wait_for(lambda: o.last_count(out) >= 3)
    p = r.run("checkpoint", "--image-path", str(tmp / "image"), cid)
    assert p.returncode == 0, p.stderr
    r.cleanup()
    return str(tmp / "image"), b


def copy_image(good_image, tmp_path):
    dst = str(tmp_path / "image")
    shutil.copytree(good_image[0], dst)
    return dst


def test_marker_incomplete_checkpoint(rt, make_bundle, tmp_path, good_image):
    img = copy_image(good_image, tmp_path)
    os.unlink(os.path.join(img, "inventory.img"))
    msg, _ = failing_create(rt, "m2", marker_bundle(make_bundle, img), tmp_path)
    assert msg == f"checkpoint {img} is incomplete: missing inventory.img"


def test_marker_foreign_architecture(rt, make_bundle, tmp_path, good_image):
    """A plain runc checkpoint (no migrt manifest) made on another machine type."""
    img = copy_image(good_image, tmp_path)
    shutil.rmtree(os.path.join(img, "migrt"), ignore_errors=True)
    core = sorted(f for f in os.listdir(img) if f.startswith("core-"))[0]
    path = os.path.join(img, core)
    data = bytearray(open(path, "rb").read())
    assert data[12] == 0x08 and data[13] == 1           # CoreEntry.mtype = X86_64
    data[13] = 3                                          # AARCH64
    open(path, "wb").write(bytes(data))
    msg, _ = failing_create(rt, "m3", marker_bundle(make_bundle, img), tmp_path)
    assert msg == f"checkpoint {img} was made on aarch64 ({core}); this node is x86_64"


def test_marker_outside_allowed_locations(rt, make_bundle, tmp_path, good_image):
    img = copy_image(good_image, tmp_path)
    link = tmp_path / "link"
    link.symlink_to("/var/lib/dpkg")
    for value in (f"{tmp_path}/../../../../../../../var/lib/dpkg", "/etc", str(link),
                  "relative/ckpt"):
        msg, _ = failing_create(rt, "m4", marker_bundle(make_bundle, value), tmp_path)
        assert ("outside the allowed checkpoint locations" in msg
                or "must be an absolute path" in msg), msg


def test_symlink_inside_checkpoint_refused(rt, make_bundle, tmp_path, good_image):
    img = copy_image(good_image, tmp_path)
    pages = sorted(f for f in os.listdir(img) if f.startswith("pages-"))[0]
    os.unlink(os.path.join(img, pages))
    os.symlink("/etc/shadow", os.path.join(img, pages))
    msg, _ = failing_create(rt, "m5", marker_bundle(make_bundle, img), tmp_path)
    assert msg == f"checkpoint {img}: {pages} is a symlink; refusing to restore"


def test_malformed_config(rt, tmp_path):
    b = tmp_path / "bad"
    b.mkdir()
    (b / "config.json").write_text('{"process": {"env": ["MIGRT_RESTORE_FROM=/tmp/x"],')
    msg, _ = failing_create(rt, "m6", str(b), tmp_path)
    assert msg.startswith(f"bundle {b}: config.json is not valid JSON")
    (b / "config.json").write_text('{"process": {"env": "MIGRT_RESTORE_FROM=/tmp/x"}}')
    msg, _ = failing_create(rt, "m6", str(b), tmp_path)
    assert msg == f"bundle {b}: config.json: process.env is not a list"


def test_criu_failure_quotes_criu_log(rt, make_bundle, tmp_path, good_image):
    """Restoring into a rootfs without the workload's open file: CRIU refuses, and the
    message names the CRIU log and quotes its error."""
    img = copy_image(good_image, tmp_path)
    # a plain runc checkpoint: without migrt's rootfs changes, the fresh rootfs has
    # no /data/counter.log for the workload's open fd 3
    shutil.rmtree(os.path.join(img, "migrt"), ignore_errors=True)
    b = marker_bundle(make_bundle, img)
    before = open(os.path.join(b, "config.json")).read()
    msg, _ = failing_create(rt, "m7", b, tmp_path)
    assert msg.startswith(f"restore of m7 from {img} failed")
    assert "CRIU log /" in msg and "restore.log" in msg
    assert "data/counter.log" in msg
    assert "RLIMIT_NOFILE" not in msg
    # the caller's bundle is as it was (marker included), ready for a retry
    assert open(os.path.join(b, "config.json")).read() == before
    assert not os.path.exists(os.path.join(b, "config.json.migrt-orig"))


def console_receiver(path):
    """Accept one connection on a unix socket and take the pty master runc sends."""
    import socket
    import threading
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    got = {}

    def accept():
        conn, _ = srv.accept()
        _, fds, _, _ = socket.recv_fds(conn, 1024, 1)
        got["fd"] = fds[0]
        conn.close()
        srv.close()
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    return got, t


def read_tty(fd, until, timeout=10):
    import select
    buf = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end and not until(buf):
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            buf += os.read(fd, 4096)
    return [int(x) for x in buf.decode().split() if x.isdigit()]


def test_terminal_container_restores_onto_new_console_socket(rt, make_bundle, tmp_path):
    cid = ocitest.uid("tty")
    b = make_bundle(["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done"])
    spec = ocitest.bundlekit.read_spec(b)
    spec["process"]["terminal"] = True
    ocitest.bundlekit.write_spec(b, spec)
    got, t = console_receiver(str(tmp_path / "c1.sock"))
    p = rt.run("create", "--bundle", b, "--console-socket", str(tmp_path / "c1.sock"), cid)
    assert p.returncode == 0, p.stderr
    t.join(10)
    assert rt.run("start", cid).returncode == 0
    first = read_tty(got["fd"], lambda buf: buf.count(b"\n") >= 5)
    assert first[:3] == [1, 2, 3]
    assert rt.run("checkpoint", "--image-path", str(tmp_path / "ckpt"), cid).returncode == 0
    ocitest.bundlekit.set_env(b, "MIGRT_RESTORE_FROM", str(tmp_path / "ckpt"))
    got2, t2 = console_receiver(str(tmp_path / "c2.sock"))
    p = rt.run("create", "--bundle", b, "--console-socket", str(tmp_path / "c2.sock"), cid)
    assert p.returncode == 0, p.stderr
    t2.join(10)
    assert "fd" in got2, "runc restore did not send the new console to --console-socket"
    assert rt.run("start", cid).returncode == 0
    after = read_tty(got2["fd"], lambda buf: buf.count(b"\n") >= 5)
    # the counter goes on on the new terminal (lines still in the old pty are lost)
    assert after and after[0] > first[-1] and after == list(range(after[0], after[0] + len(after)))


@pytest.mark.parametrize("key", ["io.kubernetes.cri.sandbox-namespace",    # containerd
                                 "io.kubernetes.pod.namespace"])            # CRI-O
def test_pod_of_another_namespace_cannot_restore(rt, make_bundle, tmp_path, key):
    """A checkpoint of a pod in namespace team-a, named by a pod in team-b: refused
    before anything runs, with both namespaces in the message; the same marker in a
    team-a pod restores, and the counter goes on."""
    cid = ocitest.uid("ctr")
    src = make_bundle(["sh", "-c", ocitest.COUNTER], name=cid, annotations={key: "team-a"})
    rc, out, err = rt.create(cid, src, start=True)
    assert rc == 0, err.text
    ocitest.wait_for(lambda: ocitest.last_count(out) >= 5, what="counter")
    image = checkpoint(rt, cid, str(tmp_path / "ckpt"))
    with open(os.path.join(image, "migrt", "manifest.json")) as f:
        assert json.load(f)["container"]["namespace"] == "team-a"

    other = make_bundle(["sh", "-c", "echo fresh; sleep 600"], annotations={key: "team-b"})
    ocitest.bundlekit.set_env(other, "MIGRT_RESTORE_FROM", image)
    msg, _ = failing_create(rt, "intruder", other, tmp_path)
    assert msg == (f"checkpoint {image} was taken from a pod in namespace 'team-a'; this "
                   f"pod is in 'team-b' (a node can allow it with "
                   f"MIGRT_ALLOW_CROSS_NAMESPACE=1)"), msg

    ocitest.bundlekit.set_env(src, "MIGRT_RESTORE_FROM", image)
    before = ocitest.last_count(out)
    rc, out2, err = rt.create(cid, src, start=True)
    assert rc == 0, err.text
    ocitest.wait_for(lambda: ocitest.last_count(out2) > before + 2, what="restored counter")
    rt.run("delete", "--force", cid)
