"""`migrt migrate <container> --to HOST:PORT`: live-migrate a container to a node's agent."""
import json
import os
import sys

import click


@click.command(name="migrate")
@click.argument("container")
@click.option("--to", "to", required=True, help="HOST:PORT of the destination's migrt agent")
@click.option("--secret-file", type=click.Path(dir_okay=False),
              help="shared secret (mode 600); or MIGRT_SECRET_FILE")
@click.option("--bundle", help="bundle path on the destination: the agent creates the "
              "container there; without it the image is only staged and the marker printed")
@click.option("--dest-root", "dest_root", help="runc root on the destination (with --bundle)")
@click.option("--id", "new_id", help="container id on the destination [default: the same]")
@click.option("--precopy", is_flag=True, help="send a full image while running, then only "
              "the changed blocks during the freeze (with --lazy: then only the pages that "
              "changed come from here after the restore)")
@click.option("--lazy", is_flag=True, help="post-copy: restore at once, serve memory on "
              "demand from a page server here (cannot be rolled back once restored)")
@click.option("--streams", default=4, show_default=True, help="parallel TCP streams")
@click.option("--zstd-level", "level", default="auto", show_default=True,
              help="zstd level; 0: no compression; negative: zstd's fast levels; auto: "
              "1, or 0 when the agent runs on this very machine (loopback, or a veth into "
              "another network namespace: same boot id)")
@click.option("--wait", default=300.0, show_default=True,
              help="without --bundle: seconds to wait for a create from the marker")
@click.option("--page-server-port", default=0, help="port of the page server (--lazy)")
@click.option("--tcp-established/--no-tcp-established", default=None,
              help="migrate established TCP connections (CRIU's --tcp-established) "
              "[default: on when the container's IP moves with it: a network namespace of "
              "its own, or a destination namespace with the same addresses; otherwise "
              "its connections are restored closed and a line says so before the freeze]")
@click.option("--tcp-skip-in-flight/--no-tcp-skip-in-flight", "skip_in_flight", default=True,
              show_default=True,
              help="skip connections the kernel completed but the container has not "
              "accepted yet (their clients see a reset); without it such a connection "
              "fails the dump (`inet: In-flight connection`)")
@click.option("--file-locks/--no-file-locks", default=None,
              help="dump the file locks its processes hold (runc's --file-locks) "
              "[default: on when they hold any, read from their /proc fdinfo once frozen]")
@click.option("--rootfs-base", help="unchanged image rootfs to diff the container's against")
@click.option("--peer-timeout", type=float, default=None,
              help="seconds without an answer from the agent after which it counts as gone "
              "(and the source is resumed) [default: $MIGRT_PEER_TIMEOUT or 20]")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--mid", default=None, hidden=True,
              help="the migration id to use (m-<hex>); a pod on the destination waits for it")
@click.option("--restored-file", default=None, hidden=True,
              help="write a JSON note to this file once the container runs on the "
              "destination (before the source is released; lazy: before its memory is sent)")
@click.option("--handoff", is_flag=True, hidden=True,
              help="stage only: the destination keeps the copy for a later create with the "
              "marker, and the source goes once it does (a StatefulSet pod's move)")
@click.option("--hold-source", "hold_source", default=None, hidden=True,
              help="once the copy runs on the destination, keep the source frozen until "
              "this file exists (or --hold-timeout passed), then release it (a Job pod "
              "with restartPolicy Never: it leaves its Job first)")
@click.option("--hold-timeout", "hold_timeout", type=float, default=120.0, hidden=True,
              help="with --hold-source: the longest the source is kept, in seconds")
@click.pass_obj
def command(call, container, to, secret_file, bundle, dest_root, new_id, precopy, lazy,
            streams, level, wait, page_server_port, tcp_established, skip_in_flight,
            file_locks, rootfs_base, peer_timeout, as_json, mid, restored_file, handoff,
            hold_source, hold_timeout):
    """Move a running container to another node with the shortest downtime."""
    from migrt.migration import migrate as mig
    from migrt.transfer import wire
    if peer_timeout is not None:
        os.environ["MIGRT_PEER_TIMEOUT"] = str(peer_timeout)
    if handoff and (lazy or bundle):
        raise click.UsageError("--handoff stages the copy for a later create: not with "
                               "--lazy (its memory would stay on this node) nor --bundle")
    if hold_source and handoff:
        raise click.UsageError("--hold-source keeps the source until its copy runs: not with "
                               "--handoff, which lets it go before the restore")
    try:
        secret = wire.load_secret(secret_file)
    except (wire.ProtocolError, OSError) as e:
        raise click.ClickException(str(e))
    # --precopy --lazy: lazy mode after a pre-copy round (only what changed since is
    # served from here after the restore)
    mode = "lazy" if lazy else "precopy" if precopy else "full"
    if level != "auto":
        try:
            level = int(level)
        except ValueError:
            raise click.BadParameter(f"{level!r} is not an integer or auto", param_hint="--zstd-level")
    opts = mig.Options(to, secret, streams=streams, level=level, mode=mode, bundle=bundle,
                       dest_root=dest_root, new_id=new_id, wait=wait,
                       progress=not as_json, page_server_port=page_server_port,
                       rootfs_base=rootfs_base, tcp_established=tcp_established,
                       file_locks=file_locks, skip_in_flight=skip_in_flight, mid=mid,
                       restored_file=restored_file, handoff=handoff,
                       hold_source=hold_source, hold_timeout=hold_timeout,
                       precopy=precopy and lazy)
    root = call.root if call is not None else "/run/runc"
    report = mig.migrate(root, container, opts)
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    print_report(report)


def print_report(r):
    p, b = r["phases"], r["bytes"]
    click.echo(f"migrated {r['container']} to {r['to']} as {r.get('destination_id')} "
               f"({r['mode']} mode, migration {r.get('migration')})")
    order = ("precheck", "precopy", "precopy_frozen", "network_hold", "freeze", "dump", "transfer", "transfer_after_dump",
             "restore", "downtime", "fill_after_restore", "pages_served_after_restore",
             "source_released_after_restore",
             "total")
    for k in order:
        if k in p:
            click.echo(f"  {k:<28} {p[k] * 1000:9.1f} ms")
    if b:
        click.echo(f"  image {b.get('image', 0) / 1e6:.1f} MB, sent {b.get('sent_raw', 0) / 1e6:.1f} MB, "
                   f"on the wire {b.get('wire', 0) / 1e6:.1f} MB"
                   + (f" (ratio {b['ratio']})" if "ratio" in b else ""))
    if "precopy_frozen" in p:
        click.echo("  (precopy_frozen: the container was frozen that long during the pre-copy "
                   "round too, outside the downtime)")
    if r.get("mode") == "lazy":
        click.echo("  (lazy mode: once restored, a failure could not have been rolled back)")
    elif "fill_after_restore" in p:
        click.echo("  (the container ran once restored; its memory came in from the "
                   "destination's copy after that, and the source went when it was all there)")
    tcp = r.get("tcp") or {}
    if tcp.get("mode"):
        click.echo(f"  TCP connections: {tcp['mode']} ({tcp.get('established', 0)} established "
                   f"at the precheck; IP {'moved with it' if tcp.get('ip_moves') else 'changed'})")
    if r.get("file_locks"):
        click.echo(f"  file locks dumped: {r['file_locks']}")
    if r.get("network_lock"):
        lock = r["network_lock"]
        if lock == "skip":
            lock = f"migrt's hold ({r.get('source_network_held')}), CRIU's own skipped"
        click.echo(f"  network lock during the dump: {lock}")
    if r.get("warning"):
        click.echo(f"  warning: {r['warning']}")
