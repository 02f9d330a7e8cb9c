"""The agent's pre-started restorer (migrt.front.spare) runs a call exactly as a fresh `migrt`.

A fake runc records what reached it: the argv handed over later, the environment and
working directory sent with it, and the stdio descriptors passed over the socket.
"""
import os
import subprocess

import pytest

import ocitest
from migrt.front import spare

FAKE = r'''#!/bin/sh
printf 'argv:%s\n' "$*"
printf 'cwd:%s\n' "$(pwd)"
printf 'env:%s\n' "${SPARE_TEST_VALUE:-unset}"
printf 'leaked:%s\n' "${MIGRT_SPARE_FD:-none}"
read line
printf 'stdin:%s\n' "$line"
echo "to stderr" >&2
exit 7
'''


@pytest.fixture
def launcher(tmp_path):
    fake = tmp_path / "runc"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    door = ocitest.build_launcher(str(tmp_path / "migrt"))
    path = spare.launcher_for(door)
    assert path is not None, "the Python launcher behind the front door was not found"
    return path, str(fake)


def test_handed_over_call_runs_with_its_argv_env_cwd_and_stdio(launcher, tmp_path):
    path, fake = launcher
    s = spare.Spare(path)
    assert s.alive()
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()
    os.write(in_w, b"hello from stdin\n")
    os.close(in_w)
    env = {"PATH": os.environ["PATH"], "MIGRT_RUNC": fake, "SPARE_TEST_VALUE": "42"}
    p = s.run(["--root", str(tmp_path / "r"), "state", "abc"], env, (in_r, out_w, out_w),
              cwd=str(tmp_path))
    os.close(out_w)
    os.close(in_r)
    assert p.wait(30) == 7          # runc's exit code is the caller's
    with os.fdopen(out_r) as f:
        text = f.read()
    assert f"argv:--root {tmp_path / 'r'} state abc" in text
    assert f"cwd:{tmp_path}" in text
    assert "env:42" in text
    assert "leaked:none" in text    # the spare's own socket variable does not reach runc
    assert "stdin:hello from stdin" in text
    assert "to stderr" in text


def test_discarded_spare_exits_without_running_anything(launcher, tmp_path):
    path, fake = launcher
    s = spare.Spare(path)
    s.discard()
    assert s.proc.returncode == 0
    assert not s.alive()


def test_no_launcher_for_a_plain_binary(tmp_path):
    assert spare.launcher_for("/bin/sh") is None
    assert spare.launcher_for(str(tmp_path / "missing")) is None
    assert spare.launcher_for(None) is None
