"""`migrt plugins [--bundle B] [--json]`: which plugins this node has, whether the node
config enables them, and why each applies or not to a bundle (and with which options)."""
import json
import os

import click

from migrt.errors import MigrtError


def _rows(bundle, stage):
    from migrt.plugins import gate as hookgate
    from migrt.plugins import config, registry, options
    cache = config.build_cache()          # a fresh look, and the hot path's cache refreshed
    if cache.get("error"):
        raise MigrtError(cache["error"])
    table = cache["plugins"]
    spec = None
    why = {}
    if bundle:
        from migrt.runc import read_spec
        spec = read_spec(bundle)
        marker = bool(hookgate._env(spec).get(hookgate.MARKER))
        groups = [stage] if stage else \
            (["restore"] if marker else ["create"]) + ["checkpoint", "migrate"]
        seen = {}
        for g in groups:
            for name, ok, reason in hookgate.explain(spec, bundle, g, cache):
                seen.setdefault(name, []).append((g, ok, reason))
        for name, results in seen.items():
            on = [g for g, ok, _ in results if ok]
            if on:
                reason = next(r for g, ok, r in results if ok)
                why[name] = (True, f"{reason} (acts on {', '.join(on)})")
            else:
                why[name] = (False, results[0][2])
    rows = []
    for name in sorted(table, key=lambda n: (table[n]["order"], n)):
        info = table[name]
        src = info["source"]
        where = src["where"]
        if src["kind"] == "file":
            where = os.path.relpath(where, os.path.dirname(hookgate.plugins_dir())) \
                if where.startswith(os.path.dirname(hookgate.plugins_dir())) else where
        row = {"name": name, "source": where, "kind": src["kind"],
               "enabled": info["enabled"], "stages": info["stages"],
               "description": info["description"]}
        if spec is not None:
            ok, reason = why.get(name, (False, ""))
            row["applies"], row["why"] = ok, reason
            if ok:
                try:
                    row["options"] = options.for_bundle(registry.load(src), spec,
                                                        info.get("options") or {})
                except MigrtError as e:
                    row["options_error"] = str(e)
        rows.append(row)
    for name, (ok, reason) in why.items():
        if name not in table:
            rows.append({"name": name, "source": "-", "kind": "missing", "enabled": False,
                         "stages": [], "description": "", "applies": ok, "why": reason})
    return cache, rows


@click.command(help=__doc__)
@click.option("--bundle", "-b", type=click.Path(file_okay=False), default=None,
              help="say why each plugin applies or not to this bundle")
@click.option("--stage", type=click.Choice(["create", "restore", "checkpoint", "migrate"]),
              default=None, help="judge for one core action only (default: all of "
                                 "them: create or restore, checkpoint, migrate)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def command(bundle, stage, as_json):
    from migrt.plugins import gate as hookgate
    try:
        cache, rows = _rows(bundle, stage)
    except MigrtError as e:
        raise click.ClickException(str(e))
    cfg = hookgate.config_path()
    if as_json:
        click.echo(json.dumps({"config": cfg, "config_present": os.path.exists(cfg),
                               "plugins": rows, "problems": cache.get("problems") or []},
                              indent=2))
        return
    click.echo(f"config: {cfg}" + ("" if os.path.exists(cfg) else " (absent: defaults)"))
    for row in rows:
        flag = "enabled" if row["enabled"] else "disabled"
        line = f"{row['name']:<10} {flag:<9} {row['source']}"
        click.echo(line)
        if row.get("description"):
            click.echo(f"    {row['description']}")
        if row["stages"]:
            click.echo(f"    stages: {', '.join(row['stages'])}")
        if "applies" in row:
            click.echo(f"    {'APPLIES' if row['applies'] else 'does not apply'}: {row['why']}")
            if row.get("options"):
                opts = ", ".join(f"{k}={v!r}" for k, v in sorted(row["options"].items()))
                click.echo(f"    options: {opts}")
            if row.get("options_error"):
                click.echo(f"    options: ERROR {row['options_error']}")
    for p in cache.get("problems") or []:
        click.echo(f"problem: {p}")
