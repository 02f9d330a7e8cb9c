"""migrt.kube without a cluster: which pods can move, the new pod it makes, the
kubeconfig it reads, the command line, and the runtime's pod rules' records.
(The Kubernetes tier, tests/kube/test_kube_migrate.py, runs all of it against real ones.)"""
import base64
import json
import os

import pytest

from migrt.kube import cli, controller as ctl
from migrt.kube import client as kc
from migrt.runtime import podrules


def pod(**over):
    p = {"metadata": {"name": "web-7d9f-abcde", "namespace": "team", "uid": "u1",
                      "generateName": "web-7d9f-",
                      "labels": {"app": "web", "pod-template-hash": "7d9f"},
                      "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}",
                                      "note": "kept"},
                      "ownerReferences": [{"kind": "ReplicaSet", "name": "web-7d9f",
                                           "uid": "rs1", "controller": True}]},
         "spec": {"nodeName": "node-a", "runtimeClassName": "migrt", "priority": 0,
                  "nodeSelector": {"kubernetes.io/hostname": "node-a", "disk": "ssd"},
                  "containers": [{"name": "main", "image": "busybox",
                                  "env": [{"name": "A", "value": "1"},
                                          {"name": "MIGRT_RESTORE_FROM", "value": "/old"}]}]},
         "status": {"phase": "Running",
                    "containerStatuses": [{"name": "main", "containerID": "containerd://c1",
                                           "state": {"running": {"startedAt": "x"}}}]}}
    for k, v in over.items():
        p[k].update(v)
    return p


RS = {"metadata": {"name": "web-7d9f", "uid": "rs1"},
      "spec": {"selector": {"matchLabels": {"app": "web", "pod-template-hash": "7d9f"}}}}


def test_which_pods_can_move():
    assert ctl.check_pod(pod()) is None
    assert "runtimeClassName migrt" in ctl.check_pod(pod(spec={"runtimeClassName": None}))
    two = pod()
    two["spec"]["containers"].append({"name": "side"})
    assert "exactly one container" in ctl.check_pod(two)
    sts = pod()
    sts["metadata"]["ownerReferences"][0]["kind"] = "StatefulSet"
    assert ctl.check_pod(sts) is None        # moved by handoff (migrt.kube.statefulset)
    job = pod()
    job["metadata"]["ownerReferences"][0]["kind"] = "Job"
    assert "restartPolicy Always: only Job pods with restartPolicy OnFailure or Never" \
        in ctl.check_pod(job)
    job["spec"]["restartPolicy"] = "Never"      # moved with its source held (swap_job_pods)
    assert ctl.check_pod(job) is None
    job["spec"]["restartPolicy"] = "OnFailure"
    assert ctl.check_pod(job) is None
    ds = pod()
    ds["metadata"]["ownerReferences"][0]["kind"] = "DaemonSet"
    assert "owned by a DaemonSet" in ctl.check_pod(ds)
    assert "not running" in ctl.check_pod(pod(status={"containerStatuses": [
        {"name": "main", "containerID": "containerd://c1", "state": {"waiting": {}}}]}))
    pvc = pod(spec={"volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "x"}}]})
    assert "persistentVolumeClaim" in ctl.check_pod(pvc)
    assert "being deleted" in ctl.check_pod(pod(metadata={"deletionTimestamp": "t"}))


def test_new_pod_waits_for_the_migration_off_the_source_and_out_of_the_replicaset():
    new = ctl.target_pod({"metadata": {"name": "pm-1"}}, pod(), "m-0123456789abcdef",
                         "node-b", RS)
    md, spec = new["metadata"], new["spec"]
    assert md["generateName"] == "web-7d9f-" and "name" not in md
    # not counted by the ReplicaSet until adopted: its selector label is held back
    assert "pod-template-hash" not in md["labels"] and md["labels"]["app"] == "web"
    assert json.loads(md["annotations"][ctl.HELD]) == {"pod-template-hash": "7d9f"}
    assert md["labels"][ctl.LABEL] == "pm-1"
    assert md["annotations"]["note"] == "kept"
    assert not any(k.startswith("kubectl.kubernetes.io/") for k in md["annotations"])
    assert "ownerReferences" not in md
    # scheduled anew: no node name, no pin to the source; off it, onto the target
    assert "nodeName" not in spec and "priority" not in spec
    assert spec["nodeSelector"] == {"disk": "ssd"}
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [
        {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["node-a"]},
        {"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-b"]}]}]
    env = spec["containers"][0]["env"]
    assert env == [{"name": "A", "value": "1"},
                   {"name": "MIGRT_RESTORE_FROM", "value": "staged:m-0123456789abcdef"}]


def test_new_pod_keeps_the_pods_own_affinity_terms():
    p = pod(spec={"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In",
                                                     "values": ["z1"]}]},
                              {"matchExpressions": [{"key": "zone", "operator": "In",
                                                     "values": ["z2"]}]}]}}}})
    p["metadata"].pop("ownerReferences")
    new = ctl.target_pod({"metadata": {"name": "pm"}}, p, "m-0123456789abcdef", None)
    terms = new["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert len(terms) == 2
    for t, zone in zip(terms, ("z1", "z2")):      # each OR-ed term also keeps off node-a
        assert t["matchExpressions"] == [
            {"key": "zone", "operator": "In", "values": [zone]},
            {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["node-a"]}]
    assert ctl.HELD not in new["metadata"]["annotations"]


def test_job_pod_is_held_out_of_its_job_by_its_selector_label():
    job = {"kind": "Job", "metadata": {"name": "batch", "uid": "j1"},
           "spec": {"selector": {"matchLabels": {"controller-uid": "j1"}}}}
    p = pod(metadata={"generateName": "batch-", "labels": {"controller-uid": "j1",
                                                            "job-name": "batch"},
                      "ownerReferences": [{"kind": "Job", "name": "batch", "uid": "j1",
                                           "controller": True}]},
            spec={"restartPolicy": "OnFailure"})
    new = ctl.target_pod({"metadata": {"name": "pm-2"}}, p, "m-0123456789abcdef", None, job)
    md = new["metadata"]
    assert "controller-uid" not in md["labels"] and md["labels"]["job-name"] == "batch"
    assert json.loads(md["annotations"][ctl.HELD]) == {"controller-uid": "j1"}
    assert "ownerReferences" not in md and md["generateName"] == "batch-"
    assert new["spec"]["restartPolicy"] == "OnFailure"


def test_job_pod_moves_only_with_room_in_its_backoff_limit():
    job = {"metadata": {"name": "batch"}, "spec": {"backoffLimit": 2}}
    p = pod(status={"phase": "Running", "containerStatuses": [{"restartCount": 0}]})
    assert ctl.job_room(job, [p], p) is None
    p["status"]["containerStatuses"][0]["restartCount"] = 1
    assert "backoffLimit 2 and its pods restarted 1 time(s)" in ctl.job_room(job, [p], p)
    job["spec"]["backoffLimit"] = 0
    p["status"]["containerStatuses"][0]["restartCount"] = 0
    assert "fail the Job" in ctl.job_room(job, [p], p)
    del job["spec"]["backoffLimit"]             # the default, 6
    assert ctl.job_room(job, [p], p) is None
    # with Never no restart is counted: the old pod leaves the Job before its container goes
    job["spec"]["backoffLimit"] = 0
    p["spec"]["restartPolicy"] = "Never"
    assert ctl.job_room(job, [p], p) is None


def test_bare_pod_names_do_not_grow():
    p = pod()
    p["metadata"].pop("generateName")
    p["metadata"]["name"] = "counter"
    assert ctl._base_name(p) == "counter-"
    p["metadata"]["name"] = "counter-x7k2p"
    p["metadata"]["annotations"]["migrt.io/migrated-from"] = "counter"
    assert ctl._base_name(p) == "counter-"


def write_kubeconfig(path, user, cluster=None, ns=None):
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
           "clusters": [{"name": "k", "cluster": dict({"server": "https://10.0.0.1:6443"},
                                                      **(cluster or {}))}],
           "users": [{"name": "u", "user": user}],
           "contexts": [{"name": "c", "context": dict({"cluster": "k", "user": "u"},
                                                      **({"namespace": ns} if ns else {}))},
                        {"name": "other", "context": {"cluster": "k", "user": "u",
                                                      "namespace": "elsewhere"}}]}
    with open(path, "w") as f:
        json.dump(cfg, f)       # JSON is YAML
    return str(path)


def test_kubeconfig_token_certs_context_namespace(tmp_path):
    ca = base64.b64encode(b"CA PEM").decode()
    p = write_kubeconfig(tmp_path / "kc", {"token": "abc"},
                         {"certificate-authority-data": ca}, ns="team")
    cfg = kc.load_config(p)
    assert (cfg.server, cfg.token, cfg.namespace) == ("https://10.0.0.1:6443", "abc", "team")
    assert open(cfg.ca, "rb").read() == b"CA PEM"
    assert kc.load_config(p, context="other").namespace == "elsewhere"
    assert kc.load_config(p, namespace="ns2").namespace == "ns2"
    with pytest.raises(kc.KubeError, match="no context named 'nope'"):
        kc.load_config(p, context="nope")
    (tmp_path / "crt").write_text("x")
    p = write_kubeconfig(tmp_path / "kc2", {"client-certificate": "crt", "client-key": "key"})
    cfg = kc.load_config(p)
    assert cfg.cert == str(tmp_path / "crt") and cfg.namespace == "default"
    p = write_kubeconfig(tmp_path / "kc3", {"exec": {"command": "aws"}})
    with pytest.raises(kc.KubeError, match="exec or auth-provider plugin"):
        kc.load_config(p)
    (tmp_path / "bad").write_text("a: [")
    with pytest.raises(kc.KubeError, match="not valid YAML"):
        kc.load_config(str(tmp_path / "bad"))


def test_kubectl_style_options_anywhere():
    a = cli.parser().parse_args(["--kubeconfig", "k", "-n", "ns", "pod", "web", "--to", "b"])
    assert (a.kubeconfig, a.namespace, a.name, a.to, a.mode) == ("k", "ns", "web", "b", "full")
    a = cli.parser().parse_args(["pod", "web", "--context", "c", "--mode", "lazy", "--json"])
    assert (a.context, a.mode, a.json) == ("c", "lazy", True)
    assert cli.main([]) == cli.EXIT_USAGE
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["pod", "web", "--mode", "fast"])


def test_one_line_without_a_kubeconfig(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    assert cli.main(["list"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("kubectl-migrt: kubeconfig ") and err.count("\n") == 1, err


def test_pod_rules_records(tmp_path, monkeypatch):
    monkeypatch.setenv("MIGRT_KUBE_STATE", str(tmp_path))
    spec = {"annotations": {"io.kubernetes.cri.container-type": "container",
                            "io.kubernetes.cri.sandbox-id": "abc123",
                            "io.kubernetes.cri.container-name": "main",
                            "io.kubernetes.cri.sandbox-namespace": "team",
                            "io.kubernetes.cri.sandbox-name": "web-1"}}
    crio = {"annotations": {"io.kubernetes.cri-o.ContainerType": "container",
                            "io.kubernetes.cri-o.SandboxID": "def456",
                            "io.kubernetes.container.name": "main"}}
    sandbox = {"annotations": {"io.kubernetes.cri.container-type": "sandbox",
                               "io.kubernetes.cri.sandbox-id": "abc123"}}
    assert podrules.pod_container(sandbox) is None
    assert podrules.pod_container({"annotations": {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-id": "../x", "io.kubernetes.cri.container-name": "m"}}) is None
    assert podrules.pod_container(crio)[:2] == ("def456", "main")
    assert not podrules.any_tombstones() and podrules.refusal(spec) is None
    assert podrules.bury(spec, "migrated to b:7070 (migration m-1)")
    assert not podrules.bury({"annotations": {}}, "x")
    assert podrules.any_tombstones()
    assert podrules.refusal(spec) == (
        "container main of pod team/web-1 was migrated to b:7070 (migration m-1); migrt "
        "does not start it again in this pod sandbox (the pod's copy runs elsewhere now: "
        "delete this pod)")
    podrules.unbury(spec)
    assert podrules.refusal(spec) is None and not podrules.any_tombstones()
    podrules.mark_restored(spec, "staged:m-1")
    assert podrules.restored_before(spec)["marker"] == "staged:m-1"
    assert podrules.restored_before(crio) is None
    podrules.bury(spec, "x")
    assert podrules.knows_sandbox("abc123")
    podrules.forget_sandbox("abc123")
    assert not podrules.knows_sandbox("abc123") and podrules.restored_before(spec) is None
    podrules.bury(spec, "x")
    old = os.path.join(str(tmp_path), "tomb", "abc123")
    os.utime(old, (1, 1))
    podrules.sweep()
    assert not os.path.exists(old)


def test_pod_rules_while_a_lazy_migration_runs(tmp_path, monkeypatch):
    """A container restored lazily is not started again from its image while its
    migration runs (its staged dir is there); once buried by the agent (the migration
    failed) it is refused for good; once the migration is over, a restart is one."""
    monkeypatch.setenv("MIGRT_KUBE_STATE", str(tmp_path / "kube"))
    spec = {"annotations": {"io.kubernetes.cri.container-type": "container",
                            "io.kubernetes.cri.sandbox-id": "abc123",
                            "io.kubernetes.cri.container-name": "main",
                            "io.kubernetes.cri.sandbox-namespace": "team",
                            "io.kubernetes.cri.sandbox-name": "web-1"}}
    staged = tmp_path / "staging" / "m-0123456789abcdef"
    staged.mkdir(parents=True)
    podrules.mark_restored(spec, "staged:m-0123456789abcdef", pending=str(staged))
    rec = podrules.restored_before(spec)
    assert podrules.still_migrating(spec, rec) == (
        "container main of pod team/web-1 was restored by migration m-0123456789abcdef, "
        "which has not ended (the source node still holds the workload); migrt does not "
        "start it again from its image until that migration has ended")
    podrules.bury_pod("abc123", "main", "stopped on this node: its migration "
                      "m-0123456789abcdef failed before all its memory had come")
    assert podrules.refusal(spec).startswith(
        "container main of pod team/web-1 was stopped on this node: its migration "
        "m-0123456789abcdef failed before all its memory had come; migrt does not start")
    with pytest.raises(ValueError):
        podrules.bury_pod("../x", "main", "x")
    staged.rmdir()                      # the migration is over
    assert podrules.still_migrating(spec, rec) is None
    podrules.mark_restored(spec, "staged:m-1")          # a full restore: nothing pending
    assert podrules.still_migrating(spec, podrules.restored_before(spec)) is None


def test_statefulset_target_node_checks():
    from migrt.kube import statefulset as sts
    node = {"metadata": {"name": "node-b", "labels": {"kubernetes.io/hostname": "node-b",
                                                      "disk": "ssd"}},
            "spec": {}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    spec = {"nodeSelector": {"disk": "ssd"}}
    assert sts.node_refusal(node, spec) is None
    assert "nodeSelector kubernetes.io/hostname=node-a" in sts.node_refusal(
        node, {"nodeSelector": {"kubernetes.io/hostname": "node-a"}})
    aff = {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["node-b"]}]}]}}}}
    assert "required node affinity" in sts.node_refusal(node, aff)
    cordoned = dict(node, spec={"unschedulable": True})
    assert "cordoned" in sts.node_refusal(cordoned, spec)
    tainted = dict(node, spec={"taints": [{"key": "gpu", "effect": "NoSchedule"}]})
    assert "taint gpu:NoSchedule" in sts.node_refusal(tainted, spec)
    assert sts.node_refusal(tainted, {"tolerations": [{"key": "gpu", "operator": "Exists"}]}) \
        is None
    down = dict(node, status={"conditions": [{"type": "Ready", "status": "False"}]})
    assert "not Ready" in sts.node_refusal(down, spec)


def test_statefulset_webhook_patch_and_selector():
    from migrt.kube import webhook as wh
    p = {"metadata": {"name": "web-0", "annotations": {"a": "1"}},
         "spec": {"containers": [{"name": "main", "env": [
             {"name": "A", "value": "1"}, {"name": "MIGRT_RESTORE_FROM", "value": "/x"}]}]}}
    ops = {o["path"]: o["value"] for o in wh.restore_patch(p, "node-b", "m-0123456789abcdef",
                                                           "pm-1")}
    assert ops["/spec/nodeName"] == "node-b"
    assert ops["/spec/containers/0/env"] == [{"name": "A", "value": "1"}, {
        "name": "MIGRT_RESTORE_FROM", "value": "staged:m-0123456789abcdef"}]
    assert ops["/metadata/annotations"] == {"a": "1", "migrt.io/migration-id":
                                            "m-0123456789abcdef", "migrt.io/podmigration": "pm-1"}
    hook = wh.Webhook.__new__(wh.Webhook)
    import threading
    hook.lock, hook.expected = threading.Lock(), {}
    assert hook.selector() == wh.IDLE
    hook.expected[("ns", "web-0")] = {"mid": "m-1", "target": "b", "pm": "p", "revision": "r1"}
    assert hook.selector() == {"matchExpressions": [
        {"key": wh.POD_NAME, "operator": "In", "values": ["web-0"]},
        {"key": wh.REVISION, "operator": "In", "values": ["r1"]}]}
    ca, cert, key = wh.serving_identity(["127.0.0.1", "migrt-controller.migrt-system.svc"])
    assert ca.startswith(b"-----BEGIN CERTIFICATE-----") and b"PRIVATE KEY" in key
