"""What plugins need to know about a running container, read from runc's state and /proc.

Everything here is a plain read (no ptrace, no freezing), so plugins can inspect a
container before deciding to refuse a checkpoint.
"""
import json
import os
import shlex
from migrt.safeio import makedirs_private


def runc_state(ctx):
    """runc's own state.json of ctx's container ({} when it cannot be read)."""
    call = ctx.get("call")
    root = getattr(call, "root", None) or "/run/runc"
    try:
        with open(os.path.join(root, ctx["cid"], "state.json")) as f:
            return json.load(f)
    except (OSError, ValueError, KeyError):
        return {}


def init_pid(ctx):
    pid = ctx.get("pid")
    if pid:
        return int(pid)
    return runc_state(ctx).get("init_process_pid")


def container_pids(ctx):
    """Host pids of every process in the container (from its cgroup)."""
    state = runc_state(ctx)
    paths = (state.get("cgroup_paths") or {})
    seen = []
    for key in ("pids", "freezer", "memory", "cpu", "devices", ""):
        d = paths.get(key)
        if not d:
            continue
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids = [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            continue
        if pids:
            return pids
    pid = init_pid(ctx)
    if pid:
        seen.append(pid)
    return seen


def open_paths(pid):
    """{fd: target} of a process's open files (targets as the process sees them)."""
    out = {}
    d = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(d)
    except OSError:
        return out
    for fd in fds:
        try:
            out[int(fd)] = os.readlink(os.path.join(d, fd))
        except OSError:
            continue
    return out


def open_rdevs(pid):
    """{(major, minor): path} of the character devices a process holds open."""
    out = {}
    for fd, target in open_paths(pid).items():
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        import stat
        if stat.S_ISCHR(st.st_mode):
            out[(os.major(st.st_rdev), os.minor(st.st_rdev))] = target
    return out


def mapped_paths(pid):
    """Paths of the files a process has mapped (from /proc/<pid>/maps)."""
    out = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    out.add(parts[5].strip())
    except OSError:
        pass
    return out


def environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    out = {}
    for it in items:
        k, sep, v = it.decode(errors="replace").partition("=")
        if sep:
            out[k] = v
    return out


def in_container(pid, path):
    """A host path for `path` as the container's process `pid` sees it."""
    return f"/proc/{pid}/root/{path.lstrip('/')}"


def spec_env(spec):
    from migrt.plugins import gate as hookgate
    return hookgate._env(spec or {})


# ---------------------------------------------------------------- CRIU config for runc

CRIU_ANNOTATION = "org.criu.config"
RUNC_CRIU_CONF = "/etc/criu/runc.conf"


def criu_config_lines(spec):
    """The CRIU config runc would use for this spec (annotation, else runc.conf)."""
    ann = (spec.get("annotations") or {}).get(CRIU_ANNOTATION)
    path = ann if ann is not None else RUNC_CRIU_CONF
    if not path:
        return []
    try:
        with open(path) as f:
            return f.read().splitlines()
    except OSError:
        return []


def criu_libdir(spec, default="/usr/lib/criu"):
    for line in criu_config_lines(spec or {}):
        parts = shlex.split(line, comments=True)
        if len(parts) >= 2 and parts[0].lstrip("-") in ("libdir", "L"):
            return parts[1]
    return default


def add_criu_config(ctx, owner, lines):
    """Make runc's CRIU read extra config lines for this bundle (restore or dump).

    runc hands CRIU the file named by the `org.criu.config` annotation, else
    /etc/criu/runc.conf. We write a per-bundle file holding the original's lines plus
    ours and point the annotation at it, so that action scripts run even though runc
    talks to CRIU over RPC (CRIU runs config-file scripts in RPC mode too).
    """
    spec = ctx["spec"]
    bundle = ctx["bundle"]
    d = os.path.join(bundle, ".migrt")
    makedirs_private(d)
    path = os.path.join(d, "criu.conf")
    existing = []
    ann = (spec.get("annotations") or {}).get(CRIU_ANNOTATION)
    if ann == path:
        try:
            with open(path) as f:
                existing = f.read().splitlines()
        except OSError:
            existing = []
    else:
        existing = criu_config_lines(spec)
    tag = f"# migrt plugin {owner}"
    kept = []
    skip = False
    for line in existing:
        if line == tag:
            skip = True
            continue
        if skip and line.startswith("# migrt plugin "):
            skip = False
        if skip:
            continue
        kept.append(line)
    text = "\n".join(kept + [tag] + list(lines)) + "\n"
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    spec.setdefault("annotations", {})[CRIU_ANNOTATION] = path
    ctx["spec_changed"] = True
    return path


def hooks_dir():
    from migrt.plugins import gate as hookgate
    return hookgate.bundled("hooks")


def in_root(pid, func, *args):
    """Run func(*args) in a child process chrooted into the container's root.

    Paths then resolve as the workload sees them, and links the workload planted cannot
    lead out of its root: walking /proc/<pid>/root/... from the host would follow an
    absolute link to the HOST's files. Returns func's JSON-able result; an exception
    in the child comes back as OSError (with its errno) or MigrtError.
    """
    r, w = os.pipe()
    child = os.fork()
    if child == 0:      # the child: no return from here
        code = 0
        try:
            os.close(r)
            os.chroot(f"/proc/{pid}/root")
            os.chdir("/")
            res = {"ok": func(*args)}
        except BaseException as e:
            res = {"error": f"{type(e).__name__}: {e}", "errno": getattr(e, "errno", None)}
            code = 1
        try:
            data = json.dumps(res).encode()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(child, 0)
    try:
        res = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        res = {"error": "no answer from the container's root"}
    if "ok" in res:
        return res["ok"]
    if res.get("errno"):
        raise OSError(res["errno"], res.get("error"))
    from migrt.errors import MigrtError
    raise MigrtError(res.get("error") or "failed in the container's root")


def read_in_root(pid, path, limit=1 << 20):
    """Read a file as the container sees it (latin-1 round-trips any bytes)."""
    def read(p, n):
        with open(p, "rb") as f:
            return f.read(n).decode("latin-1")
    return in_root(pid, read, path, limit).encode("latin-1")
