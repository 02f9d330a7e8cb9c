"""`migrt logs [CONTAINER]`: migrt's record of a container's checkpoints, restores and
migrations on this node (carried across moves), and the CRIU logs it kept.

Without CONTAINER: one line per container with a record. CONTAINER is an id, a short id
(its first characters) or a podman container name. The same id under two runtime roots
(containerd namespaces, runc roots) is two containers: --root picks one, else both are
shown, each under its root. -f follows the record as events arrive."""
import json
import os
import subprocess
import time

import click


def _base():
    """The record dir: MIGRT_LOG_DIR, else the logs plugin's `dir` option, else default."""
    from migrt.plugins import record
    if os.environ.get("MIGRT_LOG_DIR"):
        return record.base_dir()
    try:
        from migrt.plugins import gate as hookgate
        info = (hookgate.node_cache().get("plugins") or {}).get("logs") or {}
        d = (info.get("options") or {}).get("dir")
        if d:
            return d
    except Exception:
        pass
    return record.base_dir()


def _podman_id(name):
    """A podman container name -> its full id (podman knows names; runtimes do not)."""
    import shutil
    podman = shutil.which("podman")
    if not podman:
        return None
    try:
        p = subprocess.run([podman, "container", "inspect", "--format", "{{.Id}}", name],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = p.stdout.strip()
    return out if p.returncode == 0 and out else None


def _line(e):
    parts = [e.get("time", "?"), e.get("node", "?"), e.get("event", "?")]
    if e.get("mode"):
        parts.append(e["mode"])
    if e.get("seconds") is not None:
        parts.append(f"{e['seconds']:.3f}s")
    if e.get("phases"):
        parts.append(" ".join(f"{k}={v}" for k, v in e["phases"].items()))
    parts.append("ok" if e.get("ok", True) else "FAILED")
    if e.get("error"):
        parts.append(f"error: {e['error']}")
    return "  ".join(str(p) for p in parts)


def _list(base, root, as_json):
    from migrt.plugins import record
    rr = os.path.realpath(root) if root else None
    rows = []
    for d, m in record.records(base):
        if rr and m.get("root") != rr:
            continue
        evs = record.events(None, d=d)
        last = evs[-1] if evs else {}
        rows.append({"id": m["id"], "root": m.get("root"), "events": len(evs),
                     "last": {k: last.get(k) for k in ("time", "event", "ok", "node")}})
    if as_json:
        for r in rows:
            click.echo(json.dumps(r, sort_keys=True))
        return
    if not rows:
        click.echo(f"no container records in {base}")
        return
    for r in rows:
        cid = r["id"][:12] if len(r["id"]) == 64 else r["id"]
        last = r["last"]
        click.echo(f"{cid:<24} {r['events']:>4} events  last {last.get('time') or '-'} "
                   f"{last.get('event') or '-'} {'ok' if last.get('ok', True) else 'FAILED'}"
                   f"  root {r['root'] or '?'}")


@click.command(help=__doc__)
@click.argument("container", required=False)
@click.option("--json", "as_json", is_flag=True, help="the events as JSON lines")
@click.option("--criu", "criu", is_flag=True, help="print the newest CRIU log kept")
@click.option("--root", "root", default=None, help="only the record under this runtime root")
@click.option("-f", "--follow", is_flag=True, help="keep printing events as they are recorded")
def command(container, as_json, criu, root, follow):
    from migrt.plugins import record
    base = _base()
    if not container:
        if follow or criu:
            raise click.UsageError("-f and --criu need a CONTAINER")
        return _list(base, root, as_json)
    hits = record.find(container, base, root)
    if not hits:
        full = _podman_id(container)
        if full:
            hits = record.find(full, base, root)
    if not hits:
        raise click.ClickException(f"no record of {container} in {base}"
                                   + (f" under root {root}" if root else ""))
    ids = {m["id"] for _, m in hits}
    if len(ids) > 1:
        raise click.ClickException(f"{container} matches {len(ids)} containers: "
                                   f"{', '.join(sorted(ids))}; give more of the id")
    if criu:
        logs = sorted((p for d, _ in hits for p in record.criu_logs(None, d=d)),
                      key=os.path.basename)
        if not logs:
            raise click.ClickException(f"no CRIU log kept for {container} in {base}")
        with open(logs[-1], errors="replace") as f:
            click.echo(f.read(), nl=False)
        return
    several = len(hits) > 1
    seen = {}
    for d, m in hits:
        evs = record.events(None, d=d)
        seen[d] = {e.get("id") for e in evs}
        if several and not as_json:
            click.echo(f"== {m['id']} under root {m.get('root') or '?'} ==")
        for e in evs:
            click.echo(json.dumps(e, sort_keys=True) if as_json else _line(e))
        logs = record.criu_logs(None, d=d)
        if logs and not as_json and not follow:
            click.echo(f"CRIU logs ({len(logs)} kept):")
            for p in logs:
                click.echo(f"  {p}")
    if not follow:
        return
    try:
        while True:
            time.sleep(0.3)
            for d, m in hits:
                for e in record.events(None, d=d):
                    if e.get("id") not in seen[d]:
                        seen[d].add(e.get("id"))
                        click.echo(json.dumps(e, sort_keys=True) if as_json else _line(e))
    except KeyboardInterrupt:
        return
