"""`migrt agent`: the node agent that receives migrations."""
import os
import sys

import click


def _size(s):
    if s is None:
        return None
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = s.strip().lower().rstrip("ib")
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


@click.command(name="agent")
@click.option("--listen", default=None, help="HOST:PORT to listen on, required: the node's "
              "own address on the network migrations come over (0.0.0.0 only on purpose: "
              "every interface) [or $MIGRT_LISTEN]")
@click.option("--secret-file", type=click.Path(dir_okay=False),
              help="shared secret (mode 600); or MIGRT_SECRET_FILE")
@click.option("--staging", default=None, help="dir for memory images, always a tmpfs: "
              "the agent mounts a private one there if it is not one "
              "[default: $MIGRT_STAGING or /run/migrt/staged]")
@click.option("--staging-size", default=None, help="size of the tmpfs the agent mounts on "
              "--staging (e.g. 8G); grown per migration as memory allows "
              "[default: $MIGRT_STAGING_SIZE or half of memory, at most what is available]")
@click.option("--disk", default="/var/lib/migrt/staged", show_default=True,
              help="disk dir for rootfs changes (same filesystem as the bundles: rename, not copy)")
@click.option("--quota", default=None, help="most bytes one migration may stage (e.g. 2G)")
@click.option("--ttl", default=600.0, show_default=True, help="seconds a staged migration is kept")
@click.option("--restore-root", default=None, help="runc root for restores [default: --root of migrt]")
@click.option("--log-dir", default="/var/log/migrt", show_default=True,
              help="where restored containers' stdout/stderr go")
@click.option("--user", default=None, help="run the network side as this user; only "
              "restores go through a narrow root helper (see migrt/agent/privsep.py)")
@click.option("--peer-timeout", type=float, default=None,
              help="seconds without an answer from a source after which its migration is "
              "dropped [default: $MIGRT_PEER_TIMEOUT or 20]")
@click.option("--metrics", "metrics", default=None, metavar="HOST:PORT",
              help="serve Prometheus metrics on http://HOST:PORT/metrics (off by default)")
@click.pass_obj
def command(call, listen, secret_file, staging, disk, quota, ttl, restore_root, log_dir, user,
            peer_timeout, metrics, staging_size):
    """Receive migrations over TCP, stage and verify them, restore them here."""
    listen = listen or os.environ.get("MIGRT_LISTEN")
    if not listen or ":" not in listen or not listen.rpartition(":")[2].isdigit():
        raise click.UsageError(
            "--listen HOST:PORT is required: the node's own address on the network "
            "migrations come over (a node agent does not listen on every interface unless "
            "told to, e.g. --listen 0.0.0.0:7070)")
    if peer_timeout is not None:
        os.environ["MIGRT_PEER_TIMEOUT"] = str(peer_timeout)
    from migrt.agent import server
    from migrt.agent.staging import staging_root
    from migrt.transfer import wire
    try:
        secret = wire.load_secret(secret_file)
    except (wire.ProtocolError, OSError) as e:
        raise click.ClickException(str(e))
    me = os.path.realpath(sys.argv[0])
    runtime = os.environ.get("MIGRT_SELF") or (me if os.access(me, os.X_OK) else "migrt")
    root = restore_root or (call.root if call is not None else "/run/runc")
    kw = dict(staging=staging or staging_root(), disk=disk, quota=_size(quota), ttl=ttl,
              root=root, runtime=runtime, log_dir=log_dir, metrics=metrics,
              staging_size=_size(staging_size or os.environ.get("MIGRT_STAGING_SIZE")))
    if user:
        from migrt.agent import privsep
        sys.exit(privsep.run(listen, secret, user, **kw))
    sys.exit(server.run(listen, secret, **kw))
