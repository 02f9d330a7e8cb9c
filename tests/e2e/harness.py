"""Run a private containerd for the end-to-end tests, with no network.

`Containerd` starts the real containerd binary with a config of its own (socket, root and
state dirs under one temporary directory) that imports migrt's shipped drop-in from
containerd-config/, and tears everything down again: tasks, shims, mounts, dirs.

`oci_layout_tar` builds an OCI image layout tarball from a busybox rootfs, so that
`ctr image import` gives containerd an image without a registry.
"""
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONFIG_DIR = os.path.join(REPO, "containerd-config")
DROP_IN_V2 = os.path.join(CONFIG_DIR, "containerd-v2-migrt.toml")
INSTALLED_MIGRT = "/usr/local/bin/migrt"
# containerd builds to run the tests against: the system's, plus others unpacked privately
# by packaging/install.sh (on Debian 12 it unpacks Debian 13's containerd 1.7 there, so the
# shipped drop-in is proven on 1.6 and 1.7; the node's own containerd is not touched).
EXTRA_CONTAINERDS = os.environ.get("MIGRT_E2E_CONTAINERDS",
                                   "/opt/migrt/test/containerd-1.7/usr/bin")


def containerd_builds():
    """{version: bin dir or None for the system's}, e.g. {"1.6": None, "1.7": "/opt/..."}."""
    builds = {}
    for d in [None] + [x for x in EXTRA_CONTAINERDS.split(":") if x]:
        exe = os.path.join(d, "containerd") if d else shutil.which("containerd")
        if not exe or not os.access(exe, os.X_OK):
            continue
        out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        parts = out.split()
        if len(parts) >= 3:
            builds.setdefault(".".join(parts[2].split(".")[:2]), d)
    return builds


SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REGISTER = os.path.join(REPO, "packaging", "containerd_register.py")

IMAGE = "localhost/migrt-e2e/busybox:1"
# The CRI sandbox ("pause") image, named in the test config's sandbox_image: made here
# from the same busybox layer with a command that just waits, so nothing is pulled.
PAUSE_IMAGE = "localhost/migrt-e2e/pause:1"
PAUSE_CMD = ("/bin/sleep", "2147483647")


def _blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(layout, "blobs", "sha256", digest)
    with open(path, "wb") as f:
        f.write(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def oci_layout_tar(rootfs, dest, name=IMAGE, cmd=("/bin/sh",)):
    """Write an OCI image layout tarball of `rootfs` to `dest`, named `name`."""
    with tempfile.TemporaryDirectory() as layout:
        os.makedirs(os.path.join(layout, "blobs", "sha256"))
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
            for entry in sorted(os.listdir(rootfs)):
                t.add(os.path.join(rootfs, entry), arcname=entry)
        layer_tar = raw.getvalue()
        diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
        layer = _blob(layout, gzip.compress(layer_tar, mtime=0))
        layer["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip"
        config = _blob(layout, json.dumps({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/bin:/usr/bin:/sbin"], "Cmd": list(cmd),
                       "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }).encode())
        config["mediaType"] = "application/vnd.oci.image.config.v1+json"
        manifest = _blob(layout, json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config, "layers": [layer]}).encode())
        manifest["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
        manifest["annotations"] = {"io.containerd.image.name": name,
                                   "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}
        with open(os.path.join(layout, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": [manifest]}, f)
        with open(os.path.join(layout, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        with tarfile.open(dest, "w") as t:
            for entry in ("oci-layout", "index.json", "blobs"):
                t.add(os.path.join(layout, entry), arcname=entry)
    return dest


def drop_in_for(binary, source=DROP_IN_V2):
    """The shipped drop-in, with its BinaryName pointed at the migrt under test.

    Everything else (the table paths, runtime_type, the option's name) is loaded by
    containerd exactly as shipped. With the installed migrt nothing is changed at all.
    """
    with open(source) as f:
        text = f.read()
    shipped = tomllib.loads(text)
    runtime = shipped["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["migrt"]
    assert runtime["options"]["BinaryName"] == INSTALLED_MIGRT
    if binary != INSTALLED_MIGRT:
        text = text.replace(f'"{INSTALLED_MIGRT}"', json.dumps(binary))
    return text


class CtrError(AssertionError):
    pass


class Containerd:
    """A containerd of our own: temporary config, socket, root and state."""

    def __init__(self, base, migrt, namespace="migrt-e2e", drop_in=DROP_IN_V2,
                 mode="register", path=SERVICE_PATH, env=None, bin_dir=None):
        self.base = base
        self.migrt = migrt
        self.namespace = namespace
        self.root = os.path.join(base, "root")
        self.state = os.path.join(base, "state")
        self.address = os.path.join(base, "containerd.sock")
        self.config = os.path.join(base, "config.toml")
        self.confd = os.path.join(base, "conf.d")
        self.log = os.path.join(base, "containerd.log")
        self.drop_in = drop_in
        self.mode = mode
        self.path = path
        # migrt's own state (restore work dirs, plugin cache) private to this containerd,
        # so that what a test leaves behind is told apart from other runs on the machine
        self.migrt_state = os.path.join(base, "migrt-state")
        self.env = {"MIGRT_STATE_DIR": self.migrt_state, **(env or {})}
        self.bin_dir = bin_dir
        self.exe = os.path.join(bin_dir, "containerd") if bin_dir else "containerd"
        self.ctr_exe = os.path.join(bin_dir, "ctr") if bin_dir else "ctr"
        self.proc = None

    def write_config(self):
        """config.toml as a node would have it, then migrt registered in it.

        mode "register": the node's config has a CRI table of its own (here it must:
        restrict_oom_score_adj, because this machine's root lacks CAP_SYS_RESOURCE and
        cannot give a sandbox oom_score_adj -998), and packaging/containerd_register.py
        appends the shipped drop-in's tables to it, as install.sh does on a node.
        mode "import": config.toml only imports conf.d/*.toml, which holds the shipped
        drop-in itself (the documented path for a config with no CRI table).
        """
        os.makedirs(self.confd, exist_ok=True)
        head = f"""version = 2
root = {json.dumps(self.root)}
state = {json.dumps(self.state)}
[grpc]
  address = {json.dumps(self.address)}
[ttrpc]
  address = {json.dumps(self.address + ".ttrpc")}
[debug]
  level = "info"
"""
        if self.mode == "import":
            with open(os.path.join(self.confd, "migrt.toml"), "w") as f:
                f.write(drop_in_for(self.migrt, self.drop_in))
            head = f"imports = [{json.dumps(os.path.join(self.confd, '*.toml'))}]\n" + head
            with open(self.config, "w") as f:
                f.write(head)
            return
        with open(self.config, "w") as f:
            f.write(head + f"""
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = {json.dumps(PAUSE_IMAGE)}
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = {json.dumps(self.confd)}
""")
        drop_in_for(self.migrt, self.drop_in)       # checks the shipped file's BinaryName
        p = subprocess.run([sys.executable, REGISTER, "register", "--config", self.config,
                            "--drop-in", self.drop_in, "--binary", self.migrt],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"containerd_register failed: {p.stderr}")

    def start(self, timeout=30):
        self.write_config()
        env = dict(os.environ)
        # The shim, and so migrt, runc and CRIU, get containerd's environment: give it the
        # PATH systemd gives a service, unless the test asks for another.
        env["PATH"] = f"{self.bin_dir}:{self.path}" if self.bin_dir else self.path
        env.update(self.env)
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen([self.exe, "--config", self.config], stdout=logf,
                                     stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        logf.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited {self.proc.returncode}: {self.tail_log()}")
            if os.path.exists(self.address):
                p = subprocess.run(self.ctr_argv("version"), capture_output=True, timeout=10)
                if p.returncode == 0:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"containerd did not come up: {self.tail_log()}")

    def tail_log(self, n=40):
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def ctr_argv(self, *args, namespace=None):
        return [self.ctr_exe, "--address", self.address, "--namespace", namespace or self.namespace,
                *args]

    def ctr(self, *args, namespace=None, timeout=60, check=True, input=None):
        p = subprocess.run(self.ctr_argv(*args, namespace=namespace), capture_output=True,
                           text=True, timeout=timeout, input=input)
        if check and p.returncode != 0:
            raise CtrError(f"ctr {' '.join(args)} failed ({p.returncode}): "
                           f"{p.stderr.strip()}")
        return p

    def import_image(self, tarball, namespace=None):
        self.ctr("image", "import", tarball, namespace=namespace, timeout=120)

    # --- teardown -------------------------------------------------------------------
    def namespaces(self):
        p = self.ctr("namespace", "ls", "-q", check=False)
        return p.stdout.split() if p.returncode == 0 else []

    def clean_namespace(self, ns):
        for line in self.ctr("task", "ls", "-q", namespace=ns, check=False).stdout.split():
            self.ctr("task", "kill", "-s", "SIGKILL", line, namespace=ns, check=False)
        for line in self.ctr("task", "ls", "-q", namespace=ns, check=False).stdout.split():
            self.ctr("task", "delete", "--force", line, namespace=ns, check=False)
        for line in self.ctr("container", "ls", "-q", namespace=ns, check=False).stdout.split():
            self.ctr("container", "delete", line, namespace=ns, check=False)

    def shim_pids(self):
        pids = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and \
                    self.address.encode() in argv:
                pids.append(int(pid))
        return pids

    def stop(self):
        if self.proc and self.proc.poll() is None:
            for ns in self.namespaces():
                self.clean_namespace(ns)
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in self.shim_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        unmount_under(self.base)
        shutil.rmtree(self.base, ignore_errors=True)
        # the shims' runc roots (/run/containerd/runc/<namespace>) of our own namespaces
        for ns in {self.namespace} - {"k8s.io", "default"}:
            try:
                os.rmdir(os.path.join("/run/containerd/runc", ns))
            except OSError:
                pass


def unmount_under(prefix):
    """Lazily unmount everything mounted at or below `prefix`, deepest first."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    points = [p.replace("\\040", " ") for p in points]
    for p in sorted({p for p in points if p == prefix or p.startswith(prefix + "/")},
                    key=len, reverse=True):
        subprocess.run(["umount", "-l", p], capture_output=True)


def wait_for(pred, timeout=10.0, interval=0.1, what="condition"):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
