"""runc argv handling: the forms containerd, conmon and podman send. No root needed."""
import pytest

from migrt.front.argv import ArgvError, Call, parse_flags, COMMAND_FLAGS


def test_containerd_create():
    argv = ["--root", "/run/containerd/runc/default", "--log", "/b/log.json",
            "--log-format", "json", "create", "--bundle", "/b", "--pid-file",
            "/b/init.pid", "abc"]
    c = Call(argv)
    assert c.root == "/run/containerd/runc/default"
    assert c.log == "/b/log.json" and c.log_format == "json"
    assert c.command == "create"
    assert c.global_tokens() == argv[:6]
    flags, pos = c.command_flags()
    assert flags == {"bundle": "/b", "pid-file": "/b/init.pid"}
    assert pos == ["abc"]


def test_conmon_root_as_one_token_and_systemd_cgroup():
    c = Call(["--root=/run/runc-ctrs", "--systemd-cgroup", "create", "-b", "/b", "id1"])
    assert c.root == "/run/runc-ctrs"
    assert c.globals["systemd-cgroup"] is True
    flags, pos = c.command_flags()
    assert flags["bundle"] == "/b" and pos == ["id1"]


def test_single_dash_flags_as_go_runc_sends_them():
    c = Call(["--root", "/r", "restore", "--detach", "--image-path", "/i", "-no-subreaper",
              "--bundle", "/b", "id"])
    assert c.command == "restore"
    assert c.args[-1] == "id"


def test_default_root_and_format():
    c = Call(["state", "x"])
    assert c.root == "/run/runc"
    assert c.log_format == "text"
    assert c.global_tokens() == []


def test_bool_flag_with_value():
    c = Call(["--debug=false", "list"])
    assert c.globals["debug"] is False and c.command == "list"


def test_value_flag_equals_form_in_command():
    c = Call(["create", "--bundle=/x", "--pid-file=/p", "id"])
    flags, pos = c.command_flags()
    assert flags == {"bundle": "/x", "pid-file": "/p"} and pos == ["id"]


def test_flags_after_positional_are_args_as_in_urfave_cli():
    c = Call(["delete", "id", "--force"])
    flags, pos = c.command_flags()
    assert flags == {} and pos == ["id", "--force"]


def test_unknown_global_flag_is_left_to_runc():
    with pytest.raises(ArgvError):
        Call(["--bogus", "list"])


def test_value_flag_without_value():
    with pytest.raises(ArgvError, match="needs an argument"):
        parse_flags(["--lsm-mount-context"], {"lsm-mount-context": True})


def test_double_dash_ends_flags():
    c = Call(["--root", "/r", "--", "state", "x"])
    assert c.command == "state" and c.args == ["x"]


def test_no_command():
    c = Call(["--version"])
    assert c.command is None and c.globals["version"] is True


@pytest.mark.parametrize("cmd", sorted(COMMAND_FLAGS))
def test_help_is_understood_for_every_parsed_command(cmd):
    c = Call([cmd, "--help"])
    flags, _ = c.command_flags()
    assert flags["help"] is True
