"""Which CRIU migrt and runc use: install.sh's /usr/local/sbin/criu (4.2) ahead of a
distribution's /usr/sbin/criu (Debian 13's 4.1.1 cannot dump TCP sockets on kernels
>= 6.16), or $MIGRT_CRIU. runc takes `criu` from PATH, so both the shell front door
(pass-through restore) and migrt's Python put that dir first. No root needed: a fake runc
prints the PATH it got and which criu it would run."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FRONT = os.path.join(HERE, "..", "..", "migrt", "front", "front.sh")

from migrt import runc as fast  # noqa: E402


@pytest.fixture
def fake_runc(tmp_path):
    runc = tmp_path / "runc"
    runc.write_text('#!/bin/sh\necho "$PATH"\ncommand -v criu || echo none\n')
    runc.chmod(0o755)
    front = tmp_path / "migrt"
    front.write_text(open(FRONT).read().replace("@PY_LAUNCHER@", "/bin/false"))
    front.chmod(0o755)
    return runc, front


def fake_criu(d):
    d.mkdir(parents=True, exist_ok=True)
    p = d / "criu"
    p.write_text("#!/bin/sh\necho Version: 0\n")
    p.chmod(0o755)
    return str(p)


@pytest.mark.parametrize("path,first", [
    ("/usr/local/bin:/usr/bin:/bin", "/usr/local/sbin"),                     # a shim's PATH
    ("/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin", "/usr/local/sbin"),    # local last
    ("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "/usr/local/sbin"),
])
def test_front_door_puts_install_sh_criu_dir_first_for_runc(fake_runc, path, first):
    runc, front = fake_runc
    env = {"PATH": path, "MIGRT_RUNC": str(runc)}
    p = subprocess.run([str(front), "restore", "--bundle", "/b", "c1"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    got = p.stdout.splitlines()[0].split(":")
    assert got[0] == first
    assert "/usr/sbin" in got and got.index("/usr/local/sbin") < got.index("/usr/sbin")
    assert set(path.split(":")) <= set(got), "no dir of the caller's PATH is lost"


def test_front_door_puts_migrt_criu_dir_before_everything(fake_runc, tmp_path):
    runc, front = fake_runc
    mine = fake_criu(tmp_path / "mycriu")
    env = {"PATH": "/usr/bin:/bin", "MIGRT_RUNC": str(runc), "MIGRT_CRIU": mine}
    p = subprocess.run([str(front), "restore", "--bundle", "/b", "c1"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    path, criu = p.stdout.splitlines()
    assert path.split(":")[0] == str(tmp_path / "mycriu")
    assert criu == mine, "runc would run MIGRT_CRIU"


def test_python_side_fixes_path_the_same_way(monkeypatch, tmp_path):
    local, distro = tmp_path / "local", tmp_path / "distro"
    fake_criu(distro)
    want = fake_criu(local)
    monkeypatch.setattr(fast, "CRIU_DIR", str(local))
    monkeypatch.delenv("MIGRT_CRIU", raising=False)
    monkeypatch.setenv("PATH", f"{distro}:/usr/bin:/bin")
    assert fast.criu_path() == want
    parts = os.environ["PATH"].split(":")
    assert parts[0] == str(local) and str(distro) in parts and "/usr/sbin" in parts
    # idempotent: a second call changes nothing
    before = os.environ["PATH"]
    fast.sbin_path()
    assert os.environ["PATH"] == before


def test_python_side_honours_migrt_criu(monkeypatch, tmp_path):
    mine = fake_criu(tmp_path / "mine")
    monkeypatch.setenv("MIGRT_CRIU", mine)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert fast.criu_path() == mine
    assert os.environ["PATH"].split(":")[0] == str(tmp_path / "mine")


def test_a_subprocess_of_migrt_finds_the_chosen_criu(monkeypatch, tmp_path):
    """What runc (started by migrt) would see: the fixed PATH is inherited."""
    local, distro = tmp_path / "local", tmp_path / "distro"
    fake_criu(distro)
    want = fake_criu(local)
    monkeypatch.setattr(fast, "CRIU_DIR", str(local))
    monkeypatch.delenv("MIGRT_CRIU", raising=False)
    monkeypatch.setenv("PATH", f"{distro}:/usr/bin:/bin")
    fast.sbin_path()
    out = subprocess.run(["sh", "-c", "command -v criu"], capture_output=True, text=True)
    assert out.stdout.strip() == want
