"""A real two-node Kubernetes on this machine, for the tests/kube tier.

One control plane (etcd, kube-apiserver with TLS, client-certificate authentication and
Node,RBAC authorization, kube-controller-manager, kube-scheduler) and two kubelets,
`node-a` and `node-b`, each with a containerd of its own (socket, root, state, runc root)
in which packaging/containerd_register.py registered the `migrt` runtime handler pointing
at the launcher under test, and a `migrt agent`. The binaries are Kubernetes 1.20.2 built
by packaging/build-kubernetes.sh from Debian 12's source package, etcd/kubectl/CNI from
Debian's packages (all under /opt/migrt/test/kubernetes-1.20.2).

Network: each node's CNI config (the bridge plugin, host-local addresses) gives its pods
a bridge and a range of their own (10.N.1.0/24 on mk<tag>a for node-a, 10.N.2.0/24 on
mk<tag>b for node-b), the host being the gateway of both, so pods of one node reach pods
of the other through the host's routes. The nodes' own addresses (what the kubelets and agents bind to) are
/32s on a third, empty bridge (mk<tag>). Everything is undone by `stop()`: pods and sandboxes (netns),
processes, mounts, the bridge, sysctls the kubelet changed.
"""
import base64
import datetime
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
REPO = os.path.dirname(TESTS)
sys.path.insert(0, os.path.join(TESTS, "e2e"))

import cri as crimod  # noqa: E402
import harness  # noqa: E402

KUBE_DIR = os.environ.get("MIGRT_KUBE_DIR", "/opt/migrt/test/kubernetes-1.20.2")
BUILD = os.path.join(REPO, "packaging", "build-kubernetes.sh")
RUNTIMECLASS = os.path.join(REPO, "containerd-config", "runtimeclass.yaml")
IMAGE = harness.IMAGE
PAUSE_IMAGE = harness.PAUSE_IMAGE
NODES = ("node-a", "node-b")
# sysctls kubelet 1.20 sets on start (setupKernelTunables): put back at teardown
KUBELET_SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic",
                   "kernel/panic_on_oops", "kernel/keys/root_maxkeys",
                   "kernel/keys/root_maxbytes")


def built():
    # a build with the reflect2 fix (packaging/build-kubernetes.sh): without it the API
    # server dies on custom resources
    try:
        with open(os.path.join(KUBE_DIR, "COMPLETE")) as f:
            return "reflect2 1.0.2" in f.read()
    except OSError:
        return False


def ensure_built(log):
    """Run packaging/build-kubernetes.sh (it returns at once if already built)."""
    if built():
        return os.path.join(KUBE_DIR, "bin")
    with open(log, "ab") as f:
        p = subprocess.run(["bash", BUILD], stdout=f, stderr=subprocess.STDOUT,
                           env=dict(os.environ, MIGRT_KUBE_DIR=KUBE_DIR))
    if p.returncode != 0 or not built():
        with open(log, errors="replace") as f:
            tail = "".join(f.readlines()[-30:])
        raise RuntimeError(f"packaging/build-kubernetes.sh failed ({p.returncode}):\n{tail}")
    return os.path.join(KUBE_DIR, "bin")


def free_port():
    while True:
        port = random.randint(20000, 60000)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port


def read_sysctl(name):
    with open(f"/proc/sys/{name}") as f:
        return f.read().strip()


def write_sysctl(name, value):
    with open(f"/proc/sys/{name}", "w") as f:
        f.write(value)


# --- certificates ----------------------------------------------------------------------
class PKI:
    """A throwaway CA and the certificates the cluster needs (cryptography library)."""

    def __init__(self, d):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.x509.oid import NameOID
        self.x509, self.hashes, self.ser, self.ec, self.NameOID = x509, hashes, serialization, ec, NameOID
        self.dir = d
        os.makedirs(d, mode=0o700, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "migrt-kube-test-ca")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.ca_name = name
        self.ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                        .public_key(self.ca_key.public_key())
                        .serial_number(x509.random_serial_number())
                        .not_valid_before(now - datetime.timedelta(hours=1))
                        .not_valid_after(now + datetime.timedelta(days=2))
                        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True,
                                                     False, False), critical=True)
                        .sign(self.ca_key, hashes.SHA256()))
        self.ca = self._write("ca.crt", self.ca_cert.public_bytes(serialization.Encoding.PEM))
        # the service-account signing key pair
        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.sa_key = self._write("sa.key", sa.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
        self.sa_pub = self._write("sa.pub", sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def _write(self, name, data):
        path = os.path.join(self.dir, name)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(data)
        return path

    def issue(self, name, cn, orgs=(), dns=(), ips=(), server=False):
        x509, NameOID = self.x509, self.NameOID
        key = self.ec.generate_private_key(self.ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
        now = datetime.datetime.now(datetime.timezone.utc)
        b = (x509.CertificateBuilder().subject_name(x509.Name(attrs)).issuer_name(self.ca_name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(
                 [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH] if server
                 else [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = b.sign(self.ca_key, self.hashes.SHA256())
        crt = self._write(name + ".crt", cert.public_bytes(self.ser.Encoding.PEM))
        k = self._write(name + ".key", key.private_bytes(
            self.ser.Encoding.PEM, self.ser.PrivateFormat.PKCS8, self.ser.NoEncryption()))
        return crt, k

    def kubeconfig(self, path, server, cn, orgs=(), namespace=None):
        crt, key = self.issue(os.path.basename(path).rsplit(".", 1)[0], cn, orgs)

        def b64(p):
            with open(p, "rb") as f:
                return base64.b64encode(f.read()).decode()
        cfg = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": server,
                                                   "certificate-authority-data": b64(self.ca)}}],
            "users": [{"name": "u", "user": {"client-certificate-data": b64(crt),
                                             "client-key-data": b64(key)}}],
            "contexts": [{"name": "c", "context": dict({"cluster": "c", "user": "u"},
                                                      **({"namespace": namespace} if namespace
                                                         else {}))}],
            "current-context": "c",
        }
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(cfg, f)
        return path


# --- processes -------------------------------------------------------------------------
class Proc:
    def __init__(self, name, argv, log, env=None):
        self.name, self.argv, self.log = name, argv, log
        f = open(log, "ab")
        self.p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=env or dict(os.environ),
                                  start_new_session=True)
        f.close()

    def alive(self):
        return self.p.poll() is None

    def tail(self, n=30):
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def check(self):
        if not self.alive():
            raise RuntimeError(f"{self.name} exited {self.p.returncode}:\n{self.tail()}")

    def stop(self, timeout=15):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.p.pid, signal.SIGKILL)       # and anything left in its group
        except ProcessLookupError:
            pass
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            pass


def wait_for(pred, timeout, what, interval=0.2, procs=()):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        for p in procs:
            p.check()
        try:
            last = pred()
        except Exception as e:      # noqa: BLE001 - polled until it holds
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


# --- one node's containerd -------------------------------------------------------------
class NodeContainerd(harness.Containerd):
    """harness.Containerd with the CRI settings a kubelet node needs: CNI bin/conf dirs,
    the local pause image, and a runc root of this node's own for both handlers (the two
    nodes' containers must not share /run/containerd/runc/k8s.io)."""

    def __init__(self, base, migrt, cni_bin, runc_root):
        super().__init__(base, migrt, namespace="k8s.io")
        self.cni_bin = cni_bin
        self.runc_root = runc_root

    def write_config(self):
        os.makedirs(self.confd, exist_ok=True)
        with open(self.config, "w") as f:
            f.write(f"""version = 2
root = {json.dumps(self.root)}
state = {json.dumps(self.state)}
[grpc]
  address = {json.dumps(self.address)}
[ttrpc]
  address = {json.dumps(self.address + ".ttrpc")}
[debug]
  level = "info"

[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = {json.dumps(PAUSE_IMAGE)}
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {json.dumps(self.cni_bin)}
    conf_dir = {json.dumps(self.confd)}
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    Root = {json.dumps(self.runc_root)}
""")
        harness.drop_in_for(self.migrt, self.drop_in)
        p = subprocess.run([sys.executable, harness.REGISTER, "register", "--config", self.config,
                            "--drop-in", self.drop_in, "--binary", self.migrt],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"containerd_register failed: {p.stderr}")
        # The migrt handler's runc root: this node's too. One line added to the options
        # table the register tool wrote (it holds BinaryName only).
        with open(self.config) as f:
            text = f.read()
        line = f"  BinaryName = {json.dumps(self.migrt)}\n"
        assert line in text, text
        text = text.replace(line, line + f"  Root = {json.dumps(self.runc_root)}\n", 1)
        with open(self.config, "w") as f:
            f.write(text)
        import tomllib
        with open(self.config, "rb") as f:
            doc = tomllib.load(f)
        rt = doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
        assert rt["migrt"]["options"] == {"BinaryName": self.migrt, "Root": self.runc_root}, rt

    def sandboxes(self):
        c = crimod.CRI(self.address)
        try:
            f = c.call("ListPodSandbox", b"")
            return [crimod._str(crimod.parse(s), 1) for s in f.get(1, [])]
        finally:
            c.close()

    def remove_sandboxes(self):
        """Stop and remove every pod sandbox through CRI: that releases the CNI address
        and removes the pod's network namespace."""
        c = crimod.CRI(self.address)
        try:
            f = c.call("ListPodSandbox", b"")
            for s in f.get(1, []):
                sid = crimod._str(crimod.parse(s), 1)
                for call in (c.stop_pod, c.remove_pod):
                    try:
                        call(sid)
                    except crimod.CRIError:
                        pass
        finally:
            c.close()


class Node:
    def __init__(self, cluster, name, index):
        self.cluster, self.name, self.index = cluster, name, index
        self.base = os.path.join(cluster.base, name)
        os.makedirs(self.base)
        self.ip = cluster.node_ip(index)
        self.subnet = cluster.pod_subnet(index)
        self.runc_root = os.path.join(self.base, "runc")
        self.bridge = f"{cluster.bridge}{'ab'[index]}"      # made by the CNI bridge plugin
        self.kubelet_dir = os.path.join(self.base, "kubelet")
        self.port = free_port()
        self.healthz = free_port()
        self.agent_port = free_port()
        self.containerd = NodeContainerd(os.path.join(self.base, "ctrd"), cluster.handler_binary,
                                         cluster.cni_bin, self.runc_root)
        # the node's migrt (under containerd) restores what this node's agent staged
        self.staging = os.path.join(self.base, "agent", "staged")
        self.containerd.env["MIGRT_STAGING"] = self.staging
        self.disk = os.path.join(self.base, "agent", "disk")
        self.containerd.env["MIGRT_STAGING_DISK"] = self.disk
        self.kubelet = None
        self.agent = None
        self.holder = None

    @property
    def agent_address(self):
        return f"{self.ip}:{self.agent_port}"

    def write_cni(self):
        net = ipaddress.ip_network(self.subnet)
        conf = {
            "cniVersion": "0.4.0", "name": f"migrt-kube-{self.name}",
            "plugins": [{
                "type": "bridge", "bridge": self.bridge, "isGateway": True,
                "ipMasq": False, "hairpinMode": True,
                "ipam": {"type": "host-local",
                         "ranges": [[{"subnet": str(net), "gateway": str(net.network_address + 1)}]],
                         "routes": [{"dst": "0.0.0.0/0"}],
                         "dataDir": os.path.join(self.base, "ipam")},
            }],
        }
        os.makedirs(self.containerd.confd, exist_ok=True)
        with open(os.path.join(self.containerd.confd, "10-migrt-kube.conflist"), "w") as f:
            json.dump(conf, f)

    def start_mount_ns(self):
        """A mount namespace for this node's containerd and kubelet, where /var/log/pods
        and /var/log/containers are the node's own dirs. The kubelet 1.20 hard-codes
        them, and its garbage collector removes every pod log dir of a pod it does not
        know, which on a shared /var/log/pods is every pod of the other node. The rest of
        the tree is the host's (the cluster's base dir is shared both ways, so the
        rootfs and volume mounts made inside are seen outside, by migrt and the tests)."""
        logs = os.path.join(self.base, "varlog")
        for d in ("pods", "containers"):
            os.makedirs(os.path.join(logs, d), exist_ok=True)
            # the mount points: a fresh machine that never ran a kubelet has neither
            os.makedirs(os.path.join("/var/log", d), exist_ok=True)
        script = (f"mount --bind {logs}/pods /var/log/pods && "
                  f"mount --bind {logs}/containers /var/log/containers && "
                  "echo ready && exec sleep 2147483647")
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "unchanged",
                                        "sh", "-c", script], stdout=subprocess.PIPE,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        line = self.holder.stdout.readline().decode()
        if line.strip() != "ready":
            raise RuntimeError(f"{self.name}: mount namespace not made ({self.holder.wait()})")
        self.nsenter = ["nsenter", "-t", str(self.holder.pid), "-m", "--"]
        wrapper = os.path.join(self.base, "containerd-in-ns")
        with open(wrapper, "w") as f:
            f.write(f"#!/bin/sh\nexec {' '.join(self.nsenter)} containerd \"$@\"\n")
        os.chmod(wrapper, 0o755)
        self.containerd.exe = wrapper

    def start_containerd(self, images):
        self.write_cni()
        self.start_mount_ns()
        self.containerd.start()
        for tar in images:
            self.containerd.import_image(tar, namespace="k8s.io")

    def start_kubelet(self):
        c = self.cluster
        kubeconfig = c.pki.kubeconfig(os.path.join(self.base, "kubelet.kubeconfig"), c.server,
                                      f"system:node:{self.name}", ["system:nodes"])
        os.makedirs(self.kubelet_dir, exist_ok=True)
        argv = self.nsenter + [os.path.join(c.bin, "kubelet"),
                "--kubeconfig", kubeconfig,
                "--root-dir", self.kubelet_dir,
                "--cert-dir", os.path.join(self.base, "kubelet-pki"),
                "--volume-plugin-dir", os.path.join(self.base, "volume-plugins"),
                "--container-runtime", "remote",
                "--container-runtime-endpoint", f"unix://{self.containerd.address}",
                "--runtime-request-timeout", "5m",
                "--cgroup-driver", "cgroupfs", "--cgroups-per-qos=false",
                "--enforce-node-allocatable=", "--eviction-hard=", "--fail-swap-on=false",
                "--image-gc-high-threshold", "100", "--image-gc-low-threshold", "99",
                "--pod-infra-container-image", PAUSE_IMAGE,
                "--hostname-override", self.name, "--node-ip", self.ip,
                "--address", self.ip, "--port", str(self.port), "--read-only-port", "0",
                "--healthz-bind-address", "127.0.0.1", "--healthz-port", str(self.healthz),
                "--client-ca-file", c.pki.ca, "--anonymous-auth=false",
                "--authorization-mode", "AlwaysAllow",
                "--node-labels", "migrt.io/runtime=ready",
                "--make-iptables-util-chains=false",
                "--serialize-image-pulls=false",
                "--node-status-update-frequency", "4s",
                "--v", "2"]
        self.kubelet = Proc(f"kubelet {self.name}", argv, os.path.join(self.base, "kubelet.log"))

    def start_agent(self, env=None):
        """Start the node's `migrt agent` (again, as its supervisor would after a crash);
        `env` adds to its environment (and so to the `migrt migrate` runs it starts)."""
        c = self.cluster
        d = os.path.join(self.base, "agent")
        os.makedirs(d, exist_ok=True)
        # the node's migrt state is one: its shims' and its agent's (restores it made)
        env = dict(os.environ, MIGRT_STATE_DIR=self.containerd.migrt_state, **(env or {}))
        argv = [c.migrt, "--root", os.path.join(self.runc_root, "k8s.io"), "agent", "--listen", self.agent_address,
                "--secret-file", c.secret, "--staging", self.staging,
                "--disk", self.disk, "--log-dir", os.path.join(d, "logs")]
        err = open(os.path.join(d, "stderr"), "ab")
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                             env=env, start_new_session=True)
        err.close()
        line = p.stdout.readline().decode()
        if "listening" not in line:
            p.kill()
            with open(os.path.join(d, "stderr"), errors="replace") as f:
                raise RuntimeError(f"migrt agent on {self.name} did not start: {line} {f.read()}")
        self.agent = p

    def kill_agent(self, sig=signal.SIGKILL):
        """Signal the agent process alone (systemd's KillMode=process: what it started
        in sessions of their own, `migrt migrate` runs, lives on)."""
        if self.agent and self.agent.poll() is None:
            os.kill(self.agent.pid, sig)
            self.agent.wait(30)

    def stop_kubelet(self):
        """Stop the node's kubelet (SIGTERM, as `systemctl stop kubelet`): its pods'
        containers run on under containerd."""
        self.kubelet.stop()
        if self.kubelet in self.cluster.procs:
            self.cluster.procs.remove(self.kubelet)

    def restart_kubelet(self):
        if self.kubelet is not None and self.kubelet.alive():
            self.stop_kubelet()
        self.start_kubelet()
        self.cluster.procs.append(self.kubelet)

    def stop(self):
        if self.agent and self.agent.poll() is None:
            os.killpg(self.agent.pid, signal.SIGTERM)
            try:
                self.agent.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.agent.pid, signal.SIGKILL)
                self.agent.wait(5)
        if self.kubelet:
            self.kubelet.stop()
        if self.containerd.proc and self.containerd.proc.poll() is None:
            try:
                self.containerd.remove_sandboxes()
            except Exception:       # noqa: BLE001 - teardown goes on
                pass
        self.containerd.stop()       # tasks, shims, mounts, its dirs
        if self.holder and self.holder.poll() is None:
            os.killpg(self.holder.pid, signal.SIGKILL)
            self.holder.wait(5)
        harness.unmount_under(self.base)


# --- pods ------------------------------------------------------------------------------
def pod_manifest(name, command, runtime_class="migrt", node=None, env=None, **container):
    """A one-container busybox pod; `container` adds to (or overrides) its container."""
    c = {"name": "main", "image": IMAGE, "imagePullPolicy": "Never",
         "command": ["sh", "-c", command]}
    if env:
        c["env"] = [{"name": k, "value": v} for k, v in env.items()]
    c.update(container)
    spec = {"containers": [c], "terminationGracePeriodSeconds": 5,
            "automountServiceAccountToken": True}
    if runtime_class:
        spec["runtimeClassName"] = runtime_class
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": spec}


def _cond(pod, kind):
    return any(c["type"] == kind and c["status"] == "True"
               for c in pod.get("status", {}).get("conditions", []))


def container_id(pod, name="main"):
    for s in pod.get("status", {}).get("containerStatuses", []):
        if s["name"] == name and s.get("containerID"):
            return s["containerID"].split("://", 1)[1]
    return None


def restart_count(pod, name="main"):
    for s in pod.get("status", {}).get("containerStatuses", []):
        if s["name"] == name:
            return s["restartCount"]
    return None


class PodOps:
    """Mixed into Cluster: make pods, wait for them, read them."""

    def pod(self, name):
        return self.get("pod", name)

    def run_pod(self, manifest, ready=True, timeout=90):
        self.apply(manifest)
        return self.wait_pod(manifest["metadata"]["name"], "Ready" if ready else "Running",
                             timeout=timeout)

    def wait_pod(self, name, state="Ready", timeout=90):
        def ok():
            p = self.pod(name)
            if state == "Ready":
                return p if _cond(p, "Ready") else None
            return p if p.get("status", {}).get("phase") == state else None
        try:
            return wait_for(ok, timeout, f"pod {name} {state}", interval=0.3, procs=self.procs)
        except AssertionError as e:
            desc = self.kubectl("describe", "pod", name, check=False).stdout
            raise AssertionError(f"{e}\n{desc[-3000:]}") from None

    def wait_gone(self, name, timeout=120):
        wait_for(lambda: self.kubectl("get", "pod", name, check=False).returncode != 0,
                 timeout, f"pod {name} gone", interval=0.3)

    def delete_pod(self, name, *extra):
        self.kubectl("delete", "pod", name, "--wait=false", *extra, check=False)

    def exec(self, name, *argv, check=True, timeout=60):
        return self.kubectl("exec", name, "--", *argv, check=check, timeout=timeout)

    def logs(self, name, *extra):
        return self.kubectl("logs", name, *extra).stdout

    def node_of(self, pod):
        return self.nodes[pod["spec"]["nodeName"]]

    def follow_logs(self, name, *extra):
        """`kubectl logs -f` in the background: (its process, the lines read so far)."""
        proc = subprocess.Popen(self.kubectl_argv("logs", "-f", name, *extra),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []

        def read():
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
        threading.Thread(target=read, daemon=True).start()
        return proc, lines


class Cluster(PodOps):
    """Start with `start()`, tear down with `stop()`; `kubectl(...)` talks to it as admin."""

    def __init__(self, base, bin_dir, migrt, images, handler_binary=None):
        self.base = base
        self.bin = bin_dir
        self.cni_bin = os.path.join(KUBE_DIR, "cni")
        self.migrt = migrt                                  # for agents, checkpoints
        self.handler_binary = handler_binary or migrt       # the migrt handler's BinaryName
        self.images = images
        self.tag = uuid.uuid4().hex[:6]
        self.bridge = f"mk{self.tag}"     # the nodes' addresses; the pods' bridges: +a, +b
        # the tests' pods live in a namespace of this cluster's own: the kubelets' pod
        # logs (/var/log/pods/<namespace>_*) are told apart from any other cluster's
        self.namespace = f"mk-{self.tag}"
        self.net = self._pick_net()
        self.procs = []
        self.nodes = {}
        self.saved_sysctls = {}
        self.bridge_made = False
        self.timings = {}

    # addresses: 10.N.0.11/.12 the nodes, 10.N.1.0/24 and 10.N.2.0/24 their pods,
    # 10.N.128.0/24 the service range (no kube-proxy here: only the apiserver uses it)
    def _pick_net(self):
        used = subprocess.run(["ip", "-4", "route", "show", "table", "all"],
                              capture_output=True, text=True).stdout
        for _ in range(100):
            n = random.randint(100, 250)
            if f"10.{n}." not in used:
                return n
        raise RuntimeError("no free 10.N.0.0/16 for the test cluster")

    def node_ip(self, i):
        return f"10.{self.net}.0.{11 + i}"

    def pod_subnet(self, i):
        return f"10.{self.net}.{1 + i}.0/24"

    @property
    def kubeconfig(self):
        return os.path.join(self.base, "admin.kubeconfig")

    def kubectl_argv(self, *args):
        return [os.path.join(self.bin, "kubectl"), "--kubeconfig", self.kubeconfig, *args]

    def kubectl(self, *args, input=None, timeout=120, check=True):
        p = subprocess.run(self.kubectl_argv(*args), capture_output=True, text=True,
                           input=input, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({p.returncode}): "
                                 f"{p.stderr.strip()}")
        return p

    def get(self, *args):
        return json.loads(self.kubectl("get", "-o", "json", *args).stdout)

    def apply(self, obj):
        return self.kubectl("apply", "-f", "-", input=json.dumps(obj) if not isinstance(obj, str) else obj)

    # --- bring-up ----------------------------------------------------------------------
    def start(self):
        t0 = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.timings["start_s"] = round(time.monotonic() - t0, 1)
        return self

    def _start(self):
        os.makedirs(self.base, exist_ok=True)
        for name in KUBELET_SYSCTLS + ("net/ipv4/ip_forward",):
            self.saved_sysctls[name] = read_sysctl(name)
        write_sysctl("net/ipv4/ip_forward", "1")
        subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], check=True)
        self.bridge_made = True
        subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True)
        for i in range(len(NODES)):
            subprocess.run(["ip", "addr", "add", f"{self.node_ip(i)}/32", "dev", self.bridge],
                           check=True)

        # the base dir shared both ways with the nodes' mount namespaces (see Node)
        subprocess.run(["mount", "--bind", self.base, self.base], check=True)
        subprocess.run(["mount", "--make-rshared", self.base], check=True)
        self.pki = PKI(os.path.join(self.base, "pki"))
        self.secret = os.path.join(self.base, "agent-secret")
        with open(os.open(self.secret, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(uuid.uuid4().hex + uuid.uuid4().hex)

        # etcd
        etcd_client, etcd_peer = free_port(), free_port()
        self.etcd = self._proc("etcd", [
            os.path.join(self.bin, "etcd"), "--name", "kube",
            "--data-dir", os.path.join(self.base, "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"kube=http://127.0.0.1:{etcd_peer}",
            "--initial-cluster-state", "new"])

        # kube-apiserver
        self.api_port = free_port()
        self.server = f"https://127.0.0.1:{self.api_port}"
        api_crt, api_key = self.pki.issue(
            "apiserver", "kube-apiserver", dns=["localhost", "kubernetes", "kubernetes.default",
                                                "kubernetes.default.svc"],
            ips=["127.0.0.1", self.node_ip(0), f"10.{self.net}.128.1"], server=True)
        kc_crt, kc_key = self.pki.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                                        ["system:masters"])
        self.apiserver = self._proc("kube-apiserver", [
            os.path.join(self.bin, "kube-apiserver"),
            "--etcd-servers", f"http://127.0.0.1:{etcd_client}",
            "--bind-address", "127.0.0.1", "--secure-port", str(self.api_port),
            "--insecure-port", "0", "--advertise-address", self.node_ip(0),
            "--tls-cert-file", api_crt, "--tls-private-key-file", api_key,
            "--client-ca-file", self.pki.ca,
            "--authorization-mode", "Node,RBAC",
            "--enable-admission-plugins", "NodeRestriction",
            "--service-cluster-ip-range", f"10.{self.net}.128.0/24",
            "--service-account-key-file", self.pki.sa_pub,
            "--service-account-signing-key-file", self.pki.sa_key,
            "--service-account-issuer", "https://kubernetes.default.svc",
            "--kubelet-client-certificate", kc_crt, "--kubelet-client-key", kc_key,
            "--kubelet-preferred-address-types", "InternalIP",
            "--allow-privileged=true", "--v", "1"])
        self.pki.kubeconfig(self.kubeconfig, self.server, "migrt-kube-admin", ["system:masters"],
                            namespace=self.namespace)
        wait_for(lambda: self.kubectl("get", "--raw", "/readyz", check=False).returncode == 0,
                 90, "kube-apiserver /readyz", procs=[self.etcd, self.apiserver])
        self.timings["apiserver_s"] = round(time.monotonic() - self._t0, 1)

        # controller manager and scheduler, each with its own identity (RBAC gives it
        # exactly the bootstrap role of that name)
        cm_kc = self.pki.kubeconfig(os.path.join(self.base, "cm.kubeconfig"), self.server,
                                    "system:kube-controller-manager")
        self._proc("kube-controller-manager", [
            os.path.join(self.bin, "kube-controller-manager"), "--kubeconfig", cm_kc,
            "--authentication-kubeconfig", cm_kc, "--authorization-kubeconfig", cm_kc,
            "--bind-address", "127.0.0.1", "--secure-port", str(free_port()), "--port", "0",
            "--service-account-private-key-file", self.pki.sa_key,
            "--root-ca-file", self.pki.ca, "--use-service-account-credentials=true",
            "--leader-elect=false", "--controllers", "*",
            "--node-monitor-grace-period", "60s", "--v", "1"])
        sch_kc = self.pki.kubeconfig(os.path.join(self.base, "sched.kubeconfig"), self.server,
                                     "system:kube-scheduler")
        self._proc("kube-scheduler", [
            os.path.join(self.bin, "kube-scheduler"), "--kubeconfig", sch_kc,
            "--authentication-kubeconfig", sch_kc, "--authorization-kubeconfig", sch_kc,
            "--bind-address", "127.0.0.1", "--secure-port", str(free_port()), "--port", "0",
            "--leader-elect=false", "--v", "1"])

        self.kubectl("apply", "-f", RUNTIMECLASS)
        self.kubectl("create", "namespace", self.namespace)

        # nodes: containerds first (the image import is the slow part), then kubelets
        for i, name in enumerate(NODES):
            self.nodes[name] = Node(self, name, i)
        for n in self.nodes.values():
            n.start_containerd(self.images)
        for n in self.nodes.values():
            n.start_kubelet()
            self.procs.append(n.kubelet)
        for n in self.nodes.values():
            n.start_agent()

        def ready():
            nodes = self.get("nodes")["items"]
            ok = {n["metadata"]["name"] for n in nodes
                  if any(c["type"] == "Ready" and c["status"] == "True"
                         for c in n["status"].get("conditions", []))}
            return ok >= set(NODES)
        wait_for(ready, 120, "both nodes Ready", interval=0.5, procs=self.procs)
        # the default service account exists before pods are made in "default"
        wait_for(lambda: self.kubectl("get", "serviceaccount", "default", check=False)
                 .returncode == 0, 60, "the default service account", procs=self.procs)

    def _proc(self, name, argv):
        if not hasattr(self, "_t0"):
            self._t0 = time.monotonic()
        p = Proc(name, argv, os.path.join(self.base, f"{name}.log"))
        self.procs.append(p)
        return p

    def check_alive(self):
        for p in self.procs:
            p.check()

    # --- teardown ----------------------------------------------------------------------
    def stop(self):
        # pods first, so that the kubelets stop their sandboxes (netns, CNI addresses)
        if os.path.exists(self.kubeconfig) and getattr(self, "apiserver", None) \
                and self.apiserver.alive():
            self.kubectl("delete", "pods", "--all", "--all-namespaces", "--grace-period=0",
                         "--force", "--wait=false", check=False, timeout=60)
        for n in self.nodes.values():
            n.stop()
        for p in reversed(self.procs):
            p.stop()
        harness.unmount_under(self.base)
        for d in ("/var/log/pods", "/var/log/containers"):
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for n in names:
                # pods: <namespace>_<pod>_<uid>; containers: <pod>_<namespace>_<ctr>-<id>.log
                if n.startswith(self.namespace + "_") or f"_{self.namespace}_" in n:
                    p = os.path.join(d, n)
                    if os.path.islink(p) or not os.path.isdir(p):
                        os.unlink(p)
                    else:
                        shutil.rmtree(p, ignore_errors=True)
        if self.bridge_made:
            for link in (self.bridge, self.bridge + "a", self.bridge + "b"):
                subprocess.run(["ip", "link", "del", link], capture_output=True)
        for name, value in self.saved_sysctls.items():
            try:
                write_sysctl(name, value)
            except OSError:
                pass
        shutil.rmtree(self.base, ignore_errors=True)


def make_base():
    # short: containerd's socket path lives under it
    return tempfile.mkdtemp(prefix="mk-", dir="/run")

