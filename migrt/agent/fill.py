"""The memory fill after a local lazy restore (migrt.runtime.sources.staged.local_lazy).

A staged full or pre-copy migration is restored with `criu lazy-pages` reading the
staged image on this node: the container runs before all of its memory is back, and
the daemon copies the rest in (on demand and in the background). Until the daemon has
finished, the source must stay: if the fill fails, the destination copy is stopped and
the source resumes. The staged record is `filling` meanwhile (with the daemon's pid
and where its exit status lands), then `restored`, or `failed`.

`check(staged)` looks once, without waiting, and moves the record on when the daemon
is done; the agent calls it for the source's `filled` request, for status requests
and from its janitor (a migrate that died meanwhile is finished by recovery, which
asks for the status). With `migrt agent --user`, the root side does it (migrt.agent.privsep).
"""
import os
import subprocess

FILLING = "filling"


def _daemon_alive(pid):
    """Is the shell that waits for the daemon still there (not a zombie, not reused)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except (OSError, IndexError):
        return False
    return state != "Z" and b"lazy-pages" in cmd


def _errors(log, limit=3):
    try:
        from migrt.safeio import open_file
        with open_file(log, "rb") as f:
            lines = f.read(4 << 20).decode(errors="replace").splitlines()
        return [ln.strip() for ln in lines if "Error" in ln][:limit]
    except OSError:
        return []


def check(staged, mine, runc=None):
    """(state, error): `filling`, `restored` or `failed` (or the record's own state if
    it is not filling). A failed fill stops the destination copy first (with `runc`,
    default migrt.runc.runc_path()).

    The staged record only says *whether* to look (its state). What is looked at and
    acted on comes from the agent's own root-only record `mine` (the container it
    restored for this migration and its runc root, migrt.agent.server.Agent.restore)
    and from migrt's record in that container's runc state dir (the daemon's pid, the
    restore's work dir): never from the staged record, which the agent's network side
    writes (with `migrt agent --user`, an unprivileged user)."""
    rec = staged.read() or {}
    state = rec.get("state")
    if state != FILLING:
        return state, rec.get("error")
    from migrt.runtime import lifecycle
    cid, root = (mine or {}).get("container"), (mine or {}).get("root")
    restored = None
    if cid and root:
        import types
        restored = lifecycle.read_record(types.SimpleNamespace(root=root), cid)
    if not restored:
        why = ("the memory fill cannot be followed: no container restored here for "
               f"migration {staged.mid}")
        staged.update(state="failed", error=why)
        return "failed", why
    work = restored.get("work") or ""
    if os.path.dirname(os.path.normpath(work)) != lifecycle.work_top():
        work = ""
    if _daemon_alive(restored.get("lazy_pid") or 0):
        return FILLING, None
    try:
        from migrt.safeio import read_regular
        code = read_regular(os.path.join(work, lifecycle.FILL_STATUS), 64).decode().strip() \
            if work else None
    except (OSError, UnicodeDecodeError):
        code = None
    if code == "0":
        staged.update(state="restored")
        return "restored", None
    errs = _errors(os.path.join(work, "lazy-pages.log")) if work else []
    why = ("the memory fill from the staged image failed (criu lazy-pages "
           + (f"exited {code}" if code else "was killed") + ")"
           + (": " + "; ".join(errs) if errs else ""))
    # a copy with part of its memory missing must not run on: the source resumes
    _bury(mine, staged.mid)
    _delete(runc, root, cid)
    lifecycle.forget(restored)
    staged.update(state="failed", error=why)
    return "failed", why


def _runc(runc):
    if runc is None:
        from migrt.runc import runc_path
        runc = runc_path()
    return runc


def _delete(runc, root, cid):
    subprocess.run([_runc(runc), "--root", root, "delete", "--force", cid],
                   capture_output=True, timeout=60)


def stop(staged, mine, why, runc=None):
    """Stop the copy this agent restored for migration `staged` (lazy mode: the source's
    page server failed before every page was served, so the copy here lacks part of its
    memory and must not run on; the source resumes). What is stopped comes from the
    agent's own record `mine`, as in check(). True once no such container runs here."""
    from migrt.runtime import lifecycle
    cid, root = (mine or {}).get("container"), (mine or {}).get("root")
    if not cid or not root:
        return False
    import types
    restored = lifecycle.read_record(types.SimpleNamespace(root=root), cid)
    # a pod's container: its kubelet must not start it again from its image (nor has
    # it, meanwhile: migrt.runtime.podrules.still_migrating) once the source resumes
    _bury(mine, staged.mid)

    def gone():
        return subprocess.run([_runc(runc), "--root", root, "state", cid],
                              capture_output=True, timeout=60).returncode != 0
    if (restored or {}).get("restored_from") != f"staged:{staged.mid}":
        # migrt's own record of that container (root's, in runc's state dir) does not
        # say it was restored from this migration: it went already (a copy whose
        # missing memory read as zeros may have crashed), or its id names another
        # container now, which is not ours to stop
        if gone():
            staged.update(state="failed", error=why)
            return True
        return False
    # what its lazy-pages daemon said (a stream that failed its check, a lost
    # connection), before the work dir goes with the container
    work = restored.get("work") or ""
    if work and os.path.dirname(os.path.normpath(work)) == lifecycle.work_top():
        said = _errors(os.path.join(work, "lazy-pages.log"))
        if said:
            why = f"{why}; its lazy-pages daemon: {'; '.join(said)}"[:1500]
    _delete(runc, root, cid)
    if not gone():
        return False
    lifecycle.forget(restored)
    staged.update(state="failed", error=why)
    return True


def _bury(mine, mid):
    """The pod container restored for migration `mid` (the restore's record `mine`
    names its sandbox and name) is not started again in its pod: the migration failed,
    and the source runs on."""
    pod = (mine or {}).get("pod")
    if not (isinstance(pod, list) and len(pod) == 2):
        return
    from migrt.runtime import podrules
    try:
        podrules.bury_pod(pod[0], pod[1], f"stopped on this node: its migration {mid} "
                                          f"failed before all its memory had come")
    except (OSError, ValueError):
        pass
