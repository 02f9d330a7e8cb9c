"""The runc facts every layer shares: where runc is, how to hand a call over to it, the
bundle's spec, the restore marker and migrt's record in runc's state dir.

It sits at the bottom so that the front door (migrt.front.fast), the runtime and the
migration engine all call down to it. Only os and sys are imported here: this module is on
every runc call's path.
"""
import os
import sys

MARKER = "MIGRT_RESTORE_FROM"

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


def container_bundle(call, cid):
    """The bundle of a container, from runc's own state.json."""
    import json
    try:
        with open(os.path.join(call.root, cid, "state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None, None
    for label in (state.get("config") or {}).get("labels") or []:
        if label.startswith("bundle="):
            return label[len("bundle="):], state
    return None, state


def quick_status(root, cid):
    """(status, pid) of a container as `runc state` would say it, read from runc's own
    state dir without starting runc (a Go start-up: 0.01 s, which the agent's check after
    a restore put in the downtime); None when this cannot tell (no state.json, a format
    it does not know), and the caller asks runc. The same tests as runc: its init process
    (pid and start time) gone or a zombie: stopped; its exec fifo still there: created;
    its freezer cgroup frozen: paused; else running."""
    import json
    d = os.path.join(root, cid)
    try:
        with open(os.path.join(d, "state.json")) as f:
            st = json.load(f)
        pid, start = int(st["init_process_pid"]), str(st["init_process_start"])
        paths = st.get("cgroup_paths") or {}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] in ("Z", "X") or fields[19] != start:
            return "stopped", 0
    except (OSError, ValueError, IndexError):
        return "stopped", 0
    if os.path.exists(os.path.join(d, "exec.fifo")):
        return "created", pid
    try:
        if paths.get("freezer"):
            with open(os.path.join(paths["freezer"], "freezer.state")) as f:
                frozen = f.read().strip() != "THAWED"
        elif paths.get(""):
            with open(os.path.join(paths[""], "cgroup.freeze")) as f:
                frozen = f.read().strip() == "1"
        else:
            return None
    except OSError:
        return None
    return ("paused" if frozen else "running"), pid


def quick_pids(root, cid):
    """The container's processes as `runc ps --format json` lists them (every pid in its
    cgroup, sub-cgroups included), read from the cgroup runc's state dir names, without
    starting runc; None when this cannot tell (the caller asks runc)."""
    import json
    try:
        with open(os.path.join(root, cid, "state.json")) as f:
            paths = json.load(f).get("cgroup_paths") or {}
    except (OSError, ValueError, AttributeError):
        return None
    # the freezer's (what runc pause froze) or the unified hierarchy's
    top = paths.get("freezer") or paths.get("") if isinstance(paths, dict) else None
    if not top or not os.path.isdir(top):
        return None
    pids = []
    try:
        for d, _, _ in os.walk(top):
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids.extend(int(x) for x in f.read().split())
    except (OSError, ValueError):
        return None
    return sorted(set(pids))
