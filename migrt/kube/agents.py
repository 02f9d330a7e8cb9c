"""The controller's only way to a node: its migrt agent, over the agent's protocol."""
import os

from migrt.transfer import wire

ANNOTATION = "migrt.io/agent"          # on a Node: HOST:PORT of its agent
DEFAULT_PORT = int(os.environ.get("MIGRT_AGENT_PORT", "7070"))


def address(node):
    """HOST:PORT of a node's agent: its `migrt.io/agent` annotation, else its
    InternalIP and port 7070 (MIGRT_AGENT_PORT)."""
    ann = (node.get("metadata", {}).get("annotations") or {}).get(ANNOTATION)
    if ann:
        return ann
    for a in node.get("status", {}).get("addresses") or []:
        if a.get("type") == "InternalIP":
            return f"{a['address']}:{DEFAULT_PORT}"
    raise LookupError(f"node {node['metadata']['name']} has no {ANNOTATION} annotation and "
                      f"no InternalIP")


def status_reply(addr, secret, mid, timeout=5.0, **extra):
    """The agent's whole `status` reply for migration mid (`extra`: the request's
    options, e.g. net=True for the addresses, id=... on a source, release=True)."""
    c, _ = wire.connect(addr, secret, dict({"op": "status", "mid": mid}, **extra),
                        timeout=timeout)
    try:
        reply = c.read_json()
    finally:
        c.close()
    if reply.get("error"):
        raise wire.ProtocolError(reply["error"])
    return reply


def status(addr, secret, mid, timeout=5.0):
    """What the agent at addr knows of migration mid: unknown, awaited, receiving,
    staged, restoring, filling, restored, failed, done."""
    return status_reply(addr, secret, mid, timeout).get("state") or "unknown"


def addresses(addr, secret, mid, timeout=5.0):
    """(state, [IP addresses]) of migration mid's container at the agent at addr: the
    restored container's, or while a create waits for it (`awaited`) those of the pod
    sandbox it joins; none from an agent that does not tell them (older, or --user)."""
    reply = status_reply(addr, secret, mid, timeout, net=True)
    ips = reply.get("addresses")
    return reply.get("state") or "unknown", [a for a in ips if isinstance(a, str)] \
        if isinstance(ips, list) else []


def migrate(addr, secret, container, mid, to, mode="full", wait=120, start=True,
            started=None, restored=None, handoff=False, hold=None):
    """Have the agent at addr (the source node) migrate `container` to the agent `to`
    with migration id `mid`, and wait for the outcome: {"ok", "rc", "report", "error"}.
    Asking again with the same mid waits for the same run. `started` is called once
    the agent has taken the request; `restored` (with the agent's note: downtime,
    phases, mode) once the copy runs on the target, before the outcome (lazy mode:
    before the source has sent its memory). An agent older than that event never
    calls it: the outcome alone comes. handoff=True: the StatefulSet move (`migrt
    migrate --handoff`: the target keeps the staged copy until the new pod is made).
    `hold` (seconds): once the copy runs there, the source stays frozen until `go` (or
    that long), and the outcome comes after."""
    c, _ = wire.connect(addr, secret, {"op": "migrate"}, timeout=10)
    try:
        req = {"op": "migrate", "container": container, "mid": mid, "to": to,
               "mode": mode, "wait": wait, "start": start,
               "events": ["restored"] if restored else []}
        if handoff:
            req["handoff"] = True
        if hold:
            req["hold"] = float(hold)
        c.send_json(req)
        kind, first = c.read_frame()
        if kind != b"J" or first.get("error"):
            return {"ok": False, "rc": first.get("rc", 3) if kind == b"J" else 3,
                    "error": first.get("error") if kind == b"J" else "bad reply", "report": None}
        if started:
            started(first.get("started"))
        while True:
            kind, res = c.read_frame()
            if kind != b"J":
                raise wire.ProtocolError("expected a control message")
            if res.get("event") != "restored":
                return res
            if restored:
                restored(res)
    finally:
        c.close()


def drop(addr, secret, mid, why, timeout=5.0, kept=False):
    """Tell the target node's agent that migration mid will not come (kept=True: nor
    be restored from the copy it kept for a handoff, which it deletes)."""
    req = {"op": "drop", "mid": mid, "why": why}
    if kept:
        req["kept"] = True
    c, _ = wire.connect(addr, secret, req, timeout=timeout)
    try:
        kind, reply = c.read_frame()
    finally:
        c.close()
    return kind == b"J" and bool(reply.get("ok"))


def go(addr, secret, container, mid, to, mode="full", timeout=5.0):
    """Let the source of migration mid (started with `hold`) go: the agent at addr (the
    source node) releases its frozen container. True if it was told."""
    c, _ = wire.connect(addr, secret, {"op": "migrate"}, timeout=timeout)
    try:
        c.send_json({"op": "migrate", "container": container, "mid": mid, "to": to,
                     "mode": mode, "start": False, "go": True})
        reply = c.read_json()
    finally:
        c.close()
    if reply.get("error"):
        raise wire.ProtocolError(reply["error"])
    return bool(reply.get("ok"))
