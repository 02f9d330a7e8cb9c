"""`MIGRT_RESTORE_FROM=staged:<migration-id>`: restore a migration the agent staged.

The agent has already checked every chunk as it arrived; verify_image only confirms
that nothing was written since (its stat record) unless that record is gone.
A staged migration is restored once: resolving it moves it to `restoring`, and its
restore frees the image's pages as it goes (`runc restore --auto-dedup`).
"""
import os

from migrt.errors import CheckpointError


def resolve(rest, bundle):
    from migrt import image
    from migrt.agent.staging import Staged, valid_mid
    from migrt.runtime.checkpoints import RestoreSource
    if not valid_mid(rest):
        from migrt.errors import shown
        raise CheckpointError(f"{shown('staged:' + rest)}: not a migration id")
    s = Staged(rest)
    if s.linked():
        raise CheckpointError(f"staged:{rest}: a symlink in the staged migration's dirs; "
                              f"refusing to restore")
    rec = s.read()
    if rec is None or rec.get("state") == "receiving":
        arrived = await_arrival(s, rest, bundle)
        if arrived is not None:
            s = Staged(rest)            # its record names the disk dir of its rootfs
            rec = s.read()
    if rec is None:
        raise CheckpointError(f"staged:{rest}: no such staged migration in {os.path.dirname(s.dir)}")
    retain = bool(rec.get("retain"))
    lock = _lock(s) if retain else None
    try:
        if retain:
            rec = s.read() or rec           # under the lock: one restore of a kept copy at once
            if rec.get("state") == "restoring" and not _alive(rec.get("restorer")):
                rec["state"] = "staged"     # its restorer died midway: try again
        if rec.get("state") != "staged":
            raise CheckpointError(f"staged:{rest}: migration is {rec.get('state')}, not ready to restore")
        want = rec.get("for_bundle")
        if want and os.path.realpath(want) != os.path.realpath(bundle):
            raise CheckpointError(f"staged:{rest}: was sent for bundle {want}, not "
                                  f"{os.path.abspath(bundle)}")
        m = image.verify_image(s.image_dir, rootfs_dir=s.rootfs_dir)
        if retain:
            # a kept copy (its source is gone: the `keep` op) must survive a failed restore,
            # so that it can be tried again: its pages are read, never punched out, and its
            # rootfs changes are copied, not moved
            s.update(state="restoring", bundle=os.path.abspath(bundle), restorer=os.getpid(),
                     attempts=int(rec.get("attempts") or 0) + 1)
        else:
            s.update(state="restoring", bundle=os.path.abspath(bundle))
    except CheckpointError as e:
        if retain and (s.read() or {}).get("state") == "staged":
            # a kept copy's failed attempt is told to whoever waits for it (migrt.kube)
            try:
                s.update(attempts=int(rec.get("attempts") or 0) + 1, last_error=str(e)[:2000])
            except OSError:
                pass
        raise
    finally:
        if lock is not None:
            os.close(lock)
    from migrt.runtime.checkpoints import RESTORE_FLAGS, manifest_criu_conf
    flags = [f for f in m.get("criu_flags", []) if f in RESTORE_FLAGS]
    conf = manifest_criu_conf(m)
    lazy = rec.get("lazy_address")
    if not lazy and not retain:
        # restored once, then dropped: CRIU punches each page out of the staged image as
        # it restores it, so the destination holds one copy of the memory, not two (and
        # the restore reuses the pages it frees instead of asking for fresh ones)
        flags.append("--auto-dedup")

    def prepare(bundle, spec, journal=None):
        image.apply_rootfs(s.image_dir, bundle, rootfs_dir=s.rootfs_dir, m=m, spec=spec,
                           move=not retain, journal=journal)

    def on_restored(cid, pid, root, spec):
        # the agent frees the images when the source releases the migration: freeing
        # hundreds of MiB of tmpfs here would only lengthen the downtime.
        # The agent follows a local fill, and stops a copy whose memory cannot all come
        # (lazy mode: the source's page server failed), only through its own root-only
        # record of the restore and migrt's record in the runc state dir, never through
        # the staged record (migrt.agent.fill): write the first here when containerd,
        # not the agent, ran this create
        _note_restore(rest, cid, root, spec)
        if source.lazy_local:
            # running, its memory still coming in from the image: the agent says when
            # it is all there (migrt.agent.fill), and only then may the source go
            s.update(state="filling", container=cid, pid=pid, lazy=False)
        else:
            s.update(state="restored", container=cid, pid=pid, lazy=bool(lazy))

    def on_failed(cid, msg):
        if retain:
            # the only copy of the workload: ready for the next attempt (the kubelet
            # creates the container again), the error kept for the caller to read
            s.update(state="staged", last_error=str(msg)[:2000], restorer=None)
        else:
            s.update(state="failed", error=msg)

    tls = None
    if lazy:
        from migrt.criu import pagetls
        tls = pagetls.files(s.tls_dir)
        if not all(os.path.isfile(p) for p in tls.values()):
            raise CheckpointError(f"staged:{rest}: lazy migration without its page-traffic "
                                  f"TLS identity ({s.tls_dir})")
    source = RestoreSource(s.image_dir, restore_flags=flags, lazy_address=lazy, lazy_tls=tls,
                           lazy_local=not retain and fill_locally(rec, memory_bytes(m)),
                           prepare=prepare,
                           on_restored=on_restored, on_failed=on_failed,
                           description=f"staged:{rest}", criu_conf=conf)
    if lazy or source.lazy_local:
        # the container runs before its memory is all here: the migration ends (and
        # this dir goes) only once it is, or once it failed and the source resumed
        source.pending = s.dir
    return source


def _lock(s):
    """An exclusive lock on a staged migration's dir (an fd; closing it unlocks)."""
    import fcntl
    fd = os.open(s.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _alive(pid):
    try:
        os.kill(int(pid), 0)
        return True
    except (TypeError, ValueError, OSError):
        return False


def _note_restore(mid, cid, root, spec):
    """The agent's root-only record of the restore for migration `mid` (which container,
    under which runc root, and for a pod's container its sandbox and name, which the
    agent buries if it has to stop the copy: migrt.runtime.podrules), written here, as
    root, in the agent's dir when the restore was not the agent's own (containerd ran
    this create on a `staged:` marker). An agent-made record is left as it is."""
    import json
    from migrt.safeio import makedirs_private, write_private
    from migrt.agent.staging import private_root
    d = os.path.join(private_root(), mid)
    if os.path.exists(os.path.join(d, "restore.json")):
        return
    from migrt.runtime import podrules
    pod = podrules.pod_container(spec)
    try:
        makedirs_private(d)
        write_private(os.path.join(d, "restore.json"), json.dumps(
            dict({"mid": mid, "container": cid, "root": root},
                 **({"pod": list(pod[:2])} if pod else {}))).encode())
    except OSError:
        # a fill then cannot be followed (the source resumes: no loss), nor a lazy copy
        # stopped (the source stays frozen: in doubt, never two copies)
        pass


AWAITED = ".awaited"


def awaited_path(staging, mid):
    """Where a create waiting for migration `mid` says so (the agent's `status` reads it)."""
    return os.path.join(staging, AWAITED, mid)


def dropped_path(staging, mid):
    """Where the agent notes that migration `mid` will not come (rolled back, or
    cancelled by the caller before it started): a create waiting for it stops at once."""
    return os.path.join(staging, AWAITED, mid + ".dropped")


def note_dropped(staging, mid, why):
    path = dropped_path(staging, mid)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(why)
    except OSError:
        pass


def sweep_notes(staging, ttl):
    """Notes of migrations dropped more than ttl seconds ago."""
    import time
    d = os.path.join(staging, AWAITED)
    try:
        names = os.listdir(d)
    except OSError:
        return
    for n in names:
        if n.endswith(".dropped"):
            p = os.path.join(d, n)
            try:
                if time.time() - os.stat(p).st_mtime > ttl:
                    os.unlink(p)
            except OSError:
                pass


def await_arrival(s, mid, bundle):
    """A pod created for a migration before its source is even frozen (migrt.kube: the
    pod is scheduled and its sandbox made outside the downtime) has its create wait
    here, bounded by MIGRT_STAGED_WAIT seconds (default 120), until the migration is
    staged. Only a Kubernetes pod's container waits; anything else fails at once.
    Returns the staged record, or None if there is nothing to wait for."""
    import json
    import time
    from migrt.runtime import podrules
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return None
    wait = float(os.environ.get("MIGRT_STAGED_WAIT", "120"))
    if podrules.pod_container(spec) is None or wait <= 0:
        return None
    staging = os.path.dirname(s.dir)
    mark = awaited_path(staging, mid)
    os.makedirs(os.path.dirname(mark), mode=0o700, exist_ok=True)
    with open(os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(json.dumps({"pid": os.getpid(), "bundle": os.path.abspath(bundle), "since": time.time()}))
    seen = False
    deadline = time.monotonic() + wait
    try:
        while True:
            rec = s.read()
            if rec is not None:
                seen = True
                if rec.get("state") != "receiving":
                    return rec
            elif seen or os.path.exists(dropped_path(staging, mid)):
                why = ""
                try:
                    with open(dropped_path(staging, mid)) as f:
                        why = f.read().strip()
                except OSError:
                    pass
                raise CheckpointError(f"staged:{mid}: the migration was dropped before it "
                                      f"arrived ({why or 'its source rolled back'})")
            if time.monotonic() > deadline:
                raise CheckpointError(f"staged:{mid}: no such migration arrived in {staging} "
                                      f"within {wait:.0f}s (MIGRT_STAGED_WAIT)")
            time.sleep(0.01)
    finally:
        try:
            os.unlink(mark)
        except OSError:
            pass


# Below this much memory a staged migration is restored whole: starting `criu lazy-pages`
# and waiting for its socket costs about 0.03-0.06 s here, and CRIU reads a few MiB of
# pages from tmpfs in less (busybox: 0.15 MB of pages). $MIGRT_LOCAL_FILL_MIN (bytes).
LOCAL_FILL_MIN = 32 << 20


def memory_bytes(m):
    """The bytes of memory pages in an image (its manifest's pages-*.img files)."""
    try:
        return sum(int(e.get("size") or 0) for e in m.get("files") or ()
                   if os.path.basename(str(e.get("path", ""))).startswith("pages-"))
    except (TypeError, ValueError, AttributeError):
        return None


def fill_locally(rec, memory=None):
    """Should this staged migration's memory be filled in after the container runs?
    Not when it is small (LOCAL_FILL_MIN): then the lazy-pages daemon costs the
    downtime more than restoring the pages does."""
    try:
        least = int(os.environ.get("MIGRT_LOCAL_FILL_MIN", LOCAL_FILL_MIN))
    except ValueError:
        least = LOCAL_FILL_MIN
    if memory is not None and memory < least:
        return False
    return not rec.get("lazy_address") and bool(rec.get("fill_ok")) and local_lazy()


def local_lazy():
    """Restore a staged full or pre-copy migration with lazy-pages from its own image:
    CRIU restores everything but the memory, the container runs, and a local
    `criu lazy-pages` fills the memory in from the staged image (on this 2-core node:
    0.11 s to running instead of 0.20 s at 256 MiB and 0.70 s at 1 GiB; the fill takes
    0.1 to 3 s after). MIGRT_EAGER_RESTORE=1 restores all of it first; a kernel without
    userfaultfd always does, and so does a migration from a `migrt migrate` that does
    not wait for the fill (the staged record's `fill_ok`, from its precheck)."""
    if os.environ.get("MIGRT_EAGER_RESTORE", "") not in ("", "0"):
        return False
    try:
        from migrt.plugins import nodefacts
        return bool((nodefacts.collect().get("criu_features") or {}).get("uffd-noncoop"))
    except Exception:
        return False
