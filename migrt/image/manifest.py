"""The manifest of a migrt checkpoint image: what is in it and what it was made on.

`<image>/migrt/manifest.json` lists every file of the image (CRIU's files as runc wrote
them, migrt's spec copy and the rootfs diff) with its size and xxhash digests, and the
versions, architecture and CPU features of the source node. It is validated against a
JSON Schema before anything in it is trusted.
"""
import json
import os
import platform
import re
import subprocess
import time

import jsonschema

from migrt.errors import CheckpointError
from migrt.runc import criu_path
from migrt.image import digest

FORMAT = "migrt-image/1"
MANIFEST = "migrt/manifest.json"
SPEC = "migrt/config.json"

_HEX = {"type": "string", "pattern": "^[0-9a-f]{16,32}$"}
_REL = {"type": "string", "minLength": 1, "maxLength": 4096,
        "not": {"pattern": "(^/|(^|/)\\.\\.(/|$))"}}

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["format", "created", "container", "node", "chunk_size", "files", "rootfs"],
    "properties": {
        "format": {"const": FORMAT},
        "created": {"type": "string"},
        "container": {
            "type": "object", "required": ["id"],
            "properties": {"id": {"type": "string"}, "bundle": {"type": "string"},
                           "pid": {"type": "integer"}, "status": {"type": "string"},
                           "namespace": {"type": "string"}},
        },
        "node": {
            "type": "object", "required": ["arch", "kernel"],
            "properties": {"arch": {"type": "string"}, "kernel": {"type": "string"},
                           "runc": {"type": "string"}, "criu": {"type": "string"},
                           "migrt": {"type": "string"},
                           "cpu_flags": {"type": "array", "items": {"type": "string"}},
                           "hostname": {"type": "string"}},
        },
        "criu_flags": {"type": "array", "items": {"type": "string"}},
        "chunk_size": {"type": "integer", "minimum": 4096, "maximum": 1 << 30},
        "files": {
            "type": "array",
            "items": {
                "type": "object", "required": ["path", "size", "xxh3", "chunks"],
                "additionalProperties": False,
                "properties": {"path": _REL, "size": {"type": "integer", "minimum": 0},
                               "xxh3": _HEX, "chunks": {"type": "array", "items": _HEX}},
            },
        },
        "rootfs": {
            "type": "object", "required": ["kind"],
            "properties": {
                "kind": {"enum": ["overlay", "base", "since-start", "none", "engine"]},
                "base": {"type": "string"},
                "bytes": {"type": "integer"},
                "entries": {"type": "array", "items": {
                    "type": "object", "required": ["path", "type", "mode", "uid", "gid", "mtime"],
                    "properties": {"path": _REL, "type": {"enum": ["file", "dir", "symlink"]},
                                   "mode": {"type": "integer"}, "uid": {"type": "integer"},
                                   "gid": {"type": "integer"}, "mtime": {"type": "integer"},
                                   "size": {"type": "integer"}, "target": {"type": "string"}}}},
                "deleted": {"type": "array", "items": _REL},
                "listings": {"type": "object", "additionalProperties": {
                    "type": "array", "items": {"type": "string"}}},
            },
        },
        "processes": {"type": "array"},
        "migration": {"type": "object"},
    },
}


def _version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for line in out.splitlines():
        line = line.strip()
        if line.lower().startswith(("runc version", "version:")):
            return line.split()[-1]
    return out.split("\n")[0].strip() or "unknown"


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def boot_id():
    """This kernel's boot id: two agents that report the same one share a machine."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


_NODE = None


def node_info():
    """This node's facts; runc and CRIU are asked once per process (a migration needs
    them before the freeze and again, inside the downtime, for the manifest)."""
    global _NODE
    if _NODE is None:
        from migrt import __version__
        u = os.uname()
        _NODE = {"arch": platform.machine(), "kernel": u.release, "hostname": u.nodename,
                 "runc": _version([os.environ.get("MIGRT_RUNC", "runc"), "--version"]),
                 "criu": _version([criu_path(), "--version"]), "migrt": __version__,
                 "cpu_flags": cpu_flags()}
    return json.loads(json.dumps(_NODE))


def file_entries(image_dir, skip=(MANIFEST,), chunk=digest.CHUNK, extra_dirs=None):
    """Digest every regular file under image_dir (and rel->dir pairs in extra_dirs)."""
    out = []
    roots = [("", image_dir)] + sorted((extra_dirs or {}).items())
    for prefix, top in roots:
        for rel in digest.walk_files(top):
            name = os.path.join(prefix, rel) if prefix else rel
            if name in skip or (prefix == "" and any(name.startswith(p + "/") for p in (extra_dirs or {}))):
                continue
            size, whole, chunks = digest.file_digests(os.path.join(top, rel), chunk)
            out.append({"path": name, "size": size, "xxh3": whole, "chunks": chunks})
    return sorted(out, key=lambda e: e["path"])


def write(image_dir, manifest):
    path = os.path.join(image_dir, MANIFEST)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)


def parse(data, where=MANIFEST):
    """Parse and validate manifest bytes; CheckpointError naming `where` if bad."""
    try:
        m = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # deep nesting
        raise CheckpointError(f"{where}: not valid JSON ({e})")
    e = jsonschema.exceptions.best_match(_validator().iter_errors(m))
    if e is not None:
        loc = "/".join(str(p) for p in e.absolute_path) or "(top)"
        raise CheckpointError(f"{where}: invalid manifest at {loc}: {e.message[:200]}")
    for i, entry in enumerate(m["files"]):
        bad = file_entry_error(entry)
        if bad is not None:
            loc = "/".join(str(x) for x in ("files", i, bad[0]) if x != "")
            raise CheckpointError(f"{where}: invalid manifest at {loc}: {bad[1]}")
    return m


# The "files" entries are checked by file_entry_error, not by jsonschema: there is one
# per image file, and jsonschema took 60 us each (5 ms of a busybox counter's downtime,
# where the destination validates the manifest). The rule is still SCHEMA's: the check
# applies exactly its "files" item (tests/unit/test_image.py compares the two verdicts
# on many good and bad entries), only stricter on two points jsonschema lets through: a
# number like 12.0 as an integer, and a digest with a newline after it.
_FILE_KEYS = ("path", "size", "xxh3", "chunks")
_HEX_RE = re.compile(_HEX["pattern"][1:-1])
_NOT_REL_RE = re.compile(_REL["not"]["pattern"])


def _is_rel(v):
    return (type(v) is str and _REL["minLength"] <= len(v) <= _REL["maxLength"]
            and not _NOT_REL_RE.search(v))


def _is_hex(v):
    return type(v) is str and _HEX_RE.fullmatch(v) is not None


def file_entry_error(e):
    """None if e is a valid "files" entry of SCHEMA, else (where in it, what is wrong)."""
    if type(e) is not dict:
        return "", "not an object"
    for k in _FILE_KEYS:
        if k not in e:
            return "", f"{k!r} is a required property"
    if len(e) != len(_FILE_KEYS):
        return "", f"unexpected properties {sorted(set(e) - set(_FILE_KEYS))}"
    if not _is_rel(e["path"]):
        return "path", "not a relative path inside the image"
    if type(e["size"]) is not int or e["size"] < 0:
        return "size", "not an integer of at least 0"
    if not _is_hex(e["xxh3"]):
        return "xxh3", "not a hex digest"
    if type(e["chunks"]) is not list:
        return "chunks", "not an array"
    for j, c in enumerate(e["chunks"]):
        if not _is_hex(c):
            return f"chunks/{j}", "not a hex digest"
    return None


_VALIDATOR = []


def _validator():
    """One validator for the process: jsonschema.validate() checks the schema itself
    and builds a validator on every call, five times the cost of the validation
    (and a manifest is validated three times within a migration's downtime). It
    validates SCHEMA with "files" only required to be an array of objects: its entries
    are file_entry_error's."""
    if not _VALIDATOR:
        schema = json.loads(json.dumps(SCHEMA))
        schema["properties"]["files"]["items"] = {"type": "object"}
        _VALIDATOR.append(jsonschema.validators.validator_for(schema)(schema))
    return _VALIDATOR[0]


def load(image_dir, validated=None):
    """The image's manifest, parsed and validated. validated(stat): True if the file
    with this stat (of the descriptor read) was validated already on this node: then
    it is only parsed."""
    path = os.path.join(image_dir, MANIFEST)
    from migrt.safeio import open_regular
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(64 << 20)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a migrt image)")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror}")
    if validated is not None and validated(st):
        try:
            m = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            m = None
        if isinstance(m, dict):
            return m
    return parse(data, path)


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# the pod namespace, as containerd's CRI plugin and CRI-O annotate a container's bundle
NAMESPACE_ANNOTATIONS = ("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace")


def pod_namespace(spec):
    """The Kubernetes namespace of the pod a bundle belongs to, None outside Kubernetes."""
    ann = (spec or {}).get("annotations") or {}
    for key in NAMESPACE_ANNOTATIONS:
        v = ann.get(key)
        if isinstance(v, str) and v:
            return v
    return None
