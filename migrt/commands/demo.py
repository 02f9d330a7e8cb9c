"""`migrt demo`: migrate a running busybox container between two simulated nodes.

Node A and node B are two runc roots on this machine; by default they talk over a veth
pair between two network namespaces that the demo creates with pyroute2 (the agent of
node B listens in one, `migrt migrate` runs in the other), or over loopback.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import click

COUNTER = ("exec 3>>/data/counter.log; i=0; "
           "while :; do i=$((i+1)); echo $i >&3; echo $i > /tmp/count; sleep 0.05; done")
NS_A, NS_B = "migrt-demo-a", "migrt-demo-b"
IP_A, IP_B = "10.231.77.1", "10.231.77.2"


def _setns(name):
    if not name:
        return None

    def enter():
        from pyroute2 import netns
        netns.setns(name)
    return enter


def make_netns():
    from pyroute2 import IPRoute, NetNS, netns
    for n in (NS_A, NS_B):
        if n in netns.listnetns():
            netns.remove(n)
        netns.create(n)
    with IPRoute() as ip:
        ip.link("add", ifname="migrt-va", kind="veth", peer="migrt-vb")
        a = ip.link_lookup(ifname="migrt-va")[0]
        b = ip.link_lookup(ifname="migrt-vb")[0]
        ip.link("set", index=a, net_ns_fd=NS_A)
        ip.link("set", index=b, net_ns_fd=NS_B)
    for ns, ifname, addr in ((NS_A, "migrt-va", IP_A), (NS_B, "migrt-vb", IP_B)):
        with NetNS(ns) as nsip:
            idx = nsip.link_lookup(ifname=ifname)[0]
            nsip.addr("add", index=idx, address=addr, prefixlen=24)
            nsip.link("set", index=idx, state="up")
            lo = nsip.link_lookup(ifname="lo")[0]
            nsip.link("set", index=lo, state="up")


def remove_netns():
    try:
        from pyroute2 import netns
        for n in (NS_A, NS_B):
            if n in netns.listnetns():
                netns.remove(n)
    except Exception:
        pass


def count(me, root, cid):
    p = subprocess.run([me, "--root", root, "exec", cid, "cat", "/tmp/count"],
                       capture_output=True, text=True)
    return int(p.stdout.strip()) if p.returncode == 0 and p.stdout.strip().isdigit() else None


@click.command(name="demo")
@click.option("--network", type=click.Choice(["veth", "loopback"]), default="veth",
              show_default=True, help="two netns joined by a veth pair, or loopback")
@click.option("--mode", type=click.Choice(["full", "precopy", "lazy"]), default="full",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the migration report as JSON")
@click.option("--keep", is_flag=True, help="keep the demo's directory")
def command(network, mode, as_json, keep):
    """Migrate a running busybox container between two simulated nodes.

    With --json, stdout carries the report alone (the narrative goes to stderr)."""

    def say(msg):
        click.echo(msg, err=as_json)

    from migrt.runtime import bundlekit
    from migrt.commands.migrate import print_report
    me = os.path.realpath(sys.argv[0])
    if os.geteuid() != 0:
        raise click.ClickException("the demo runs containers: run it as root")
    work = tempfile.mkdtemp(prefix="migrt-demo-", dir="/run" if os.path.isdir("/run") else None)
    state = os.path.join(work, "state")
    env = dict(os.environ, MIGRT_STATE_DIR=state, MIGRT_STAGING=os.path.join(state, "staged"),
               MIGRT_SELF=me)
    root_a, root_b = os.path.join(work, "node-a"), os.path.join(work, "node-b")
    secret = os.path.join(work, "secret")
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, os.urandom(24).hex().encode())
    os.close(fd)
    agent = reader = None
    netns_made = False
    try:
        say(f"node A: runc root {root_a}; node B: runc root {root_b}")
        rootfs = bundlekit.make_rootfs(os.path.join(work, "busybox-rootfs"))
        src = bundlekit.make_bundle(os.path.join(work, "bundle-a"), ["sh", "-c", COUNTER],
                                    rootfs=rootfs, cgroups_path=f"/migrt-demo/{os.getpid()}-a")
        dst = bundlekit.make_bundle(os.path.join(work, "bundle-b"), ["sh", "-c", COUNTER],
                                    rootfs=rootfs, cgroups_path=f"/migrt-demo/{os.getpid()}-b")
        if network == "veth":
            make_netns()
            netns_made = True
            listen, to, ns_a, ns_b = f"{IP_B}:7070", f"{IP_B}:7070", NS_A, NS_B
            say(f"network: veth pair {NS_A} {IP_A} <-> {NS_B} {IP_B}")
        else:
            import socket
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            listen = to = f"127.0.0.1:{port}"
            ns_a = ns_b = None
            say("network: loopback")
        agent = subprocess.Popen(
            [me, "--root", root_b, "agent", "--listen", listen, "--secret-file", secret,
             "--staging", os.path.join(state, "staged"), "--disk", os.path.join(work, "disk"),
             "--log-dir", os.path.join(work, "logs")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            preexec_fn=_setns(ns_b))
        line = agent.stdout.readline().decode().strip()
        if "listening" not in line:
            raise click.ClickException(f"agent on node B did not start: {line}")
        say(f"node B: {line}")
        # the container's stdio are pipes, as containerd gives them
        out_r, out_w = os.pipe()
        reader = subprocess.Popen(["cat"], stdin=out_r, stdout=subprocess.DEVNULL)
        os.close(out_r)
        p = subprocess.run([me, "--root", root_a, "create", "--bundle", src, "demo"],
                           stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w, env=env)
        os.close(out_w)
        if p.returncode != 0:
            raise click.ClickException("could not create the demo container on node A")
        subprocess.run([me, "--root", root_a, "start", "demo"], check=True, env=env)
        time.sleep(1.0)
        before = count(me, root_a, "demo")
        say(f"node A: container 'demo' is counting: {before}")
        argv = [me, "--root", root_a, "migrate", "demo", "--to", to, "--secret-file", secret,
                "--bundle", dst, "--dest-root", root_b, "--json"]
        if mode != "full":
            argv.append(f"--{mode}")
        say(f"$ migrt migrate demo --to {to} --bundle {dst}" + (f" --{mode}" if mode != "full" else ""))
        m = subprocess.run(argv, capture_output=True, text=True, env=env, preexec_fn=_setns(ns_a))
        if m.returncode != 0:
            raise click.ClickException(m.stderr.strip() or "migration failed")
        report = json.loads(m.stdout)
        time.sleep(0.5)
        after = count(me, root_b, "demo")
        src_state = subprocess.run([me, "--root", root_a, "state", "demo"], capture_output=True)
        if as_json:
            report["counter_before"], report["counter_after"] = before, after
            json.dump(report, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print_report(report)
            say(f"node B: container 'demo' goes on counting: {after} "
                       f"(was {before} on node A); on node A it "
                       f"{'is gone' if src_state.returncode != 0 else 'still exists'}")
            say(f"downtime: {report['phases']['downtime'] * 1000:.0f} ms")
    finally:
        for root in (root_a, root_b):
            if os.path.isdir(root):
                subprocess.run([me, "--root", root, "delete", "--force", "demo"],
                               capture_output=True, env=env)
        if agent is not None:
            agent.terminate()
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
        if reader is not None:
            try:
                reader.wait(5)
            except subprocess.TimeoutExpired:
                reader.kill()
        if netns_made:
            remove_netns()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"kept {work}")
