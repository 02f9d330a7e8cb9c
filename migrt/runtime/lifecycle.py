"""The one place that decides create-or-restore, and the container states around it.

States of a container migrt restored (recorded in <runc root>/<id>/migrt.json, a file
inside runc's own state dir, so `runc delete` removes it with the container):

    created-from-checkpoint --start (no-op)--> running --delete--> gone

runc's view of the same container is "running" from the moment `runc restore
--detach` returns; the caller (containerd, CRI-O, podman) still believes it only
created it, so the `start` that follows must succeed without doing anything. A second
`start` goes to runc, which refuses it as it would for any running container.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from migrt.runtime import checkpoints
from migrt.errors import BundleError, MigrtError, RuncError
from migrt.runc import MARKER, container_bundle, criu_path, record_path, runc_path
from migrt.safeio import makedirs_private

STATE_DIR = os.environ.get("MIGRT_STATE_DIR", "/run/migrt")
SPEC_BACKUP = "config.json.migrt-orig"


# ---------------------------------------------------------------- records

def read_record(call, cid):
    try:
        with open(record_path(call, cid)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_record(call, cid, rec):
    path = record_path(call, cid)
    tmp = path + ".tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(json.dumps(rec))
    os.replace(tmp, path)


def _work_key(root, cid):
    return hashlib.sha1(f"{os.path.realpath(root)}\0{cid}".encode()).hexdigest()[:16]


def work_top():
    return os.path.join(STATE_DIR, "work")


def work_dir(call, cid):
    """A FRESH CRIU work dir for one restore (short: it holds the lazy-pages socket).

    Never reused: a lazy-pages.socket or lazy-pages.status left by an earlier restore
    of the same id would make this one connect to nothing or count a killed memory
    fill as finished. `<key>-<random>`, key from the runc root and the container id."""
    import tempfile
    top = work_top()
    makedirs_private(top)
    d = tempfile.mkdtemp(prefix=_work_key(call.root, cid) + "-", dir=top)
    with open(os.open(os.path.join(d, "owner"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
              "w") as f:
        f.write(json.dumps({"root": os.path.realpath(call.root), "id": cid}))
    return d


def work_dirs_of(root, cid):
    """Every work dir of restores of this container id in this runc root."""
    key = _work_key(root, cid)
    try:
        names = os.listdir(work_top())
    except OSError:
        return []
    return [os.path.join(work_top(), n) for n in names if n == key or n.startswith(key + "-")]


def _mounts_under(paths):
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
    except (OSError, IndexError):
        return []
    return [m for m in points if any(m.startswith(p.rstrip("/") + "/") for p in paths)]


def remove_work(work):
    """Remove one restore's work dir (nothing mounted in it may be followed)."""
    if not work or os.path.dirname(os.path.normpath(work)) != work_top():
        return
    if _mounts_under([work]):
        return
    import shutil
    shutil.rmtree(work, ignore_errors=True)


def exists(call, cid):
    return os.path.exists(os.path.join(call.root, cid, "state.json"))


def unmount_criu_leftovers(call, cid, remove=False):
    """A CRIU killed mid-restore leaves its cgroup yard (.criu.cgyard.*) mounted in the
    restore's work dir, and runc its criu-root in the container's state dir: a dozen
    mounts per failed restore that would pile up on the node. remove=True also removes
    the work dirs of this id (the container does not exist)."""
    works = work_dirs_of(call.root, cid)
    state = os.path.join(os.path.realpath(call.root), cid)
    for mp in sorted(_mounts_under(works + [state]), reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)
    if remove:
        for w in works:
            remove_work(w)


def sweep_work(max_age=900):
    """Work dirs whose container is gone (deleted by plain runc, a node's restore killed
    with its caller): removed once older than max_age (no restore takes that long)."""
    now = time.time()
    try:
        names = os.listdir(work_top())
    except OSError:
        return
    for n in names:
        d = os.path.join(work_top(), n)
        try:
            if now - os.lstat(d).st_mtime < max_age:
                continue
            with open(os.path.join(d, "owner")) as f:
                own = json.load(f)
            gone = not os.path.exists(os.path.join(own["root"], own["id"], "state.json"))
        except (OSError, ValueError, KeyError, TypeError):
            gone = True
        if gone:
            remove_work(d)


KEPT_LOGS = 40


def keep_log(path, label):
    """Copy a failed restore's CRIU log to <state>/failed (the last KEPT_LOGS are kept)
    before its work dir goes; returns where, or None."""
    d = os.path.join(STATE_DIR, "failed")
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - (1 << 20)))
            data = f.read()
    except OSError:
        return None
    try:
        makedirs_private(d)
        dst = os.path.join(d, f"{label}-{os.path.basename(path)}")
        with open(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600),
                  "wb") as f:
            f.write(data)
        old = sorted(os.listdir(d), key=lambda n: os.path.getmtime(os.path.join(d, n)))
        for n in old[:-KEPT_LOGS]:
            os.unlink(os.path.join(d, n))
        return dst
    except OSError:
        return None


# ---------------------------------------------------------------- runc as a child

def run_runc(tokens, forward_signals=False, watch_criu=False, lazy=None):
    """Run runc with our stdio and inherited fds (pid-file, console, preserve-fds)."""
    runc = runc_path()
    proc = subprocess.Popen([runc] + tokens, close_fds=False)
    if watch_criu:
        import threading
        threading.Thread(target=_criu_watchdog, args=(proc, lazy), daemon=True).start()
    if forward_signals:
        def fwd(sig, _frame):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                  signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH):
            signal.signal(s, fwd)
    while True:
        try:
            return proc.wait()
        except InterruptedError:
            continue


def wait_exit(proc, timeout):
    """proc.wait(timeout), but seen the moment the process ends: Popen.wait with a
    timeout looks, then sleeps (up to 50 ms) between looks."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (OSError, AttributeError):
        return proc.wait(timeout)
    try:
        import select
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if not ready:
        raise subprocess.TimeoutExpired(proc.args, timeout)
    return proc.wait()


WATCHDOG_STOPPED = []      # why _criu_watchdog stopped a restore in this process
# how long restored tasks may wait without a live CRIU before they are stopped: a dead
# CRIU leaves them waiting forever, so this only decides how soon that failure shows
STUCK_SECONDS = 5.0


def _criu_watchdog(proc, lazy=None):
    """Make a dead CRIU fail the restore instead of hanging it.

    `runc restore` talks to `criu swrk` over a socket; when CRIU's main process dies
    mid-restore, the half-restored tasks ("criu: restore ...", re-parented to runc, the
    subreaper) keep that socket open and runc waits forever. When they are left without
    a live `criu swrk`, or the lazy-pages daemon has failed (no page will ever come),
    killing them lets runc fail, and the caller cleans up as for any failed restore.
    """
    import psutil
    try:
        runc = psutil.Process(proc.pid)
    except psutil.Error:
        return

    def cmd(p):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                return ""
            return " ".join(p.cmdline())
        except psutil.Error:
            return ""

    def pidns(pid):
        try:
            return os.readlink(f"/proc/{pid}/ns/pid")
        except OSError:
            return None

    # CRIU's main process starts as "criu swrk 3", then retitles itself "criu: restore";
    # the restored tasks carry one of those titles until their memory (argv included) is
    # back, but they live in the container's pid namespace, CRIU in runc's. CRIU's main
    # process is the first CRIU child of runc; its helpers come later.
    host = pidns(proc.pid)
    main = None
    seen_tasks = False
    stuck_since = None
    while proc.poll() is None:
        try:
            kids = runc.children()
            # a CRIU child of runc that died and that runc has not reaped: runc is
            # blocked on CRIU's socket, which the restored tasks still hold
            zombie = any(_is_zombie(k) for k in kids if k.name() == "criu")
            direct = [k for k in kids if k.name() == "criu" and cmd(k)
                      and pidns(k.pid) == host]
            tasks = [k for k in runc.children(recursive=True)
                     if cmd(k).startswith("criu") and pidns(k.pid) not in (host, None)]
            seen_tasks = seen_tasks or bool(tasks)
            if direct and (main is None or (not cmd(main) and not seen_tasks)):
                main = min(direct, key=lambda k: k.create_time())
            # gone means gone: exited or a zombie, not a look at /proc that failed once
            # on a loaded node (cmd() is "" for any psutil error)
            alive = main is not None and _running(main)
            lazy_failed = lazy is not None and lazy.poll() not in (None, 0)
            victims = []
            if lazy_failed:
                victims = ([main] if alive else []) + tasks
                why = f"the lazy-pages daemon exited {lazy.returncode}"
                log = getattr(lazy, "migrt_log", None)
                errs = criu_errors(log) if log else []
                if errs:
                    why += f" ({'; '.join(errs)})"
            elif tasks and (zombie or (main is not None and not alive)):
                now = time.monotonic()
                stuck_since = stuck_since or now
                if now - stuck_since > STUCK_SECONDS:
                    victims = tasks
                    why = ("CRIU's main process was gone while restored tasks waited for it "
                           f"(over {STUCK_SECONDS:g} s)")
            else:
                stuck_since = None
            if victims and why not in WATCHDOG_STOPPED:
                WATCHDOG_STOPPED.append(why)       # the failed restore's message says so
            for k in victims:
                try:
                    k.kill()
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        time.sleep(0.1)


def _running(p):
    import psutil
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def _is_zombie(p):
    import psutil
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def quiet_runc(tokens):
    runc = runc_path()
    return subprocess.run([runc] + tokens, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True)


def log_globals(call, work):
    """Global tokens for a runc child, plus a json log of our own if the caller gave none.

    Returns (tokens, log path, offset): the runc error is the last error line written
    to that log after offset.
    """
    tokens = call.global_tokens()
    if call.log and call.log_format == "json":
        try:
            off = os.path.getsize(call.log)
        except OSError:
            off = 0
        return tokens, call.log, off
    if call.log:     # text log: runc's message is also on stderr; we only add CRIU's
        return tokens, None, 0
    own = os.path.join(work, "runc.log")
    return tokens + ["--log", own, "--log-format", "json"], own, 0


def runc_error(log, offset):
    if not log:
        return None
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    msg = None
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("level") in ("error", "fatal"):
            msg = rec.get("msg")
    # runc appends "\nlog file: <criu log>", which our message names anyway
    return msg.splitlines()[0] if msg else None


# CRIU writes these on every run on this kind of node; they are not the failure.
CRIU_NOISE = ("RLIMIT_NOFILE", "cgroupd: recv req error", "Restoring FAILED",
              "Dumping FAILED", "Can't keep kdat cache")


def criu_errors(log_path, limit=3):
    """The first meaningful `Error (...)` lines of a CRIU log, without timestamps."""
    try:
        with open(log_path, errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return []
    errs = []
    for line in lines:
        i = line.find("Error (")
        if i < 0 or any(n in line for n in CRIU_NOISE):
            continue
        text = line[i:].strip()
        if text not in errs:
            errs.append(text)
        if len(errs) >= limit:
            break
    return errs


def failure_message(what, log, offset, criu_log):
    parts = [what]
    err = runc_error(log, offset)
    if err:
        parts.append(f"runc: {err}")
    errs = criu_errors(criu_log)
    if errs:
        parts.append(f"CRIU log {criu_log}: " + "; ".join(errs))
    elif os.path.exists(criu_log):
        parts.append(f"CRIU log {criu_log}")
    if WATCHDOG_STOPPED:
        parts.append("migrt stopped the restore's tasks: " + "; ".join(WATCHDOG_STOPPED))
    return ": ".join(parts[:1]) + ("; " + "; ".join(parts[1:]) if len(parts) > 1 else "")


# ---------------------------------------------------------------- spec helpers

def write_spec(bundle, spec):
    path = os.path.join(bundle, "config.json")
    tmp = path + ".migrt-tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(spec))
    os.replace(tmp, path)


def put_back_spec(bundle):
    backup = os.path.join(bundle, SPEC_BACKUP)
    if os.path.exists(backup):
        os.replace(backup, os.path.join(bundle, "config.json"))


def strip_marker(spec):
    """The spec runc gets: the marker removed from process.env."""
    spec = json.loads(json.dumps(spec))
    env = spec["process"].get("env") or []
    spec["process"]["env"] = [e for e in env
                              if not (isinstance(e, str) and e.startswith(MARKER + "="))]
    return spec


# ---------------------------------------------------------------- create / run

def create(call, flags, cid, bundle, spec, marker, plugins):
    bundle = os.path.abspath(bundle)
    if marker is None:
        return create_with_plugins(call, flags, cid, bundle, spec, plugins)
    return restore_create(call, flags, cid, bundle, spec, marker, plugins)


def run_stage(stage, plugins, **ctx):
    if not plugins:
        return ctx
    from migrt.plugins import run_stage as run
    return run(stage, plugins, **ctx)


def create_with_plugins(call, flags, cid, bundle, spec, plugins):
    """A plain create that some plugin wants to see (no marker)."""
    ctx = run_stage("pre-create", plugins, call=call, cid=cid, bundle=bundle, spec=spec)
    if ctx["spec"] is not spec or ctx.get("spec_changed"):
        write_spec(bundle, ctx["spec"])
    rc = run_runc(call.argv, forward_signals=(call.command == "run"))
    if rc == 0 and call.command == "create":
        run_stage("post-create", plugins, call=call, cid=cid, bundle=bundle, spec=ctx["spec"],
                  pid=_read_pid(flags.get("pid-file")))
    return rc


def _read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (TypeError, OSError, ValueError):
        return None


ARMED_ENV = "MIGRT_RESTORE_ARMED"


def _restore_args(work, bundle, detach, flags, restore_flags, lazy):
    """`runc restore`'s arguments after --image-path, up to the container id."""
    args = ["--work-path", work, "--bundle", bundle]
    if detach:
        args.append("--detach")
    for name in ("pid-file", "console-socket"):
        if flags.get(name):
            args += [f"--{name}", flags[name]]
    for name in ("no-pivot", "no-subreaper"):
        if flags.get(name):
            args.append(f"--{name}")
    args += list(restore_flags)
    if lazy:
        args.append("--lazy-pages")
    return args


class Armed:
    """A `runc restore` started before its images exist (migrt.agent arms it before the
    source freezes): its CRIU waits at a gate (migrt.criu.gate.RestoreGate) before it
    reads an image. Used only if the restore, worked out once the images are here,
    would have run exactly it; stopped otherwise, and the restore runs as usual."""

    def __init__(self, proc, gate, work, args, conf, spec, descriptors, t_start):
        self.proc, self.gate, self.work = proc, gate, work
        self.args, self.conf, self.spec = args, conf, spec
        self.descriptors = descriptors
        self.t_start = t_start
        self.t_ready = self.t_go = None

    def differs(self, args, conf, spec, image_dir):
        """None if the restore worked out now is the armed one; else what differs."""
        if self.proc.poll() is not None:
            return f"its runc exited ({self.proc.returncode}) before the images came"
        if args != self.args:
            return f"runc restore {' '.join(args)}, armed with {' '.join(self.args)}"
        if conf != self.conf:
            return f"CRIU config {conf}, armed with {self.conf}"
        if spec != self.spec:
            return "the pre-restore plugins changed the bundle's config"
        try:
            with open(os.path.join(image_dir, "descriptors.json")) as f:
                got = json.load(f)
        except (OSError, ValueError):
            got = None
        if got != self.descriptors:
            return "the checkpoint's descriptors.json is not the one armed"
        return None

    def release(self, lazy=None):
        """Open CRIU's gate; runc's exit status once it is done."""
        import threading
        threading.Thread(target=_criu_watchdog, args=(self.proc, lazy), daemon=True).start()
        self.gate.open()
        while True:
            try:
                return self.proc.wait()
            except InterruptedError:
                continue

    def stop(self):
        """CRIU stops at its gate, before it read an image; runc fails and cleans up."""
        self.gate.abort()
        if self.proc.poll() is None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _no_container(call, cid):
    """No container of this id (a failed or stopped restore's), no CRIU mounts left."""
    if exists(call, cid):
        quiet_runc(call.global_tokens() + ["delete", "--force", cid])
    unmount_criu_leftovers(call, cid)


def _disarm(call, cid, bundle, armed):
    """Nothing left of an armed restore that will not be used: no runc, no container,
    the caller's config.json back, no work dir."""
    armed.stop()
    _no_container(call, cid)
    put_back_spec(bundle)
    remove_work(armed.work)


def _arm_restore(call, flags, cid, bundle, spec, marker, arm_dir):
    """Start `runc restore` for a staged migration that has not arrived yet, stop its
    CRIU at the gate, then wait for the agent's go (or its no: the migration did not go
    ahead). The plan (arm.json in the agent's root-only dir): runc's restore flags, lazy
    or not, CRIU's config lines, the source's descriptors.json. Returns an Armed."""
    from migrt.criu import cgyard, gate as cgate
    from migrt.safeio import read_regular
    try:
        plan = json.loads(read_regular(os.path.join(arm_dir, "arm.json"), 1 << 20))
        restore_flags = [str(f) for f in plan["restore_flags"]]
        conf_lines = [str(c) for c in plan.get("criu_conf") or []]
        descriptors = plan["descriptors"]
        lazy = bool(plan.get("lazy"))
        memory = plan.get("memory") if isinstance(plan.get("memory"), int) else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MigrtError(f"armed restore of {cid}: its plan in {arm_dir}: {e}")
    if not lazy and marker.startswith("staged:"):
        # a large full or pre-copy migration fills its memory in after the restore
        # (migrt.runtime.sources.staged): as that source will decide, from the estimate
        from migrt.agent.staging import Staged, valid_mid
        from migrt.runtime.sources.staged import fill_locally
        mid = marker.split(":", 1)[1]
        if valid_mid(mid):
            lazy = fill_locally(Staged(mid).read() or {}, memory)
    detach = call.command == "create" or flags.get("detach")
    if not detach:
        raise MigrtError(f"armed restore of {cid}: only a detached restore can be armed")
    t_start = time.monotonic()
    sweep_work()
    work = work_dir(call, cid)
    stand_in = os.path.join(work, "images-to-come")
    makedirs_private(stand_in)
    with open(os.open(os.path.join(stand_in, "descriptors.json"),
                      os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        json.dump(descriptors, f)
    g_dir = os.path.join(work, "gate")
    makedirs_private(g_dir)
    g = cgate.RestoreGate(g_dir)
    runc_spec = strip_marker(spec)
    os.replace(os.path.join(bundle, "config.json"), os.path.join(bundle, SPEC_BACKUP))
    write_spec(bundle, runc_spec)
    tokens, _log, _offset = log_globals(call, work)
    args = _restore_args(work, bundle, detach, flags, restore_flags, lazy)
    conf = conf_lines + cgyard.conf_lines(cgyard.ensure(os.getpid()))
    env = dict(os.environ)
    if conf:
        from migrt.criu import config as criuconf
        env.update(criuconf.env(work, conf))
    env.update(g.env())
    proc = None

    def give_up(why):
        g.abort()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        _no_container(call, cid)
        put_back_spec(bundle)
        remove_work(work)
        return MigrtError(f"armed restore of {cid}: {why}")

    try:
        proc = subprocess.Popen([runc_path()] + tokens + ["restore", "--image-path", stand_in]
                                + args + [cid], close_fds=False, env=env)
        armed = Armed(proc, g, work, args, conf, runc_spec, descriptors, t_start)
        if not g.wait_ready(proc, 60):
            raise give_up("runc restore did not reach CRIU's restore gate"
                          + (f" (it exited {proc.returncode})" if proc.poll() is not None
                             else " in 60s"))
        armed.t_ready = time.monotonic()
        # bounded: an agent that neither lets go nor dies must not keep this forever
        go = cgate.wait_for_go(arm_dir, _armed_wait())
        armed.t_go = time.monotonic()
    except MigrtError:
        raise
    except BaseException as e:
        raise give_up(f"{type(e).__name__}: {e}")
    if not go:
        armed.stop()
        raise give_up("the migration did not go ahead (its agent said no, is gone, or "
                      f"did not answer in {_armed_wait():.0f}s: MIGRT_ARMED_WAIT); "
                      "nothing was restored")
    return armed


def _armed_wait():
    try:
        return float(os.environ.get("MIGRT_ARMED_WAIT", "1800"))
    except ValueError:
        return 1800.0


def restore_create(call, flags, cid, bundle, spec, marker, plugins):
    """`create` (or `run`) of a bundle carrying the marker: restore instead.

    A failed restore leaves the bundle exactly as the caller gave it: its config.json
    (the one written now, never an older backup), and its rootfs (the image's rootfs
    changes are undone); and nothing else behind (no container, no work dir)."""
    if exists(call, cid):
        raise MigrtError(f"container with id exists: {cid}")
    if not isinstance(spec.get("process"), dict):
        raise BundleError(f"bundle {bundle}: config.json has no process")
    from migrt.runtime import podrules
    before = podrules.restored_before(spec)
    if before is not None:
        # its kubelet restarts a container this pod sandbox already restored: it starts
        # from its image like any restart, never from the old checkpoint again; but not
        # while a lazy migration that restored it has not ended
        why = podrules.still_migrating(spec, before)
        if why:
            raise MigrtError(why)
        write_spec(bundle, strip_marker(spec))
        return create_with_plugins(call, flags, cid, bundle, strip_marker(spec), plugins)
    armed = None
    arm_dir = os.environ.pop(ARMED_ENV, None)
    if arm_dir:
        armed = _arm_restore(call, flags, cid, bundle, spec, marker, arm_dir)
    try:
        source = checkpoints.resolve(marker, bundle)
    except BaseException:
        if armed is not None:
            _disarm(call, cid, bundle, armed)
        raise
    try:
        return _restore_source(call, flags, cid, bundle, spec, marker, plugins, source,
                               armed=armed)
    finally:
        if source.cleanup:
            try:
                source.cleanup()
            except Exception:
                pass


def _restore_source(call, flags, cid, bundle, spec, marker, plugins, source, armed=None):
    try:
        checkpoints.check_namespace(source.image_dir, spec, marker, source.namespace)
    except BaseException as e:
        if armed is not None:
            _disarm(call, cid, bundle, armed)
        if source.on_failed:
            source.on_failed(cid, str(e))
        raise
    detach = call.command == "create" or flags.get("detach")
    if armed is not None:
        work = armed.work
    else:
        sweep_work()
        # no container of this id exists: work dirs of its earlier restores are leftovers
        # (those of a restore still starting, this last minute, are left to it)
        for old in work_dirs_of(call.root, cid):
            try:
                if time.time() - os.lstat(old).st_mtime > 60:
                    remove_work(old)
            except OSError:
                pass
        work = work_dir(call, cid)

    runc_spec = strip_marker(spec)
    try:
        ctx = run_stage("pre-restore", plugins, call=call, cid=cid, bundle=bundle,
                        spec=runc_spec, image_dir=source.image_dir, work_dir=work)
    except BaseException:
        if armed is not None:
            _disarm(call, cid, bundle, armed)
        remove_work(work)
        raise
    runc_spec = ctx["spec"]
    if armed is None:
        # the caller's config.json as it is now (a backup left by anything earlier is stale)
        os.replace(os.path.join(bundle, "config.json"), os.path.join(bundle, SPEC_BACKUP))
    if armed is None or runc_spec != armed.spec:
        write_spec(bundle, runc_spec)

    lazy = None
    journal = None

    def undo(err):
        """Leave nothing of a failed restore: no container, the caller's bundle back."""
        if armed is not None:
            armed.stop()
        if lazy:
            _kill(lazy)
        _no_container(call, cid)
        if journal is not None:
            try:
                journal.rollback()
            except OSError:
                pass
        put_back_spec(bundle)
        remove_work(work)
        if source.on_failed:
            try:
                source.on_failed(cid, str(err))
            except Exception:
                pass

    def failed(log, offset):
        kept = keep_log(os.path.join(work, "restore.log"), f"restore-{os.path.basename(work)}")
        from migrt.errors import shown as display
        shown = display(marker)
        return RuncError(failure_message(f"restore of {cid} from {shown} failed", log, offset,
                                         kept or os.path.join(work, "restore.log")))

    started = time.monotonic()
    timing = {}
    try:
        if source.prepare:
            from migrt.image import rootfs_journal
            journal = rootfs_journal(bundle, runc_spec)
            source.prepare(bundle, runc_spec, journal=journal)
        timing["prepare_s"] = round(time.monotonic() - started, 4)
        tokens, log, offset = log_globals(call, work)
        from migrt.criu import cgyard
        conf = list(source.criu_conf) + cgyard.conf_lines(cgyard.ensure(os.getpid()))
        wants_lazy = bool(source.lazy_address or source.lazy_local)
        args = _restore_args(work, bundle, detach, flags, source.restore_flags, wants_lazy)
        if armed is not None:
            why = armed.differs(args, conf, runc_spec, source.image_dir)
            if why is not None:
                # the restore runs as if it had not been armed; its record says why
                armed.stop()
                armed = None
                timing["armed"] = f"not used: {why}"
                _no_container(call, cid)
        if armed is not None:
            # runc and CRIU, started before the freeze with these same arguments, config
            # and spec, wait at CRIU's gate: it reads the images from here on
            os.symlink(source.image_dir, os.path.join(armed.gate.dir, "images"))
            if wants_lazy:
                lazy = start_lazy_pages(source, work)
            timing["armed"] = "used"
            timing["armed_before_s"] = round(armed.t_go - armed.t_start, 4)
            t_runc = time.monotonic()
            timing["before_runc_s"] = round(t_runc - started - timing["prepare_s"], 4)
            rc = armed.release(lazy)
        else:
            tokens += ["restore", "--image-path", source.image_dir] + args
            if conf:
                from migrt.criu import config as criuconf
                os.environ.update(criuconf.env(work, conf))
            if wants_lazy:
                lazy = start_lazy_pages(source, work)
            tokens.append(cid)
            if not detach:
                # `run` stays attached: there is no start to follow and nothing to record.
                rc = run_runc(tokens, forward_signals=True, watch_criu=True, lazy=lazy)
                _private_stats(source.image_dir)
                if rc != 0 and not _was_restored(work):
                    raise failed(log, offset)
                if journal is not None:
                    journal.commit()
                put_back_spec(bundle)
                if lazy:
                    _kill(lazy)
                remove_work(work)
                return rc
            t_runc = time.monotonic()
            timing["before_runc_s"] = round(t_runc - started - timing["prepare_s"], 4)
            rc = run_runc(tokens, watch_criu=True, lazy=lazy)
        t_ran = time.monotonic()
        timing["runc_s"] = round(t_ran - t_runc, 4)     # runc restore and CRIU
        _private_stats(source.image_dir)
        _private_stats(work)
        if rc != 0:
            raise failed(log, offset)
    except BaseException as e:
        undo(e)
        raise
    pid = _read_pid(flags.get("pid-file")) or _state_pid(call, cid)
    try:
        run_stage("post-restore", plugins, call=call, cid=cid, bundle=bundle, spec=runc_spec,
                  image_dir=source.image_dir, pid=pid, work_dir=work)
    except BaseException as e:
        # A plugin could not finish the restore (a GPU left locked, a device missing):
        # the caller sees a failed create, so no container may be left running.
        undo(e)
        raise
    if journal is not None:
        journal.commit()
    # runc has read the spec it needed: the bundle keeps what the caller wrote
    put_back_spec(bundle)
    if "runc_s" in timing:
        timing["after_runc_s"] = round(time.monotonic() - t_ran, 4)
    write_record(call, cid, {
        "restored_from": marker, "image_dir": source.image_dir, "work": work,
        "started": not detach or call.command == "run", "plugins": list(plugins),
        "restore_seconds": round(time.monotonic() - started, 3), "timing": timing,
        "restored_at": time.time(), "lazy_pid": lazy.pid if lazy else None,
    })
    from migrt.runtime import podrules
    podrules.mark_restored(spec, marker, pending=source.pending)
    if source.on_restored:
        source.on_restored(cid, pid, call.root, spec)
    return 0


def _private_stats(image_dir):
    """CRIU writes its restore statistics into the image dir readable by all (0644)."""
    p = os.path.join(image_dir, "stats-restore")
    try:
        st = os.lstat(p)
        if st.st_uid == os.geteuid() and st.st_nlink == 1 and (st.st_mode & 0o077) \
                and __import__("stat").S_ISREG(st.st_mode):
            os.chmod(p, 0o600, follow_symlinks=True)
    except OSError:
        pass


def _was_restored(work):
    """After an attached restore exits non-zero: did the container ever run?"""
    try:
        with open(os.path.join(work, "restore.log"), errors="replace") as f:
            return "Restore finished successfully" in f.read()
    except OSError:
        return False


def _state_pid(call, cid):
    try:
        with open(os.path.join(call.root, cid, "state.json")) as f:
            return json.load(f).get("init_process_pid")
    except (OSError, ValueError):
        return None


FILL_STATUS = "lazy-pages.status"


def start_lazy_pages(source, work):
    """Start `criu lazy-pages` for this restore; runc restore --lazy-pages connects to
    lazy-pages.socket in the same work dir (so the daemon must use that dir).

    A CRIU whose restore waits for that socket (migrt.criu.features, lazy-socket-wait)
    gets runc started at once: the daemon's start-up (exec, its libraries, reading the
    image's process tree: 5 to 10 ms) then overlaps runc's instead of coming before it,
    in the downtime. Otherwise this waits until the daemon listens.
    MIGRT_LAZY_SOCKET_WAIT=0 waits anyway (to compare).

    With a page server (lazy migration) the pages come from the source node. Local
    (source.lazy_local, a staged full or pre-copy migration): they come from the staged
    image on this node, and the daemon's exit status is written to FILL_STATUS in the
    work dir (a shell waits for it), because the agent that has to know whether every
    page arrived is not its parent."""
    from migrt.criu import pagetls
    criu = criu_path()
    log = os.path.join(work, "lazy-pages.log")
    argv = [criu, "lazy-pages", "--images-dir", source.image_dir, "--work-dir", work,
            "-o", log, "-v2"]
    if source.lazy_address:
        host, _, port = source.lazy_address.rpartition(":")
        argv += ["--page-server", "--address", host, "--port", port]
        if source.lazy_tls:
            argv += pagetls.criu_args(source.lazy_tls)
    else:
        # No --auto-dedup here (the restore itself has it, for the pages it reads): with
        # it, CRIU 4.2.1's lazy-pages daemon punched out pages it had not copied yet, and
        # the tails of some mappings came back as zeros (tests/workloads, the 1 GiB,
        # 4096-mapping process: one run in two or three; none in 14 without it). The
        # staged image is removed when the source releases it, once the fill is done.
        status = os.path.join(work, FILL_STATUS)
        argv = ["sh", "-c", 'umask 077; criu_bin=$1; shift; "$criu_bin" "$@"; rc=$?; '
                            'echo $rc > "$MIGRT_FILL_STATUS.tmp" && '
                            'mv "$MIGRT_FILL_STATUS.tmp" "$MIGRT_FILL_STATUS"; exit $rc',
                "lazy-pages"] + argv
    env = None
    if not source.lazy_address:
        env = dict(os.environ, MIGRT_FILL_STATUS=status)
    else:
        if os.path.isdir(os.path.join(source.image_dir, checkpoints.PRECOPY_PARENT)):
            # a lazy migration with a pre-copy (migrate --precopy --lazy): the pages that
            # are the same as in that earlier dump, here in parent/, are read from it and
            # not sent (packaging/criu-patches, lazy-parent)
            env = dict(os.environ, MIGRT_CRIU_LAZY_PARENT="1")
        if source.lazy_tls and pagetls.uses_frames(source.lazy_tls):
            # both ends agreed on the stream in frames after the handshake
            # (packaging/criu-patches, stream-frames)
            env = dict(env or os.environ, MIGRT_CRIU_STREAM_FRAMES="1")
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env=env)
    proc.migrt_log = log
    if os.environ.get("MIGRT_LAZY_SOCKET_WAIT", "1") != "0":
        from migrt.criu import features
        if features.has(features.LAZY_SOCKET_WAIT, criu):
            return proc         # a daemon that fails is seen by _criu_watchdog
    sock = os.path.join(work, "lazy-pages.socket")
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(proc)
            errs = criu_errors(log)
            raise RuncError(f"criu lazy-pages did not start (log {log})"
                            + (": " + "; ".join(errs) if errs else ""))
        time.sleep(0.002)
    return proc


def _kill(proc):
    """Stop a lazy-pages daemon (and the shell that waits for a local one)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)     # its own session (start_lazy_pages)
    except OSError:
        pass
    try:
        proc.kill()
        proc.wait(5)
    except Exception:
        pass


# ---------------------------------------------------------------- start / delete

def start(call, cid):
    rec = read_record(call, cid)
    if rec is None or rec.get("started"):
        from migrt.runc import exec_runc
        exec_runc(call.argv)
    rec["started"] = True
    write_record(call, cid, rec)
    return 0


def delete(call, flags, cid):
    rec = read_record(call, cid) or {}
    plugins = rec.get("plugins") or []
    if plugins:
        run_stage("delete", plugins, call=call, cid=cid, record=rec)
    rc = run_runc(call.argv)
    if rc == 0:
        if plugins:
            try:                # off the downtime: records of ids long gone (record.sweep)
                from migrt.plugins import record as events
                events.sweep()
            except Exception:
                pass
        forget(rec)
    return rc


def forget(rec):
    """What a restored container left on the node once it is deleted: its lazy-pages
    daemon and its work dir. `rec`: its record (read before the delete)."""
    if rec.get("lazy_pid"):
        _stop_lazy_daemon(rec["lazy_pid"])
    remove_work(rec.get("work"))


def _stop_lazy_daemon(pid):
    """A lazy-pages daemon still serving a deleted container has nothing left to do."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"lazy-pages" not in f.read():
                return
        os.killpg(pid, signal.SIGTERM)          # the daemon leads its own session
    except OSError:
        pass


# ---------------------------------------------------------------- checkpoint

def checkpoint_flags(flags):
    out = []
    for name in ("leave-running", "tcp-established", "ext-unix-sk", "shell-job",
                 "file-locks", "pre-dump", "lazy-pages", "auto-dedup", "tcp-skip-in-flight"):
        if flags.get(name):
            out.append(f"--{name}")
    for name in ("manage-cgroups-mode", "page-server", "parent-path", "empty-ns"):
        if flags.get(name):
            out += [f"--{name}", flags[name]]
    return out


def skip_in_flight_argv(call, flags, work):
    """runc 1.2 has --tcp-skip-in-flight; runc 1.1 refuses it but sends CRIU nothing
    for the option, so there the flag becomes a line of CRIU's config file
    (migrt.criu.config) and leaves the argv. Returns the argv for runc."""
    if not flags.get("tcp-skip-in-flight"):
        return call.argv
    p = subprocess.run([runc_path(), "checkpoint", "--help"], capture_output=True, text=True)
    if "--tcp-skip-in-flight" in p.stdout.split():
        return call.argv
    from migrt.criu import config as criuconf
    os.makedirs(work, mode=0o700, exist_ok=True)
    os.environ.update(criuconf.env(work, ["skip-in-flight"]))
    n = len(call.argv) - len(call.args)
    args = [t for t in call.args
            if t.lstrip("-").split("=", 1)[0] != "tcp-skip-in-flight" or not t.startswith("-")]
    return call.argv[:n] + args


def checkpoint(call, flags, cid):
    """`checkpoint`: runc's, then migrt's manifest next to CRIU's images."""
    bundle, state = container_bundle(call, cid)
    if state is None:
        from migrt.runc import exec_runc
        exec_runc(call.argv)       # runc says the container does not exist
    plugins = []
    spec = None
    if bundle:
        from migrt.runc import read_spec
        from migrt.plugins import gate as hookgate
        try:
            spec = read_spec(bundle)
        except MigrtError:
            spec = None
        if spec is not None:
            plugins = hookgate.active(spec, bundle, stage="checkpoint")
    image_dir = os.path.abspath(flags.get("image-path") or "checkpoint")
    work = os.path.abspath(flags.get("work-path") or image_dir)
    mode = ("pre-dump" if flags.get("pre-dump") else
            "leave-running" if flags.get("leave-running") else "dump")
    ctx = dict(call=call, cid=cid, bundle=bundle, spec=spec, image_dir=image_dir,
               work_dir=work, mode=mode)
    final = mode != "pre-dump" and not flags.get("lazy-pages")
    held = BundleHold(bundle, spec, state) if final and bundle else None
    try:
        return _checkpoint(call, flags, cid, bundle, state, plugins, ctx, final, held)
    finally:
        if held:
            held.release()


class BundleHold:
    """What `migrt checkpoint` needs of a bundle after the dump, taken before it.

    Once a dumped container has exited, its owner may tear the bundle down before migrt
    has written its manifest: containerd's shim reports the exit, containerd deletes the
    task, unmounts the rootfs and removes the bundle dir (config.json included) within
    milliseconds. So config.json is read first, and a rootfs that is a mount (containerd's
    overlay) is bind-mounted into migrt's state dir: that second mount keeps the
    filesystem, upper dir and all, readable after the owner's unmount. Released (lazily
    unmounted) when the checkpoint is done.
    """

    def __init__(self, bundle, spec, state):
        from migrt import image
        self.view = None
        self.rootfs = None
        try:
            with open(os.path.join(bundle, "config.json"), "rb") as f:
                self.spec_raw = f.read()
        except OSError:
            self.spec_raw = None
        if spec is None:
            return
        rootfs = image.rootfs_of(bundle, spec, state)
        if not os.path.ismount(rootfs):
            return          # a plain directory: it stays where it is
        import tempfile
        os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
        view = tempfile.mkdtemp(prefix="ckpt-rootfs-", dir=STATE_DIR)
        p = subprocess.run(["mount", "--bind", rootfs, view], capture_output=True, text=True)
        if p.returncode != 0:
            os.rmdir(view)
            return          # no view: the capture reads the rootfs in place, as before
        subprocess.run(["mount", "--make-private", view], capture_output=True)
        self.view = self.rootfs = view

    def release(self):
        if self.view:
            subprocess.run(["umount", "-l", self.view], capture_output=True)
            try:
                os.rmdir(self.view)
            except OSError:
                pass
            self.view = None


def _checkpoint(call, flags, cid, bundle, state, plugins, ctx, final, held):
    mode, work = ctx["mode"], ctx["work_dir"]
    image_dir, spec = ctx["image_dir"], ctx["spec"]
    run_stage("pre-checkpoint", plugins, **ctx)
    restored = read_record(call, cid)      # a container migrt restored: its work dir
    argv = skip_in_flight_argv(call, flags, work)
    dump_log = os.path.join(work, "pre-dump.log" if mode == "pre-dump" else "dump.log")
    began = time.time()
    json_log = call.log if call.log and call.log_format == "json" else None
    buried = False
    if mode == "dump" and spec is not None:
        # the container stops for good here: its kubelet must not create it again
        from migrt.runtime import podrules
        buried = podrules.bury(spec, f"checkpointed to {image_dir}")
    try:
        offset = os.path.getsize(json_log) if json_log else 0
    except OSError:
        offset = 0
    try:
        rc = run_runc(argv)
        if rc != 0:
            try:
                criu_ran = os.stat(dump_log).st_mtime >= began - 1
            except OSError:
                criu_ran = False
            if not criu_ran:
                # runc refused before CRIU ran (a bad flag, a missing container): its own
                # message, already on stderr and in the log, is the whole story and
                # must stay the last word the caller reads
                err = runc_error(json_log, offset) or f"runc checkpoint exited {rc}"
                try:
                    run_stage("post-checkpoint", plugins, **dict(ctx, error=err))
                except Exception:
                    pass
                return rc
            errs = criu_errors(dump_log)
            why = runc_error(json_log, offset)
            raise RuncError(f"checkpoint of {cid} failed"
                            + (f"; runc: {why}" if why else "")
                            + f"; CRIU log {dump_log}"
                            + (": " + "; ".join(errs) if errs else ""))
    except BaseException as e:
        if buried:
            podrules.unbury(spec)
        # plugins undo what pre-checkpoint did (resume CUDA, tell the workload)
        try:
            run_stage("post-checkpoint", plugins, **dict(ctx, error=str(e) or "interrupted"))
        except Exception:
            pass
        raise
    run_stage("post-checkpoint", plugins, **ctx)
    if restored and mode == "dump" and not exists(call, cid):
        forget(restored)                   # the checkpoint ended it, as a delete would
    # sealed last, so that what plugins add to the image is covered by its digests
    if final:
        from migrt import image
        image.finalize_checkpoint(image_dir, cid, state, bundle, checkpoint_flags(flags),
                                  spec_raw=held.spec_raw if held else None,
                                  rootfs_dir=held.rootfs if held else None)
    return 0
