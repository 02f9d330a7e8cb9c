"""The PodMigration controller: moves one pod per PodMigration (migrt.io/v1alpha1).

The order (as Tencent's mig runtime does it), so that scheduling and pod creation stay
out of the downtime:

1. checks: the pod runs, with the migrt runtime class, one container, an owner migrt
   knows how to keep (none, a ReplicaSet, or a Job: restartPolicy OnFailure or Never);
2. the new pod is created and scheduled first: a copy of the old pod's spec, kept off
   the source node (and on the target node if one was asked for), whose container
   carries MIGRT_RESTORE_FROM=staged:<mid> with a migration id chosen here. On its node
   migrt's create waits (bounded) for that migration (migrt.runtime.sources.staged);
   the controller waits until that node's agent says so (`awaited`);
3. the source node's agent migrates the container to the target node's agent with that
   id (`migrt migrate`: freeze, dump, transfer, restore there, source released);
   the waiting create restores it, so the new pod's container runs on; the agent says
   so before the outcome, and the Services' endpoints are handed over then (HandOver);
   a Job's pod with restartPolicy Never has its source held frozen from then on, while
   the new pod joins the Job and the old one leaves it, and released after
   (Mover.swap_job_pods: the old pod turns Failed once its container goes, which the Job
   would count as a failure while the pod is still its own);
4. the bookkeeping, after the restore: a ReplicaSet's (or Job's) pod is handed to it
   (see `adopt`), the old pod is deleted, Events, status.

Failure before step 3 succeeds deletes the new pod: the source runs on. Once the
migration succeeded, only the bookkeeping is left, and it is retried until done. Every
step is recorded in the PodMigration's status before it is taken, so a restarted
controller goes on from there (the agent's `migrate` is idempotent for one id). A
PodMigration deleted before the migration started deletes its new pod; deleted during
the migration, it waits for the outcome (finalizer `migrt.io/controller`).
"""
import copy
import datetime
import json
import os
import sys
import threading
import time

from migrt.kube import agents
from migrt.kube.client import KubeError

FINALIZER = "migrt.io/controller"
LABEL = "migrt.io/migration"              # on the new pod: the PodMigration's name
HELD = "migrt.io/held-labels"             # labels held back until the ReplicaSet adopts it
DRAIN_TAINT = "migrt.io/drain"            # a node tainted so is drained by migration
# migrt migrate's modes, as the source agent takes them (precopy-lazy: --precopy --lazy)
MODES = ("full", "precopy", "lazy", "precopy-lazy")
# the owners whose pods migrt hands over to them (kind: API group/version, resource)
OWNERS = {"ReplicaSet": ("apps/v1", "replicasets"), "Job": ("batch/v1", "jobs")}
RUNTIME_CLASS = os.environ.get("MIGRT_RUNTIME_CLASS", "migrt")
SCHEDULE_TIMEOUT = float(os.environ.get("MIGRT_KUBE_SCHEDULE_TIMEOUT", "60"))
READY_TIMEOUT = float(os.environ.get("MIGRT_KUBE_READY_TIMEOUT", "60"))
# a Job pod with restartPolicy Never: how long its source may stay frozen (its copy
# running on the target) while the old pod leaves the Job (Mover.swap_job_pods)
HOLD_TIMEOUT = float(os.environ.get("MIGRT_KUBE_HOLD_TIMEOUT", "120"))
# the Service hand-over once the copy runs (HandOver); 0 turns it off (as before: the
# kubelets' own view only, about 1 s later, and the frozen old pod kept in lazy mode)
HAND_OVER = os.environ.get("MIGRT_KUBE_HAND_OVER", "1") != "0"
HAND_OVER_PERIOD = 0.1
# labels held back from the new pod (HELD) that a Service is not expected to select by
HELD_UNSELECTED = {"pod-template-hash", "controller-uid"}


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def log(msg):
    sys.stderr.write(f"{now_iso()} migrt-controller: {msg}\n")
    sys.stderr.flush()


class Failed(Exception):
    """The move failed; `target` says whether the new pod must go."""

    def __init__(self, msg, delete_target=True):
        super().__init__(msg)
        self.delete_target = delete_target


def _cond(pod, kind):
    for c in pod.get("status", {}).get("conditions") or []:
        if c.get("type") == kind:
            return c
    return {}


def ready(pod):
    return _cond(pod, "Ready").get("status") == "True"


def controller_ref(obj):
    for r in obj.get("metadata", {}).get("ownerReferences") or []:
        if r.get("controller"):
            return r
    return None


def check_pod(pod):
    """Why this pod cannot be moved, or None."""
    md, spec = pod["metadata"], pod["spec"]
    name = f"{md['namespace']}/{md['name']}"
    if md.get("deletionTimestamp"):
        return f"pod {name} is being deleted"
    if spec.get("runtimeClassName") != RUNTIME_CLASS:
        return (f"pod {name} does not run with runtimeClassName {RUNTIME_CLASS} "
                f"(it has {spec.get('runtimeClassName') or 'the default runtime'})")
    if len(spec.get("containers") or []) != 1 or spec.get("initContainers") \
            or spec.get("ephemeralContainers"):
        return f"pod {name}: only pods with exactly one container can be moved yet"
    if pod.get("status", {}).get("phase") != "Running" or not spec.get("nodeName"):
        return f"pod {name} is {pod.get('status', {}).get('phase')}, not Running"
    st = (pod["status"].get("containerStatuses") or [{}])[0]
    if "running" not in (st.get("state") or {}) or not st.get("containerID"):
        return f"pod {name}: its container is not running"
    ref = controller_ref(pod)
    if ref and ref.get("kind") == "Job" and spec.get("restartPolicy") not in ("OnFailure",
                                                                             "Never"):
        return (f"pod {name} is owned by a Job ({ref.get('name')}) with restartPolicy "
                f"{spec.get('restartPolicy') or 'Always'}: only Job pods with restartPolicy "
                f"OnFailure or Never can be moved")
    if ref and ref.get("kind") not in OWNERS and ref.get("kind") != "StatefulSet":
        return (f"pod {name} is owned by a {ref.get('kind')} ({ref.get('name')}): only bare "
                f"pods, ReplicaSet (Deployment), StatefulSet and Job pods can be moved yet")
    if spec.get("volumes"):
        for v in spec["volumes"]:
            if v.get("persistentVolumeClaim") or v.get("hostPath"):
                return (f"pod {name}: volume {v.get('name')} is a "
                        f"{'persistentVolumeClaim' if v.get('persistentVolumeClaim') else 'hostPath'}"
                        f", whose contents do not move with the pod")
    return None


def job_room(job, pods, pod):
    """Why moving this Job pod could fail its Job, or None. With restartPolicy OnFailure
    the Job controller (1.20) fails the Job once the restarts of its Running and Pending
    pods add up to backoffLimit (any restart, if 0); the old pod's refused restart
    (its container left for the new pod) counts one until the old pod is gone. With
    Never nothing is counted: the old pod leaves the Job before its container goes
    (Mover.swap_job_pods)."""
    if pod["spec"].get("restartPolicy") == "Never":
        return None
    limit = (job.get("spec") or {}).get("backoffLimit")
    limit = 6 if limit is None else limit
    used = sum(c.get("restartCount") or 0
               for p in pods if (p.get("status") or {}).get("phase") in ("Running", "Pending")
               for c in (p["status"].get("containerStatuses") or [])
               + (p["status"].get("initContainerStatuses") or []))
    if used + 1 >= max(limit, 1):
        md = pod["metadata"]
        return (f"pod {md['namespace']}/{md['name']}: its Job {job['metadata']['name']} has "
                f"backoffLimit {limit} and its pods restarted {used} time(s); the old pod's "
                f"refused restart after the move would count one more and fail the Job")
    return None


def node_ready(node):
    for c in node.get("status", {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def _base_name(pod):
    md = pod["metadata"]
    if md.get("generateName"):
        return md["generateName"]
    name = md["name"]
    # a pod this controller made already ends in -xxxxx: do not let names grow
    if (md.get("annotations") or {}).get("migrt.io/migrated-from") and len(name) > 6 \
            and name[-6] == "-":
        name = name[:-6]
    return name[:57] + "-"


def _pin_terms(spec, source, target):
    """Keep the new pod off the source node (and on the target node if given); drop a
    pin to the source node, which would keep it where it is."""
    sel = spec.get("nodeSelector") or {}
    if sel.get("kubernetes.io/hostname") == source:
        del sel["kubernetes.io/hostname"]
        if not sel:
            spec.pop("nodeSelector")
    exprs = [{"key": "kubernetes.io/hostname", "operator": "NotIn", "values": [source]}]
    if target:
        exprs.append({"key": "kubernetes.io/hostname", "operator": "In", "values": [target]})
    aff = spec.setdefault("affinity", {})
    na = aff.setdefault("nodeAffinity", {})
    req = na.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = req.get("nodeSelectorTerms") or [{}]
    out = []
    for t in terms:
        t = copy.deepcopy(t)
        kept = [e for e in t.get("matchExpressions") or []
                if not (e.get("key") == "kubernetes.io/hostname" and source in (e.get("values") or [])
                        and e.get("operator") == "In")]
        t["matchExpressions"] = kept + exprs
        out.append(t)
    req["nodeSelectorTerms"] = out


def selector_labels(rs):
    sel = rs.get("spec", {}).get("selector") or {}
    return dict(sel.get("matchLabels") or {}), sel.get("matchExpressions") or []


def target_pod(pm, pod, mid, target, rs=None):
    """The new pod: the old one's spec, kept off the source node, its container carrying
    the marker; a ReplicaSet's pod without the label that would make the ReplicaSet count
    it before the move is over."""
    md = pod["metadata"]
    spec = copy.deepcopy(pod["spec"])
    source = spec.pop("nodeName")
    spec.pop("priority", None)          # the admission plugin sets it again from the class
    _pin_terms(spec, source, target)
    c = spec["containers"][0]
    env = [e for e in c.get("env") or [] if e.get("name") != "MIGRT_RESTORE_FROM"]
    env.append({"name": "MIGRT_RESTORE_FROM", "value": f"staged:{mid}"})
    c["env"] = env
    labels = dict(md.get("labels") or {})
    ann = {k: v for k, v in (md.get("annotations") or {}).items()
           if not k.startswith("kubectl.kubernetes.io/last-applied")}
    held = {}
    if rs is not None:
        match, exprs = selector_labels(rs)
        keys = ["pod-template-hash"] if "pod-template-hash" in match else list(match)
        if not keys:
            raise Failed(f"{rs.get('kind') or 'ReplicaSet'} {rs['metadata']['name']} selects by "
                         f"expressions only; "
                         f"migrt cannot keep the new pod out of it until the move is done",
                         delete_target=False)
        for k in keys:
            if k in labels:
                held[k] = labels.pop(k)
        ann[HELD] = json.dumps(held)
    labels[LABEL] = pm["metadata"]["name"]
    ann.update({"migrt.io/migrated-from": md["name"], "migrt.io/migration-id": mid})
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": _base_name(pod), "namespace": md["namespace"],
                         "labels": labels, "annotations": ann},
            "spec": spec}


def probed(pod):
    """Does the kubelet decide this pod's readiness by more than its container running
    (a readiness or startup probe, readiness gates)? Then only the kubelet marks it
    ready."""
    c = (pod["spec"].get("containers") or [{}])[0]
    return bool(c.get("readinessProbe") or c.get("startupProbe")
                or pod["spec"].get("readinessGates"))


def container_running(pod):
    """Has the pod's kubelet seen its container run?"""
    st = (pod.get("status", {}).get("containerStatuses") or [{}])[0]
    return "running" in (st.get("state") or {})


def _ready_conditions(status, types, reason=None, message=None):
    t = now_iso()[:19] + "Z"
    return [{"type": k, "status": status, "reason": reason, "message": message,
             "lastTransitionTime": t, "lastProbeTime": None} for k in types]


class HandOver:
    """The Services' endpoints follow the container when its copy starts running on the
    target, not when the migration ends (lazy mode: the frozen source serves its
    memory for seconds more; full mode at 1 GiB: the target fills it in) nor when the
    kubelets notice (their relist, about 1 s). Through pods/status, as the kubelet
    itself writes them: the old pod's Ready condition False (frozen, it answers
    nothing), the new pod's Ready and ContainersReady True with its IP (as its kubelet
    will say once it has seen the container run; only for a pod whose readiness is
    just that: no probe, no readiness gate). A kubelet puts its own view back when it
    notices the difference (status manager: every 10 s, and on each change it sees),
    so a thread holds both until the old pod is deleted (the old pod's Ready) and
    until the new pod's kubelet has seen its container run (the new pod's). The
    ReplicaSet counts pods, not readiness: nothing is adopted or deleted before the
    outcome. On a rollback, `undo` puts the old pod back and the new one out."""

    def __init__(self, mover, old, new, ips, message):
        self.kube, self.ns = mover.kube, mover.ns
        self.old = (old["metadata"]["name"], old["metadata"]["uid"])
        self.new = (new["metadata"]["name"], new["metadata"]["uid"])
        self.ips = ips                  # None: the new pod is left to its kubelet
        self.message = message
        self.new_held = ips is not None and not container_running(new)
        self.stopped = threading.Event()
        self.thread = None
        self.flips = 0                  # times a kubelet put its view back meanwhile

    def _patch(self, pod, status):
        name, uid = pod
        return self.kube.patch("pods", name, {"metadata": {"uid": uid}, "status": status},
                               namespace=self.ns, sub="status", strategic=True)

    def old_out(self):
        self._patch(self.old, {"conditions": _ready_conditions(
            "False", ["Ready"], "Migrated", self.message)})

    def new_in(self):
        self._patch(self.new, {"podIP": self.ips[0], "podIPs": [{"ip": a} for a in self.ips],
                               "conditions": _ready_conditions(
                                   "True", ["ContainersReady", "Ready"])})

    def start(self):
        self.old_out()                  # if this fails, nothing was changed
        if self.new_held:
            try:
                self.new_in()
            except Exception as e:      # noqa: BLE001 - then its kubelet publishes it
                self.new_held = False
                log(f"{self.ns}: {self.new[0]}: not marked ready: {type(e).__name__}: {e}")
        self.thread = threading.Thread(target=self._hold, daemon=True)
        self.thread.start()

    def _hold(self):
        while not self.stopped.wait(HAND_OVER_PERIOD):
            try:
                old = self.kube.get_or_none("pods", self.old[0], self.ns)
                if old is not None and old["metadata"]["uid"] == self.old[1] \
                        and not old["metadata"].get("deletionTimestamp") and ready(old) \
                        and not self.stopped.is_set():
                    self.flips += 1
                    self.old_out()
                if self.new_held:
                    new = self.kube.get_or_none("pods", self.new[0], self.ns)
                    if new is None or new["metadata"].get("deletionTimestamp"):
                        self.new_held = False
                    elif container_running(new):
                        self.new_held = False       # its kubelet has it now
                    elif (not ready(new) or not new["status"].get("podIP")) \
                            and not self.stopped.is_set():
                        self.flips += 1
                        self.new_in()
            except Exception as e:      # noqa: BLE001 - the API server restarts, etc.
                log(f"{self.ns}: hand-over of {self.old[0]}: {type(e).__name__}: {e}")

    def stop(self):
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(10)

    def undo(self):
        """The migration rolled back: the source runs again, the target's copy was
        stopped. The new pod out first (never both), then the old pod back in."""
        self.stop()
        try:
            if self.ips is not None:
                self._patch(self.new, {"conditions": _ready_conditions(
                    "False", ["ContainersReady", "Ready"], "MigrationFailed",
                    "migrt: the migration rolled back")})
        except Exception as e:          # noqa: BLE001 - it is deleted next anyway
            log(f"{self.ns}: {self.new[0]}: {type(e).__name__}: {e}")
        try:
            self._patch(self.old, {"conditions": _ready_conditions("True", ["Ready"])})
        except Exception as e:          # noqa: BLE001 - its kubelet puts it back (10 s)
            log(f"{self.ns}: {self.old[0]}: {type(e).__name__}: {e}")


class Mover:
    """Moves the pod of one PodMigration, step by step (status.step)."""

    def __init__(self, ctl, pm):
        self.ctl = ctl
        self.kube = ctl.kube
        self.pm = pm
        self.ns = pm["metadata"]["namespace"]
        self.name = pm["metadata"]["name"]

    # -------------------------------------------------------- status
    @property
    def st(self):
        return self.pm.setdefault("status", {})

    def set_status(self, **fields):
        times = dict(self.st.get("phaseTimes") or {})
        if "phase" in fields and fields["phase"] not in times:
            times[fields["phase"]] = now_iso()
        if "step" in fields:
            steps = dict(self.st.get("stepTimes") or {})
            steps.setdefault(fields["step"], now_iso())
            fields["stepTimes"] = steps
        fields["phaseTimes"] = times
        self.st.update(fields)
        self.pm = self.kube.patch("podmigrations", self.name, {"status": fields},
                                  namespace=self.ns, sub="status")

    def refresh(self):
        self.pm = self.kube.get("podmigrations", self.name, self.ns)
        return self.pm

    def deleted(self):
        try:
            return bool(self.refresh()["metadata"].get("deletionTimestamp"))
        except KubeError as e:
            if e.status == 404:
                return True
            raise

    def event(self, pod, reason, message, warning=False):
        if not pod:
            return
        md = pod["metadata"]
        t = now_iso()[:19] + "Z"
        ev = {"apiVersion": "v1", "kind": "Event",
              "metadata": {"generateName": f"{md['name']}.", "namespace": md["namespace"]},
              "involvedObject": {"kind": "Pod", "apiVersion": "v1", "name": md["name"],
                                 "namespace": md["namespace"], "uid": md.get("uid")},
              "reason": reason, "message": message[:1000],
              "type": "Warning" if warning else "Normal",
              "source": {"component": "migrt-controller"}, "reportingComponent": "migrt-controller",
              "firstTimestamp": t, "lastTimestamp": t, "count": 1}
        try:
            self.kube.create("events", ev, namespace=md["namespace"])
        except KubeError as e:
            log(f"{self.ns}/{self.name}: event {reason} not recorded: {e}")

    # -------------------------------------------------------- driver
    def run(self):
        try:
            self._attempts()
        finally:
            self.end_hand_over()

    def _attempts(self):
        for attempt in range(20):
            try:
                return self._run()
            except Failed as e:
                return self.fail(str(e), e.delete_target)
            except Exception as e:      # noqa: BLE001 - one PodMigration's trouble only
                step = self.st.get("step")
                log(f"{self.ns}/{self.name}: {type(e).__name__} during {step}: {e}")
                if step in ("migrating", "finishing"):
                    # the container may run on the target already: never undo from here;
                    # both steps can be taken again (the agent's migrate is idempotent)
                    time.sleep(1)
                    try:
                        self.refresh()
                    except KubeError:
                        pass
                    continue
                return self.fail(f"controller error: {type(e).__name__}: {e}",
                                 delete_target=step is not None)
        self.fail("gave up after 20 attempts; see the controller's log", delete_target=False)

    def _run(self):
        if not self.st.get("phase") or self.st.get("phase") == "Pending":
            if self.pm["metadata"].get("deletionTimestamp"):
                return self.unfinalize()
            self.start()
        step = self.st.get("step")
        if step in ("creating target pod", "scheduling target pod"):
            if self.deleted():
                raise Failed("the PodMigration was deleted before the migration started")
            self.create_target()
            self.wait_scheduled()
            self.set_status(step="migrating")
            step = "migrating"
        if step == "migrating":
            self.migrate()
            self.set_status(step="finishing")
            step = "finishing"
        if step == "finishing":
            self.finish()

    # -------------------------------------------------------- steps
    def start(self):
        spec = self.pm.get("spec") or {}
        fins = self.pm["metadata"].get("finalizers") or []
        if FINALIZER not in fins:
            self.pm = self.kube.patch("podmigrations", self.name,
                                      {"metadata": {"finalizers": fins + [FINALIZER]}},
                                      namespace=self.ns)
        pod = self.kube.get_or_none("pods", spec.get("pod") or "-", self.ns)
        if pod is None:
            raise Failed(f"pod {self.ns}/{spec.get('pod')} not found", delete_target=False)
        why = check_pod(pod)
        if why:
            raise Failed(why, delete_target=False)
        owner = self.owner(pod)
        if owner is not None and owner.get("kind") == "Job":
            why = job_room(owner, self.kube.list(
                "pods", self.ns, labelSelector=",".join(
                    f"{k}={v}" for k, v in selector_labels(owner)[0].items())), pod)
            if why:
                raise Failed(why, delete_target=False)
        target = spec.get("targetNode")
        source = pod["spec"]["nodeName"]
        if target:
            node = self.kube.get_or_none("nodes", target)
            if node is None:
                raise Failed(f"target node {target} not found", delete_target=False)
            if target == source:
                raise Failed(f"pod {pod['metadata']['name']} already runs on {target}",
                             delete_target=False)
        mode = spec.get("mode") or "full"
        if mode not in MODES:
            raise Failed(f"mode {mode!r}: one of {', '.join(MODES)}", delete_target=False)
        mid = "m-" + os.urandom(8).hex()
        cid = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[-1]
        self.set_status(phase="Running", step="creating target pod", migrationID=mid,
                        sourceNode=source, sourcePod=pod["metadata"]["name"],
                        sourcePodUID=pod["metadata"]["uid"], containerID=cid, mode=mode,
                        message=f"moving pod {pod['metadata']['name']} off {source}")
        self.event(pod, "Migrating", f"PodMigration {self.name}: moving off {source}"
                   + (f" to {target}" if target else "") + f" (migration {mid}, {mode} mode)")

    def source_pod(self):
        pod = self.kube.get_or_none("pods", self.st["sourcePod"], self.ns)
        if pod is not None and pod["metadata"]["uid"] != self.st.get("sourcePodUID"):
            return None
        return pod

    def find_target(self):
        pods = self.kube.list("pods", self.ns, labelSelector=f"{LABEL}={self.name}")
        pods = [p for p in pods if (p["metadata"].get("annotations") or {})
                .get("migrt.io/migration-id") == self.st.get("migrationID")]
        return pods[0] if pods else None

    def owner(self, pod):
        """The pod's ReplicaSet or Job (the object), or None for a bare pod."""
        ref = controller_ref(pod)
        if not ref:
            return None
        kind = ref.get("kind")
        obj = self.kube.get_or_none(OWNERS[kind][1], ref["name"], self.ns) \
            if kind in OWNERS else None
        if obj is None or obj["metadata"]["uid"] != ref.get("uid"):
            raise Failed(f"the pod's {kind} {ref['name']} is gone", delete_target=True)
        obj.setdefault("kind", kind)
        return obj

    def create_target(self):
        if self.find_target() is not None:
            return
        pod = self.source_pod()
        if pod is None:
            raise Failed(f"pod {self.st['sourcePod']} is gone")
        why = check_pod(pod)
        if why:
            raise Failed(why)
        rs = self.owner(pod)
        obj = target_pod(self.pm, pod, self.st["migrationID"],
                         (self.pm.get("spec") or {}).get("targetNode"), rs)
        new = self.kube.create("pods", obj, namespace=self.ns)
        self.set_status(step="scheduling target pod", targetPod=new["metadata"]["name"])
        log(f"{self.ns}/{self.name}: created {new['metadata']['name']} for "
            f"{self.st['sourcePod']} (migration {self.st['migrationID']})")

    def wait_scheduled(self):
        """Until the new pod is on a node whose migrt create waits for the migration."""
        mid = self.st["migrationID"]
        deadline = time.monotonic() + SCHEDULE_TIMEOUT
        last = "not scheduled yet"
        while True:
            pod = self.find_target()
            if pod is None:
                raise Failed("the new pod was deleted before the migration started")
            node = pod["spec"].get("nodeName")
            if node:
                if self.st.get("targetNode") != node:
                    self.set_status(targetNode=node)
                n = self.kube.get("nodes", node)
                addr = agents.address(n)
                try:
                    # (with the address the new pod's sandbox has: see hand_over)
                    state, self.target_ips = agents.addresses(addr, self.ctl.secret, mid)
                except Exception as e:      # noqa: BLE001
                    state = f"agent {addr} unreachable: {e}"
                if state == "awaited":
                    self.target_addr = addr
                    return
                last = f"on {node}, its container not waiting for the migration yet ({state})"
                st = (pod.get("status", {}).get("containerStatuses") or [{}])[0]
                w = (st.get("state") or {}).get("waiting") or {}
                if w.get("reason") not in (None, "ContainerCreating"):
                    last += f"; {w.get('reason')}: {w.get('message', '')}"
                if pod.get("status", {}).get("phase") in ("Failed", "Succeeded"):
                    raise Failed(f"the new pod {pod['metadata']['name']} is "
                                 f"{pod['status']['phase']} on {node}")
            else:
                c = _cond(pod, "PodScheduled")
                if c.get("status") == "False":
                    last = f"unschedulable: {c.get('message') or c.get('reason')}"
            if time.monotonic() > deadline:
                raise Failed(f"the new pod {pod['metadata']['name']} was not ready to restore "
                             f"within {SCHEDULE_TIMEOUT:.0f}s ({last}); the source pod runs on")
            if self.deleted():
                raise Failed("the PodMigration was deleted before the migration started")
            time.sleep(0.1)

    def migrate(self):
        mid = self.st["migrationID"]
        src_node = self.kube.get("nodes", self.st["sourceNode"])
        src = agents.address(src_node)
        target_addr = getattr(self, "target_addr", None)
        if target_addr is None:
            target_addr = agents.address(self.kube.get("nodes", self.st["targetNode"]))
        t0 = time.monotonic()
        res = None
        # a Job pod with restartPolicy Never: its source stays frozen once the copy runs,
        # until the old pod has left the Job (swap_job_pods), then goes
        held = self.never_job()
        hold = dict(hold=HOLD_TIMEOUT) if held else {}

        def restored(note):
            self.hand_over(note, target_addr)
            if held:
                self.swap_and_go(src, target_addr)
        for attempt in range(30):
            try:
                res = agents.migrate(src, self.ctl.secret, self.st["containerID"], mid,
                                     target_addr, mode=self.st.get("mode") or "full",
                                     restored=restored, **hold)
                break
            except Exception as e:      # noqa: BLE001 - the agent restarts: ask again
                log(f"{self.ns}/{self.name}: source agent {src}: {e}; asking again")
                time.sleep(1)
        if res is None:
            raise Failed(f"the source node's agent {src} did not answer", delete_target=False)
        report = res.get("report") or {}
        rc = res.get("rc")
        fields = {"migrationSeconds": round(time.monotonic() - t0, 3)}
        if report:
            ph = report.get("phases") or {}
            fields.update(phases=ph, bytes=report.get("bytes") or {},
                          downtimeSeconds=ph.get("downtime"))
            if report.get("lazy_precopy"):      # precopy-lazy: what the pre-copy saved
                fields["lazyPrecopy"] = str(report["lazy_precopy"])
                pages = {k: report[f"lazy_pages_{w}"] for k, w in
                         (("fromPrecopy", "from_precopy"), ("sent", "sent"))
                         if isinstance(report.get(f"lazy_pages_{w}"), int)}
                if pages:
                    fields["lazyPages"] = pages
        if res.get("ok") or rc == 6:
            self.set_status(**fields, message=f"restored on {self.st.get('targetNode')}")
            return
        if rc == 5:
            self.end_hand_over()            # neither copy known: the kubelets' view again
            self.set_status(**fields)
            raise Failed(f"migration in doubt: {res.get('error')}; the source container is "
                         f"left frozen until its node's agent knows the outcome",
                         delete_target=False)
        # rolled back (4), refused (3), or anything else: what does the target hold?
        try:
            state = agents.status(target_addr, self.ctl.secret, mid)
        except Exception:       # noqa: BLE001
            state = "unknown"
        if state in ("restored", "done", "filling"):
            self.set_status(**fields, message=f"restored on {self.st.get('targetNode')} "
                                              f"({res.get('error')})")
            return
        self.end_hand_over(undo=True)
        self.set_status(**fields)
        raise Failed(f"migration failed: {res.get('error')}")

    def hand_over(self, note, target_addr):
        """The source's agent says the copy runs on the target (`note`: its downtime so
        far, mode): the Services' endpoints go to it now (HandOver); the outcome comes
        later (lazy mode: once the source has sent its memory)."""
        if not HAND_OVER or getattr(self, "handover", None) is not None:
            return
        why = None
        old, new = self.source_pod(), self.find_target()
        if old is None or new is None:
            why = "the old or the new pod is gone"
        else:
            held = json.loads((new["metadata"].get("annotations") or {}).get(HELD) or "{}")
            if set(held) - HELD_UNSELECTED:
                # a Service may select by them: the new pod could not take the old one's place
                why = (f"the new pod lacks the labels {', '.join(sorted(held))} until it is "
                       f"adopted; endpoints left to the kubelets")
        if why is None:
            ips = None
            if not probed(new) and not container_running(new):
                # the new pod's address: known since its create waited (its sandbox's),
                # else asked now (a controller restarted since)
                state, addrs = "awaited", getattr(self, "target_ips", None) or []
                try:
                    if not addrs:
                        state, addrs = agents.addresses(target_addr, self.ctl.secret,
                                                        self.st["migrationID"])
                except Exception as e:      # noqa: BLE001 - then its kubelet says it
                    state, addrs = f"unknown ({e})", []
                ips = addrs if len(addrs) == 1 else None
                if ips is None:
                    log(f"{self.ns}/{self.name}: target agent gave {addrs or 'no'} address(es) "
                        f"({state}): the new pod's kubelet will publish its IP")
            node = self.st.get("targetNode")
            h = HandOver(self, old, new, ips,
                         f"migrt: its container runs on {node} now, in pod "
                         f"{new['metadata']['name']} (PodMigration {self.name}); this copy "
                         f"is frozen until the migration ends")
            try:
                h.start()
                self.handover = h
                why = ("old pod not ready" + (f"; new pod ready at {ips[0]}" if ips else
                                             "; new pod left to its kubelet"))
            except Exception as e:      # noqa: BLE001 - the kubelets' view then, as before
                h.stop()
                why = f"not done: {type(e).__name__}: {e}"
        log(f"{self.ns}/{self.name}: the copy runs on {self.st.get('targetNode')} "
            f"(downtime {note.get('downtime')}s); hand-over: {why}")
        try:
            self.set_status(restoredTime=now_iso(), serviceHandOver=why)
        except KubeError:
            pass

    def end_hand_over(self, undo=False):
        h, self.handover = getattr(self, "handover", None), None
        if h is not None:
            h.undo() if undo else h.stop()
            if h.flips:
                log(f"{self.ns}/{self.name}: the kubelets put their view back {h.flips} "
                    f"time(s) during the hand-over; set again each time")

    def never_job(self):
        """Is the pod moved a Job's pod with restartPolicy Never?"""
        old = self.source_pod()
        if old is None or old["spec"].get("restartPolicy") != "Never":
            return False
        ref = controller_ref(old)
        # (or one that left its Job already: a controller restarted midway)
        return bool(ref and ref.get("kind") == "Job") or \
            "migrt.io/left-job" in (old["metadata"].get("annotations") or {})

    def swap_and_go(self, src, target_addr):
        """(a Job pod with restartPolicy Never, once its copy runs on the target and its
        source is held frozen) The old pod out of the Job, the new one in; then the
        source node's agent lets the source go. If that cannot be done, the source goes
        anyway (at the latest when its hold times out), and the Job counts the old pod's
        end as a failure: the move itself stands."""
        why = None
        for attempt in range(3):
            try:
                why = self.swap_job_pods()
                break
            except Failed as e:
                why = f"not done: {e}"
                break
            except Exception as e:      # noqa: BLE001 - the API server restarts, etc.
                why = f"not done: {type(e).__name__}: {e}"
                time.sleep(1)
        log(f"{self.ns}/{self.name}: Job hand-over: {why}")
        try:
            self.set_status(jobHandOver=why)
        except KubeError:
            pass
        for attempt in range(10):
            try:
                agents.go(src, self.ctl.secret, self.st["containerID"], self.st["migrationID"],
                          target_addr, mode=self.st.get("mode") or "full")
                return
            except Exception as e:      # noqa: BLE001 - it lets go at its hold's end
                log(f"{self.ns}/{self.name}: source agent {src}: go: {e}")
                time.sleep(0.5)

    def swap_job_pods(self):
        """A Job pod with restartPolicy Never: the new pod joins the Job and the old one
        leaves it while the old container is still there (frozen), so the old pod is no
        longer the Job's when its container goes and the kubelet sets its phase Failed.

        The Job controller (1.20) counts as failed every pod in phase Failed that it
        claims (its selector matches and it owns it, or adopts it), being deleted or not;
        it counts as active its claimed pods neither Succeeded, Failed nor being deleted,
        creates pods while fewer than parallelism are active, and deletes the extra ones
        by rank (ActivePods: unscheduled, Pending, not ready, ready for less time, more
        restarts, newer, first). Two pods change, in two writes, so the Job may see one
        state in between: the old pod out first would leave it too few active pods, and
        it would create a replacement; so the new pod goes in first, and the old one
        leaves in the next call. If the Job looks in between it sees one pod too many
        and deletes the lowest-ranked: with both Running, the old one, not ready (the
        hand-over's view, patched again just before), which is harmless: its container
        is frozen and gone with the hold anyway, and it leaves the Job the next moment.
        What is left: the old pod's kubelet, which sees a frozen container as running
        and ready, can put Ready back (its status sync, at most every 10 s) in the few
        milliseconds between the check and the second write; then the Job would delete
        the newer pod, the new one (ready for less time)."""
        old, new = self.source_pod(), self.find_target()
        if old is None or new is None:
            raise Failed("the old or the new pod is gone")
        held = (new["metadata"].get("annotations") or {}).get(HELD)
        ref = controller_ref(old)
        if held is None and not (ref and ref.get("kind") == "Job"):
            return "done before"                    # a restarted controller: done already
        if old["status"].get("phase") in ("Failed", "Succeeded"):
            raise Failed(f"the old pod is {old['status']['phase']} already")
        job = self.owner(old)
        if job is None:
            raise Failed("the old pod has no Job")
        match, exprs = selector_labels(job)
        if exprs or not match:
            raise Failed(f"Job {job['metadata']['name']} selects by expressions")
        # the new pod Running and ready in its kubelet's eyes (Pending ranks first)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            new = self.find_target() or new
            if new["status"].get("phase") == "Running" and container_running(new) \
                    and ready(new):
                break
            if new["metadata"].get("deletionTimestamp") or time.monotonic() > deadline:
                raise Failed(f"the new pod {new['metadata']['name']} is not Running and "
                             f"ready (phase {new['status'].get('phase')})")
            time.sleep(0.05)
        # the old pod not ready (the hand-over holds that; without it, done here)
        for attempt in range(20):
            old = self.source_pod()
            if old is None or old["metadata"].get("deletionTimestamp") or not ready(old):
                break
            self.kube.patch("pods", old["metadata"]["name"],
                            {"metadata": {"uid": old["metadata"]["uid"]},
                             "status": {"conditions": _ready_conditions(
                                 "False", ["Ready"], "Migrated",
                                 f"migrt: its container runs in pod {new['metadata']['name']} "
                                 f"now (PodMigration {self.name})")}},
                            namespace=self.ns, sub="status", strategic=True)
        else:
            raise Failed("the old pod's kubelet keeps it ready")
        if old is not None and old["status"].get("phase") in ("Failed", "Succeeded"):
            raise Failed(f"the old pod is {old['status']['phase']} already")
        if (new["metadata"].get("annotations") or {}).get(HELD) is not None:
            new = self.adopt(new, job)
        if old is not None:
            refs = [r for r in old["metadata"].get("ownerReferences") or []
                    if r.get("uid") != job["metadata"]["uid"]]
            labels = {k: None for k in match}
            if (old["metadata"].get("labels") or {}).get("job-name") == job["metadata"]["name"]:
                labels["job-name"] = None
            self.kube.patch("pods", old["metadata"]["name"],
                            {"metadata": {"uid": old["metadata"]["uid"], "labels": labels,
                                          "ownerReferences": refs,
                                          "annotations": {"migrt.io/left-job":
                                                          job["metadata"]["name"]}}},
                            namespace=self.ns)
        return (f"pod {new['metadata']['name']} joined Job {job['metadata']['name']}, "
                f"then {self.st['sourcePod']} left it; its source goes now")

    def adopt(self, new, rs):
        """Hand the new pod to the old pod's ReplicaSet, with no pod added or deleted
        because of the move. The ReplicaSet counts the active pods it owns (not being
        deleted) against its replicas. Deleting the old pod first would let it create a
        replacement; adopting the new one first gives it one pod too many, and it
        deletes by rank (1.20: unscheduled, pending, not ready before ready; then newer
        before older), so it is the old pod, not ready since its container left, that
        it would take. So: wait until the API shows the old pod not ready and the new
        one ready, adopt, then delete the old pod at once.

        A Job (1.20) does the same with the pods that match its selector: active ones
        (not Succeeded, Failed, nor being deleted) against its parallelism, deleting the
        extra ones by the same rank, creating one when too few; it counts a failure only
        for a pod in phase Failed. With restartPolicy OnFailure the old pod stays in phase
        Running (its container's restart is refused: not ready), so the same order holds
        and no failure is counted. With Never it would turn Failed while still the Job's:
        such a pod is handed over earlier, while its source is held (swap_job_pods).
        """
        held = json.loads((new["metadata"].get("annotations") or {}).get(HELD) or "{}")
        kind = rs.get("kind") or "ReplicaSet"
        ref = {"apiVersion": OWNERS[kind][0], "kind": kind, "name": rs["metadata"]["name"],
               "uid": rs["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
        return self.kube.patch("pods", new["metadata"]["name"],
                               {"metadata": {"labels": held, "ownerReferences": [ref],
                                             "annotations": {HELD: None}}},
                               namespace=self.ns)

    def finish(self):
        new = self.find_target()
        old = self.source_pod()
        if new is None:
            raise Failed("the new pod is gone after the migration", delete_target=False)
        deadline = time.monotonic() + READY_TIMEOUT
        # only a ReplicaSet's pod needs the old one seen not ready (see adopt)
        adopting = (new["metadata"].get("annotations") or {}).get(HELD) is not None
        while True:
            new = self.find_target() or new
            old = self.source_pod()
            new_ok = ready(new)
            old_down = old is None or not adopting or not ready(old) \
                or old["metadata"].get("deletionTimestamp")
            if adopting:
                # the ReplicaSet ranks by what the kubelets say (phase, then readiness),
                # not by the hand-over's earlier view, which a kubelet may put back: the
                # new pod Running by its kubelet, the old one's container seen gone
                new_ok = new_ok and container_running(new) \
                    and new["status"].get("phase") == "Running"
                if old is not None and not old["metadata"].get("deletionTimestamp"):
                    old_down = old_down and not container_running(old)
            if new_ok and old_down:
                break
            if time.monotonic() > deadline:
                if not new_ok:
                    raise Failed(f"the new pod {new['metadata']['name']} did not become ready "
                                 f"after the restore", delete_target=False)
                break                   # the old pod's status lags: delete it anyway
            time.sleep(0.1)
        orphan = None
        if (new["metadata"].get("annotations") or {}).get(HELD) is not None and old is not None:
            try:
                rs = self.owner(old)
            except Failed as e:
                # its ReplicaSet or Job was deleted during the move: the new pod is the
                # only copy running, so it stays (a bare pod), and the status says so
                rs, orphan = None, f"{e}, so the new pod was left without an owner"
            if rs is not None:
                new = self.adopt(new, rs)
        if old is not None:
            self.kube.delete("pods", old["metadata"]["name"], self.ns, grace=1,
                             uid=old["metadata"]["uid"])
        self.end_hand_over()
        node = new["spec"].get("nodeName")
        msg = (f"moved to {node} as pod {new['metadata']['name']}"
               + (f", downtime {self.st['downtimeSeconds']:.2f}s"
                  if isinstance(self.st.get("downtimeSeconds"), (int, float)) else "")
               + (f"; {orphan}" if orphan else ""))
        self.set_status(phase="Succeeded", step="done", targetPod=new["metadata"]["name"],
                        targetNode=node, message=msg)
        self.event(old, "Migrated", f"PodMigration {self.name}: {msg}")
        self.event(new, "Migrated", f"PodMigration {self.name}: restored here from "
                   f"{self.st['sourceNode']} (pod {self.st['sourcePod']})")
        log(f"{self.ns}/{self.name}: {msg}")
        self.unfinalize()

    def fail(self, msg, delete_target=True):
        log(f"{self.ns}/{self.name}: failed: {msg}")
        self.end_hand_over()        # (a rolled-back migration was undone in migrate)
        if delete_target and self.st.get("targetNode") and self.st.get("step") in (
                "creating target pod", "scheduling target pod"):
            # the new pod's create may wait for the migration: it stops at once
            try:
                agents.drop(agents.address(self.kube.get("nodes", self.st["targetNode"])),
                            self.ctl.secret, self.st["migrationID"], "the move was cancelled")
            except Exception as e:      # noqa: BLE001 - it stops at its time limit then
                log(f"{self.ns}/{self.name}: could not tell {self.st['targetNode']}: {e}")
        if delete_target and self.st.get("migrationID"):
            try:
                t = self.find_target()
                if t is not None:
                    self.kube.delete("pods", t["metadata"]["name"], self.ns, grace=0)
            except KubeError as e:
                msg += f" (and the new pod could not be deleted: {e})"
        try:
            self.set_status(phase="Failed", step="done", message=msg)
        except KubeError:
            pass
        try:
            self.event(self.source_pod() if self.st.get("sourcePod") else
                       self.kube.get_or_none("pods", (self.pm.get("spec") or {}).get("pod") or "-",
                                             self.ns),
                       "MigrationFailed", f"PodMigration {self.name}: {msg}", warning=True)
        except KubeError:
            pass
        self.unfinalize()

    def unfinalize(self):
        try:
            pm = self.kube.get("podmigrations", self.name, self.ns)
        except KubeError:
            return
        fins = [f for f in pm["metadata"].get("finalizers") or [] if f != FINALIZER]
        if len(fins) != len(pm["metadata"].get("finalizers") or []):
            try:
                self.kube.patch("podmigrations", self.name, {"metadata": {"finalizers": fins}},
                                namespace=self.ns)
            except KubeError:
                pass


class Controller:
    def __init__(self, kube, secret, max_parallel=4, interval=0.2):
        self.kube = kube
        self.secret = secret
        self.max_parallel = max_parallel
        self.interval = interval
        self.running = {}          # uid -> thread
        self.drained = set()       # (namespace, pod) a drain taint already tried to move
        self.lock = threading.Lock()
        self.last_drain = 0.0

    def active(self, pm):
        phase = (pm.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            return bool(pm["metadata"].get("deletionTimestamp")) and \
                FINALIZER in (pm["metadata"].get("finalizers") or [])
        return True

    def once(self):
        pms = self.kube.list("podmigrations")
        with self.lock:
            for uid in [u for u, t in self.running.items() if not t.is_alive()]:
                del self.running[uid]
            busy = len(self.running)
        for pm in sorted(pms, key=lambda p: p["metadata"].get("creationTimestamp", "")):
            uid = pm["metadata"]["uid"]
            if uid in self.running or not self.active(pm):
                continue
            phase = (pm.get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed"):
                Mover(self, pm).unfinalize()
                continue
            if busy >= self.max_parallel and phase in (None, "Pending"):
                continue
            t = threading.Thread(target=mover_for(self, pm).run, daemon=True)
            with self.lock:
                self.running[uid] = t
            busy += 1
            t.start()
        if time.monotonic() - self.last_drain > 2:
            self.last_drain = time.monotonic()
            self.drain_tainted(pms)

    def drain_tainted(self, pms):
        """Nodes tainted migrt.io/drain: a PodMigration for each migrt pod on them."""
        nodes = [n for n in self.kube.list("nodes")
                 if any(t.get("key") == DRAIN_TAINT for t in n["spec"].get("taints") or [])]
        if not nodes:
            return
        moving = {(p["metadata"]["namespace"], (p.get("spec") or {}).get("pod"))
                  for p in pms if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")}
        for n in nodes:
            name = n["metadata"]["name"]
            for pod in self.kube.list("pods", fieldSelector=f"spec.nodeName={name}"):
                md = pod["metadata"]
                key = (md["namespace"], md["name"])
                if key in moving or key in self.drained or check_pod(pod):
                    continue
                self.drained.add(key)       # once: a pod that cannot move keeps running
                pm = new_podmigration(md["name"], md["namespace"], None, "full",
                                      generate=True, reason=f"node {name} tainted {DRAIN_TAINT}")
                try:
                    self.kube.create("podmigrations", pm, namespace=md["namespace"])
                    log(f"node {name} is tainted {DRAIN_TAINT}: moving {md['namespace']}/{md['name']}")
                except KubeError as e:
                    log(f"node {name}: cannot create a PodMigration for {md['name']}: {e}")

    def run(self):
        log(f"watching PodMigrations (at most {self.max_parallel} at once)")
        while True:
            try:
                self.once()
            except Exception as e:      # noqa: BLE001 - the API server restarts, etc.
                log(f"{type(e).__name__}: {e}")
                time.sleep(1)
            time.sleep(self.interval)


def mover_for(controller, pm):
    """A StatefulSet's pod is moved by handoff (migrt.kube.statefulset), others here."""
    from migrt.kube import statefulset
    return statefulset.mover(controller, pm) or Mover(controller, pm)


def new_podmigration(pod, namespace, target=None, mode="full", generate=False, reason=None):
    md = {"namespace": namespace}
    if generate:
        md["generateName"] = f"{pod[:50]}-"
    else:
        md["name"] = pod
    if reason:
        md["annotations"] = {"migrt.io/reason": reason}
    spec = {"pod": pod, "mode": mode}
    if target:
        spec["targetNode"] = target
    return {"apiVersion": "migrt.io/v1alpha1", "kind": "PodMigration", "metadata": md,
            "spec": spec}
