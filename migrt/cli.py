"""migrt's own commands (everything that is not runc's), loaded only when used.

Each command lives in migrt/commands/<name>.py and exposes a click command named
`command`. Only the module of the command being run is imported (pip's
commands_dict habit), so `migrt image verify` never pays for the transfer engine.
"""
import importlib
import subprocess
import sys

import click

from migrt import __version__
from migrt.errors import EXIT_USAGE, MigrtError, report

COMMANDS = {
    "migrate": ("migrt.commands.migrate", "move a running container to another node"),
    "agent": ("migrt.commands.agent", "run the node agent that receives migrations"),
    "image": ("migrt.commands.image", "inspect, verify, export, list, remove and clean up checkpoints"),
    "plugins": ("migrt.commands.plugins", "list plugins and why they apply to a bundle"),
    "doctor": ("migrt.commands.doctor", "check this node for what migrt needs"),
    "demo": ("migrt.commands.demo", "migrate a running busybox container and print its downtime"),
    "logs": ("migrt.commands.logs", "show migrt's record of a container's checkpoints and restores"),
}


def load(name):
    module, _ = COMMANDS[name]
    return importlib.import_module(module).command


def main(call):
    """Run migrt's own command `call.command` with its args; return an exit code."""
    cmd = load(call.command)
    try:
        rv = cmd.main(args=list(call.args), prog_name=f"migrt {call.command}", obj=call,
                      standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.Abort:
        return 130
    except click.ClickException as e:
        e.show()
        return EXIT_USAGE if isinstance(e, click.UsageError) else 1
    # without standalone mode click returns ctx.exit(n)'s code instead of exiting
    return rv if type(rv) is int else 0


def top_level(call):
    """`migrt --help` / `migrt --version`: runc's answer, then migrt's own."""
    from migrt.runc import runc_path
    runc = runc_path()
    flag = "--version" if call.globals.get("version") else "--help"
    out = subprocess.run([runc, flag], capture_output=True, text=True)
    sys.stdout.write(out.stdout)
    if flag == "--version":
        sys.stdout.write(f"migrt: {__version__}\n")
        return out.returncode
    sys.stdout.write("\nMIGRT COMMANDS (in front of runc; everything above passes through to runc):\n")
    for name, (_, desc) in COMMANDS.items():
        sys.stdout.write(f"   {name:<10} {desc}\n")
    sys.stdout.write("\nA bundle whose process.env has MIGRT_RESTORE_FROM=<checkpoint> is restored "
                     "by `create`/`run` instead of started fresh.\n")
    return out.returncode
