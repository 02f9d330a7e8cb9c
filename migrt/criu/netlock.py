"""How CRIU locks the container's network while it dumps, for the dumps `migrt migrate`
makes, and clearing a lock that a killed CRIU left behind.

CRIU cuts a container's network off while it dumps (packets dropped in its network
namespace), so that no connection moves on while its state is taken. Its default lock
is iptables: each lock and unlock runs iptables-restore and ip6tables-restore,
about a dozen programs started per migration (lock and unlock on the source, and again on
the destination, which takes the method from the image). Measured here, that is
0.11 s of a migration's downtime. The nftables lock does the same with libnftables
inside CRIU, in a few milliseconds. migrt's own dumps use it when both nodes' CRIU and
kernel support it (`criu check --feature network_lock_nftables`, part of the node
facts the agent reports in the precheck); plain `runc checkpoint` through migrt is
left as runc does it.

runc hands CRIU no lock option: the lines go through migrt.criu.config.

MIGRT_NETWORK_LOCK=iptables keeps CRIU's default; =nftables asks for nftables even
where the checks did not find it. Left to itself (auto), migrate tells CRIU to skip its
lock when migrt holds the source's network itself (migrt.migration.handover), which is
the case for every container with a network namespace of its own or a pod's; the
report's `network_lock` then says "skip".

A CRIU killed between lock and unlock leaves the lock in place: the container resumes
with its network cut. `clear(pid)` removes what CRIU adds (an `inet CRIU-*` table, or
the iptables CRIU chain and its jumps) in the network namespace of process `pid`, and
migrate's own hold on it (migrt.migration.handover: `inet migrt-hold`, `MIGRT-HOLD`).
"""
import os
import subprocess
import sys

FEATURE = "network_lock_nftables"
ENV = "MIGRT_NETWORK_LOCK"
METHODS = ("iptables", "nftables")


def automatic():
    """True when MIGRT_NETWORK_LOCK leaves the choice to migrt."""
    return (os.environ.get(ENV, "auto").strip().lower() or "auto") == "auto"


def choose(local_facts, dest_facts):
    """The lock method for a migration between nodes with these facts."""
    want = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if want in METHODS:
        return want
    if want != "auto":
        raise ValueError(f"{ENV}={want!r}: expected auto, iptables or nftables")

    def has(facts):
        return bool(((facts or {}).get("criu_features") or {}).get(FEATURE))
    return "nftables" if has(local_facts) and has(dest_facts) else "iptables"


def conf_lines(method):
    """CRIU config lines for a dump that should lock with `method`."""
    return ["network-lock nftables"] if method == "nftables" else []


# ---------------------------------------------------------------- leftovers

# Run in a child that has joined the container's network namespace: lists CRIU's
# nftables tables through libnftables (CRIU's own dependency, so present wherever it
# locks with nftables), deletes them, then undoes the iptables lock with the tools CRIU
# itself uses. Prints what it removed, one word per line.
_CLEAR = r"""
import ctypes, json, os, subprocess, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CLOEXEC)
if hasattr(os, "setns"):
    os.setns(fd, os.CLONE_NEWNET)
else:                               # Python 3.11 (Debian 12) has no os.setns
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, 0x40000000) != 0:                 # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), "setns: " + os.strerror(ctypes.get_errno()))
try:
    nft = ctypes.CDLL("libnftables.so.1")
except OSError:
    nft = None
if nft is not None:
    nft.nft_ctx_new.restype = ctypes.c_void_p
    nft.nft_ctx_new.argtypes = [ctypes.c_uint32]
    for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error", "nft_ctx_free"):
        getattr(nft, name).argtypes = [ctypes.c_void_p]
    nft.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    nft.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    nft.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    nft.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ctx = nft.nft_ctx_new(0)
    nft.nft_ctx_buffer_output(ctx)
    nft.nft_ctx_buffer_error(ctx)
    nft.nft_ctx_output_set_flags(ctx, 1 << 4)          # NFT_CTX_OUTPUT_JSON
    if nft.nft_run_cmd_from_buffer(ctx, b"list tables") == 0:
        out = nft.nft_ctx_get_output_buffer(ctx) or b"{}"
        for item in json.loads(out).get("nftables", []):
            t = item.get("table")
            name = str((t or {}).get("name", ""))
            if t and t.get("family") == "inet" and (name.startswith("CRIU-") or name == "migrt-hold"):
                if nft.nft_run_cmd_from_buffer(ctx, f"delete table inet {t['name']}".encode()) == 0:
                    print(t["name"])
    nft.nft_ctx_free(ctx)
for tool in ("iptables", "ip6tables"):
    def run(*args):
        try:
            return subprocess.run([tool, "-w", *args], capture_output=True).returncode == 0
        except OSError:
            return False
    for own in ("CRIU", "MIGRT-HOLD"):
        if not run("-n", "-L", own):
            continue
        for chain in ("INPUT", "OUTPUT"):
            while run("-D", chain, "-j", own):
                pass
        run("-F", own)
        if run("-X", own):
            print(tool + ":" + own)
"""


def clear(pid, timeout=20):
    """Remove a network lock CRIU left in the network namespace of `pid`. Returns what
    was removed ([] if there was nothing); raises OSError if it could not look."""
    ns = f"/proc/{pid}/ns/net"
    try:
        if os.stat(ns).st_ino == os.stat("/proc/self/ns/net").st_ino:
            # the host's namespace: CRIU locked single connections there, not the
            # namespace, and a table of another CRIU run must not be touched
            return []
    except OSError as e:
        raise OSError(f"network namespace of {pid}: {e.strerror}") from None
    p = subprocess.run([sys.executable, "-I", "-S", "-c", _CLEAR, ns], capture_output=True,
                       text=True, timeout=timeout)
    if p.returncode != 0:
        raise OSError(f"clearing CRIU's network lock in {ns}: "
                      f"{(p.stderr.strip().splitlines() or ['failed'])[-1]}")
    return p.stdout.split()
