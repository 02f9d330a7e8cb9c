"""`migrt image inspect|verify`: look into a migrt checkpoint image."""
import json
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
    """Inspect and verify migrt checkpoint images."""


@command.command()
@click.argument("image_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def inspect(image_dir, as_json):
    """Show what an image holds: processes, sizes, memory, rootfs changes."""
    from migrt import image
    try:
        info = image.inspect(image_dir)
    except MigrtError as e:
        raise click.ClickException(str(e))
    if as_json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    c, n, s, r = info["container"], info["node"], info["sizes"], info["rootfs"]
    click.echo(f"container  {c['id']}  (bundle {c.get('bundle', '?')})")
    click.echo(f"made       {info['created']} on {n.get('hostname', '?')}: {n['arch']}, "
               f"kernel {n['kernel']}, runc {n.get('runc')}, criu {n.get('criu')}")
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
@click.argument("image_dir", type=click.Path(file_okay=False))
def verify(image_dir):
    """Check every file and chunk digest; name the first bad file."""
    from migrt import image
    try:
        m = image.verify_image(image_dir, full=True)
    except MigrtError as e:
        raise click.ClickException(str(e))
    total = sum(e["size"] for e in m["files"])
    chunks = sum(len(e["chunks"]) for e in m["files"])
    click.echo(f"{image_dir}: OK ({len(m['files'])} files, {chunks} chunks, {_human(total)})")


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
