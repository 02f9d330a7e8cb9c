"""The controller's mutating admission webhook: a StatefulSet pod's replacement lands on
the target node and restores from the staged copy (migrt.kube.statefulset).

A StatefulSet pod keeps its name, so its new copy can only be created once the old pod
object is gone, and the StatefulSet controller creates it, from its template. The
webhook is how that creation gets the move's two changes: `spec.nodeName` (the target
node: no scheduling, the staged copy is there) and `MIGRT_RESTORE_FROM=staged:<mid>` in
the container's environment (migrt's create restores instead of starting afresh).

Scope: the controller manages the MutatingWebhookConfiguration `migrt-controller`
(packaging/kube/controller-webhook.yaml ships it, the controller writes its caBundle,
its address and its objectSelector). While no StatefulSet pod is being moved the
selector matches no pod; during a move it matches only pods labelled with that pod's
name (`statefulset.kubernetes.io/pod-name`) and revision (`controller-revision-hash`),
so no other pod's creation ever waits for this webhook. failurePolicy is Fail: if the
controller is down when the StatefulSet controller recreates the pod, the create is
refused and retried (with its backoff) until the controller is back, instead of the
pod starting afresh from its template while its state waits on the target node.

TLS: the controller makes a CA and a serving certificate for its address at start
(the `cryptography` package), and writes the CA into the configuration's caBundle.
"""
import base64
import datetime
import ipaddress
import json
import os
import ssl
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = "migrt-controller"                   # the MutatingWebhookConfiguration
HOOK = "statefulset-restore.migrt.io"       # its one webhook
PATH = "/mutate-pods"
POD_NAME = "statefulset.kubernetes.io/pod-name"
REVISION = "controller-revision-hash"
# matches no pod (no move waiting): a label nobody sets
IDLE = {"matchExpressions": [{"key": "migrt.io/no-move-waiting", "operator": "Exists"}]}
TIMEOUT = int(os.environ.get("MIGRT_WEBHOOK_TIMEOUT", "5"))


def log(msg):
    sys.stderr.write(f"{datetime.datetime.now(datetime.timezone.utc).isoformat()[:23]}Z "
                     f"migrt-controller: webhook: {msg}\n")
    sys.stderr.flush()


def serving_identity(hosts):
    """(CA PEM, certificate PEM, key PEM): a CA of this controller's own and a serving
    certificate it signed for `hosts` (IP addresses or DNS names)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "migrt-controller webhook CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=10))
          .not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       crl_sign=True, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=10))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (ca.public_bytes(pem), cert.public_bytes(pem),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def restore_patch(pod, target, mid, pm_name):
    """The JSON patch that puts `pod` (a StatefulSet's new pod) on `target` restoring
    from staged migration `mid`."""
    ops = [{"op": "add", "path": "/spec/nodeName", "value": target}]
    c = (pod.get("spec") or {}).get("containers") or [{}]
    env = [e for e in c[0].get("env") or [] if e.get("name") != "MIGRT_RESTORE_FROM"]
    env.append({"name": "MIGRT_RESTORE_FROM", "value": f"staged:{mid}"})
    ops.append({"op": "add", "path": "/spec/containers/0/env", "value": env})
    ann = dict((pod.get("metadata") or {}).get("annotations") or {})
    ann.update({"migrt.io/migration-id": mid, "migrt.io/podmigration": pm_name})
    ops.append({"op": "add", "path": "/metadata/annotations", "value": ann})
    return ops


class Webhook:
    """The HTTPS server and the configuration it keeps up to date."""

    def __init__(self, kube, listen, url=None, service=None):
        self.kube = kube
        host, _, port = listen.rpartition(":")
        self.listen = (host or "0.0.0.0", int(port))
        if url:
            self.client_config = {"url": url}
            hosts = [urllib.parse.urlsplit(url).hostname]
        elif service:
            ns, _, rest = service.partition("/")
            name, _, sport = rest.partition(":")
            self.client_config = {"service": {"namespace": ns, "name": name, "path": PATH,
                                              "port": int(sport or 443)}}
            hosts = [f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
        else:
            raise ValueError("the webhook needs --webhook-url or --webhook-service")
        self.ca, cert, key = serving_identity(hosts)
        self.expected = {}          # (namespace, pod) -> {mid, target, pm, revision}
        self.seen = {}              # (namespace, pod, mid) -> time of a call (dry run or not)
        self.lock = threading.Lock()
        self.synced = None          # the webhooks list last written
        d = tempfile.mkdtemp(prefix="migrt-webhook-")
        for n, data in (("tls.crt", cert), ("tls.key", key)):
            with open(os.open(os.path.join(d, n), os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(data)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ctx.load_cert_chain(os.path.join(d, "tls.crt"), os.path.join(d, "tls.key"))
        for n in ("tls.crt", "tls.key"):
            os.unlink(os.path.join(d, n))
        os.rmdir(d)
        self.server = None
        self.error = None           # why StatefulSet moves cannot be done, if so

    # ------------------------------------------------------------ server
    def start(self):
        hook = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):      # the controller logs what matters
                pass

            def do_POST(self):
                try:
                    n = int(self.headers.get("Content-Length") or 0)
                    review = json.loads(self.rfile.read(min(n, 4 << 20)))
                    body = json.dumps(hook.review(review)).encode()
                    code = 200
                except Exception as e:      # noqa: BLE001 - answered, and logged
                    log(f"bad request: {type(e).__name__}: {e}")
                    body, code = b'{"error": "bad admission review"}', 400
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(self.listen, Handler)
        self.server.daemon_threads = True
        self.server.socket = self.ctx.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        log(f"serving on {self.listen[0]}:{self.server.server_address[1]} "
            f"({self.client_config})")
        # a restarted controller: the moves under way keep their pods selected (a
        # selector narrowed to none, even for a moment, would let the StatefulSet start
        # such a pod afresh)
        from migrt.kube import statefulset
        try:
            for pm in self.kube.list("podmigrations"):
                w = statefulset.expectation(pm)
                if w is not None:
                    with self.lock:
                        self.expected[(pm["metadata"]["namespace"],
                                       (pm.get("status") or {}).get("sourcePod"))] = w
        except Exception as e:      # noqa: BLE001 - then the written selector is kept
            self.error = f"PodMigrations unreadable at start ({e})"
            log(f"{self.error}; the configuration is written at the next move's step")
            return
        self.sync()

    def review(self, review):
        req = review.get("request") or {}
        resp = {"uid": req.get("uid"), "allowed": True}
        out = {"apiVersion": review.get("apiVersion") or "admission.k8s.io/v1",
               "kind": "AdmissionReview", "response": resp}
        obj = req.get("object") or {}
        md = obj.get("metadata") or {}
        if req.get("kind", {}).get("kind") != "Pod" or req.get("operation") != "CREATE":
            return out
        ns = req.get("namespace") or md.get("namespace")
        name = md.get("name") or req.get("name")
        want = self.lookup(ns, name)
        if want is None:
            return out
        labels = md.get("labels") or {}
        if want.get("revision") and labels.get(REVISION) != want["revision"]:
            log(f"{ns}/{name}: created from revision {labels.get(REVISION)}, not "
                f"{want['revision']}: left as it is")
            return out
        with self.lock:
            self.seen[(ns, name, want["mid"])] = time.time()
        patch = restore_patch(obj, want["target"], want["mid"], want["pm"])
        resp["patchType"] = "JSONPatch"
        resp["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
        if not req.get("dryRun"):
            log(f"{ns}/{name}: put on {want['target']}, restoring staged:{want['mid']}")
        return out

    def lookup(self, ns, name):
        with self.lock:
            want = self.expected.get((ns, name))
        if want is not None:
            return want
        # a restarted controller whose mover has not taken its move up again yet: the
        # PodMigration's status says it all
        from migrt.kube import statefulset
        try:
            for pm in self.kube.list("podmigrations", ns):
                w = statefulset.expectation(pm)
                if w is not None and (pm.get("spec") or {}).get("pod") == name:
                    return w
        except Exception as e:      # noqa: BLE001
            log(f"{ns}/{name}: PodMigrations unreadable: {e}")
        return None

    # ------------------------------------------------------------ expectations
    def expect(self, ns, pod, mid, target, pm, revision):
        with self.lock:
            self.expected[(ns, pod)] = {"mid": mid, "target": target, "pm": pm,
                                        "revision": revision}
        self.sync()

    def forget(self, ns, pod):
        with self.lock:
            gone = self.expected.pop((ns, pod), None)
            for k in [k for k in self.seen if k[:2] == (ns, pod)]:
                del self.seen[k]
        if gone is not None:
            self.sync()

    def was_seen(self, ns, pod, mid):
        with self.lock:
            return (ns, pod, mid) in self.seen

    def selector(self):
        with self.lock:
            want = list(self.expected.items())
        if not want:
            return IDLE
        names = sorted({p for (_, p), _ in want})
        revs = sorted({w["revision"] for _, w in want if w.get("revision")})
        exprs = [{"key": POD_NAME, "operator": "In", "values": names}]
        if revs:
            exprs.append({"key": REVISION, "operator": "In", "values": revs})
        return {"matchExpressions": exprs}

    def config(self):
        cc = dict(self.client_config, caBundle=base64.b64encode(self.ca).decode())
        if "service" in cc:
            cc["service"] = dict(cc["service"])
        else:
            cc["url"] = cc["url"]
        return [{"name": HOOK, "clientConfig": cc,
                 "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                            "resources": ["pods"], "scope": "Namespaced"}],
                 "objectSelector": self.selector(),
                 "failurePolicy": "Fail", "sideEffects": "None", "matchPolicy": "Equivalent",
                 "admissionReviewVersions": ["v1"], "timeoutSeconds": TIMEOUT,
                 "reinvocationPolicy": "Never"}]

    def sync(self):
        """Write the configuration (address, caBundle, selector). Sets self.error when
        it cannot be written (StatefulSet moves are then refused with that line)."""
        hooks = self.config()
        from migrt.kube.client import KubeError
        try:
            self.kube.patch("mutatingwebhookconfigurations", NAME, {"webhooks": hooks})
            self.synced = hooks
            self.error = None
        except KubeError as e:
            self.error = (f"the MutatingWebhookConfiguration {NAME} cannot be written ({e}); "
                          f"apply packaging/kube/controller-webhook.yaml")
            log(self.error)
            raise
