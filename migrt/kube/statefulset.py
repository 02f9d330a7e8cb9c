"""Moving a StatefulSet's pod: it keeps its name, so its new copy comes after the old.

A StatefulSet pod (`web-0`) must keep its name and identity, so the new `web-0` can only
exist once the old pod object is gone, and the StatefulSet controller creates it itself,
from its template, the moment the old one is gone. So the order of a Deployment's move
(new pod first, then the migration) cannot be kept; this one is:

1. checks (as for any pod, plus: the StatefulSet is not rolling out, the target node
   takes the pod, the mode is not lazy);
2. arming: the controller's admission webhook (migrt.kube.webhook) expects `web-0` at
   this revision, and a dry-run create of `web-0` proves the API server calls it;
3. handoff: the source node's agent runs `migrt migrate --handoff`: freeze, dump,
   transfer, the target node's agent keeps the staged copy (`keep`), then the source
   container is killed (and its kubelet refused a restart, as after any move). Until the
   target keeps the copy, any failure resumes the source: the move fails, the pod runs on;
4. the old pod object is deleted at once (grace 0: its container is already gone);
5. the StatefulSet controller creates `web-0`; the webhook sets its `spec.nodeName` to
   the target and adds `MIGRT_RESTORE_FROM=staged:<mid>`; the target's kubelet makes the
   sandbox and migrt's create restores the kept copy;
6. the kept copy is released, the webhook's selector narrowed again, Succeeded.

After step 3 the kept copy is the only copy of the workload: a failed restore leaves it
as it was (no pages punched out, rootfs changes copied: migrt.runtime.sources.staged),
and the kubelet's next try restores from it again; the PodMigration stays Running and
says so in its message. Nothing is dropped after step 3 unless a restore ran.
The downtime runs from the freeze to the restore on the target: dump and transfer as
for any move, plus the pod's deletion, its re-creation, and its sandbox on the target.
"""
import os
import time

from migrt.kube import agents
from migrt.kube import controller as ctl
from migrt.kube.client import KubeError

KIND = "StatefulSet"
STEPS_EXPECTING = ("arming webhook", "migrating", "deleting source pod",
                   "awaiting replacement", "restoring")
AFTER_HANDOFF = ("deleting source pod", "awaiting replacement", "restoring", "finishing")
ARM_TIMEOUT = float(os.environ.get("MIGRT_KUBE_WEBHOOK_ARM_TIMEOUT", "20"))
log = ctl.log


def expectation(pm):
    """What the webhook puts on the pod this PodMigration waits for, or None."""
    st = pm.get("status") or {}
    if st.get("workload") != KIND or st.get("phase") != "Running" \
            or st.get("step") not in STEPS_EXPECTING or not st.get("targetNode"):
        return None
    return {"mid": st.get("migrationID"), "target": st["targetNode"],
            "pm": pm["metadata"]["name"], "revision": st.get("revision")}


def mover(controller, pm):
    """A StsMover for a PodMigration of a StatefulSet's pod, else None."""
    st = pm.get("status") or {}
    if st.get("workload") == KIND:
        return StsMover(controller, pm)
    if st.get("phase") in (None, "Pending"):
        try:
            pod = controller.kube.get_or_none("pods", (pm.get("spec") or {}).get("pod") or "-",
                                              pm["metadata"]["namespace"])
        except KubeError:
            return None
        ref = ctl.controller_ref(pod) if pod else None
        if ref and ref.get("kind") == KIND:
            return StsMover(controller, pm)
    return None


# ------------------------------------------------------------------ node fit
def _expr_ok(e, labels):
    k, op, vals = e.get("key"), e.get("operator"), e.get("values") or []
    if op == "In":
        return labels.get(k) in vals
    if op == "NotIn":
        return labels.get(k) not in vals
    if op == "Exists":
        return k in labels
    if op == "DoesNotExist":
        return k not in labels
    if op in ("Gt", "Lt"):
        try:
            a, b = int(labels.get(k)), int(vals[0])
        except (TypeError, ValueError, IndexError):
            return False
        return a > b if op == "Gt" else a < b
    return False


def _tolerated(taint, tolerations):
    for t in tolerations or []:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and (not t.get("key") or t["key"] == taint.get("key")):
            return True
        if t.get("key") == taint.get("key") and (t.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def node_refusal(node, spec):
    """Why this pod spec cannot run on `node` (its kubelet would reject it, or it is
    closed to new pods), or None. The webhook sets spec.nodeName, so the scheduler does
    not check this: the controller does, before anything is frozen."""
    name = node["metadata"]["name"]
    labels = node["metadata"].get("labels") or {}
    if node["spec"].get("unschedulable"):
        return f"node {name} is cordoned (unschedulable)"
    if not ctl.node_ready(node):
        return f"node {name} is not Ready"
    for t in node["spec"].get("taints") or []:
        if t.get("effect") in ("NoSchedule", "NoExecute") and \
                not _tolerated(t, spec.get("tolerations")):
            return f"node {name} has the taint {t.get('key')}:{t.get('effect')}, not tolerated"
    for k, v in (spec.get("nodeSelector") or {}).items():
        if labels.get(k) != v:
            return f"node {name} does not match the pod's nodeSelector {k}={v}"
    req = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
           .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = req.get("nodeSelectorTerms") or []
    if terms and not any(all(_expr_ok(e, labels) for e in t.get("matchExpressions") or [])
                         for t in terms):
        return f"node {name} does not match the pod's required node affinity"
    return None


# ------------------------------------------------------------------ agents
class StsMover(ctl.Mover):
    """Moves one StatefulSet pod (the module's doc), step by step (status.step)."""

    @property
    def webhook(self):
        return getattr(self.ctl, "webhook", None)

    def addr(self, node):
        return agents.address(self.kube.get("nodes", node))

    # -------------------------------------------------------- driver
    def run(self):
        for attempt in range(60):
            try:
                return self._run()
            except ctl.Failed as e:
                return self.fail(str(e))
            except Exception as e:      # noqa: BLE001 - one PodMigration's trouble only
                step = self.st.get("step")
                log(f"{self.ns}/{self.name}: {type(e).__name__} during {step}: {e}")
                if step in ("migrating",) + AFTER_HANDOFF:
                    # never undone from here: each step can be taken again
                    time.sleep(1)
                    try:
                        self.refresh()
                    except KubeError:
                        pass
                    continue
                return self.fail(f"controller error: {type(e).__name__}: {e}")
        if self.st.get("step") in ("migrating",) + AFTER_HANDOFF:
            # never failed from here (the outcome may be a kept copy and no source): the
            # controller's next round takes it up again
            self.set_status(message="the controller is retrying (see its log); a kept "
                                    "copy waits on " + str(self.st.get("targetNode")))
            return None
        return self.fail("gave up after 60 attempts; see the controller's log")

    def _run(self):
        if not self.st.get("phase") or self.st.get("phase") == "Pending":
            if self.pm["metadata"].get("deletionTimestamp"):
                return self.unfinalize()
            self.start()
        step = self.st.get("step")
        if step == "arming webhook":
            if self.deleted():
                raise ctl.Failed("the PodMigration was deleted before the migration started")
            self.arm(verify=True)
            self.set_status(step="migrating")
            step = "migrating"
        if step == "migrating":
            self.arm()
            self.handoff()
            step = "deleting source pod"
        if step == "deleting source pod":
            self.arm()
            from migrt.criu import failpoints
            failpoints.hit("kube.sts-before-delete")
            t0 = time.time()
            try:
                self.kube.delete("pods", self.st["sourcePod"], self.ns, grace=0,
                                 uid=self.st["sourcePodUID"])
            except KubeError as e:
                if e.status != 409:     # 409: that name is already the new pod
                    raise
            self.set_status(step="awaiting replacement",
                            handoff=dict(self.st.get("handoff") or {}, deletedAt=t0,
                                         deleteSeconds=round(time.time() - t0, 3)))
            step = "awaiting replacement"
        if step in ("awaiting replacement", "restoring"):
            self.arm()
            self.await_restore()
            self.set_status(step="finishing")
            step = "finishing"
        if step == "finishing":
            self.finish()

    # -------------------------------------------------------- steps
    def start(self):
        spec = self.pm.get("spec") or {}
        fins = self.pm["metadata"].get("finalizers") or []
        if ctl.FINALIZER not in fins:
            self.pm = self.kube.patch("podmigrations", self.name,
                                      {"metadata": {"finalizers": fins + [ctl.FINALIZER]}},
                                      namespace=self.ns)
        pod = self.kube.get_or_none("pods", spec.get("pod") or "-", self.ns)
        if pod is None:
            raise ctl.Failed(f"pod {self.ns}/{spec.get('pod')} not found")
        why = ctl.check_pod(pod)
        if why:
            raise ctl.Failed(why)
        pname = pod["metadata"]["name"]
        ref = ctl.controller_ref(pod)
        mode = spec.get("mode") or "full"
        if mode not in ("full", "precopy"):
            raise ctl.Failed(f"pod {self.ns}/{pname} is a StatefulSet's pod: it can be moved in "
                             f"full or precopy mode, not {mode} (its copy waits on the target "
                             f"node until the StatefulSet recreates the pod, while lazy mode "
                             f"would keep its memory on the source)")
        hook = self.webhook
        if hook is None or hook.error:
            raise ctl.Failed(f"pod {self.ns}/{pname} is a StatefulSet's pod, which the controller "
                             f"moves through its admission webhook: "
                             + (hook.error if hook else "the controller runs without one "
                                "(--webhook-listen with --webhook-url or --webhook-service)"))
        sts = self.kube.get_or_none("statefulsets", ref["name"], self.ns)
        if sts is None or sts["metadata"]["uid"] != ref.get("uid"):
            raise ctl.Failed(f"the pod's StatefulSet {ref['name']} is gone")
        rev = (pod["metadata"].get("labels") or {}).get("controller-revision-hash")
        sst = sts.get("status") or {}
        if not rev or sst.get("updateRevision") != rev \
                or (sst.get("currentRevision") and sst["currentRevision"] != sst["updateRevision"]):
            raise ctl.Failed(f"StatefulSet {ref['name']} is rolling out a new revision "
                             f"({sst.get('currentRevision')} -> {sst.get('updateRevision')}; "
                             f"pod {pname} has {rev}): its pods are moved once that is over")
        source = pod["spec"]["nodeName"]
        target = spec.get("targetNode")
        if target:
            node = self.kube.get_or_none("nodes", target)
            if node is None:
                raise ctl.Failed(f"target node {target} not found")
            if target == source:
                raise ctl.Failed(f"pod {pname} already runs on {target}")
            why = node_refusal(node, pod["spec"])
            if why:
                raise ctl.Failed(f"pod {self.ns}/{pname} cannot be moved to {target}: {why}")
        else:
            fits = []
            for node in self.kube.list("nodes"):
                n = node["metadata"]["name"]
                if n != source and node_refusal(node, pod["spec"]) is None:
                    fits.append(n)
            if not fits:
                raise ctl.Failed(f"no other node takes pod {self.ns}/{pname} (Ready, not "
                                 f"cordoned, its taints tolerated, its node selector and "
                                 f"affinity met)")
            target = sorted(fits)[0]
        mid = "m-" + os.urandom(8).hex()
        cid = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[-1]
        self.set_status(phase="Running", step="arming webhook", workload=KIND,
                        statefulSet=ref["name"], revision=rev, migrationID=mid,
                        sourceNode=source, sourcePod=pname, sourcePodUID=pod["metadata"]["uid"],
                        containerID=cid, mode=mode, targetNode=target, targetPod=pname,
                        message=f"moving StatefulSet pod {pname} off {source} to {target}")
        self.event(pod, "Migrating", f"PodMigration {self.name}: moving off {source} to {target} "
                   f"(migration {mid}, {mode} mode; the pod keeps its name, so it is deleted "
                   f"and recreated there by its StatefulSet)")

    def arm(self, verify=False):
        """The webhook expects the pod; with verify, a dry-run create of the pod proves
        that the API server calls it (its configuration reached the API server)."""
        hook = self.webhook
        if hook is None:
            raise ctl.Failed("the controller runs without its admission webhook")
        st = self.st
        hook.expect(self.ns, st["sourcePod"], st["migrationID"], st["targetNode"], self.name,
                    st.get("revision"))
        if not verify:
            return
        pod = self.source_pod()
        if pod is None:
            raise ctl.Failed(f"pod {st['sourcePod']} is gone")
        probe = {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": st["sourcePod"], "namespace": self.ns,
                              "labels": pod["metadata"].get("labels") or {}},
                 "spec": {k: v for k, v in pod["spec"].items() if k != "nodeName"}}
        deadline = time.monotonic() + ARM_TIMEOUT
        last = None
        while not hook.was_seen(self.ns, st["sourcePod"], st["migrationID"]):
            if time.monotonic() > deadline:
                raise ctl.Failed(f"the API server did not call the controller's admission "
                                 f"webhook for a dry-run create of {st['sourcePod']} within "
                                 f"{ARM_TIMEOUT:.0f}s ({last or 'no error'}); nothing was "
                                 f"frozen, the pod runs on")
            try:
                self.kube.create("pods", probe, namespace=self.ns, dry_run=True)
            except KubeError as e:
                last = str(e)       # AlreadyExists after the webhook: expected
            if not hook.was_seen(self.ns, st["sourcePod"], st["migrationID"]):
                time.sleep(0.2)

    def handoff(self):
        st = self.st
        mid, cid = st["migrationID"], st["containerID"]
        src, tgt = self.addr(st["sourceNode"]), self.addr(st["targetNode"])
        t0 = time.monotonic()
        res = None
        for attempt in range(30):
            try:
                res = agents.migrate(src, self.ctl.secret, cid, mid, tgt,
                                     st.get("mode") or "full", handoff=True)
                break
            except Exception as e:      # noqa: BLE001 - the agent restarts: ask again
                log(f"{self.ns}/{self.name}: source agent {src}: {e}; asking again")
                time.sleep(1)
        done_at = time.time()
        report = (res or {}).get("report") or {}
        ph = report.get("phases") or {}
        fields = {"migrationSeconds": round(time.monotonic() - t0, 3)}
        if report:
            fields.update(phases=ph, bytes=report.get("bytes") or {})
        if res is not None and res.get("ok") and report.get("handoff"):
            self.set_status(**fields, step="deleting source pod",
                            handoff={"at": done_at, "frozenSeconds": ph.get("downtime")},
                            message=f"staged on {st['targetNode']}, source container released")
            return
        err = (res or {}).get("error") or "the source node's agent did not answer"
        # what happened? the target keeps a copy and the source container is gone: the
        # handoff happened (the report was lost); otherwise the source runs (or is
        # resumed by its agent's recovery) and a kept copy must go
        try:
            q = agents.status_reply(tgt, self.ctl.secret, mid)
        except Exception as e:      # noqa: BLE001
            q = {"state": f"unknown ({e})"}
        try:
            s = agents.status_reply(src, self.ctl.secret, mid, id=cid)
            src_exists = s.get("container_exists")
        except Exception:       # noqa: BLE001
            src_exists = None
        if q.get("retain") and src_exists is False:
            self.set_status(**fields, step="deleting source pod",
                            handoff={"at": done_at, "frozenSeconds": ph.get("downtime")},
                            message=f"staged on {st['targetNode']} ({err}), source gone")
            return
        if src_exists is None and q.get("retain"):
            # cannot tell: neither drop the only copy nor go on; ask again later
            raise RuntimeError(f"handoff outcome unknown ({err}); asking again")
        if q.get("retain"):
            try:
                agents.drop(tgt, self.ctl.secret, mid, "the handoff failed; the source runs on",
                            kept=True)
            except Exception as e:      # noqa: BLE001 - never restored: the webhook goes
                log(f"{self.ns}/{self.name}: could not drop the kept copy: {e}")
        self.set_status(**fields)
        raise ctl.Failed(f"migration failed: {err}; the source pod runs on")

    def await_restore(self):
        """Until the StatefulSet's new pod runs the restored copy on the target."""
        st = self.st
        mid, pname, target = st["migrationID"], st["sourcePod"], st["targetNode"]
        tgt = self.addr(target)
        ho = dict(st.get("handoff") or {})
        said = None
        checked = 0.0
        while True:
            if time.monotonic() - checked > 2:
                checked = time.monotonic()
                owner = self.kube.get_or_none("statefulsets", st.get("statefulSet") or "-",
                                              self.ns)
                if owner is None or owner["metadata"].get("deletionTimestamp"):
                    # nobody will create the pod again: the workload was deleted
                    why = (f"StatefulSet {st.get('statefulSet')} was deleted during the move; "
                           f"its kept copy was dropped")
                    try:
                        agents.drop(tgt, self.ctl.secret, mid, why, kept=True)
                    except Exception as e:      # noqa: BLE001
                        why += f" (not dropped: {e})"
                    raise ctl.Failed(why)
            pod = self.kube.get_or_none("pods", pname, self.ns)
            if pod is not None and pod["metadata"]["uid"] != st["sourcePodUID"]:
                ann = pod["metadata"].get("annotations") or {}
                if "createdAt" not in ho:
                    ho["createdAt"] = time.time()
                    ho["createdUID"] = pod["metadata"]["uid"]
                    self.set_status(step="restoring", handoff=ho)
                rev = (pod["metadata"].get("labels") or {}).get("controller-revision-hash")
                if ann.get("migrt.io/migration-id") != mid and st.get("revision") \
                        and rev != st["revision"]:
                    # the StatefulSet rolled out a new revision meanwhile: its pod is a
                    # new one by the user's choice (a rollout replaces pods), started
                    # afresh; the old revision's copy is not restored into it
                    why = (f"StatefulSet {st.get('statefulSet')} recreated {pname} from a new "
                           f"revision ({rev}, not {st['revision']}) during the move: it "
                           f"started afresh, as a rollout does; the kept copy was dropped")
                    try:
                        agents.drop(tgt, self.ctl.secret, mid, why, kept=True)
                    except Exception as e:      # noqa: BLE001
                        why += f" (not dropped: {e})"
                    self.set_status(handoff=ho)
                    raise ctl.Failed(why)
                if ann.get("migrt.io/migration-id") != mid:
                    # made without the webhook (its configuration removed by hand): it
                    # would start afresh; it goes, gracefully, and comes back through it
                    if not pod["metadata"].get("deletionTimestamp"):
                        log(f"{self.ns}/{self.name}: {pname} was created without the "
                            f"restore marker; deleting it so it is made again")
                        self.kube.delete("pods", pname, self.ns, grace=1,
                                         uid=pod["metadata"]["uid"])
                        ho.pop("createdAt", None)
                    time.sleep(0.2)
                    continue
            try:
                q = agents.status_reply(tgt, self.ctl.secret, mid)
            except Exception as e:      # noqa: BLE001 - the agent restarts: ask again
                q = {"state": f"unreachable ({e})"}
            if q.get("state") in ("restored", "done"):
                break
            if q.get("state") == "unknown" and not q.get("retain"):
                raise RuntimeError(f"the target node's agent does not know migration {mid}")
            if q.get("attempts") and q.get("last_error") and q.get("state") == "staged":
                msg = (f"restore attempt {q['attempts']} on {target} failed: "
                       f"{str(q['last_error'])[:300]}; the copy is kept there and the "
                       f"kubelet tries again")
                if msg != said:
                    said = msg
                    log(f"{self.ns}/{self.name}: {msg}")
                    self.set_status(message=msg)
                    self.event(pod, "MigrationRestoreFailed", msg, warning=True)
            time.sleep(0.05)
        now = time.time()
        ho["restoredAt"] = now
        ho["attempts"] = q.get("attempts")
        frozen = ho.get("frozenSeconds")
        fields = {"handoff": ho}
        if isinstance(frozen, (int, float)) and ho.get("at"):
            fields["downtimeSeconds"] = round(frozen + (now - ho["at"]), 3)
        self.set_status(**fields)
        # ready, as a user would check (bounded: the copy runs, whatever its probes say)
        deadline = time.monotonic() + ctl.READY_TIMEOUT
        while time.monotonic() < deadline:
            pod = self.kube.get_or_none("pods", pname, self.ns)
            if pod is not None and ctl.ready(pod):
                break
            time.sleep(0.1)

    def finish(self):
        st = self.st
        try:        # the copy runs: the kept image is no longer needed
            agents.status_reply(self.addr(st["targetNode"]), self.ctl.secret, st["migrationID"],
                    release=True)
        except Exception as e:      # noqa: BLE001 - its agent sweeps it by age then
            log(f"{self.ns}/{self.name}: release of the kept copy: {e}")
        if self.webhook is not None:
            self.webhook.forget(self.ns, st["sourcePod"])
        new = self.kube.get_or_none("pods", st["sourcePod"], self.ns)
        ho = st.get("handoff") or {}
        msg = (f"moved to {st['targetNode']} as pod {st['sourcePod']} (same name, recreated "
               f"by StatefulSet {st.get('statefulSet')})"
               + (f", downtime {st['downtimeSeconds']:.2f}s"
                  if isinstance(st.get("downtimeSeconds"), (int, float)) else "")
               + (f", {ho['attempts']} restore attempts" if (ho.get("attempts") or 0) > 1 else ""))
        self.set_status(phase="Succeeded", step="done", message=msg)
        self.event(new, "Migrated", f"PodMigration {self.name}: restored here from "
                   f"{st['sourceNode']} (the old {st['sourcePod']}, uid {st['sourcePodUID']})")
        log(f"{self.ns}/{self.name}: {msg}")
        self.unfinalize()

    def fail(self, msg, delete_target=False):
        """Before the handoff only (after it, nothing fails: the kept copy waits)."""
        if self.webhook is not None and self.st.get("sourcePod"):
            try:
                self.webhook.forget(self.ns, self.st["sourcePod"])
            except KubeError as e:
                log(f"{self.ns}/{self.name}: webhook selector not narrowed: {e}")
        log(f"{self.ns}/{self.name}: failed: {msg}")
        try:
            self.set_status(phase="Failed", step="done", message=msg)
        except KubeError:
            pass
        try:
            pod = self.kube.get_or_none("pods", self.st.get("sourcePod") or
                                        (self.pm.get("spec") or {}).get("pod") or "-", self.ns)
            self.event(pod, "MigrationFailed", f"PodMigration {self.name}: {msg}", warning=True)
        except KubeError:
            pass
        self.unfinalize()
