"""Cheap answer to "does any plugin apply to this bundle?", asked on every create/run.

The answer comes from the bundle's spec alone plus a JSON cache of the node's plugin
config (written by migrt.plugins.config, keyed by the config file's and the plugin
folders' mtimes). Detection rules are data (globs on device paths, env names,
annotation keys, mount destinations), so nothing here imports YAML, JSON Schema, click
or any plugin code. Only when the cache is missing or stale is the slow loader used,
once, and its result is written back for the next call.

A bundle chooses plugins explicitly with the annotation `io.migrt.plugins` or the env
variable `MIGRT_PLUGINS` in process.env (the annotation wins): "gpu,rdma" names exactly
the plugins to use, "+rdma" / "-logs" add to or remove from what detection found, and
"none" turns them all off. An explicit choice always wins over detection.
"""
import json
import os
import sys

MARKER = "MIGRT_RESTORE_FROM"
ANNOTATION = "io.migrt.plugins"
ENV = "MIGRT_PLUGINS"
DEFAULT_CONFIG = "/etc/migrt/config.yaml"
CACHE_VERSION = 2


def config_path():
    return os.environ.get("MIGRT_CONFIG") or DEFAULT_CONFIG


def state_dir():
    return os.environ.get("MIGRT_STATE_DIR", "/run/migrt")


def plugins_dir():
    """The bundled plugins: plugins/ next to the migrt package (a checkout, install.sh's
    /opt/migrt/lib), migrt_plugins/ (the wheel), or, in the zipapp, its plugins/
    extracted once into a cache dir (a directory inside a zip cannot be listed or run)."""
    return bundled("plugins")


def bundled(name):
    """The dir of the bundled `name` (plugins, hooks), whatever the artefact."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # migrt/
    top = os.path.dirname(package)
    for cand in (os.path.join(top, name), os.path.join(top, "migrt_" + name)):
        if os.path.isdir(cand):
            return cand
    if os.path.isfile(top):                 # the zipapp: top is the .pyz file itself
        got = _from_zip(top, name)
        if got:
            return got
    return os.path.join(top, name)


def _from_zip(archive, name):
    """Extract the zipapp's plugins/ and hooks/ (once per build) into the first usable
    of $MIGRT_PYZ_CACHE, /var/cache/migrt (root), ~/.cache/migrt."""
    try:
        st = os.stat(archive)
    except OSError:
        return None
    build = f"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}"
    bases = [os.environ["MIGRT_PYZ_CACHE"]] if os.environ.get("MIGRT_PYZ_CACHE") else []
    bases += ["/var/cache/migrt"] if os.geteuid() == 0 else []
    bases.append(os.path.join(os.environ.get("XDG_CACHE_HOME")
                              or os.path.expanduser("~/.cache"), "migrt"))
    for base in bases:
        dest = os.path.join(base, "pyz-data-" + build)
        if not os.path.isdir(dest):
            tmp = f"{dest}.tmp.{os.getpid()}"
            try:
                import shutil
                import zipfile
                os.makedirs(base, mode=0o755, exist_ok=True)
                with zipfile.ZipFile(archive) as z:
                    for n in z.namelist():
                        if n.startswith(("plugins/", "hooks/")) and not n.endswith(".pyc"):
                            z.extract(n, tmp)
                for sub in ("plugins", "hooks"):
                    os.makedirs(os.path.join(tmp, sub), exist_ok=True)
                os.rename(tmp, dest)
            except FileExistsError:
                shutil.rmtree(tmp, ignore_errors=True)
            except (OSError, zipfile.BadZipFile):
                shutil.rmtree(tmp, ignore_errors=True)
                continue
        return os.path.join(dest, name)
    return None


def extra_plugin_dirs():
    return [d for d in os.environ.get("MIGRT_PLUGIN_PATH", "").split(os.pathsep) if d]


def _mtime(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


def stamp(path=None):
    """What the cache depends on: the config file, plugin folders, site-packages dirs."""
    path = path or config_path()
    dirs = [plugins_dir()] + extra_plugin_dirs()
    dirs += sorted(p for p in sys.path if p.endswith("-packages"))
    return {"config": path, "config_stat": _mtime(path), "version": CACHE_VERSION,
            "dirs": [[d, _mtime(d)] for d in dirs]}


def cache_path(path=None):
    # One cache per config file; the name spells the path (hashlib costs 3 ms to import).
    path = os.path.abspath(path or config_path())
    key = path.strip("/").replace("%", "%25").replace("/", "%")[-180:]
    return os.path.join(state_dir(), "plugins", f"cache-{key}.json")


def node_cache():
    """The node's plugin table: {"plugins": {name: {...}}, "error": msg or None}."""
    st = stamp()
    try:
        with open(cache_path(), "rb") as f:
            cache = json.loads(f.read())
        if cache.get("stamp") == st:
            return cache
    except (OSError, ValueError):
        pass
    from migrt.plugins import config   # slow path: YAML, JSON Schema, plugin modules
    return config.build_cache(st)


# ---------------------------------------------------------------- the bundle's side

def _env(spec):
    proc = spec.get("process")
    env = proc.get("env") if isinstance(proc, dict) else None
    out = {}
    if isinstance(env, list):
        for item in env:
            if isinstance(item, str):
                k, sep, v = item.partition("=")
                if sep:
                    out[k] = v
    return out


def _annotations(spec):
    a = spec.get("annotations")
    return a if isinstance(a, dict) else {}


def explicit_choice(spec):
    """(source, text) of the bundle's explicit plugin choice, or (None, None)."""
    ann = _annotations(spec).get(ANNOTATION)
    if isinstance(ann, str) and ann.strip():
        return f"annotation {ANNOTATION}", ann
    env = _env(spec).get(ENV)
    if env and env.strip():
        return f"env {ENV}", env
    return None, None


def parse_choice(text):
    """'a,b' -> ({a,b}, set(), set(), exact=True); '+a,-b' -> (set(), {a}, {b}, False)."""
    exact, add, remove = set(), set(), set()
    for tok in text.replace(" ", ",").split(","):
        tok = tok.strip().lower()
        if not tok:
            continue
        if tok == "none":
            exact.add("")        # an exact, empty choice
        elif tok[0] == "+":
            add.add(tok[1:])
        elif tok[0] == "-":
            remove.add(tok[1:])
        else:
            exact.add(tok)
    is_exact = bool(exact)
    exact.discard("")
    return exact, add, remove, is_exact


def _glob(pattern, value):
    if "[" not in pattern and "?" not in pattern:      # the common shapes, without `re`
        star = pattern.find("*")
        if star < 0:
            return value == pattern
        if star == len(pattern) - 1:
            return value.startswith(pattern[:-1])
    from fnmatch import fnmatchcase
    return fnmatchcase(value, pattern)


def detect(rules, spec, env, marker, group):
    """The reason a plugin's detect rules match this spec, or None."""
    for pat in rules.get("devices") or ():
        linux = spec.get("linux") if isinstance(spec.get("linux"), dict) else {}
        for dev in linux.get("devices") or ():
            path = dev.get("path") if isinstance(dev, dict) else None
            if isinstance(path, str) and _glob(pat, path):
                return f"bundle grants device {path}"
    for name in rules.get("env") or ():
        v = env.get(name)
        if v and v.lower() not in ("void", "none"):
            return f"process.env sets {name}={v}"
    ann = _annotations(spec)
    for key in rules.get("annotations") or ():
        if key in ann:
            return f"annotation {key} is set"
    for pat in rules.get("mounts") or ():
        for m in spec.get("mounts") or ():
            if not isinstance(m, dict):
                continue
            dest = m.get("destination")
            bind = m.get("type") == "bind" or "bind" in (m.get("options") or ()) \
                or "rbind" in (m.get("options") or ())
            if bind and isinstance(dest, str) and _glob(pat, dest):
                return f"bundle bind-mounts {dest} from the host"
    if rules.get("restore") and marker:
        return "bundle is restored from a checkpoint"
    if group in (rules.get("groups") or ()):
        return f"applies to every {group}"
    return None


def _group(spec, stage, env):
    if stage is None:
        stage = _own_command()
    if stage in (None, "create", "run"):
        return "restore" if env.get(MARKER) else "create"
    return _STAGE_TO_GROUP.get(stage, stage)


_STAGE_TO_GROUP = {"pre-create": "create", "post-create": "create",
                   "pre-restore": "restore", "post-restore": "restore", "delete": "restore",
                   "pre-checkpoint": "checkpoint", "post-checkpoint": "checkpoint",
                   "pre-migrate": "migrate"}


def _own_command():
    """The runc command this process is running (when the core did not say)."""
    try:
        from migrt.front.argv import Call
        cmd = Call(sys.argv[1:]).command
    except Exception:
        return None
    return cmd if cmd in ("checkpoint", "migrate") else None


def explain(spec, bundle=None, stage=None, cache=None):
    """[(name, applies, reason)] for every installed plugin, plus unknown explicit names."""
    cache = cache or node_cache()
    if cache.get("error"):
        from migrt.errors import MigrtError
        raise MigrtError(cache["error"])
    plugins = cache.get("plugins") or {}
    env = _env(spec)
    marker = bool(env.get(MARKER))
    group = _group(spec, stage, env)
    src, text = explicit_choice(spec)
    exact, add, remove, is_exact = parse_choice(text) if text else (set(), set(), set(), False)
    out = []
    for name in sorted(plugins, key=lambda n: (plugins[n].get("order", 50), n)):
        info = plugins[name]
        relevant = _relevant(info, group)
        if is_exact:
            if name in exact:
                out.append((name, True, f"chosen by {src}"))
            else:
                out.append((name, False, f"not chosen by {src}"))
            continue
        if name in remove:
            out.append((name, False, f"removed by {src}"))
            continue
        if name in add:
            out.append((name, True, f"added by {src}"))
            continue
        if not info.get("enabled", True):
            out.append((name, False, f"disabled in {cache.get('stamp', {}).get('config')}"))
            continue
        reason = detect(info.get("detect") or {}, spec, env, marker, group)
        if reason is None:
            out.append((name, False, "nothing in the bundle calls for it"))
        elif not relevant:
            out.append((name, False, f"{reason}, but it has nothing to do on {group}"))
        else:
            out.append((name, True, reason))
    for name in sorted((exact | add) - set(plugins)):
        out.append((name, True, f"chosen by {src}, but not installed"))
    return out


# The stages each core action runs, so that a plugin is returned only where it has
# work: a plugin whose only hooks are checkpoint stages costs nothing on create.
STAGE_GROUPS = {
    "create": ("pre-create", "post-create"),
    "restore": ("pre-restore", "post-restore", "delete"),
    "checkpoint": ("pre-checkpoint", "post-checkpoint"),
    "migrate": ("pre-migrate", "pre-checkpoint", "post-checkpoint"),
}


def _relevant(info, group):
    wanted = STAGE_GROUPS.get(group, (group,))
    return any(s in wanted for s in info.get("stages") or ())


def active(spec, bundle=None, stage=None):
    """Names of the plugins that apply to this bundle, in run order ([] = none).

    stage: what the core is about to do: "create" ("restore" when the spec carries the
    marker), "checkpoint", "migrate", or one stage name. None: the command this process
    runs (its runc argv) decides.
    A plugin is returned only if it applies and has a hook in those stages.
    """
    cache = node_cache()
    if cache.get("error"):
        from migrt.errors import MigrtError
        raise MigrtError(cache["error"])
    plugins = cache.get("plugins") or {}
    if not plugins:
        return []
    return [name for name, ok, _ in explain(spec, bundle, stage, cache) if ok]
