"""Test helpers: drive an OCI runtime binary (migrt, or plain runc) on busybox bundles.

The runtime under test comes from MIGRT_TEST_RUNTIME (default: a migrt launcher built
for this checkout), so the lifecycle tests can be pointed at plain runc to show that
migrt behaves the same.
"""
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from migrt.runtime import bundlekit  # noqa: E402

VENV_PYTHON = os.environ.get("MIGRT_PYTHON", "/opt/migrt/venv/bin/python")

# A workload whose state a restore must keep: a counter in shell memory that goes on,
# printed to stdout and written to a file that stays open on fd 3.
COUNTER = ("exec 3>>/data/counter.log; i=0; "
           "while :; do i=$((i+1)); echo $i; echo $i >&3; echo $i > /tmp/count; "
           "sleep 0.05; done")


def have_root_tools():
    return os.geteuid() == 0 and shutil.which("runc") and shutil.which("criu")


def build_launcher(dest, front=None):
    """The `migrt` executable as installed: the shell front door before the Python
    launcher (MIGRT_TEST_FRONT=0: the Python launcher alone)."""
    from migrt.front import launcher
    if front is None:
        front = os.environ.get("MIGRT_TEST_FRONT", "1") != "0"
    launcher.write(dest, REPO, VENV_PYTHON, front=front)
    return dest


def static_program(src, tmp):
    """The C program `src` built static (gcc -O2 -static) into dir tmp, once."""
    out = os.path.join(tmp, os.path.splitext(os.path.basename(src))[0])
    if not os.path.exists(out):
        subprocess.run(["gcc", "-O2", "-static", "-o", out, src], check=True)
    return out


def put_program(bundle, binary, name=None):
    """Copy binary into the bundle's rootfs as /bin/NAME (executable)."""
    dst = os.path.join(bundle, "rootfs", "bin", name or os.path.basename(binary))
    shutil.copy(binary, dst)
    os.chmod(dst, 0o755)
    return dst


def uid(prefix="t"):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Output:
    """Collects what a container writes to one pipe."""

    def __init__(self, fd):
        self.fd = fd
        self.chunks = []
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self):
        while True:
            try:
                b = os.read(self.fd, 65536)
            except OSError:
                break
            if not b:
                break
            self.chunks.append(b)
        os.close(self.fd)

    @property
    def text(self):
        return b"".join(self.chunks).decode(errors="replace")

    def lines(self):
        return self.text.splitlines()


class Runtime:
    """An OCI runtime binary with its own --root (one simulated node)."""

    def __init__(self, binary, root, env=None):
        self.binary = binary
        self.root = root
        self.env = dict(os.environ, **(env or {}))
        os.makedirs(root, exist_ok=True)

    def cmd(self, *args, root_form="separate"):
        if root_form == "joined":
            return [self.binary, f"--root={self.root}", *args]
        return [self.binary, "--root", self.root, *args]

    def run(self, *args, input=None, timeout=120, root_form="separate", check=False):
        p = subprocess.run(self.cmd(*args, root_form=root_form), input=input,
                           capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and p.returncode != 0:
            raise AssertionError(f"{args} failed ({p.returncode}): {p.stderr}")
        return p

    def create(self, cid, bundle, *extra, log=None, log_format="json", start=False,
               timeout=120):
        """`create` with pipes for the container's stdio. Returns (proc, out, err)."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe()
        glob = []
        if log:
            glob = ["--log", log, "--log-format", log_format]
        argv = [self.binary, "--root", self.root, *glob, "create", "--bundle", bundle,
                *extra, cid]
        p = subprocess.run(argv, stdin=in_r, stdout=out_w, stderr=err_w, env=self.env,
                           timeout=timeout)
        os.close(out_w)
        os.close(err_w)
        os.close(in_r)
        out, err = Output(out_r), Output(err_r)
        if p.returncode != 0:
            os.close(in_w)
            err.thread.join(5)
        else:
            self._stdin = getattr(self, "_stdin", [])
            self._stdin.append(in_w)
        if start and p.returncode == 0:
            s = self.run("start", cid)
            assert s.returncode == 0, s.stderr
        return p.returncode, out, err

    def state(self, cid):
        p = self.run("state", cid)
        if p.returncode != 0:
            return None
        return json.loads(p.stdout)

    def ids(self):
        p = self.run("list", "--format", "json", check=True)
        return [c["id"] for c in (json.loads(p.stdout) or [])]

    def exec_out(self, cid, *args):
        return self.run("exec", cid, *args, check=True).stdout

    def cleanup(self):
        for cid in self.ids() if os.path.isdir(self.root) else []:
            self.run("delete", "--force", cid)
        for fd in getattr(self, "_stdin", []):
            try:
                os.close(fd)
            except OSError:
                pass


class Sampler:
    """Calls self.sample() every `interval` seconds, in a thread of its own, while a
    with block runs (a look at /proc during a migration)."""

    interval = 0.05

    def __init__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(self.interval):
            self.sample()

    def sample(self):
        raise NotImplementedError

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def wait_for(pred, timeout=10.0, interval=0.05, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def lazy_page_server(cid):
    """The source's CRIU serving a lazy migration's pages: the CRIU processes under the
    `runc checkpoint --lazy-pages` of container cid (on this machine, whichever node)."""
    runcs, kids = set(), {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"checkpoint" in cmd and b"--lazy-pages" in cmd and cid.encode() in cmd:
            runcs.add(int(p))
        if cmd and (os.path.basename(cmd[0]) == b"criu" or cmd[0].startswith(b"criu:")):
            kids[int(p)] = ppid
    return [pid for pid, ppid in kids.items() if ppid in runcs]


def last_count(out):
    nums = [int(x) for x in out.lines() if x.strip().isdigit()]
    return nums[-1] if nums else 0


# ---------------------------------------------------------------- network namespaces

def _in_netns(pid, prog):
    return subprocess.run(["nsenter", "-t", str(pid), "-n", sys.executable, "-I", "-c", prog],
                          capture_output=True, text=True, timeout=30)


def lo_up(pid):
    """Bring lo up in the network namespace of `pid` (runc leaves a new one down)."""
    p = _in_netns(pid, "from pyroute2 import IPRoute\n"
                       "with IPRoute() as ip:\n"
                       "    ip.link('set', index=ip.link_lookup(ifname='lo')[0], state='up')")
    assert p.returncode == 0, p.stderr


def net_works(pid):
    """A TCP connection over lo in the network namespace of `pid`: what CRIU's network
    lock (iptables or nftables) drops until it is undone."""
    p = _in_netns(pid, "import socket\n"
                       "s = socket.create_server(('127.0.0.1', 0))\n"
                       "socket.create_connection(s.getsockname(), timeout=2)\n"
                       "print('connected')")
    return p.stdout.strip() == "connected"


def zipapp_python():
    """The Python the zipapp is built for: the system's when it is the venv's version
    (Debian 13); on Debian 12 (3.11) the Python 3.13 install.sh built, which the venv is
    made from (compiled dependencies are built for one Python version)."""
    system = "/usr/bin/python3"
    try:
        out = subprocess.run([system, "-c", "import sys; print(*sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.split()
    except OSError:
        out = []
    if out == [str(x) for x in sys.version_info[:2]]:
        return system
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def staging_mounts(under):
    """Mount points of staging tmpfs's an agent mounted (source "migrt-staging") at or
    below a dir."""
    under = os.path.realpath(under).rstrip("/")
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            i = parts.index("-")
            point = parts[4].replace("\\040", " ")
            if parts[i + 2] == "migrt-staging" and (point == under
                                                    or point.startswith(under + "/")):
                out.append(point)
    return out


def unmount_staging(under):
    """Detach what an agent killed with SIGKILL left mounted (an agent that exits
    normally unmounts its own)."""
    for point in reversed(staging_mounts(under)):
        subprocess.run(["umount", "-l", point], capture_output=True)


def remove_state(state, timeout=10.0):
    """Remove a test's MIGRT_STATE_DIR once nothing writes to it any more: a migration
    the agent starts on its node (op `migrate`, the Kubernetes side) runs as a child
    that outlives the agent (its pid in out/*.pid) and writes its report and exit
    status there when it ends, which a teardown's delete makes happen just before this
    runs. The agent's spare restorer (migrt.front.spare, its own session) outlives it
    too: an agent killed while its spare still preloads leaves a spare that writes the
    node's plugin cache (plugins/cache-*.json) before it sees the agent gone, which made
    the dir again after the rmtree. So every process started with this MIGRT_STATE_DIR
    is waited for as well."""
    out = os.path.join(state, "out")
    pids = _pids_with_env(f"MIGRT_STATE_DIR={state}")
    for name in os.listdir(out) if os.path.isdir(out) else []:
        if name.endswith(".pid"):
            try:
                with open(os.path.join(out, name)) as f:
                    pids.append(int(f.read().strip()))
            except (OSError, ValueError):
                pass
    deadline = time.monotonic() + timeout
    for pid in pids:
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break           # exited, its parent has not reaped it yet
            except OSError:
                break
            time.sleep(0.05)
    shutil.rmtree(state, ignore_errors=True)


def _pids_with_env(item):
    """Pids of the processes (but this one) started with `item` (NAME=value) in their
    environment."""
    want = item.encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if want in f.read().split(b"\0"):
                    pids.append(int(name))
        except OSError:
            pass
    return pids
