"""The source's side of a handover: its network stays cut off from just before the freeze
until its processes and their sockets are gone, and those processes die while frozen.

Why: CRIU locks the container's network only while it dumps, and with `--leave-running`
(how migrate dumps, so that a failure can resume the source) it opens it again at the
end. The tasks are still frozen then, but their kernel is not: it would acknowledge a
client's data that the destination never sees (lost), retransmit, answer keepalives,
and when the source is released, send FIN or RST on every connection the destination
now owns. So migrate holds a lock of its own (`hold`): a `migrt-hold` nftables table
(or an iptables chain `MIGRT-HOLD` where nftables cannot be used) that drops every
packet in the container's network namespace, added before `runc pause` (so no new
connection completes into a listen queue during the freeze: CRIU refuses those) and
removed only on a rollback (before the source resumes) or, for a namespace that
outlives the container (a pod's, given by path in the bundle), after the release,
once its sockets are destroyed. A namespace of the container's own goes with it, the
lock included: orphaned sockets keep it alive, and locked, until they are gone.

The release (`release`): `runc kill --all <id> KILL` while the container is paused
(runc freezes, signals and thaws: SIGKILL is acted on before any user instruction runs,
where `runc delete --force` of a paused container lets its processes run a moment
first), then wait until they are gone, then `runc delete --force`.

A container in the host's network namespace is not locked: that would cut the node off.
"""
import os
import subprocess
import sys
import threading
import time

TABLE = "migrt-hold"
CHAIN = "MIGRT-HOLD"

# Run in a child that has joined the network namespace (argv[1]); argv[2] is "add" or
# "del". Prints the method that holds the lock ("nftables" or "iptables") or, for del,
# what it removed.
_SCRIPT = r"""
import ctypes, os, subprocess, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CLOEXEC)
if hasattr(os, "setns"):
    os.setns(fd, os.CLONE_NEWNET)
elif ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:   # Python < 3.12
    raise OSError(ctypes.get_errno(), "setns")
table, chain, op = sys.argv[2], sys.argv[3], sys.argv[4]
def nft_run(cmds):
    try:
        nft = ctypes.CDLL("libnftables.so.1")
    except OSError:
        return None
    nft.nft_ctx_new.restype = ctypes.c_void_p
    nft.nft_ctx_new.argtypes = [ctypes.c_uint32]
    for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error", "nft_ctx_free"):
        getattr(nft, name).argtypes = [ctypes.c_void_p]
    nft.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ctx = nft.nft_ctx_new(0)
    nft.nft_ctx_buffer_output(ctx)
    nft.nft_ctx_buffer_error(ctx)
    ok = nft.nft_run_cmd_from_buffer(ctx, cmds.encode()) == 0
    nft.nft_ctx_free(ctx)
    return ok
def ipt(tool, *args):
    try:
        return subprocess.run([tool, "-w", *args], capture_output=True).returncode == 0
    except OSError:
        return False
if op == "add":
    rules = (f"add table inet {table}\n"
             f"add chain inet {table} in {{ type filter hook input priority -400; policy drop; }}\n"
             f"add chain inet {table} out {{ type filter hook output priority -400; policy drop; }}\n")
    if nft_run(rules):
        print("nftables")
        sys.exit(0)
    done = []
    for tool in ("iptables", "ip6tables"):
        if ipt(tool, "-N", chain) and ipt(tool, "-A", chain, "-j", "DROP") \
                and ipt(tool, "-I", "INPUT", "1", "-j", chain) \
                and ipt(tool, "-I", "OUTPUT", "1", "-j", chain):
            done.append(tool)
    if "iptables" not in done:
        sys.stderr.write("neither nftables nor iptables could lock the namespace\n")
        sys.exit(1)
    print("iptables")
else:
    if nft_run(f"delete table inet {table}"):
        print("nftables:" + table)
    for tool in ("iptables", "ip6tables"):
        if not ipt(tool, "-n", "-L", chain):
            continue
        for c in ("INPUT", "OUTPUT"):
            while ipt(tool, "-D", c, "-j", chain):
                pass
        ipt(tool, "-F", chain)
        if ipt(tool, "-X", chain):
            print(tool + ":" + chain)
"""


_HOLD_RULES = (f"add table inet {TABLE}\n"
               f"add chain inet {TABLE} in {{ type filter hook input priority -400; policy drop; }}\n"
               f"add chain inet {TABLE} out {{ type filter hook output priority -400; policy drop; }}\n")


def _nft_hold_here(ns_fd, timeout=10):
    """Add the nftables hold from this process, without a child: a thread of its own
    joins the namespace (setns moves only the calling thread), runs the rules through
    libnftables and ends, its namespace with it. The hold is inside the downtime, and a
    new interpreter costs 0.03 to 0.05 s there. True if done; False if it could not be
    (no libnftables, no setns, the rules refused): the caller uses the child then."""
    import ctypes
    import threading
    out = {}

    def work():
        try:
            os.setns(ns_fd, os.CLONE_NEWNET)
            nft = ctypes.CDLL("libnftables.so.1")
            nft.nft_ctx_new.restype = ctypes.c_void_p
            nft.nft_ctx_new.argtypes = [ctypes.c_uint32]
            for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error", "nft_ctx_free"):
                getattr(nft, name).argtypes = [ctypes.c_void_p]
            nft.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            ctx = nft.nft_ctx_new(0)
            nft.nft_ctx_buffer_output(ctx)
            nft.nft_ctx_buffer_error(ctx)
            out["ok"] = nft.nft_run_cmd_from_buffer(ctx, _HOLD_RULES.encode()) == 0
            nft.nft_ctx_free(ctx)
        except (OSError, AttributeError):
            out["ok"] = False
    if not hasattr(os, "setns"):
        return False
    t = threading.Thread(target=work, name="migrt-hold", daemon=True)
    t.start()
    t.join(timeout)
    return bool(out.get("ok"))


def _run(ns_path, op, pass_fds=(), timeout=20):
    p = subprocess.run([sys.executable, "-I", "-S", "-c", _SCRIPT, ns_path, TABLE, CHAIN, op],
                       capture_output=True, text=True, timeout=timeout, pass_fds=pass_fds)
    if p.returncode != 0:
        raise OSError(f"{op} migrt's network lock in {ns_path}: "
                      f"{(p.stderr.strip().splitlines() or ['failed'])[-1]}")
    return p.stdout.split()


def host_netns(pid):
    """True if process `pid` is in the network namespace this process runs in (the
    node's own: migrate runs there)."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino


def unhold(pid):
    """Remove migrt's lock from the network namespace of `pid` (what it removed)."""
    return _run(f"/proc/{pid}/ns/net", "del")


def external_netns(spec):
    """The path of the network namespace a bundle's spec joins (a pod's), or None if
    runc makes the container one of its own (or it shares the host's)."""
    for ns in ((spec or {}).get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "network":
            return ns.get("path") or None
    return None


class Hold:
    """migrt's lock on a source container's network namespace (see the module doc)."""

    def __init__(self, pid, external):
        self.pid = pid
        self.external = external      # the namespace outlives the container (a pod's)
        self.fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.method = None
        self.conns = []               # the container's TCP connections, for the release
        self._lister = None           # the thread listing them (take)

    @classmethod
    def take(cls, pid, external):
        """Lock the network namespace of `pid` (None for the host's namespace)."""
        if host_netns(pid):
            return None
        h = cls(pid, external)
        try:
            if os.environ.get("MIGRT_HOLD_IN_CHILD") != "1" and _nft_hold_here(h.fd):
                h.method = "nftables"
            else:
                h.method = _run(f"/proc/self/fd/{h.fd}", "add", pass_fds=(h.fd,))[0]
        except BaseException:
            h.close()
            raise
        if external:
            # Which connections the release must destroy: listed once the hold is on (no
            # connection can complete after it), while the freeze and the dump go on.
            # Reading /proc/PID/net/tcp walks the node's whole socket table: 0.2 to 0.3 s
            # on a busy node, which was inside the downtime.
            h._lister = threading.Thread(target=h._list_conns, name="migrt-hold-conns",
                                         daemon=True)
            h._lister.start()
        return h

    def _list_conns(self):
        try:
            self.conns = tcp_connections(self.pid)
        except OSError:
            self.conns = []

    def _listed(self):
        if self._lister is not None:
            self._lister.join(30)
            self._lister = None
        return self.conns

    @classmethod
    def existing(cls, pid):
        """The hold a dead migrate left (recovery releases the source): the namespace's
        connections recorded, so that after_release destroys them, then unlocks it."""
        if host_netns(pid):
            return None
        h = cls(pid, True)
        h.conns = tcp_connections(pid)
        h.method = "existing"
        return h

    def drop(self):
        """Rollback: open the namespace again (the source is about to resume)."""
        try:
            return _run(f"/proc/self/fd/{self.fd}", "del", pass_fds=(self.fd,))
        finally:
            self.close()

    def after_release(self):
        """The source's processes are gone. A namespace of its own dies with it (the lock
        too, once no socket keeps it alive); a pod's stays: destroy what is left of the
        container's TCP sockets (closing ones retransmit their FIN) while still locked,
        then unlock it for whatever else lives there."""
        try:
            if self.external:
                if self._listed():
                    destroy_sockets(self.fd, self.conns)
                _run(f"/proc/self/fd/{self.fd}", "del", pass_fds=(self.fd,))
        finally:
            self.close()

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def release(run, cid, timeout=15):
    """Kill every process of the paused container `cid` while it is frozen, wait until
    they are gone, then delete it. run(*runc_args) -> CompletedProcess. Returns a
    warning ("" if none)."""
    k = run("kill", "--all", cid, "KILL")
    warn = ""
    deadline = time.monotonic() + timeout
    while True:
        st = run("state", cid)
        if st.returncode != 0 or '"status": "stopped"' in st.stdout:
            break
        if time.monotonic() > deadline:
            warn = f"source processes still there {timeout:.0f}s after SIGKILL"
            break
        time.sleep(0.02)
    d = run("delete", "--force", cid)
    if d.returncode != 0 and run("state", cid).returncode == 0:
        warn = f"source delete failed: {d.stderr.strip()}"
    elif k.returncode != 0 and not warn and "not exist" not in k.stderr:
        warn = f"runc kill --all: {k.stderr.strip()}"
    return warn


# ---------------------------------------------------------------- TCP sockets

def _hex_addr(h):
    import ipaddress
    addr, port = h.split(":")
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        ip = ipaddress.IPv4Address(raw[::-1])
    else:   # four host-order 32-bit words
        ip = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
        if ip.ipv4_mapped:
            ip = ip.ipv4_mapped
    return str(ip), int(port, 16)


def _inodes(pid):
    """Socket inodes held by the container whose init is `pid` (its whole pid namespace
    as seen from here: every process in init's cgroup)."""
    pids = {pid}
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                parts = line.rstrip("\n").split(":", 2)
                if parts[1] in ("", "pids", "memory"):
                    for base in ("/sys/fs/cgroup/unified" if parts[1] == "" else
                                 f"/sys/fs/cgroup/{parts[1]}", "/sys/fs/cgroup"):
                        procs = os.path.join(base, parts[2].lstrip("/"), "cgroup.procs")
                        if os.path.exists(procs):
                            with open(procs) as pf:
                                pids.update(int(x) for x in pf.read().split())
                            break
    except (OSError, ValueError, IndexError):
        pass
    inodes = set()
    for p in pids:
        try:
            for fd in os.listdir(f"/proc/{p}/fd"):
                try:
                    t = os.readlink(f"/proc/{p}/fd/{fd}")
                except OSError:
                    continue
                if t.startswith("socket:["):
                    inodes.add(t[8:-1])
        except OSError:
            pass
    return inodes


def tcp_connections(pid, states=None):
    """The container's TCP sockets that have a peer: [(local ip, port, peer ip, port)].
    states: hex TCP states to keep (default: all but LISTEN and CLOSE)."""
    inodes = _inodes(pid)
    out = []
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            c = line.split()
            if len(c) < 10 or c[9] not in inodes:
                continue
            if (states and c[3] not in states) or (not states and c[3] in ("0A", "07")):
                continue
            out.append(_hex_addr(c[1]) + _hex_addr(c[2]))
    return out


def destroy_sockets(ns_fd, conns):
    """SOCK_DESTROY (ss -K) the given connections in the namespace (a socket a killed
    process left closing would go on retransmitting its FIN)."""
    for lip, lport, rip, rport in conns:
        subprocess.run(["nsenter", f"--net=/proc/self/fd/{ns_fd}", "ss", "-K", "-tn",
                        "state", "all", "src", _ss_addr(lip, lport), "dst", _ss_addr(rip, rport)],
                       capture_output=True, timeout=10, pass_fds=(ns_fd,))


def _ss_addr(ip, port):
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# ---------------------------------------------------------------- addresses

def addresses(ns_path, pass_fds=()):
    """The global (non-loopback, non-link-local) IP addresses of a network namespace."""
    import ipaddress
    import json
    p = subprocess.run(["nsenter", f"--net={ns_path}", "ip", "-j", "addr", "show"],
                       capture_output=True, text=True, timeout=10, pass_fds=pass_fds)
    if p.returncode != 0:
        raise OSError(f"addresses of {ns_path}: {p.stderr.strip() or 'ip failed'}")
    out = []
    for link in json.loads(p.stdout or "[]"):
        for a in link.get("addr_info") or []:
            try:
                ip = ipaddress.ip_address(a.get("local", ""))
            except ValueError:
                continue
            if not (ip.is_loopback or ip.is_link_local):
                out.append(str(ip))
    return sorted(set(out))


def bundle_net(bundle):
    """What a destination bundle's container gets for a network: {"netns": "host" |
    "new" | "path", "addresses": [...] (for a path)}. Run as root (bundles are root's)."""
    import json
    with open(os.path.join(bundle, "config.json")) as f:
        spec = json.load(f)
    nss = ((spec.get("linux") or {}).get("namespaces")) or []
    net = [n for n in nss if n.get("type") == "network"]
    if not net:
        return {"netns": "host"}
    path = net[0].get("path")
    if not path:
        return {"netns": "new"}
    try:
        return {"netns": "path", "path": path, "addresses": addresses(path)}
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return {"netns": "path", "path": path, "error": str(e)}
