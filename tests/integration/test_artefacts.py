"""Each artefact behaves as the installed launcher: the zipapp (packaging/build_zipapp.py)
and the wheel list their bundled plugins and checkpoint a real container with them
(the logs plugin records the checkpoint, so the plugin really ran)."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

import ocitest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


SYSTEM_PYTHON = ocitest.zipapp_python()
BUNDLED = {"devices", "gpu", "isolation", "logs", "rdma"}


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pyz") / "migrt")
    p = subprocess.run([sys.executable, os.path.join(REPO, "packaging", "build_zipapp.py"),
                        "-o", out, "--python", SYSTEM_PYTHON], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    return out


@pytest.fixture(scope="module")
def wheel_launcher(tmp_path_factory):
    """The wheel, installed (pip --target) and run through a -I -S launcher on the venv's
    Python (which has the dependencies), as a pip user's `migrt` would run."""
    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("src") / "migrt"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "build", "dist", "*.egg-info", ".pytest_cache"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "--no-build-isolation", "-q", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    (whl,) = glob.glob(str(out / "migrt-*.whl"))
    target = tmp_path_factory.mktemp("site")
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                        "--target", str(target), whl], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    site = [x for x in sys.path if x.endswith("site-packages")]
    launcher = target / "migrt-wheel"
    launcher.write_text(f"#!{sys.executable} -IS\nimport sys\n"
                        f"sys.path[:0] = [{str(target)!r}]\nsys.path += {site!r}\n"
                        "from migrt.front.fast import main\nmain()\n")
    launcher.chmod(0o755)
    return str(launcher)


@pytest.fixture(params=["zipapp", "wheel"])
def artefact(request, tmp_path):
    binary = request.getfixturevalue("pyz" if request.param == "zipapp" else "wheel_launcher")
    env = dict(os.environ, MIGRT_PYZ_CACHE=str(tmp_path / "cache"),
               MIGRT_LOG_DIR=str(tmp_path / "records"),
               MIGRT_STATE_DIR=str(tmp_path / "state"))
    env.pop("MIGRT_PLUGIN_PATH", None)
    return binary, env


def test_artefact_lists_bundled_plugins_and_checkpoints_with_them(artefact, make_bundle,
                                                                   tmp_path):
    binary, env = artefact
    p = subprocess.run([binary, "plugins", "--json"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    names = {x["name"] for x in (doc["plugins"] if isinstance(doc, dict) else doc)}
    assert BUNDLED <= names, names

    rt = ocitest.Runtime(binary, str(tmp_path / "root"), env=env)
    try:
        cid = ocitest.uid("art")
        bundle = make_bundle(["sh", "-c", ocitest.COUNTER], name=cid,
                             env=["MIGRT_PLUGINS=logs"])
        rc, out, err = rt.create(cid, bundle, start=True)
        assert rc == 0, err.text
        ocitest.wait_for(lambda: ocitest.last_count(out) >= 3, what="counter")
        image = str(tmp_path / "ckpt")
        p = rt.run("checkpoint", "--image-path", image, cid)
        assert p.returncode == 0, p.stderr
        assert os.path.isfile(os.path.join(image, "migrt", "manifest.json"))
        shown = rt.run("logs", "--json", cid)
        assert shown.returncode == 0, shown.stderr
        events = [json.loads(x)["event"] for x in shown.stdout.splitlines()]
        assert events == ["checkpoint"], shown.stdout
    finally:
        rt.cleanup()
