"""A plugin's options for one bundle: defaults < node config < env < annotation.

Bundles set options as annotations `io.migrt.<plugin>.<option>` or env variables
`MIGRT_<PLUGIN>_<OPTION>` in process.env (dashes and underscores are the same; the
annotation wins). Their values are strings, converted by the type the plugin's option
schema declares; a value that does not convert is an error naming the key.
"""
from migrt.errors import BundleError


def _coerce(value, schema, where):
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), None)
    v = value.strip()
    try:
        if t == "boolean":
            low = v.lower()
            if low in ("1", "true", "yes", "on"):
                out = True
            elif low in ("0", "false", "no", "off"):
                out = False
            else:
                raise ValueError("not a boolean (true/false)")
        elif t == "integer":
            out = int(v)
        elif t == "number":
            out = float(v)
        elif t == "array":
            out = [x.strip() for x in v.split(",") if x.strip()]
        elif t == "object":
            out = {}
            for pair in filter(None, (x.strip() for x in v.split(","))):
                k, sep, val = pair.partition("=")
                if not sep:
                    raise ValueError(f"not key=value pairs ({pair!r})")
                out[k.strip()] = val.strip()
        else:
            out = value
    except ValueError as e:
        msg = str(e) if str(e).startswith("not ") else \
            f"not a{'n' if t == 'integer' else ''} {t}"
        raise BundleError(f"{where}: {value!r} is {msg}")
    enum = schema.get("enum")
    if enum and out not in enum:
        raise BundleError(f"{where}: {value!r} is not one of {', '.join(map(str, enum))}")
    for bound, ok in (("minimum", lambda a, b: a >= b), ("maximum", lambda a, b: a <= b)):
        if bound in schema and isinstance(out, (int, float)) and not ok(out, schema[bound]):
            raise BundleError(f"{where}: {value!r} is out of range ({bound} {schema[bound]})")
    return out


def defaults(plugin):
    return {k: s.get("default") for k, s in (plugin.options or {}).items()}


def for_bundle(plugin, spec, node=None):
    """The effective options of `plugin` for the bundle whose spec is `spec`."""
    from migrt.plugins import gate as hookgate
    opts = defaults(plugin)
    if node is None:
        info = (hookgate.node_cache().get("plugins") or {}).get(plugin.name) or {}
        node = info.get("options") or {}
    opts.update({k: v for k, v in node.items() if k != "enabled"})
    if not isinstance(spec, dict):
        return opts
    schema = plugin.options or {}
    canon = {k.replace("-", "_").lower(): k for k in schema}
    env = hookgate._env(spec)
    prefix = f"MIGRT_{plugin.name.upper()}_"
    for key, value in env.items():
        if key.startswith(prefix):
            opt = canon.get(key[len(prefix):].lower())
            if opt is None:
                raise BundleError(f"env {key}: plugin {plugin.name} has no option "
                                  f"{key[len(prefix):].lower()!r} (options: {', '.join(sorted(schema))})")
            opts[opt] = _coerce(value, schema[opt], f"env {key}")
    ann_prefix = f"io.migrt.{plugin.name}."
    for key, value in hookgate._annotations(spec).items():
        if isinstance(key, str) and key.startswith(ann_prefix) and isinstance(value, str):
            opt = canon.get(key[len(ann_prefix):].replace("-", "_").lower())
            if opt is None:
                raise BundleError(f"annotation {key}: plugin {plugin.name} has no option "
                                  f"{key[len(ann_prefix):]!r} (options: {', '.join(sorted(schema))})")
            opts[opt] = _coerce(value, schema[opt], f"annotation {key}")
    return opts
