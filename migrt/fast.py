"""The hot path: every call a container manager makes to the runtime starts here.

Most calls (state, kill, delete, exec, ps, events, ...) are none of migrt's business:
they are handed to runc with os.execv, argv untouched, after parsing a few flags with
the stdlib alone. Only these do more:

- `create` / `run` read the bundle's config.json; when it carries the restore marker
  (MIGRT_RESTORE_FROM in process.env) they become a CRIU restore (migrt.lifecycle);
- `start` checks one file to know whether the container was restored (a no-op then);
- `delete` and `checkpoint` do extra work only for containers migrt restored or when
  a plugin applies;
- migrt's own commands (migrate, agent, image, ...) load the full CLI.

Nothing heavy (click, yaml, jsonschema, zstd, the transfer engine) is imported here.
"""
import os
import sys

from migrt.argv import ArgvError, Call

MARKER = "MIGRT_RESTORE_FROM"

# migrt's own commands: these load click and the rest (migrt.cli).
OWN_COMMANDS = frozenset({"migrate", "agent", "image", "plugins", "doctor", "demo", "logs"})

# Where runc usually lives when the caller's PATH lacks sbin (a shim's environment).
RUNC_FALLBACKS = ("/usr/sbin/runc", "/usr/bin/runc", "/usr/local/sbin/runc",
                  "/usr/local/bin/runc")

RECORD = "migrt.json"   # migrt's record inside runc's own state dir <root>/<id>/


def find_runc():
    path = os.environ.get("MIGRT_RUNC")
    if path:
        return path
    me = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else None
    for d in os.environ.get("PATH", "").split(os.pathsep) + [os.path.dirname(p) for p in RUNC_FALLBACKS]:
        cand = os.path.join(d or ".", "runc")
        if os.access(cand, os.X_OK) and not os.path.isdir(cand):
            if me and os.path.realpath(cand) == me:
                continue
            return cand
    return None


# Where packaging/install.sh puts the CRIU it builds (4.2; Debian 13's 4.1.1 cannot dump
# TCP sockets on kernels >= 6.16). runc takes CRIU from PATH, so this dir goes first.
CRIU_DIR = "/usr/local/sbin"


def sbin_path():
    """Fix this process's PATH (which runc and every CRIU migrt runs inherit): the sbin
    dirs present (a containerd shim's PATH may lack them), CRIU_DIR ahead of /usr/sbin (so
    that install.sh's CRIU wins over a distribution's criu package), and the dir of
    $MIGRT_CRIU first when that names a `criu`."""
    path = os.environ.get("PATH", "")
    parts = path.split(os.pathsep) if path else []
    want = [CRIU_DIR]
    forced = os.environ.get("MIGRT_CRIU")
    if forced and os.path.basename(forced) == "criu" and os.path.dirname(forced):
        want.insert(0, os.path.dirname(forced))
    if parts[:len(want)] != want:
        parts = want + [d for d in parts if d not in want]
    parts += [d for d in ("/usr/sbin", "/sbin") if d not in parts]
    new = os.pathsep.join(parts)
    if new != path:
        os.environ["PATH"] = new


def criu_path():
    """The CRIU migrt runs, the same one runc finds: $MIGRT_CRIU, else `criu` on the PATH
    sbin_path() set (install.sh's /usr/local/sbin/criu first). "criu" if none is found."""
    import shutil
    sbin_path()
    forced = os.environ.get("MIGRT_CRIU")
    if forced:
        return forced if "/" in forced else (shutil.which(forced) or forced)
    return shutil.which("criu") or "criu"


def runc_path(call=None):
    # runc finds CRIU on PATH: see sbin_path
    sbin_path()
    runc = find_runc()
    if runc is None:
        from migrt.errors import MigrtError
        raise MigrtError("runc not found: set MIGRT_RUNC or put runc on PATH")
    return runc


def exec_runc(argv):
    """Replace this process with runc, argv untouched."""
    runc = runc_path()
    try:
        os.execv(runc, [runc] + list(argv))
    except OSError as e:
        from migrt.errors import MigrtError
        raise MigrtError(f"cannot run runc {runc}: {e.strerror}")


def record_path(call, cid):
    return os.path.join(call.root, cid, RECORD)


def dispatch(argv):
    try:
        call = Call(argv)
    except ArgvError:
        exec_runc(argv)      # runc reports its own usage errors
    cmd = call.command
    if cmd in OWN_COMMANDS:
        from migrt import cli
        return cli.main(call)
    if cmd is None:
        if call.globals.get("help") or call.globals.get("version"):
            from migrt import cli
            return cli.top_level(call)
        exec_runc(argv)
    if cmd in ("create", "run"):
        try:
            flags, pos = call.command_flags()
        except ArgvError:
            exec_runc(argv)
        if flags.get("help") or len(pos) != 1:
            exec_runc(argv)
        bundle = flags.get("bundle") or os.getcwd()
        spec = read_spec(bundle)
        marker = find_marker(spec, bundle)
        from migrt import hookgate
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
        from migrt import lifecycle
        return lifecycle.create(call, flags, pos[0], bundle, spec, marker, plugins)
    if cmd == "start":
        if len(call.args) == 1 and not call.args[0].startswith("-"):
            if os.path.exists(record_path(call, call.args[0])):
                from migrt import lifecycle
                return lifecycle.start(call, call.args[0])
        exec_runc(argv)
    if cmd == "delete":
        try:
            flags, pos = call.command_flags()
        except ArgvError:
            exec_runc(argv)
        if len(pos) == 1 and not flags.get("help") and os.path.exists(record_path(call, pos[0])):
            from migrt import lifecycle
            return lifecycle.delete(call, flags, pos[0])
        exec_runc(argv)
    if cmd == "checkpoint":
        try:
            flags, pos = call.command_flags()
        except ArgvError:
            exec_runc(argv)
        if flags.get("help") or len(pos) != 1:
            exec_runc(argv)
        from migrt import lifecycle
        return lifecycle.checkpoint(call, flags, pos[0])
    exec_runc(argv)


def read_spec(bundle):
    """Load <bundle>/config.json, with one clear error for each way it can be bad."""
    import json
    from migrt.errors import BundleError
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if not os.path.isdir(bundle):
            raise BundleError(f"bundle {bundle}: no such directory")
        raise BundleError(f"bundle {bundle}: config.json not found")
    except OSError as e:
        raise BundleError(f"bundle {bundle}: cannot read config.json: {e.strerror}")
    try:
        spec = json.loads(data)
    except ValueError as e:
        raise BundleError(f"bundle {bundle}: config.json is not valid JSON: {e}")
    if not isinstance(spec, dict):
        raise BundleError(f"bundle {bundle}: config.json is not a JSON object")
    return spec


def find_marker(spec, bundle):
    """Return the value of MIGRT_RESTORE_FROM in process.env, or None."""
    from migrt.errors import BundleError
    proc = spec.get("process")
    if proc is None:
        return None
    if not isinstance(proc, dict):
        raise BundleError(f"bundle {bundle}: config.json: process is not an object")
    env = proc.get("env") or []
    if not isinstance(env, list):
        raise BundleError(f"bundle {bundle}: config.json: process.env is not a list")
    prefix = MARKER + "="
    found = None
    for item in env:
        if isinstance(item, str) and item.startswith(prefix):
            found = item[len(prefix):]
    if found is not None and not found.strip():
        raise BundleError(f"bundle {bundle}: {MARKER} is set but empty")
    return found


def main():
    argv = sys.argv[1:]
    spare = "MIGRT_SPARE_FD" in os.environ  # a restorer the agent started ahead of time
    if spare:
        from migrt import spare as sp
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
