"""The hot path: every call a container manager makes to the runtime starts here.

Most calls (state, kill, delete, exec, ps, events, ...) are none of migrt's business:
they are handed to runc with os.execv, argv untouched, after parsing a few flags with
the stdlib alone. Only these do more:

- `create` / `run` read the bundle's config.json; when it carries the restore marker
  (MIGRT_RESTORE_FROM in process.env) they become a CRIU restore (migrt.runtime.lifecycle);
- `start` checks one file to know whether the container was restored (a no-op then);
- `delete` and `checkpoint` do extra work only for containers migrt restored or when
  a plugin applies;
- migrt's own commands (migrate, agent, image, ...) load the full CLI.

Nothing heavy (click, yaml, jsonschema, zstd, the transfer engine) is imported here.
"""
import os
import sys

from migrt.front.argv import ArgvError, Call
from migrt.runc import MARKER, exec_runc, find_marker, read_spec, record_path, runc_path  # noqa: F401

# migrt's own commands: these load click and the rest (migrt.cli).
OWN_COMMANDS = frozenset({"migrate", "agent", "image", "plugins", "doctor", "demo", "logs"})


def _flags_or_runc(call, argv):
    """The command's flags and operands; runc itself reports what it cannot parse."""
    try:
        return call.command_flags()
    except ArgvError:
        exec_runc(argv)


def dispatch(argv):
    try:
        call = Call(argv)
    except ArgvError:
        exec_runc(argv)      # runc reports its own usage errors
    cmd = call.command
    if cmd in OWN_COMMANDS:
        from migrt import cli
        return cli.main(call)
    if cmd in ("help", "h"):
        # runc's `help` lists runc's commands only: answer as `migrt --help` does, and
        # `help <migrt command>` as `migrt <command> --help`
        from migrt import cli
        if not call.args:
            return cli.top_level(call)
        if len(call.args) == 1 and call.args[0] in OWN_COMMANDS:
            call.command, call.args = call.args[0], ["--help"]
            return cli.main(call)
        exec_runc(argv)
    if cmd is None:
        if call.globals.get("help") or call.globals.get("version"):
            from migrt import cli
            return cli.top_level(call)
        exec_runc(argv)
    if cmd in ("create", "run"):
        flags, pos = _flags_or_runc(call, argv)
        if flags.get("help") or len(pos) != 1:
            exec_runc(argv)
        bundle = flags.get("bundle") or os.getcwd()
        spec = read_spec(bundle)
        marker = find_marker(spec, bundle)
        if _pod_records("tomb"):
            # a pod's container that migrt moved away is not created again in its
            # sandbox (migrt.runtime.podrules)
            from migrt.runtime import podrules
            why = podrules.refusal(spec)
            if why:
                from migrt.errors import MigrtError
                raise MigrtError(why)
        from migrt.plugins import gate as hookgate
        try:
            plugins = hookgate.active(spec, bundle)
        except Exception:
            # A broken node plugin config must not stop containers that asked for
            # nothing: only a restore or an explicit plugin choice fails on it.
            if marker is not None or hookgate.explicit_choice(spec)[1]:
                raise
            plugins = []
        if marker is None and not plugins:
            exec_runc(argv)
        from migrt.runtime import lifecycle
        return lifecycle.create(call, flags, pos[0], bundle, spec, marker, plugins)
    if cmd == "start":
        if len(call.args) == 1 and not call.args[0].startswith("-"):
            if os.path.exists(record_path(call, call.args[0])):
                from migrt.runtime import lifecycle
                return lifecycle.start(call, call.args[0])
        exec_runc(argv)
    if cmd == "delete":
        flags, pos = _flags_or_runc(call, argv)
        if len(pos) == 1 and not flags.get("help") and (
                _pod_records("tomb", pos[0]) or _pod_records("restored", pos[0])):
            # a pod sandbox going: what migrt recorded about its containers goes too
            from migrt.runtime import podrules
            podrules.forget_sandbox(pos[0])
        if len(pos) == 1 and not flags.get("help") and os.path.exists(record_path(call, pos[0])):
            from migrt.runtime import lifecycle
            return lifecycle.delete(call, flags, pos[0])
        exec_runc(argv)
    if cmd == "checkpoint":
        flags, pos = _flags_or_runc(call, argv)
        if flags.get("help") or len(pos) != 1:
            exec_runc(argv)
        from migrt.runtime import lifecycle
        return lifecycle.checkpoint(call, flags, pos[0])
    exec_runc(argv)


def _pod_records(kind, sid=None):
    """Any record of migrt.runtime.podrules (of sandbox `sid`), with os alone."""
    base = os.path.join(os.environ.get("MIGRT_KUBE_STATE", "/run/migrt/kube"), kind)
    if sid is None:
        try:
            return bool(os.listdir(base))
        except OSError:
            return False
    return "/" not in sid and os.path.exists(os.path.join(base, sid))


def main():
    argv = sys.argv[1:]
    spare = "MIGRT_SPARE_FD" in os.environ  # a restorer the agent started ahead of time
    if spare:
        from migrt.front import spare as sp
        argv = sp.wait(int(os.environ.pop("MIGRT_SPARE_FD")))
    try:
        code = dispatch(argv)
    except KeyboardInterrupt:
        code = 130
    except Exception as e:   # the one place exceptions become the caller's error line
        from migrt.errors import MigrtError, report
        call = _safe_call(argv)
        if isinstance(e, MigrtError):
            msg, code = str(e), e.exit_code
        else:
            msg, code = f"internal error: {type(e).__name__}: {e}", 1
            if os.environ.get("MIGRT_DEBUG"):
                import traceback
                traceback.print_exc()
        report(msg, call.log if call else None, call.log_format if call else "text")
    sys.stdout.flush()
    if spare:
        # the agent waits for this exit inside a migration's downtime: skip the
        # interpreter's teardown of everything the spare preloaded
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 0 if code is None else 1)
    sys.exit(code or 0)


def _safe_call(argv):
    try:
        return Call(argv)
    except ArgvError:
        return None
