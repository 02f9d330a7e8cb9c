"""Two rules for containers that belong to a Kubernetes pod (issues 13 and 14).

1. A container moved away is not brought back. When migrt releases the source of a
   migration, or checkpoints a container without --leave-running, the container's
   process goes, and its kubelet (restartPolicy Always or OnFailure) would create it
   again from its image in the same pod sandbox: a second copy of a workload that now
   runs elsewhere, starting from scratch. So migrt first leaves a tombstone keyed by the
   pod sandbox id and the container's name, and refuses to create that container in
   that sandbox again, with one line the kubelet shows in `kubectl describe pod`.

2. A restore happens once per pod sandbox. A pod that restored a container from
   `MIGRT_RESTORE_FROM` keeps the marker in its spec; when that container later exits
   and its kubelet restarts it, the create must start it from its image like any
   restart, never rewind it to the old checkpoint (nor fail because a staged migration
   is gone). The first restore in a sandbox records the container's name; later creates
   of that name there drop the marker. Except while the migration that restored it
   lazily has not ended (its memory still comes from the source, whose copy is frozen,
   not gone): a restart then would run beside a source that may yet resume, so it is
   refused until then; if that migration fails, the destination's agent buries the
   container (rule 1) before it stops it, and the source resumes.

Both records live in MIGRT_KUBE_STATE (default /run/migrt/kube): `tomb/<sandbox>/<name>`
and `restored/<sandbox>/<name>`. Sandbox ids are unique per node and across nodes, so
the directory needs no per-node key. They go when the sandbox itself is deleted (the
runtime's `delete` of the sandbox's pause container) and after a week in any case.
Only os and json are imported: fast.py calls this on the pass-through path, and only
when a tombstone exists at all.
"""
import json
import os
import re
import time

KEEP_SECONDS = 7 * 24 * 3600
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$")


def state_dir():
    return os.environ.get("MIGRT_KUBE_STATE", "/run/migrt/kube")


def pod_container(spec):
    """(sandbox id, container name, namespace, pod name) of a pod's container, from the
    annotations containerd's CRI (io.kubernetes.cri.*) or CRI-O sets; None otherwise
    (a sandbox's own pause container, or a container no kubelet owns)."""
    ann = spec.get("annotations") if isinstance(spec, dict) else None
    if not isinstance(ann, dict):
        return None
    if ann.get("io.kubernetes.cri.container-type") == "container":
        found = (ann.get("io.kubernetes.cri.sandbox-id"),
                 ann.get("io.kubernetes.cri.container-name"),
                 ann.get("io.kubernetes.cri.sandbox-namespace"),
                 ann.get("io.kubernetes.cri.sandbox-name"))
    elif ann.get("io.kubernetes.cri-o.ContainerType") == "container":
        found = (ann.get("io.kubernetes.cri-o.SandboxID"),
                 ann.get("io.kubernetes.container.name"),
                 ann.get("io.kubernetes.pod.namespace"), ann.get("io.kubernetes.pod.name"))
    else:
        return None
    sid, name = found[0], found[1]
    if not (isinstance(sid, str) and _NAME.match(sid) and isinstance(name, str)
            and _NAME.match(name)):
        return None
    return found


def _path(kind, sid, name=None):
    p = os.path.join(state_dir(), kind, sid)
    return os.path.join(p, name) if name else p


def _write(path, rec):
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(json.dumps(rec))
    os.replace(tmp, path)


def _read(path):
    try:
        with open(path) as f:
            rec = json.load(f)
        return rec if isinstance(rec, dict) else {}
    except ValueError:
        return {}
    except OSError:
        return None


def _who(pc):
    sid, name, ns, pod = pc
    where = f"pod {ns}/{pod}" if ns and pod else f"pod sandbox {sid[:12]}"
    return f"container {name} of {where}"


# ------------------------------------------------------------ rule 1: tombstones

def bury(spec, why):
    """Record that this pod container was moved away (before its process goes).
    Returns True if the spec is a pod's container (and a tombstone was written)."""
    pc = pod_container(spec)
    if pc is None:
        return False
    bury_pod(pc[0], pc[1], why)
    return True


def bury_pod(sid, name, why):
    """bury() by the pod sandbox id and container name (pod_container's first two)."""
    if not (isinstance(sid, str) and _NAME.match(sid) and isinstance(name, str)
            and _NAME.match(name)):
        raise ValueError(f"not a pod sandbox id and container name: {sid!r}, {name!r}")
    _write(_path("tomb", sid, name), {"why": why, "at": time.time()})
    sweep()


def unbury(spec):
    """The move failed and the container runs on: take its tombstone back."""
    pc = pod_container(spec)
    if pc is None:
        return
    try:
        os.unlink(_path("tomb", pc[0], pc[1]))
    except OSError:
        pass
    _rmdir_empty(_path("tomb", pc[0]))


def any_tombstones():
    """Cheap: is there any tombstone at all on this node?"""
    try:
        return bool(os.listdir(os.path.join(state_dir(), "tomb")))
    except OSError:
        return False


def refusal(spec):
    """The one line a create of a buried container gets, or None."""
    pc = pod_container(spec)
    if pc is None:
        return None
    rec = _read(_path("tomb", pc[0], pc[1]))
    if rec is None:
        return None
    why = rec.get("why") or "moved away by migrt"
    return (f"{_who(pc)} was {why}; migrt does not start it again in this pod sandbox "
            f"(the pod's copy runs elsewhere now: delete this pod)")


# ------------------------------------------------------------ rule 2: restore once

def restored_before(spec):
    """The marker of this pod container was already restored in this sandbox: the
    record, else None."""
    pc = pod_container(spec)
    if pc is None:
        return None
    return _read(_path("restored", pc[0], pc[1]))


def mark_restored(spec, marker, pending=None):
    """`pending`: a lazy migration's staged dir, there until the source has served
    every page (the migration's end): see still_migrating()."""
    pc = pod_container(spec)
    if pc is None:
        return
    rec = {"marker": marker, "at": time.time()}
    if pending:
        rec["pending"] = pending
    try:
        _write(_path("restored", pc[0], pc[1]), rec)
    except OSError:
        pass


def still_migrating(spec, rec):
    """The one line a restart of a lazily restored container gets while its migration
    has not ended (its memory still comes from the source, or the migration has just
    failed and the source resumes), else None. Started from its image then, it would be
    a second copy of the workload beside the source's; once the migration is over it
    either succeeded (a restart is a restart) or buried this container (rule 1)."""
    pending = (rec or {}).get("pending")
    if not (isinstance(pending, str) and os.path.isdir(pending)):
        return None
    return (f"{_who(pod_container(spec))} was restored by migration "
            f"{os.path.basename(pending)}, which has not ended (the source node still "
            f"holds the workload); migrt does not start it again from its image until "
            f"that migration has ended")


# ------------------------------------------------------------ cleanup

def knows_sandbox(sid):
    return any(os.path.exists(_path(kind, sid)) for kind in ("tomb", "restored")) \
        if sid and _NAME.match(sid) else False


def forget_sandbox(sid):
    """The sandbox is being deleted: its records go with it."""
    if not (sid and _NAME.match(sid)):
        return
    import shutil
    for kind in ("tomb", "restored"):
        shutil.rmtree(_path(kind, sid), ignore_errors=True)


def _rmdir_empty(path):
    try:
        os.rmdir(path)
    except OSError:
        pass


def sweep(keep=KEEP_SECONDS):
    """Records of sandboxes never deleted through this runtime (a node that lost them)."""
    now = time.time()
    for kind in ("tomb", "restored"):
        base = os.path.join(state_dir(), kind)
        try:
            sids = os.listdir(base)
        except OSError:
            continue
        for sid in sids:
            d = os.path.join(base, sid)
            try:
                if now - os.stat(d).st_mtime > keep:
                    import shutil
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass
