"""migrt/front/front.sh (proposed shell front door): which calls go straight to runc and
which reach migrt's Python, for the argv forms containerd, conmon and podman send.

The rule: runc only when the call is certainly none of migrt's business; Python for
everything else (Python then decides exactly). No root needed: fake runc and a fake
Python launcher print which of them ran.
"""
import json
import os
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FRONT = os.path.join(HERE, "..", "..", "migrt", "front", "front.sh")


@pytest.fixture
def front(tmp_path):
    for name in ("runc", "py"):
        p = tmp_path / name
        p.write_text(f"#!/bin/sh\necho {name.upper()} \"$@\"\n")
        p.chmod(0o755)
    text = open(FRONT).read().replace("@PY_LAUNCHER@", str(tmp_path / "py"))
    f = tmp_path / "migrt"
    f.write_text(text)
    f.chmod(0o755)
    root = tmp_path / "root"
    (root / "restored").mkdir(parents=True)
    (root / "restored" / "migrt.json").write_text("{}")
    (root / "plain").mkdir()
    plain, marked = tmp_path / "plain-bundle", tmp_path / "marked-bundle"
    for b, env in ((plain, ["PATH=/bin"]), (marked, ["PATH=/bin", "MIGRT_RESTORE_FROM=/x"])):
        b.mkdir()
        (b / "config.json").write_text(json.dumps({"process": {"env": env}}))

    def route(*argv, cwd=None):
        p = subprocess.run([str(f), *[a.format(root=root, plain=plain, marked=marked)
                                      for a in argv]],
                           capture_output=True, text=True, cwd=cwd, timeout=30,
                           env=dict(os.environ, MIGRT_RUNC=str(tmp_path / "runc"),
                                    MIGRT_CONFIG=str(tmp_path / "no-config.yaml")))
        assert p.returncode == 0, p.stderr
        which, _, rest = p.stdout.strip().partition(" ")
        assert rest == " ".join(a.format(root=root, plain=plain, marked=marked)
                                for a in argv), "argv must reach the target untouched"
        return which
    route.plain = plain
    return route


CONTAINERD = ["--root", "{root}", "--log", "/l/log.json", "--log-format", "json"]
CONMON = ["--systemd-cgroup", "--root={root}"]


@pytest.mark.parametrize("argv,expected", [
    (CONTAINERD + ["create", "--bundle", "{plain}", "--pid-file", "/p", "c1"], "RUNC"),
    (CONTAINERD + ["create", "--bundle", "{marked}", "--pid-file", "/p", "c1"], "PY"),
    (CONMON + ["create", "--bundle", "{plain}", "--pid-file", "/p", "--no-new-keyring",
               "c1"], "RUNC"),
    (CONMON + ["create", "-b={marked}", "c1"], "PY"),
    (["run", "-d", "--bundle", "{plain}", "c1"], "RUNC"),
    (["run", "--bundle", "{marked}", "c1"], "PY"),
    (["create", "--bundle", "/no/such/bundle", "c1"], "PY"),
    (CONTAINERD + ["start", "plain"], "RUNC"),
    (CONTAINERD + ["start", "restored"], "PY"),
    (CONMON + ["delete", "--force", "restored"], "PY"),
    (CONTAINERD + ["delete", "--force", "plain"], "RUNC"),
    (CONTAINERD + ["kill", "c1", "15"], "RUNC"),
    (CONTAINERD + ["kill", "--all", "c1", "9"], "RUNC"),
    (CONTAINERD + ["exec", "--process", "/p.json", "--detach", "--pid-file", "/p", "c1"],
     "RUNC"),
    (["state", "c1"], "RUNC"),
    (["ps", "--format", "json", "c1"], "RUNC"),
    (["update", "--resources=-", "c1"], "RUNC"),
    (["features"], "RUNC"),
    (CONMON + ["restore", "--detach", "--image-path", "/i", "--work-path", "/w", "c1"],
     "RUNC"),
    (CONTAINERD + ["checkpoint", "--image-path", "/i", "c1"], "PY"),
    (["checkpoint", "--help"], "PY"),
    (["doctor"], "PY"),
    (["migrate", "c1", "--to", "h:1"], "PY"),
    (["--help"], "PY"),
    (["--version"], "PY"),
    ([], "PY"),
    (["create", "--bogus", "c1"], "PY"),
    (["create", "--bundle", "{plain}", "c1", "extra"], "PY"),
    (["delete", "--", "c1"], "PY"),
])
def test_route(front, argv, expected):
    assert front(*argv) == expected


def test_plugin_choice_in_the_bundle_goes_to_python(front, tmp_path):
    b = tmp_path / "gpu-bundle"
    b.mkdir()
    (b / "config.json").write_text(json.dumps({"annotations": {"io.migrt.plugins": "gpu"}}))
    assert front("create", "--bundle", str(b), "c1") == "PY"


def test_create_without_bundle_uses_the_working_directory(front):
    assert front("create", "c1", cwd=str(front.plain)) == "RUNC"


def test_node_with_a_plugin_config_sends_every_create_to_python(front, tmp_path,
                                                                monkeypatch):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("plugins: {}\n")
    text = open(FRONT).read()
    assert "MIGRT_CONFIG" in text
    monkeypatch.setenv("MIGRT_PLUGIN_PATH", str(tmp_path))
    p = subprocess.run(["sh", "-c", f'MIGRT_RUNC=/bin/echo "$0" create --bundle '
                        f'{front.plain} c1', str(tmp_path / "migrt")],
                       capture_output=True, text=True, timeout=30)
    assert p.stdout.startswith("PY "), p.stdout
