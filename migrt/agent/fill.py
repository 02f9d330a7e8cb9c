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
        with open(log, errors="replace") as f:
            return [ln.strip() for ln in f if "Error" in ln][:limit]
    except OSError:
        return []


def check(staged, runc=None):
    """(state, error): `filling`, `restored` or `failed` (or the record's own state if
    it is not filling). A failed fill stops the destination copy first (with `runc`,
    default migrt.runc.runc_path())."""
    rec = staged.read() or {}
    state = rec.get("state")
    if state != FILLING:
        return state, rec.get("error")
    if _daemon_alive(rec.get("fill_pid") or 0):
        return FILLING, None
    try:
        with open(rec.get("fill_status") or "") as f:
            code = f.read().strip()
    except OSError:
        code = None
    if code == "0":
        staged.update(state="restored")
        return "restored", None
    errs = _errors(rec.get("fill_log") or "")
    why = (f"the memory fill from the staged image failed (criu lazy-pages "
           + (f"exited {code}" if code else "was killed") + ")"
           + (": " + "; ".join(errs) if errs else ""))
    cid, root = rec.get("container"), rec.get("root")
    if cid and root:
        # a copy with part of its memory missing must not run on: the source resumes
        if runc is None:
            from migrt.runc import runc_path
            runc = runc_path()
        subprocess.run([runc, "--root", root, "delete", "--force", cid],
                       capture_output=True, timeout=60)
    staged.update(state="failed", error=why)
    return "failed", why

