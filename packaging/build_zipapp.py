#!/usr/bin/env python3
"""Build migrt as one executable file (a zipapp) that needs only a system Python 3.11+.

    python3 packaging/build_zipapp.py [-o dist/migrt.pyz] [--python /usr/bin/python3]

The file starts with `#!<python> -IS`, like migrt's launcher: no site processing, so the
runc pass-through path costs what the launcher's does (the hot path imports only the
standard library). Byte code is compiled by the target Python and stored next to each
module (zipimport's layout) with unchecked hashes, so nothing is compiled at start.

Pure-Python dependencies (click, PyYAML without its C part) are bundled.
The compiled ones (zstandard, xxhash, psutil, jsonschema's rpds) cannot live in a zip:
migrt's own heavier commands (migrate, agent, image) find them in Debian's packages
(python3-zstandard python3-xxhash python3-psutil python3-jsonschema), whose directory is
appended to sys.path at start. The runc pass-through and the restore marker need none.
"""
import argparse
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PURE_DEPS = ("click", "yaml")
SYSTEM_SITE = "/usr/lib/python3/dist-packages"

MAIN = f'''# migrt zipapp entry point, written by packaging/build_zipapp.py
import sys
sys.path.append({SYSTEM_SITE!r})
from migrt.fast import main
main()
'''

COMPILE = r'''
import os, py_compile, sys
root = sys.argv[1]
for d, _, files in os.walk(root):
    for f in files:
        if f.endswith(".py"):
            src = os.path.join(d, f)
            py_compile.compile(src, cfile=src + "c", dfile=os.path.relpath(src, root),
                               doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
'''


def dep_dir(name, site):
    """Where package `name` lives: the given site-packages, else this Python's."""
    if site:
        p = os.path.join(site, name)
        if os.path.isdir(p):
            return p
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"build_zipapp: dependency {name} not found (pass --site)")
    return list(spec.submodule_search_locations)[0]


def copy_tree(src, dest):
    def ignore(d, names):
        return [n for n in names if n == "__pycache__" or n.endswith((".pyc", ".so"))]
    shutil.copytree(src, dest, ignore=ignore)


def build(out, python, site=None):
    with tempfile.TemporaryDirectory() as tmp:
        stage = os.path.join(tmp, "app")
        os.makedirs(stage)
        copy_tree(os.path.join(REPO, "migrt"), os.path.join(stage, "migrt"))
        # zipimport has no namespace packages: every package dir gets an __init__.py
        for d, _, files in os.walk(os.path.join(stage, "migrt")):
            if any(f.endswith(".py") for f in files) and "__init__.py" not in files:
                open(os.path.join(d, "__init__.py"), "w").close()
        plugins = os.path.join(REPO, "plugins")
        if os.path.exists(os.path.join(plugins, "__init__.py")):
            copy_tree(plugins, os.path.join(stage, "migrt_plugins"))
        for name in PURE_DEPS:
            copy_tree(dep_dir(name, site), os.path.join(stage, name))
        with open(os.path.join(stage, "__main__.py"), "w") as f:
            f.write(MAIN)
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
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="build migrt as a single-file zipapp")
    ap.add_argument("-o", "--output", default=os.path.join(REPO, "dist", "migrt.pyz"))
    ap.add_argument("--python", default="/usr/bin/python3",
                    help="the interpreter of the target machines (its #! line and byte code)")
    ap.add_argument("--site", help="site-packages to take click and yaml from "
                    "(default: this Python's)")
    a = ap.parse_args(argv)
    out = build(a.output, a.python, a.site)
    print(f"{out}: {os.path.getsize(out) >> 10} KiB, runs with {a.python}")


if __name__ == "__main__":
    main()
