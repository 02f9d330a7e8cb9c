"""Interrupted migrations, found and finished from the source node's own records.

`migrt migrate` keeps a journal of each migration it runs on this node
(`<MIGRT_STATE_DIR>/migrations/<mid>.json`, root-only): the container, its runc root,
the destination agent, the migration id, the work dir, its own pid, and the phase it
has reached. Each phase is written *before* the step it names, so the journal never
claims less than what may have happened:

    prechecked  the destination staged nothing yet; nothing is frozen
    frozen      the source may be paused (runc pause) and a dump may be running
    restoring   the destination may be restoring, or may already run the container

If `migrt migrate` dies (kill -9, OOM, reboot of the agent it talks to), the journal
stays. `resolve_pending()` reads every journal whose writer is gone, stops what that
writer left running (a `runc checkpoint` and its CRIU), asks the destination agent what
became of the migration, and finishes it:

    destination runs the container           -> delete the (frozen) source
      (lazy mode: once the dead writer's page server has ended; if CRIU's log says it
      did not serve every page, the destination's copy is stopped and the source
      resumes, or, if the destination cannot confirm, the source stays paused)
    destination never got to restore it      -> resume the source
    destination unreachable, or the answer
    cannot tell "dropped" from "restored"    -> leave the source frozen, keep the
                                                journal, try again next time

Never both copies running, never neither: a source is resumed only when the destination
cannot have started the container. `migrt migrate` runs this before each migration, and
`migrt agent` at start and on each sweep, so a restarted migrate or agent cleans up
after a dead one. `python -m migrt.migration.recovery` runs it by hand and prints each outcome.
"""
import json
import os
import shutil
import signal
import subprocess
import time
from migrt.safeio import makedirs_private


def state_dir():
    return os.path.join(os.environ.get("MIGRT_STATE_DIR", "/run/migrt"), "migrations")


class Journal:
    """The on-disk record of one migration in progress on this (source) node."""

    def __init__(self, path, rec):
        self.path = path
        self.rec = rec

    @classmethod
    def begin(cls, mid, container, root, to, work, **extra):
        d = state_dir()
        makedirs_private(d)
        rec = dict(extra, mid=mid, container=container, root=os.path.abspath(root), to=to,
                   work=work, pid=os.getpid(), pid_start=_start_time(os.getpid()),
                   phase="prechecked", started=time.time())
        j = cls(os.path.join(d, f"{mid}.json"), rec)
        j._write()
        return j

    def phase(self, name, **fields):
        self.rec.update(fields, phase=name, updated=time.time())
        self._write()

    def _write(self):
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.rec))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def done(self):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _start_time(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def writer_alive(rec):
    pid = rec.get("pid")
    return bool(pid) and _start_time(pid) is not None and _start_time(pid) == rec.get("pid_start")


def pending():
    """Journals whose `migrt migrate` is gone."""
    out = []
    try:
        names = sorted(os.listdir(state_dir()))
    except FileNotFoundError:
        return out
    for n in names:
        if not n.endswith(".json"):
            continue
        p = os.path.join(state_dir(), n)
        try:
            with open(p) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and not writer_alive(rec):
            out.append(Journal(p, rec))
    return out


def _runc(rec, *args):
    from migrt.runc import runc_path
    return subprocess.run([runc_path(), "--root", rec["root"], *args], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120)


def stop_leftovers(rec):
    """Kill what the dead writer started for this migration (runc checkpoint, CRIU)."""
    import psutil
    work = rec.get("work")
    if not work:
        return 0
    victims = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(work in a for a in (p.info["cmdline"] or [])):
                victims += [p] + p.children(recursive=True)
        except psutil.Error:
            continue
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=10)
    return len(victims)


def _ask_destination(rec, secret, **more):
    """The destination agent's `status` reply about this migration (`more`: what the
    source decided, e.g. stop or release), or None if it cannot be asked."""
    from migrt.transfer import wire
    hello = dict(more, op="status", mid=rec["mid"], id=rec.get("dest_id") or rec["container"])
    if rec.get("dest_root"):
        hello["root"] = rec["dest_root"]
    try:
        c, _ = wire.connect(rec["to"], secret, hello, timeout=3)
    except (wire.ProtocolError, OSError):
        return None
    try:
        return c.read_json()
    except (wire.ProtocolError, OSError):
        return None
    finally:
        c.close()


def destination_state(rec, secret):
    """What the destination agent says of the migration: (state, exists) where state is
    restored, restoring, failed, gone, or None when it cannot be asked, and exists
    whether a container of the destination's id is in the destination's runc root
    (None if the agent does not say)."""
    reply = _ask_destination(rec, secret)
    if reply is None:
        return None, None
    st = reply.get("state")
    state = {"restored": "restored", "done": "restored", "restoring": "restoring",
             "failed": "failed", "unknown": "gone"}.get(st, st or "gone")
    exists = reply.get("container_exists")
    return state, exists if isinstance(exists, bool) else None


def resolve(j, secret):
    """Finish one interrupted migration. Returns a one-line outcome."""
    rec = j.rec
    cid, phase = rec["container"], rec.get("phase")
    where = f"migration {rec['mid']} of {cid} to {rec['to']} (interrupted at {phase})"
    # lazy mode after the restore request: the dead writer's page server may still be
    # feeding the destination's memory; it must not be killed until that is over
    serving = rec.get("mode") == "lazy" and phase == "restoring"
    killed = 0 if serving else stop_leftovers(rec)
    unlocked = ""
    st = _runc(rec, "state", cid)
    srcst = json.loads(st.stdout) if st.returncode == 0 else {}
    src = srcst.get("status")
    dest, exists = (destination_state(rec, secret) if phase in ("frozen", "restoring")
                    else ("gone", False))
    if src is None and not (serving and leftovers(rec)):
        # nothing left here to resume or delete (released, or removed by hand)
        _drop_work(rec)
        j.done()
        return f"{where}: the source is gone; nothing to do"
    if dest == "restored" or (dest is not None and exists):
        if serving and leftovers(rec):
            return f"{where}: the destination runs it; the source still serves its memory"
        failed = serving and src is not None and page_server_failure(rec)
        if failed:
            # the copy there lacks part of its memory: it must stop, and the source,
            # which has all of it, resumes (as a live migrate does, lazy_finish)
            if not stop_destination(rec, secret, failed):
                if src == "running":        # thawed by its failed CRIU: not two copies
                    _runc(rec, "pause", cid)
                return (f"{where}: {failed}, and the destination did not confirm that it "
                        f"stopped its copy; the source stays frozen until it does")
            unlocked, err = _resume_source(rec, cid, src, srcst.get("pid"))
            if err:
                return f"{where}: {err}"
            outcome = (f"{where}: {failed}; the destination's copy, missing part of its "
                       f"memory, was stopped there; source resumed")
            return _finish(j, rec, secret, phase, outcome, killed, unlocked)
        if src is not None:
            if srcst.get("bundle"):         # its kubelet must not bring it back
                from migrt.migration.migrate import bury
                bury(srcst["bundle"], f"migrated to {rec['to']} (migration {rec['mid']})")
            from migrt.migration.migrate import _restore_record
            from migrt.runtime.lifecycle import forget
            restored = _restore_record(rec["root"], cid) if rec.get("root") else None
            if not _release(rec, cid, srcst.get("pid")) and restored:
                forget(restored)
        outcome = f"{where}: the destination runs it; source deleted"
    elif dest in ("failed", "gone") and (phase != "restoring" or exists is False):
        if serving:
            killed = stop_leftovers(rec)
            src = json.loads(_runc(rec, "state", cid).stdout or "{}").get("status")
        unlocked, err = _resume_source(rec, cid, src, srcst.get("pid"))
        if err:
            return f"{where}: {err}"
        outcome = (f"{where}: the destination has no copy; source "
                   + ("resumed" if src == "paused" else f"left {src or 'absent'}"))
    else:
        # unreachable, still restoring, or gone after a restore may have happened
        return (f"{where}: destination says {dest or 'nothing (unreachable)'}; the source "
                f"stays {src} until that is known")
    return _finish(j, rec, secret, phase, outcome, killed, unlocked)


def _resume_source(rec, cid, src, pid):
    """The source goes on: the network lock a dead CRIU left removed, then resumed if
    paused. Returns (a note on the lock, "" or an error line)."""
    unlocked = _clear_netlock(pid)
    if src == "paused":
        r = _runc(rec, "resume", cid)
        if r.returncode != 0:
            return unlocked, f"could not resume the source: {r.stderr.strip()}"
    return unlocked, ""


def _finish(j, rec, secret, phase, outcome, killed, unlocked):
    if killed:
        outcome += f"; stopped {killed} leftover process(es)"
    if unlocked:
        outcome += f"; {unlocked}"
    if phase in ("frozen", "restoring"):
        release_destination(rec, secret)
    _drop_work(rec)
    j.done()
    return outcome


def page_server_failure(rec):
    """Lazy mode, once the dead writer's page server (its `runc checkpoint --lazy-pages`
    and CRIU) has ended: None if CRIU's log says the dump finished, every page served;
    else why not, in one line. A CRIU killed leaves no last line, and counts as failed."""
    log = os.path.join(rec.get("work") or "", "work", "dump.log")
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - (16 << 10)))
            tail = f.read().decode(errors="replace")
    except OSError as e:
        return f"its page server's log cannot be read ({e.strerror}: {log})"
    if "Dumping finished successfully" in tail:
        return None
    from migrt.runtime.lifecycle import criu_errors
    errs = criu_errors(log)
    return ("its page server ended before it had served every page"
            + (f" (CRIU: {'; '.join(errs)[:300]})" if errs else " (CRIU's log has no end: "
               "killed)"))


def stop_destination(rec, secret, why):
    """Ask the destination agent to stop the copy it restored (lazy mode: it lacks part
    of its memory). True once it says no such copy runs there."""
    reply = _ask_destination(rec, secret, stop=why) or {}
    return bool(reply.get("stopped")) or (reply.get("state") in ("failed", "unknown")
                                          and reply.get("container_exists") is False)


def _release(rec, cid, pid):
    """As migrate releases a source (migrt.migration.handover): killed while frozen and
    its network still held, then its leftover sockets destroyed and the hold removed.
    Returns a warning ("" when the source is gone)."""
    from migrt.migration import handover
    hold = None
    if pid:
        try:
            hold = handover.Hold.existing(pid)
        except OSError:
            hold = None
    warn = handover.release(lambda *a: _runc(rec, *a), cid)
    if hold is not None:
        try:
            hold.after_release()
        except (OSError, subprocess.SubprocessError):
            pass
    return warn


def release_destination(rec, secret):
    """The migration is decided: the destination's staged copy is not needed any more
    (it would otherwise stay until the agent's --ttl)."""
    _ask_destination(rec, secret, release=True)


def _clear_netlock(pid):
    """The dead writer's CRIU may have died with the source's network locked: undo it
    (migrt.criu.netlock). Returns a note for the outcome ("" if there was nothing)."""
    if not pid:
        return ""
    from migrt.criu import netlock
    try:
        removed = netlock.clear(pid)
    except (OSError, subprocess.SubprocessError) as e:
        return f"could not check the source's network lock: {e}"
    return f"removed the network lock its CRIU left ({', '.join(removed)})" if removed else ""


def leftovers(rec):
    """Processes the dead writer started for this migration that still run."""
    import psutil
    work = rec.get("work")
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if work and p.info["status"] != psutil.STATUS_ZOMBIE and \
                    any(work in a for a in (p.info["cmdline"] or [])):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


def _drop_work(rec):
    """The dead writer's local image and CRIU work dir (only under .../migrate/)."""
    work = rec.get("work")
    if work and os.path.basename(os.path.dirname(work)) == "migrate":
        shutil.rmtree(work, ignore_errors=True)


def resolve_pending(secret=None, log=None):
    """Resolve every interrupted migration of this node. Returns the outcomes."""
    out = []
    for j in pending():
        try:
            s = secret
            if s is None:
                from migrt.transfer import wire
                s = wire.load_secret(j.rec.get("secret_file"))
            msg = resolve(j, s)
        except Exception as e:          # one bad record must not stop the others
            msg = f"migration {j.rec.get('mid')}: recovery failed: {type(e).__name__}: {e}"
        out.append(msg)
        if log:
            log(msg)
    return out


def main():
    import sys
    for line in resolve_pending():
        print(line)
    return 0 if not pending() else 1


if __name__ == "__main__":
    raise SystemExit(main())
