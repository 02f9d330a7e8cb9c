#!/usr/bin/env python3
"""Build migrt as one executable file (a zipapp) that needs only a system Python 3.11+.

    python3 packaging/build_zipapp.py [-o dist/migrt.pyz] [--python /usr/bin/python3]

Run it with a Python that has migrt's dependencies installed (the venv of install.sh)
and of the same minor version as the target's --python.

The file starts with `#!<python> -IS`, like migrt's launcher: no site processing, so the
runc pass-through costs what the launcher's does (the hot path imports only the standard
library). Byte code is compiled by the target Python and stored next to each module
(zipimport's layout) with unchecked hashes, so nothing is compiled at start.

Dependencies come in two parts:
- click and PyYAML (pure Python, needed by every own command) are imported from the zip;
- the rest (xxhash, zstandard, psutil: compiled; jsonschema and what it needs, whose
  data files and compiled rpds cannot be used from a zip) are stored under `_native/` and
  extracted on first use (checkpoint, restore of a manifest, migrate, agent) into
  $MIGRT_PYZ_CACHE, /var/cache/migrt (root) or $XDG_CACHE_HOME/migrt, as pyz-<hash>,
  once per build.
  A finder at the end of sys.meta_path does that, so calls that never import them (the
  runc pass-through) never pay for it. They are built for the building Python's version:
  a different target version gets a clear error from those commands only.
"""
import argparse
import hashlib
import importlib.metadata as md
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ZIPPED = ("click", "PyYAML")
NATIVE = ("xxhash", "zstandard", "psutil", "jsonschema")

MAIN = '''# migrt zipapp entry point, written by packaging/build_zipapp.py
import sys


class _Native:
    """Extract _native/ from this zip on the first import that needs it."""

    names = frozenset({names!r})
    dirs = None

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if path is not None or name.partition(".")[0] not in cls.names or cls.dirs:
            return None
        import os
        import zipfile
        from importlib.machinery import PathFinder
        if tuple(sys.version_info[:2]) != {pyver!r}:
            raise ImportError(f"{{name}}: this migrt.pyz was built for Python "
                              f"{pyver[0]}.{pyver[1]}, not {{sys.version.split()[0]}}; "
                              "rebuild it with packaging/build_zipapp.py")
        bases = [os.environ["MIGRT_PYZ_CACHE"]] if os.environ.get("MIGRT_PYZ_CACHE") else []
        bases += ["/var/cache/migrt"] if os.geteuid() == 0 else []
        bases.append(os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                  os.path.expanduser("~/.cache"), "migrt"))
        for base in bases:
            dest = os.path.join(base, "pyz-{build}")
            if not os.path.isdir(dest):
                try:
                    os.makedirs(base, mode=0o755, exist_ok=True)
                    tmp = dest + ".tmp." + str(os.getpid())
                    with zipfile.ZipFile(cls.archive()) as z:
                        for n in z.namelist():
                            if n.startswith("_native/"):
                                z.extract(n, tmp)
                    os.rename(os.path.join(tmp, "_native"), dest)
                    os.rmdir(tmp)
                except FileExistsError:
                    pass
                except OSError:
                    continue
            cls.dirs = [dest]
            sys.path.append(dest)
            return PathFinder.find_spec(name, cls.dirs)
        return None

    @staticmethod
    def archive():
        import os
        here = os.path.abspath(__file__)
        while here and not os.path.isfile(here):
            here = os.path.dirname(here)
        return here


sys.meta_path.append(_Native)
sys.path.append("/usr/lib/python3/dist-packages")   # Debian's python3-* as a last resort
from migrt.front.fast import main
main()
'''

COMPILE = r'''
import os, py_compile, sys
root = sys.argv[1]
for d, dirs, files in os.walk(root):
    if os.path.relpath(d, root).split(os.sep)[0] == "_native":
        continue
    for f in files:
        if f.endswith(".py"):
            src = os.path.join(d, f)
            py_compile.compile(src, cfile=src + "c", dfile=os.path.relpath(src, root),
                               doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
'''


def closure(names):
    """The distributions `names` need, themselves included (no extras)."""
    todo, seen = list(names), {}
    while todo:
        n = todo.pop()
        key = n.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            d = md.distribution(n)
        except md.PackageNotFoundError:
            raise SystemExit(f"build_zipapp: {n} is not installed in {sys.executable}")
        seen[key] = d
        for r in d.requires or []:
            if "extra ==" not in r:
                todo.append(re.split(r"[ ;<>=!~\[(]", r)[0])
    return seen


def copy_dist(d, dest):
    """Copy an installed distribution's files (its packages and its .dist-info)."""
    tops = set()
    for f in d.files or []:
        parts = f.parts
        if parts[0].startswith("..") or "__pycache__" in parts or parts[0].endswith(".pth"):
            continue
        src = f.locate()
        if not os.path.isfile(src):
            continue
        out = os.path.join(dest, *parts)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copy2(src, out)
        if not parts[0].endswith(".dist-info"):
            tops.add(parts[0].split(".")[0] if len(parts) == 1 else parts[0])
    return tops


def build(out, python, with_native=True):
    target = subprocess.run([python, "-I", "-S", "-c",
                             "import sys; print(*sys.version_info[:2])"],
                            capture_output=True, text=True, check=True).stdout.split()
    pyver = tuple(int(x) for x in target)
    zipped = closure(ZIPPED)
    native = {k: d for k, d in closure(NATIVE).items() if k not in zipped} \
        if with_native else {}
    if native and pyver != tuple(sys.version_info[:2]):
        print(f"build_zipapp: target Python {pyver} != this Python "
              f"{tuple(sys.version_info[:2])}: compiled dependencies left out",
              file=sys.stderr)
        native = {}
    with tempfile.TemporaryDirectory() as tmp:
        stage = os.path.join(tmp, "app")
        os.makedirs(stage)
        shutil.copytree(os.path.join(REPO, "migrt"), os.path.join(stage, "migrt"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # zipimport has no namespace packages: every package dir gets an __init__.py
        for d, _, files in os.walk(os.path.join(stage, "migrt")):
            if any(f.endswith(".py") for f in files) and "__init__.py" not in files:
                open(os.path.join(d, "__init__.py"), "w").close()
        plugins = os.path.join(REPO, "plugins")
        if os.path.isdir(plugins):
            shutil.copytree(plugins, os.path.join(stage, "plugins"),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for d in zipped.values():
            copy_dist(d, stage)
        names = set()
        for d in native.values():
            names |= copy_dist(d, os.path.join(stage, "_native"))
        names = sorted(n for n in names if n.isidentifier())
        digest = hashlib.sha256()
        for d, dirs, files in sorted(os.walk(stage)):
            dirs.sort()
            for f in sorted(files):
                with open(os.path.join(d, f), "rb") as fh:
                    digest.update(f.encode() + fh.read())
        with open(os.path.join(stage, "__main__.py"), "w") as f:
            f.write(MAIN.format(names=names, pyver=pyver, build=digest.hexdigest()[:16]))
        subprocess.run([python, "-I", "-S", "-c", COMPILE, stage], check=True)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for d, dirs, files in os.walk(stage):
                dirs.sort()
                for f in sorted(files):
                    path = os.path.join(d, f)
                    z.write(path, os.path.relpath(path, stage))
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        tmp_out = out + ".tmp"
        with open(tmp_out, "wb") as f:
            f.write(f"#!{python} -IS\n".encode())
            f.write(buf.getvalue())
        os.chmod(tmp_out, 0o755)
        os.replace(tmp_out, out)
    return out, names


def main(argv=None):
    ap = argparse.ArgumentParser(description="build migrt as a single-file zipapp")
    ap.add_argument("-o", "--output", default=os.path.join(REPO, "dist", "migrt.pyz"))
    ap.add_argument("--python", default="/usr/bin/python3",
                    help="the interpreter of the target machines (its #! line and byte code)")
    ap.add_argument("--no-native", action="store_true",
                    help="leave the compiled dependencies out (then checkpoint, migrate and "
                    "agent need Debian's python3-xxhash, -zstandard, -psutil, -jsonschema)")
    a = ap.parse_args(argv)
    out, native = build(a.output, a.python, not a.no_native)
    print(f"{out}: {os.path.getsize(out) >> 10} KiB, runs with {a.python}; "
          f"extracted on first use: {', '.join(native) or 'nothing'}")


if __name__ == "__main__":
    main()
