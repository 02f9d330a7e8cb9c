#!/usr/bin/env python3
"""Set (or with value "-", remove) a label on a Kubernetes node, from inside a pod.

Uses the pod's service account and the API server's in-cluster address; standard library
only, so the DaemonSet image needs no kubectl. Usage: label_node.py NODE KEY VALUE|-
"""
import json
import os
import ssl
import sys
import urllib.request

SA = "/var/run/secrets/kubernetes.io/serviceaccount"


def patch(node, key, value):
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    with open(os.path.join(SA, "token")) as f:
        token = f.read().strip()
    body = json.dumps({"metadata": {"labels": {key: None if value == "-" else value}}})
    req = urllib.request.Request(
        f"https://{host}:{port}/api/v1/nodes/{node}", data=body.encode(), method="PATCH",
        headers={"Authorization": f"Bearer {token}",
                 "Content-Type": "application/merge-patch+json"})
    ctx = ssl.create_default_context(cafile=os.path.join(SA, "ca.crt"))
    with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
        return r.status


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    print(f"node {sys.argv[1]}: {sys.argv[2]}={sys.argv[3]} ({patch(*sys.argv[1:])})")
