"""Exit statuses of migrt's own commands, as `migrt doctor` relies on them."""
import click
import pytest

from migrt import cli


class FakeCall:
    command = "doctor"
    args = []


def test_click_exit_code_reaches_the_caller(monkeypatch):
    @click.command()
    def command():
        raise click.exceptions.Exit(3)
    monkeypatch.setattr(cli, "load", lambda name: command)
    assert cli.main(FakeCall()) == 3


def test_doctor_exit_status_without_click_exit(monkeypatch):
    """doctor ends with sys.exit(1): that reaches the caller whatever cli.main does."""
    from migrt.commands import doctor as d
    monkeypatch.setattr(d, "run_checks", lambda **kw: [
        d.Finding("runc", d.MISSING, "runc not found", "apt-get install runc")])
    monkeypatch.setattr(cli, "load", lambda name: d.command)
    with pytest.raises(SystemExit) as e:
        cli.main(FakeCall())
    assert e.value.code == 1
