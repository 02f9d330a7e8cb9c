"""A checkpoint made through migrt carries a manifest; `migrt image inspect|verify` read
it; a damaged image is refused before restore with the bad file named."""
import json
import os
import shutil

import ocitest


def checkpoint(node, make_bundle, tmp_path, env):
    rt = node("a")
    rt.env.update(env)
    bundle = make_bundle(["sh", "-c", ocitest.COUNTER], name="src")
    code, out, err = rt.create("ctr", bundle, start=True)
    assert code == 0, err.text
    ocitest.wait_for(lambda: ocitest.last_count(out) >= 5, what="counter")
    img = os.path.join(env["MIGRT_CHECKPOINT_DIRS"], "ctr")
    p = rt.run("checkpoint", "--image-path", img, "ctr")
    assert p.returncode == 0, p.stderr
    return rt, bundle, img, out


def test_inspect_verify_and_damage(node, make_bundle, tmp_path, migrt_launcher):
    ckdir = tmp_path / "ckpts"
    ckdir.mkdir()
    env = {"MIGRT_CHECKPOINT_DIRS": str(ckdir)}
    rt, bundle, img, out = checkpoint(node, make_bundle, tmp_path, env)
    assert os.path.exists(os.path.join(img, "migrt", "manifest.json"))
    assert os.stat(img).st_mode & 0o077 == 0

    p = rt.run("image", "inspect", "--json", img)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["container"]["id"] == "ctr"
    assert {pr["comm"] for pr in info["processes"]} >= {"sh"}
    assert "data/counter.log" in info["rootfs"]["changed"]
    assert info["sizes"]["memory"] > 0
    p = rt.run("image", "inspect", img)
    assert "processes" in p.stdout and "rootfs" in p.stdout

    p = rt.run("image", "verify", img)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr

    # a copy with one flipped byte in a CRIU image: verify and restore both name it
    bad = os.path.join(str(ckdir), "bad")
    shutil.copytree(img, bad)
    pages = sorted(f for f in os.listdir(bad) if f.startswith("pages-"))[0]
    with open(os.path.join(bad, pages), "r+b") as f:
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 0xFF]))
    p = rt.run("image", "verify", bad)
    assert p.returncode != 0 and pages in p.stderr, p.stderr

    rb = node("b")
    rb.env.update(env)
    dst = make_bundle(["sh", "-c", ocitest.COUNTER], name="dst", env=[f"MIGRT_RESTORE_FROM={bad}"])
    code, _, err = rb.create("ctr2", dst)
    assert code != 0 and pages in err.text, err.text
    assert rb.state("ctr2") is None

    # the intact image restores, with the writable layer, and the counter goes on
    dst2 = make_bundle(["sh", "-c", ocitest.COUNTER], name="dst2", env=[f"MIGRT_RESTORE_FROM={img}"])
    code, out2, err = rb.create("ctr3", dst2, start=True)
    assert code == 0, err.text
    last = ocitest.last_count(out)
    ocitest.wait_for(lambda: ocitest.last_count(out2) > last + 2, what="counter after restore")
