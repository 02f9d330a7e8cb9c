"""`migrt image inspect|verify`: look into a migrt checkpoint image."""
import json
import os
import sys

import click

from migrt.errors import MigrtError


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@click.group(name="image")
def command():
    """Inspect, verify, export, encrypt and decrypt checkpoints."""


def _fail(msg, as_json):
    if as_json:
        json.dump({"ok": False, "error": msg}, sys.stdout)
        sys.stdout.write("\n")
        raise click.exceptions.Exit(1)
    raise click.ClickException(msg)


@command.command()
@click.argument("checkpoint")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def inspect(checkpoint, as_json):
    """Show what a checkpoint holds: processes, sizes, memory, rootfs changes.

    CHECKPOINT: a migrt image, a runc/podman checkpoint dir, a podman/CRI-O/kubelet
    checkpoint archive (.tar, gzip or zstd) or its unpacked dir, or staged:<id>."""
    from migrt.image import anyckpt
    try:
        info = anyckpt.inspect(checkpoint)
    except MigrtError as e:
        _fail(str(e), as_json)
    if as_json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    c, n, s, r = info["container"], info["node"], info["sizes"], info["rootfs"]
    click.echo(f"format     {info['format']}")
    name = f" ({c['name']})" if c.get("name") and c.get("name") != c.get("id") else ""
    click.echo(f"container  {c.get('id') or '?'}{name}"
               + (f"  (bundle {c['bundle']})" if c.get("bundle") else "")
               + (f"  pod {c['namespace']}/{c.get('pod') or '?'}" if c.get("namespace") else ""))
    if "kernel" in n:
        click.echo(f"made       {info['created']} on {n.get('hostname', '?')}: {n['arch']}, "
                   f"kernel {n['kernel']}, runc {n.get('runc')}, criu {n.get('criu')}")
    else:
        click.echo(f"made       {info['created'] or '?'}: {n['arch']}")
    click.echo(f"flags      {' '.join(info['criu_flags']) or '-'}")
    click.echo(f"size       {_human(s['total'])} in {info['files']} files: CRIU {_human(s['criu'])} "
               f"(memory pages {_human(s['memory'])}), rootfs changes {_human(s['rootfs'])}")
    click.echo("processes")
    for p in info["processes"]:
        click.echo(f"  pid {p['pid']:<6} ppid {p['ppid']:<6} {p['comm']:<16} "
                   f"threads {p['threads']:<3} memory {_human(p['memory'])}")
    click.echo(f"rootfs     {r['kind']}: {len(r['changed'])} changed, {len(r['deleted'])} deleted")
    for path in r["changed"][:50]:
        click.echo(f"  M /{path}")
    for path in r["deleted"][:50]:
        click.echo(f"  D /{path}")
    if len(r["changed"]) > 50 or len(r["deleted"]) > 50:
        click.echo("  ...")


@command.command()
@click.argument("checkpoint")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def verify(checkpoint, as_json):
    """Check a checkpoint as a restore would; for a migrt image every chunk digest too.
    Names the first bad file."""
    from migrt.image import anyckpt
    try:
        r = anyckpt.verify(checkpoint)
    except MigrtError as e:
        _fail(str(e), as_json)
    if as_json:
        json.dump(r, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    if r["digests"]:
        click.echo(f"{checkpoint}: OK ({r['files']} files, {r['chunks']} chunks, "
                   f"{_human(r['bytes'])})")
    else:
        click.echo(f"{checkpoint}: OK ({r['format']}: {r['files']} files, {_human(r['bytes'])}; "
                   f"complete and restorable here; no digests to check: only a migrt image "
                   f"carries them)")


@command.command()
@click.argument("source")
@click.argument("dest", type=click.Path(dir_okay=False))
@click.option("--compress", type=click.Choice(["none", "gzip", "zstd"]), default="none",
              show_default=True)
def export(source, dest, compress):
    """Write a migrt image (or staged:<id>) as a podman/CRI-O/kubelet checkpoint archive:
    checkpointctl reads it, podman can import it, MIGRT_RESTORE_FROM takes it."""
    from migrt import image
    from migrt.image import archive
    from migrt.image import anyckpt
    try:
        with anyckpt.opened(source) as o:
            if not o.is_migrt:
                raise MigrtError(f"{source}: not a migrt image (no migrt/manifest.json); "
                                 f"only migrt images and staged migrations are exported")
            m = image.verify_image(o.image_dir, rootfs_dir=o.rootfs_dir, full=True)
            archive.export(o.image_dir, dest, m, rootfs_dir=o.rootfs_dir, compress=compress)
    except MigrtError as e:
        raise click.ClickException(str(e))
    except OSError as e:
        raise click.ClickException(f"{e.filename or dest}: {e.strerror or e}")
    click.echo(f"{dest}: {os.path.getsize(dest)} bytes ({compress}), "
               f"{len(m['files'])} files of {m['container']['id']}")


@command.command()
@click.argument("image_dir", type=click.Path(file_okay=False))
@click.argument("dest", type=click.Path(exists=False))
@click.option("--key", "key_name", default="node", show_default=True,
              help="name of the key in MIGRT_KEY_DIR (/etc/migrt/keys); `node` is made if missing")
@click.option("--new-key", is_flag=True, help="make the named key first (e.g. one per migration)")
def encrypt(image_dir, dest, key_name, new_key):
    """Encrypt a checkpoint at rest (AES-256-GCM); restore it with
    MIGRT_RESTORE_FROM=encrypted:DEST."""
    from migrt import crypto
    try:
        if new_key:
            crypto.make_key(key_name, exist_ok=False)
        h = crypto.encrypt_image(image_dir, dest, key_name)
    except MigrtError as e:
        raise click.ClickException(str(e))
    click.echo(f"{dest}: {len(h['files'])} files encrypted with key {h['key']!r}")


@command.command()
@click.argument("image_dir", type=click.Path(file_okay=False))
@click.argument("dest", type=click.Path(exists=False))
def decrypt(image_dir, dest):
    """Decrypt an encrypted checkpoint (checking every chunk) into DEST."""
    from migrt import crypto
    try:
        h = crypto.decrypt_image(image_dir, dest)
    except MigrtError as e:
        raise click.ClickException(str(e))
    click.echo(f"{dest}: {len(h['files'])} files decrypted (key {h['key']!r})")


def _when(t):
    import time as _t
    return _t.strftime("%Y-%m-%d %H:%M:%S", _t.gmtime(t)) if t else "?"


@command.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per checkpoint")
@click.option("--staging", default=None, help="the agent's staging dir "
              "[default: $MIGRT_STAGING or /run/migrt/staged]")
def ls(as_json, staging):
    """List the checkpoints in the allowed locations (MIGRT_CHECKPOINT_DIRS) and the
    migrations staged on this node, oldest first."""
    from migrt.image import store
    entries = store.scan() + store.staged(staging)
    if as_json:
        for e in entries:
            click.echo(json.dumps(e, sort_keys=True))
        return
    if not entries:
        from migrt.runtime.checkpoints import allowed_dirs
        click.echo(f"no checkpoints in {':'.join(allowed_dirs())}, nothing staged")
        return
    for e in entries:
        what = e["kind"] + (f" ({e['state']})" if e.get("state") else "")
        click.echo(f"{_when(e['created'])}  {_human(e['bytes']):>10}  {what:<20} "
                   f"{e.get('container') or '?':<30} {e['path']}")


@command.command(name="rm")
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="also a staged migration the agent is using")
def rm(checkpoints, force):
    """Remove checkpoints (paths in the allowed locations, or staged:<id>)."""
    from migrt.image import store
    failed = False
    for c in checkpoints:
        try:
            store.remove(c, force=force)
            click.echo(f"removed {c}")
        except MigrtError as e:
            click.echo(f"Error: {e}", err=True)
            failed = True
        except OSError as e:
            click.echo(f"Error: {c}: {e.strerror}", err=True)
            failed = True
    if failed:
        raise click.exceptions.Exit(1)


@command.command(name="gc")
@click.option("--keep", type=click.IntRange(min=0), default=None,
              help="newest checkpoints kept per container (like the checkpoint-restore-"
                   "operator's maxCheckpointsPerContainer) [default: "
                   "$MIGRT_MAX_CHECKPOINTS_PER_CONTAINER or 10]")
@click.option("--max-age", default=None, help="remove checkpoints older than this "
              "(90m, 12h, 7d) [default: $MIGRT_MAX_CHECKPOINT_AGE or none]")
@click.option("--staging", default=None, help="the agent's staging dir")
@click.option("--dry-run", is_flag=True, help="say what would go, remove nothing")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per removal")
def gc(keep, max_age, staging, dry_run, as_json):
    """Remove old checkpoints by count per container and by age; staged migrations
    that are over (done, failed) or older than --max-age and not in use."""
    from migrt.image import store
    if keep is None:
        keep = int(os.environ.get("MIGRT_MAX_CHECKPOINTS_PER_CONTAINER", "10"))
    try:
        age = store.parse_age(max_age or os.environ.get("MIGRT_MAX_CHECKPOINT_AGE"))
    except MigrtError as e:
        raise click.UsageError(str(e))
    plan = store.plan_gc(store.scan(), keep=keep, max_age=age) + \
        store.plan_gc_staged(store.staged(staging), max_age=age)
    freed = 0
    for e, why in plan:
        if not dry_run:
            try:
                store.remove(e["path"])
            except (MigrtError, OSError) as err:
                click.echo(f"Error: {e['path']}: {err}", err=True)
                continue
        freed += e["bytes"]
        if as_json:
            click.echo(json.dumps({"path": e["path"], "reason": why, "bytes": e["bytes"],
                                   "removed": not dry_run}, sort_keys=True))
        else:
            click.echo(f"{'would remove' if dry_run else 'removed'} {e['path']} ({why}, "
                       f"{_human(e['bytes'])})")
    if not as_json:
        click.echo(f"{len(plan)} checkpoint(s), {_human(freed)} "
                   f"{'would be freed' if dry_run else 'freed'}")
