"""Where plugins come from: this project's plugins/ folder and the `migrt.plugins`
entry-point group of installed packages (plus MIGRT_PLUGIN_PATH / `plugin_path` folders).

discover() finds them (slow: imports every plugin module and scans installed
distributions; done when the node cache is rebuilt). resolve() loads only the named
ones, from the source recorded in the cache, for a stage that is about to run.
"""
import importlib
import importlib.util
import os
import re
import sys

from migrt.errors import MigrtError, RefusedError
from migrt.plugins import Plugin
from migrt.plugins import stages

GROUP = "migrt.plugins"
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

_loaded = {}


def _from_object(obj, where):
    if isinstance(obj, type) and issubclass(obj, Plugin):
        obj = obj()
    if not isinstance(obj, Plugin):
        raise MigrtError(f"plugin {where}: does not provide a migrt.plugins.Plugin")
    if not isinstance(obj.name, str) or not NAME_RE.match(obj.name):
        raise MigrtError(f"plugin {where}: bad name {obj.name!r} (want [a-z][a-z0-9_]*)")
    return obj


def load_file(path):
    """Import a plugin module from a file; it must define `plugin` (instance or class)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    modname = f"migrt_plugins.{stem}"
    mod = sys.modules.get(modname)
    try:
        st = os.stat(path)
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        sig = None
    if mod is None or getattr(mod, "__file__", None) != path \
            or getattr(mod, "_migrt_loaded_from", None) != sig:
        if "migrt_plugins" not in sys.modules:
            import types
            pkg = types.ModuleType("migrt_plugins")
            pkg.__path__ = []
            sys.modules["migrt_plugins"] = pkg
        spec = importlib.util.spec_from_file_location(modname, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[modname] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception as e:
            del sys.modules[modname]
            raise MigrtError(f"plugin {path}: cannot load: {type(e).__name__}: {e}") from e
        mod._migrt_loaded_from = sig
    obj = getattr(mod, "plugin", None)
    if obj is None:
        raise MigrtError(f"plugin {path}: defines no `plugin`")
    return _from_object(obj, path)


def preload():
    """Import the node's enabled plugin files ahead of a restore (migrt.front.spare): the
    plugins a restore names are then only looked up in its downtime (importing two of
    them took 5 ms there). A file changed since is imported again (load_file)."""
    from migrt.plugins import gate as hookgate
    table = hookgate.node_cache().get("plugins") or {}
    for info in table.values():
        if not isinstance(info, dict):
            continue
        src = info.get("source")
        if info.get("enabled") and isinstance(src, dict) and src.get("kind") == "file":
            try:
                load_file(src["where"])
            except MigrtError:
                pass        # the restore that names it says so


def load_entry_point(value):
    """Load 'package.module:attr' as an entry point value names it."""
    modname, _, attr = value.partition(":")
    try:
        obj = importlib.import_module(modname)
        for part in filter(None, attr.split(".")):
            obj = getattr(obj, part)
    except Exception as e:
        raise MigrtError(f"plugin entry point {value}: cannot load: {type(e).__name__}: {e}") from e
    return _from_object(obj, value)


def load(source):
    key = (source["kind"], source["where"])
    if key not in _loaded:
        if source["kind"] == "file":
            _loaded[key] = load_file(source["where"])
        else:
            _loaded[key] = load_entry_point(source["where"])
    return _loaded[key]


def discover(extra_dirs=()):
    """{name: (plugin, source)} of every installed plugin; first found wins.

    Returns (found, problems): problems are one-line strings (a plugin that does not
    load is reported by `migrt plugins`, not fatal for the others).
    """
    from migrt.plugins import gate as hookgate
    found, problems = {}, []
    dirs = [hookgate.plugins_dir()] + hookgate.extra_plugin_dirs() + list(extra_dirs)
    for d in dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for fn in names:
            if not fn.endswith(".py") or fn.startswith(("_", ".")):
                continue
            path = os.path.join(os.path.abspath(d), fn)
            try:
                p = load_file(path)
            except MigrtError as e:
                problems.append(str(e))
                continue
            if p.name not in found:
                found[p.name] = (p, {"kind": "file", "where": path})
    try:
        from importlib.metadata import entry_points
        eps = entry_points(group=GROUP)
    except Exception as e:  # a broken distribution must not hide the others
        eps = []
        problems.append(f"entry points {GROUP}: {e}")
    for ep in eps:
        try:
            p = load_entry_point(ep.value)
        except MigrtError as e:
            problems.append(str(e))
            continue
        if p.name not in found:
            dist = getattr(getattr(ep, "dist", None), "name", None)
            found[p.name] = (p, {"kind": "entry-point", "where": ep.value, "dist": dist})
    return found, problems


def implemented_stages(plugin):
    return [s for s in stages.ALL if callable(getattr(plugin, stages.method_name(s), None))]


def resolve(names):
    """The named plugins as objects, in run order; a clear refusal for a bad name."""
    from migrt.plugins import gate as hookgate
    cache = hookgate.node_cache()
    if cache.get("error"):
        raise MigrtError(cache["error"])
    table = cache.get("plugins") or {}
    out = []
    for name in names:
        info = table.get(name)
        if info is None:
            have = ", ".join(sorted(table)) or "none"
            raise RefusedError(f"plugins: the bundle asks for plugin {name!r}, which is not "
                               f"installed on this node (installed: {have})")
        out.append(load(info["source"]))
    out.sort(key=lambda p: (p.order, p.name))
    return out
