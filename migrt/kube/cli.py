"""`kubectl migrt`: move pods with migrt (a kubectl plugin: the executable kubectl-migrt).

    kubectl migrt pod NAME [--to NODE] [--mode full|precopy|lazy|precopy-lazy] [--json] [--dry-run]
    kubectl migrt drain NODE [--max-parallel N] [--mode M] [--json]
    kubectl migrt list [-A]
    kubectl migrt controller --secret-file FILE     (the PodMigration controller itself)

Options kubectl users know, anywhere on the line: --kubeconfig, --context, -n/--namespace.
`pod` creates a PodMigration and follows it: the CLI and the controller are one path.
"""
import argparse
import json
import sys
import time

from migrt.kube import client as kc
from migrt.kube import controller as ctl

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _common(p):
    p.add_argument("--kubeconfig", default=argparse.SUPPRESS, help="path to the kubeconfig")
    p.add_argument("--context", default=argparse.SUPPRESS, help="kubeconfig context")
    p.add_argument("-n", "--namespace", default=argparse.SUPPRESS, help="namespace")


def parser():
    top = argparse.ArgumentParser(prog="kubectl migrt", description=__doc__.split("\n\n")[0])
    _common(top)
    sub = top.add_subparsers(dest="cmd", metavar="COMMAND")
    p = sub.add_parser("pod", help="move one pod to another node")
    _common(p)
    p.add_argument("name")
    p.add_argument("--to", dest="to", help="target node [default: the scheduler picks]")
    p.add_argument("--mode", default="full", choices=ctl.MODES)
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    p.add_argument("--dry-run", action="store_true",
                   help="check that the pod could be moved; change nothing")
    p.add_argument("--timeout", type=float, default=300, help="seconds to follow [300]")
    d = sub.add_parser("drain", help="cordon a node and move every migrt pod off it")
    _common(d)
    d.add_argument("node")
    d.add_argument("--max-parallel", type=int, default=2, help="pods moved at once [2]")
    d.add_argument("--mode", default="full", choices=ctl.MODES)
    d.add_argument("--json", action="store_true")
    d.add_argument("--timeout", type=float, default=600)
    ls = sub.add_parser("list", help="list PodMigrations")
    _common(ls)
    ls.add_argument("-A", "--all-namespaces", action="store_true")
    c = sub.add_parser("controller", help="run the PodMigration controller")
    _common(c)
    c.add_argument("--secret-file", help="the agents' shared secret [$MIGRT_SECRET_FILE]")
    c.add_argument("--max-parallel", type=int, default=4)
    c.add_argument("--webhook-listen", metavar="HOST:PORT",
                   help="serve the admission webhook that StatefulSet moves need here")
    c.add_argument("--webhook-url", help="the webhook's address as the API server reaches it "
                   "(https://HOST:PORT/mutate-pods; HOST in its certificate)")
    c.add_argument("--webhook-service", metavar="NAMESPACE/NAME[:PORT]",
                   help="or the Service in front of the controller (port 443 by default)")
    return top


def out(msg=""):
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def err(msg):
    sys.stderr.write(f"kubectl-migrt: {msg}\n")
    sys.stderr.flush()


def connect(args):
    cfg = kc.load_config(getattr(args, "kubeconfig", None), getattr(args, "context", None),
                         getattr(args, "namespace", None))
    return kc.Client(cfg)


# ------------------------------------------------------------------ pod

def check_move(kube, ns, name, to):
    """Client-side checks before a PodMigration is created: None or why not."""
    pod = kube.get_or_none("pods", name, ns)
    if pod is None:
        return f"pod {ns}/{name} not found", None
    why = ctl.check_pod(pod)
    if why:
        return why, pod
    if to:
        node = kube.get_or_none("nodes", to)
        if node is None:
            return f"node {to} not found", pod
        if to == pod["spec"]["nodeName"]:
            return f"pod {ns}/{name} already runs on {to}", pod
        if node["spec"].get("unschedulable"):
            return f"node {to} is cordoned", pod
        if not ctl.node_ready(node):
            return f"node {to} is not Ready", pod
    return None, pod


def follow(kube, ns, pm_name, timeout, quiet=False, prefix="  "):
    """Print the PodMigration's steps until it ends; returns it."""
    seen = set()
    deadline = time.monotonic() + timeout
    while True:
        try:
            pm = kube.get("podmigrations", pm_name, ns)
        except kc.KubeError as e:
            if e.status == 404:
                raise kc.KubeError(f"PodMigration {ns}/{pm_name} was deleted", 404)
            if e.status or time.monotonic() > deadline:
                raise
            time.sleep(0.5)             # the API server is away for a moment: the move goes on
            continue
        st = pm.get("status") or {}
        step = st.get("step")
        if not quiet:
            for key, text in (("sched", f"new pod {st.get('targetPod')} on {st.get('targetNode')}"
                               if st.get("targetNode") and st.get("targetPod") else None),
                              (step, {"creating target pod": "creating the new pod",
                                      "scheduling target pod": "new pod created, waiting "
                                      "for it to be scheduled and ready to restore",
                                      "migrating": "migrating (freeze, dump, transfer, "
                                      "restore)", "finishing": "restored; handing over and "
                                      "deleting the old pod",
                                      "arming webhook": "StatefulSet pod: arming the "
                                      "admission webhook for its re-creation",
                                      "deleting source pod": "staged on the target, source "
                                      "released; deleting the old pod",
                                      "awaiting replacement": "waiting for the StatefulSet "
                                      "to create the pod again",
                                      "restoring": "recreated on the target node, restoring"}
                                     .get(step))):
                if key and text and key not in seen:
                    seen.add(key)
                    out(prefix + text)
        if st.get("phase") in ("Succeeded", "Failed"):
            return pm
        if time.monotonic() > deadline:
            return pm
        time.sleep(0.1)


def report_lines(pm, took):
    st = pm.get("status") or {}
    spec = pm.get("spec") or {}
    ns = pm["metadata"]["namespace"]
    lines = []
    if st.get("phase") == "Succeeded":
        lines.append(f"moved {ns}/{spec.get('pod')} from {st.get('sourceNode')} to "
                     f"{st.get('targetNode')} as pod {st.get('targetPod')} "
                     f"({st.get('mode', 'full')} mode, migration {st.get('migrationID')})")
    else:
        lines.append(f"{ns}/{spec.get('pod')}: {st.get('phase') or 'not done'}: "
                     f"{st.get('message') or 'no answer from the controller'}")
    ph = st.get("phases") or {}
    if isinstance(st.get("downtimeSeconds"), (int, float)):
        lines.append(f"  downtime {st['downtimeSeconds']:.3f} s (frozen until the new pod's "
                     f"container ran); command to done {took:.2f} s")
    else:
        lines.append(f"  command to done {took:.2f} s")
    order = ("precheck", "precopy", "freeze", "dump", "transfer", "transfer_after_dump",
             "restore", "downtime", "fill_after_restore", "pages_served_after_restore",
             "source_released_after_restore", "total")
    if ph:
        lines.append("  migration phases: " + ", ".join(
            f"{k} {ph[k] * 1000:.0f} ms" for k in order if isinstance(ph.get(k), (int, float))))
    steps = st.get("stepTimes") or {}
    if steps:
        lines.append("  steps: " + ", ".join(f"{k} at {v[11:23]}" for k, v in steps.items()))
    b = st.get("bytes") or {}
    if b:
        lines.append(f"  bytes: image {b.get('image', 0) / 1e6:.1f} MB, on the wire "
                     f"{b.get('wire', 0) / 1e6:.1f} MB")
    if st.get("lazyPrecopy"):
        pages = st.get("lazyPages") or {}
        lines.append(f"  pre-copy {st['lazyPrecopy']}" + (
            f": after the restore {pages.get('fromPrecopy', 0)} pages read from it on the "
            f"target, {pages.get('sent', 0)} sent" if pages else ""))
    return lines


def cmd_pod(args, kube):
    ns = getattr(args, "namespace", None) or kube.namespace
    why, pod = check_move(kube, ns, args.name, args.to)
    if why:
        err(why)
        return EXIT_FAILED
    pm = ctl.new_podmigration(args.name, ns, args.to, args.mode, generate=True)
    if args.dry_run:
        kube.create("podmigrations", pm, namespace=ns, dry_run=True)
        out(f"would move {ns}/{args.name} off {pod['spec']['nodeName']} to "
            f"{args.to or 'a node the scheduler picks'} ({args.mode} mode); nothing changed")
        return EXIT_OK
    t0 = time.monotonic()
    pm = kube.create("podmigrations", pm, namespace=ns)
    name = pm["metadata"]["name"]
    if not args.json:
        out(f"podmigration {ns}/{name}: moving pod {args.name} off {pod['spec']['nodeName']}")
    pm = follow(kube, ns, name, args.timeout, quiet=args.json)
    took = time.monotonic() - t0
    if args.json:
        json.dump({"podmigration": name, "namespace": ns, "commandToDoneSeconds": round(took, 3),
                   "spec": pm.get("spec"), "status": pm.get("status")}, sys.stdout, indent=2)
        out()
    else:
        for line in report_lines(pm, took):
            out(line)
    return EXIT_OK if (pm.get("status") or {}).get("phase") == "Succeeded" else EXIT_FAILED


# ------------------------------------------------------------------ drain

def cmd_drain(args, kube):
    node = kube.get_or_none("nodes", args.node)
    if node is None:
        err(f"node {args.node} not found")
        return EXIT_FAILED
    if not node["spec"].get("unschedulable"):
        kube.patch("nodes", args.node, {"spec": {"unschedulable": True}})
    out(f"node {args.node} cordoned")
    pods = kube.list("pods", fieldSelector=f"spec.nodeName={args.node}")
    todo, skipped = [], []
    for p in pods:
        md = p["metadata"]
        ref = ctl.controller_ref(p)
        if ref and ref.get("kind") == "DaemonSet":
            continue
        if p.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            continue
        why = ctl.check_pod(p)
        if why:
            skipped.append((md["namespace"], md["name"], why))
        else:
            todo.append((md["namespace"], md["name"]))
    results = {}
    running = {}
    t0 = time.monotonic()
    queue = list(todo)
    while queue or running:
        while queue and len(running) < max(1, args.max_parallel):
            ns, name = queue.pop(0)
            pm = kube.create("podmigrations", ctl.new_podmigration(name, ns, None, args.mode,
                                                                  generate=True,
                                                                  reason=f"drain {args.node}"),
                             namespace=ns)
            running[(ns, name)] = (pm["metadata"]["name"], time.monotonic())
            out(f"moving {ns}/{name} (podmigration {pm['metadata']['name']})")
        for key, (pmn, since) in list(running.items()):
            pm = kube.get_or_none("podmigrations", pmn, key[0])
            phase = ((pm or {}).get("status") or {}).get("phase")
            late = time.monotonic() - since > args.timeout
            if pm is None or phase in ("Succeeded", "Failed") or late:
                del running[key]
                results[key] = pm
                for line in report_lines(pm or {"metadata": {"namespace": key[0]},
                                                 "spec": {"pod": key[1]}},
                                         time.monotonic() - since):
                    out(line)
        time.sleep(0.2)
    moved = [k for k, pm in results.items()
             if ((pm or {}).get("status") or {}).get("phase") == "Succeeded"]
    failed = [k for k in results if k not in moved]
    out(f"drain {args.node}: {len(moved)} of {len(todo)} migrt pod(s) moved in "
        f"{time.monotonic() - t0:.1f} s" + (f"; {len(failed)} could not be moved and keep "
                                            f"running: " + ", ".join(f"{a}/{b}" for a, b in failed)
                                            if failed else ""))
    for ns, name, why in skipped:
        out(f"  left alone: {ns}/{name}: {why}")
    if args.json:
        json.dump({"node": args.node, "moved": [f"{a}/{b}" for a, b in moved],
                   "failed": [f"{a}/{b}" for a, b in failed],
                   "skipped": [{"pod": f"{a}/{b}", "why": w} for a, b, w in skipped]},
                  sys.stdout, indent=2)
        out()
    return EXIT_OK if not failed else EXIT_FAILED


# ------------------------------------------------------------------ list

def cmd_list(args, kube):
    ns = None if args.all_namespaces else (getattr(args, "namespace", None) or kube.namespace)
    items = kube.list("podmigrations", ns)
    rows = [("NAMESPACE", "NAME", "POD", "PHASE", "FROM", "TO", "NEW POD", "DOWNTIME", "MESSAGE")]
    for pm in sorted(items, key=lambda p: p["metadata"].get("creationTimestamp", "")):
        st = pm.get("status") or {}
        d = st.get("downtimeSeconds")
        rows.append((pm["metadata"]["namespace"], pm["metadata"]["name"],
                     (pm.get("spec") or {}).get("pod", ""), st.get("phase") or "Pending",
                     st.get("sourceNode") or "", st.get("targetNode") or "",
                     st.get("targetPod") or "", f"{d:.3f}s" if isinstance(d, (int, float)) else "",
                     (st.get("message") or "")[:60]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    return EXIT_OK


def cmd_controller(args, kube):
    from migrt.transfer import wire
    secret = wire.load_secret(args.secret_file)
    c = ctl.Controller(kube, secret, max_parallel=args.max_parallel)
    if args.webhook_listen:
        from migrt.kube import webhook
        c.webhook = webhook.Webhook(kube, args.webhook_listen, url=args.webhook_url,
                                    service=args.webhook_service)
        try:
            c.webhook.start()
        except kc.KubeError:
            pass        # said once; StatefulSet moves are refused with that line
    c.run()
    return EXIT_OK


def main(argv=None):
    args = parser().parse_args(argv)
    if not args.cmd:
        parser().print_help()
        return EXIT_USAGE
    try:
        kube = connect(args)
        return {"pod": cmd_pod, "drain": cmd_drain, "list": cmd_list,
                "controller": cmd_controller}[args.cmd](args, kube)
    except kc.KubeError as e:
        err(str(e))
        return EXIT_FAILED
    except KeyboardInterrupt:
        err("interrupted (a PodMigration already created goes on; see `kubectl migrt list`)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
