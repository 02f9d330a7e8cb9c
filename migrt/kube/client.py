"""A small Kubernetes API client: the user's kubeconfig, HTTPS, JSON.

Why not the `kubernetes` Python package: it pulls in about 20 dependencies (urllib3,
google-auth, requests-oauthlib, websocket-client, ...) for what migrt needs here,
which is a dozen REST calls: get, list, create, patch, delete, and a status update.
This speaks exactly that, with the standard library (http.client and ssl) and pyyaml
for the kubeconfig. Authentication: bearer tokens (also from a file, as service
accounts have them), client certificates (file or inline data), and the in-cluster
configuration of a pod's service account. Exec and auth-provider plugins are not
supported (one clear line says so).
"""
import base64
import http.client
import json
import os
import ssl
import tempfile
import threading
import time
import urllib.parse

IN_CLUSTER = "/var/run/secrets/kubernetes.io/serviceaccount"


class KubeError(Exception):
    """An API call failed: `status` is the HTTP status (0: no answer)."""

    def __init__(self, msg, status=0, reason=None):
        super().__init__(msg)
        self.status = status
        self.reason = reason


class Config:
    def __init__(self, server, namespace="default", token=None, token_file=None, ca=None,
                 cert=None, key=None, insecure=False, context=None):
        self.server = server
        self.namespace = namespace
        self.token = token
        self.token_file = token_file
        self.ca = ca
        self.cert = cert
        self.key = key
        self.insecure = insecure
        self.context = context


def _data_file(data_b64, what):
    """Inline kubeconfig data (base64) as a private temporary file for ssl."""
    raw = base64.b64decode(data_b64)
    fd, path = tempfile.mkstemp(prefix=f"migrt-kube-{what}-")
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    return path


def load_config(kubeconfig=None, context=None, namespace=None):
    """The kubeconfig kubectl would use: --kubeconfig, else $KUBECONFIG (first file),
    else ~/.kube/config, else the pod's service account when run in a cluster."""
    path = kubeconfig or (os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None)
    if path is None:
        home = os.path.expanduser("~/.kube/config")
        if os.path.exists(home):
            path = home
    if path is None and os.path.exists(os.path.join(IN_CLUSTER, "token")):
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise KubeError("in a pod without KUBERNETES_SERVICE_HOST: no API server known")
        ns = namespace
        if ns is None:
            with open(os.path.join(IN_CLUSTER, "namespace")) as f:
                ns = f.read().strip()
        return Config(f"https://{host}:{port}", ns, token_file=os.path.join(IN_CLUSTER, "token"),
                      ca=os.path.join(IN_CLUSTER, "ca.crt"))
    if path is None:
        raise KubeError("no kubeconfig: pass --kubeconfig, set KUBECONFIG, or create "
                        "~/.kube/config")
    import yaml
    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except OSError as e:
        raise KubeError(f"kubeconfig {path}: {e.strerror}")
    except yaml.YAMLError as e:
        raise KubeError(f"kubeconfig {path} is not valid YAML: {str(e).splitlines()[0]}")
    base = os.path.dirname(os.path.abspath(path))

    def named(kind, name):
        for item in doc.get(kind) or []:
            if item.get("name") == name:
                return item.get(kind[:-1]) or {}
        raise KubeError(f"kubeconfig {path}: no {kind[:-1]} named {name!r}")

    ctx_name = context or doc.get("current-context")
    if not ctx_name:
        raise KubeError(f"kubeconfig {path}: no current-context (pass --context)")
    ctx = named("contexts", ctx_name)
    cluster = named("clusters", ctx.get("cluster"))
    user = named("users", ctx.get("user")) if ctx.get("user") else {}

    def rel(p):
        return p if p is None or os.path.isabs(p) else os.path.join(base, p)

    if user.get("exec") or user.get("auth-provider"):
        raise KubeError(f"kubeconfig {path}: user {ctx.get('user')!r} authenticates through "
                        f"an exec or auth-provider plugin, which kubectl-migrt does not run; "
                        f"use a token or a client certificate")
    cfg = Config(cluster.get("server"), namespace or ctx.get("namespace") or "default",
                 token=user.get("token"), token_file=rel(user.get("tokenFile")),
                 ca=rel(cluster.get("certificate-authority")),
                 cert=rel(user.get("client-certificate")), key=rel(user.get("client-key")),
                 insecure=bool(cluster.get("insecure-skip-tls-verify")), context=ctx_name)
    if cluster.get("certificate-authority-data"):
        cfg.ca = _data_file(cluster["certificate-authority-data"], "ca")
    if user.get("client-certificate-data"):
        cfg.cert = _data_file(user["client-certificate-data"], "cert")
    if user.get("client-key-data"):
        cfg.key = _data_file(user["client-key-data"], "key")
    if not cfg.server:
        raise KubeError(f"kubeconfig {path}: cluster {ctx.get('cluster')!r} has no server")
    return cfg


class Client:
    """HTTPS to the API server: one connection per thread, reopened when it drops."""

    def __init__(self, cfg, timeout=30):
        self.cfg = cfg
        self.timeout = timeout
        u = urllib.parse.urlsplit(cfg.server)
        if u.scheme != "https":
            raise KubeError(f"API server {cfg.server}: only https is supported")
        self.host, self.port = u.hostname, u.port or 443
        self.prefix = u.path.rstrip("/")
        ctx = ssl.create_default_context(cafile=cfg.ca) if cfg.ca else \
            ssl.create_default_context()
        # as kubectl (Go's TLS): a cluster CA's certificates without the Authority Key
        # Identifier extension are accepted (Python 3.13 refuses them by default)
        ctx.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
        if cfg.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cfg.cert:
            ctx.load_cert_chain(cfg.cert, cfg.key)
        self.ssl = ctx
        self._local = threading.local()     # one connection per thread (the controller's
                                            # movers run in threads of their own)

    @property
    def conn(self):
        return getattr(self._local, "conn", None)

    @conn.setter
    def conn(self, value):
        self._local.conn = value

    @property
    def namespace(self):
        return self.cfg.namespace

    def _token(self):
        if self.cfg.token:
            return self.cfg.token
        if self.cfg.token_file:
            with open(self.cfg.token_file) as f:
                return f.read().strip()
        return None

    def request(self, method, path, body=None, query=None, content_type="application/json",
                timeout=None):
        url = self.prefix + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json"}
        tok = self._token()
        if tok:
            headers["Authorization"] = f"Bearer {tok}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        # A kept-alive connection the server closed, or a server too busy to accept one
        # (seen on a 2-core test node: resets for a moment): try again, a few times. A
        # request that was sent but got no answer is sent again only if it is a read,
        # or if the connection was reused (the server closed it before reading).
        for attempt in range(6):
            fresh = self.conn is None
            if fresh:
                self.conn = http.client.HTTPSConnection(self.host, self.port, context=self.ssl,
                                                        timeout=timeout or self.timeout)
            sent = False
            try:
                self.conn.request(method, url, body=data, headers=headers)
                sent = True
                resp = self.conn.getresponse()
                raw = resp.read()
                break
            except (http.client.HTTPException, OSError) as e:
                self.conn.close()
                self.conn = None
                again = method == "GET" or not sent or not fresh
                if attempt == 5 or not again:
                    raise KubeError(f"API server {self.cfg.server}: {e}") from None
                time.sleep(min(0.1 * 2 ** attempt, 1.0))
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = {"message": raw[:200].decode(errors="replace")}
        if resp.status >= 400:
            msg = doc.get("message") if isinstance(doc, dict) else None
            raise KubeError(msg or f"{method} {path}: HTTP {resp.status}", resp.status,
                            doc.get("reason") if isinstance(doc, dict) else None)
        return doc

    # -------------------------------------------------------- paths
    @staticmethod
    def path(kind, namespace=None, name=None, sub=None):
        """kind: 'pods', 'nodes', 'events', 'replicasets', 'podmigrations', ..."""
        groups = {"pods": "/api/v1", "nodes": "/api/v1", "events": "/api/v1",
                  "services": "/api/v1", "endpoints": "/api/v1",
                  "replicasets": "/apis/apps/v1", "deployments": "/apis/apps/v1",
                  "statefulsets": "/apis/apps/v1", "jobs": "/apis/batch/v1",
                  "podmigrations": "/apis/migrt.io/v1alpha1",
                  "mutatingwebhookconfigurations": "/apis/admissionregistration.k8s.io/v1"}
        p = groups[kind]
        if namespace is not None:
            p += f"/namespaces/{namespace}"
        p += f"/{kind}"
        if name is not None:
            p += f"/{name}"
        if sub:
            p += f"/{sub}"
        return p

    def get(self, kind, name, namespace=None):
        return self.request("GET", self.path(kind, namespace, name))

    def get_or_none(self, kind, name, namespace=None):
        try:
            return self.get(kind, name, namespace)
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def list(self, kind, namespace=None, **query):
        return self.request("GET", self.path(kind, namespace), query=query).get("items") or []

    def create(self, kind, obj, namespace=None, dry_run=False):
        return self.request("POST", self.path(kind, namespace), obj,
                            query={"dryRun": "All"} if dry_run else None)

    def patch(self, kind, name, patch, namespace=None, sub=None, merge=True, strategic=False):
        ct = "application/strategic-merge-patch+json" if strategic else \
            "application/merge-patch+json" if merge else "application/json-patch+json"
        return self.request("PATCH", self.path(kind, namespace, name, sub), patch,
                            content_type=ct)

    def delete(self, kind, name, namespace=None, grace=None, uid=None):
        body = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace is not None:
            body["gracePeriodSeconds"] = grace
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            return self.request("DELETE", self.path(kind, namespace, name), body)
        except KubeError as e:
            if e.status == 404:
                return None
            raise
