"""Pass-through with a fake runc: argv, stdin, exit codes and fds reach runc untouched.

The fake records what it was given; migrt must add nothing and change nothing.
"""
import json
import os
import subprocess
import sys

import pytest

import ocitest

FAKE = r'''#!/bin/sh
out="$FAKE_RUNC_OUT"
{
  printf '%s\n' "$@"
  printf -- '--stdin--\n'
  if [ "$FAKE_RUNC_READ_STDIN" = 1 ]; then cat; fi
} > "$out"
echo "fake stdout"
echo "fake stderr" >&2
exit "${FAKE_RUNC_EXIT:-0}"
'''


@pytest.fixture
def fake(tmp_path):
    path = tmp_path / "runc"
    path.write_text(FAKE)
    path.chmod(0o755)
    launcher = ocitest.build_launcher(str(tmp_path / "migrt"))
    out = tmp_path / "argv.txt"

    def run(*args, input=None, code=0, read_stdin=False, cwd=None):
        env = dict(os.environ, MIGRT_RUNC=str(path), FAKE_RUNC_OUT=str(out),
                   FAKE_RUNC_EXIT=str(code), FAKE_RUNC_READ_STDIN="1" if read_stdin else "0")
        p = subprocess.run([launcher, *args], input=input, capture_output=True, text=True,
                           env=env, cwd=cwd)
        got = out.read_text().split("--stdin--\n") if out.exists() else ["", ""]
        return p, got[0].splitlines(), got[1]
    return run


ARGVS = [
    ["--root", "/run/containerd/runc/default", "--log", "/b/log.json", "--log-format", "json",
     "start", "abc"],
    ["--root=/run/crio", "--systemd-cgroup", "kill", "--all", "abc", "9"],
    ["--root", "/r", "delete", "--force", "abc"],
    ["--root", "/r", "exec", "--process", "/p.json", "--detach", "--pid-file", "/p", "abc"],
    ["--root", "/r", "ps", "--format", "json", "abc"],
    ["--root", "/r", "pause", "abc"],
    ["--root", "/r", "resume", "abc"],
    ["--root", "/r", "events", "--stats", "abc"],
    ["--root", "/r", "list", "--format", "json"],
    ["--root", "/r", "state", "abc"],
    ["--root", "/r", "spec", "--rootless"],
    ["features"],
    ["--debug", "--criu", "/usr/sbin/criu", "--rootless", "false", "state", "abc"],
    ["--root", "/r", "restore", "--detach", "--image-path", "/i", "--work-path", "/w",
     "-no-subreaper", "--bundle", "/b", "abc"],
    ["checkpoint", "--help"],
    ["restore", "--lsm-mount-context"],
    ["--bogus-global", "whatever"],
]


@pytest.mark.parametrize("argv", ARGVS, ids=lambda a: " ".join(a)[:40])
def test_argv_reaches_runc_unchanged(fake, argv):
    p, got, _ = fake(*argv)
    assert got == argv
    assert p.stdout == "fake stdout\n"
    assert p.stderr == "fake stderr\n"
    assert p.returncode == 0


@pytest.mark.parametrize("code", [1, 2, 137])
def test_exit_code_is_runcs(fake, code):
    p, _, _ = fake("--root", "/r", "kill", "abc", "15", code=code)
    assert p.returncode == code


def test_update_reads_stdin(fake):
    body = json.dumps({"pids": {"limit": 42}})
    p, got, stdin = fake("--root", "/r", "update", "--resources=-", "abc", input=body,
                         read_stdin=True)
    assert got == ["--root", "/r", "update", "--resources=-", "abc"]
    assert stdin == body


def test_create_without_marker_is_passed_through(fake, tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(
        {"ociVersion": "1.0.2", "process": {"args": ["sh"], "env": ["PATH=/bin"]},
         "root": {"path": "rootfs"}}))
    argv = ["--root", "/r", "--log", str(tmp_path / "log.json"), "--log-format", "json",
            "create", "--bundle", str(bundle), "--pid-file", str(bundle / "init.pid"), "abc"]
    p, got, _ = fake(*argv)
    assert got == argv and p.returncode == 0


def test_create_uses_cwd_as_bundle(fake, tmp_path):
    (tmp_path / "config.json").write_text('{"process": {"env": ["MIGRT_RESTORE_FROM=/x"]')
    p, got, _ = fake("--root", "/r", "create", "abc", cwd=str(tmp_path))
    assert p.returncode == 1
    assert got == []                     # runc never ran
    assert "config.json is not valid JSON" in p.stderr


def test_malformed_config_without_marker_is_runcs_to_report(fake, tmp_path):
    """A bundle that does not mention migrt is runc's business, broken or not."""
    (tmp_path / "config.json").write_text("{not json")
    argv = ["--root", "/r", "create", "--bundle", str(tmp_path), "abc"]
    p, got, _ = fake(*argv)
    assert got == argv


def test_missing_config_gets_its_own_message(fake, tmp_path):
    log = tmp_path / "log.json"
    p, got, _ = fake("--root", "/r", "--log", str(log), "--log-format", "json",
                     "create", "--bundle", str(tmp_path), "abc")
    assert p.returncode == 1 and got == []
    assert p.stderr.strip() == f"migrt: bundle {tmp_path}: config.json not found"
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["level"] == "error"
    assert last["msg"] == f"bundle {tmp_path}: config.json not found"
    assert "time" in last


def test_missing_runc_is_one_clear_line(tmp_path):
    launcher = ocitest.build_launcher(str(tmp_path / "migrt"))
    env = dict(os.environ, MIGRT_RUNC=str(tmp_path / "nope"))
    p = subprocess.run([launcher, "state", "x"], capture_output=True, text=True, env=env)
    assert p.returncode == 1
    assert p.stderr.strip().startswith("migrt: cannot run runc")


def test_hot_path_imports_nothing_heavy(tmp_path):
    """The pass-through path must not import click, yaml, jsonschema, zstd, xxhash."""
    code = (
        "import sys, os\n"
        f"sys.path[:0] = [{ocitest.REPO!r}]\n"
        "os.environ['MIGRT_RUNC'] = '/bin/true'\n"
        "import migrt.front.fast as f\n"
        "os.execv = lambda *a: (print(sorted(m for m in sys.modules)), sys.exit(0))\n"
        "sys.argv = ['migrt', '--root', '/r', 'state', 'x']\n"
        "f.main()\n")
    p = subprocess.run([ocitest.VENV_PYTHON, "-I", "-S", "-c", code], capture_output=True,
                       text=True)
    mods = p.stdout
    for heavy in ("click", "yaml", "jsonschema", "zstandard", "xxhash", "pyroute2", "psutil",
                  "subprocess", "json"):
        assert f"'{heavy}'" not in mods, heavy
