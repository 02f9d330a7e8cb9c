"""The node-wide plugin config (/etc/migrt/config.yaml, or MIGRT_CONFIG), validated
with a JSON Schema built from the installed plugins' option schemas.

An unknown key or a wrong type is an error that names the key
(`plugins.gpu.lock_timeout_ms: 'soon' is not of type 'integer'`). The validated result
is written as a JSON cache that migrt.plugins.gate reads on the hot path.

Example:
    plugins:
      rdma:
        timeout: 20          # seconds to wait for the workload's acknowledgement
      gpu:
        enabled: false       # no detection on this node (a bundle may still ask)
    plugin_path: [/opt/site/migrt-plugins]
"""
import json
import os

from migrt.plugins import gate as hookgate
from migrt.errors import MigrtError

BASE_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "migrt node config",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "plugins": {"type": "object", "additionalProperties": False, "properties": {}},
        "plugin_path": {"type": "array", "items": {"type": "string"}},
    },
}


class ConfigError(MigrtError):
    """The node config is not valid; the message names the file and the key."""


def schema_for(plugins):
    schema = json.loads(json.dumps(BASE_SCHEMA))
    props = schema["properties"]["plugins"]["properties"]
    for name, p in sorted(plugins.items()):
        opts = {"enabled": {"type": "boolean", "default": True,
                            "description": "apply when detection finds a reason"}}
        opts.update(json.loads(json.dumps(p.options or {})))
        props[name] = {"type": ["object", "null"], "additionalProperties": False,
                       "properties": opts, "description": p.description}
    return schema


def read_yaml(path):
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}")
    import yaml
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def _key(path_parts):
    return ".".join(str(p) for p in path_parts) or "(top level)"


def validate(data, plugins, path):
    import jsonschema
    schema = schema_for(plugins)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(data),
                    key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if not errors:
        return
    e = errors[0]
    where = list(e.absolute_path)
    if e.validator == "additionalProperties":
        extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))
        key = _key(where + extra[:1])
        if where == ["plugins"]:
            raise ConfigError(f"{path}: {key}: no such plugin is installed "
                              f"(installed: {', '.join(sorted(plugins)) or 'none'})")
        known = ", ".join(sorted(e.schema.get("properties", {})))
        raise ConfigError(f"{path}: {key}: unknown key (known here: {known})")
    raise ConfigError(f"{path}: {_key(where)}: {e.message}")


def load(path=None):
    """(plugins, node options, problems) for this node: {name: (plugin, source)}, ..."""
    from migrt.plugins import registry
    path = path or hookgate.config_path()
    data = read_yaml(path) or {}
    extra = data.get("plugin_path") if isinstance(data.get("plugin_path"), list) else []
    found, problems = registry.discover([d for d in extra if isinstance(d, str)])
    if data:          # an absent or empty config needs no JSON Schema (nor its import)
        validate(data, {n: p for n, (p, _) in found.items()}, path)
    node = {}
    for name, opts in (data.get("plugins") or {}).items():
        node[name] = dict(opts or {})
    return found, node, problems


def build_cache(st=None):
    """Load, validate and write the cache hookgate reads; returns the cache dict.

    An invalid config is cached too (as its error), so every create reports it in one
    line until the file is fixed.
    """
    from migrt.plugins import registry
    st = st or hookgate.stamp()
    cache = {"stamp": st, "plugins": {}, "error": None, "problems": []}
    try:
        found, node, problems = load(st["config"])
        cache["problems"] = problems
        for name, (p, source) in found.items():
            opts = node.get(name, {})
            cache["plugins"][name] = {
                "enabled": opts.get("enabled", True),
                "order": p.order,
                "description": p.description,
                "stages": registry.implemented_stages(p),
                "detect": p.detect or {},
                "source": source,
                "options": {k: v for k, v in opts.items() if k != "enabled"},
            }
    except ConfigError as e:
        cache["error"] = str(e)
    path = hookgate.cache_path(st["config"])
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(cache))
        os.replace(tmp, path)
    except OSError:
        pass   # an unwritable state dir only costs speed
    return cache
