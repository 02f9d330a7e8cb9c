"""`migrt help` answers as `migrt --help` does (runc's commands, then migrt's)."""
import subprocess


def test_help_lists_migrts_own_commands(migrt_launcher):
    top = subprocess.run([migrt_launcher, "--help"], capture_output=True, text=True)
    for argv in (["help"], ["h"]):
        p = subprocess.run([migrt_launcher, *argv], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert p.stdout == top.stdout
        assert "MIGRT COMMANDS" in p.stdout and "   migrate " in p.stdout
    p = subprocess.run([migrt_launcher, "help", "image"], capture_output=True, text=True)
    assert p.returncode == 0 and "Usage: migrt image" in p.stdout and "export" in p.stdout
    # a runc command's help is still runc's
    p = subprocess.run([migrt_launcher, "help", "state"], capture_output=True, text=True)
    assert p.returncode == 0 and "runc state" in p.stdout
