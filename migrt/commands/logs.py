"""`migrt logs <container>`: migrt's record of a container's checkpoints, restores and
migrations on this node (carried across moves), and the CRIU logs it kept."""
import json
import os

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


@click.command(help=__doc__)
@click.argument("container")
@click.option("--json", "as_json", is_flag=True, help="the events as JSON lines")
@click.option("--criu", "criu", is_flag=True, help="print the newest CRIU log kept")
def command(container, as_json, criu):
    from migrt.plugins import record
    base = _base()
    try:
        events = record.events(container, base)
    except ValueError as e:
        raise click.ClickException(str(e))
    logs = record.criu_logs(container, base)
    if criu:
        if not logs:
            raise click.ClickException(f"no CRIU log kept for {container} in {base}")
        with open(logs[-1], errors="replace") as f:
            click.echo(f.read(), nl=False)
        return
    if as_json:
        for e in events:
            click.echo(json.dumps(e, sort_keys=True))
        return
    if not events:
        raise click.ClickException(f"no record of {container} in {base}")
    for e in events:
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
        click.echo("  ".join(str(p) for p in parts))
    if logs:
        click.echo(f"CRIU logs ({len(logs)} kept):")
        for p in logs:
            click.echo(f"  {p}")
