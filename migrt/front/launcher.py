"""Write the `migrt` executable: a shell front door and the Python launcher behind it.

Every runc call of a node goes through this binary, and even `python -I -S` costs
7-16 ms a call under a containerd shim (five calls per container: 1.5x runc for a
whole create/start/exec/stop/remove cycle). So DEST is migrt/front/front.sh, which decides
in about a millisecond whether a call can be migrt's business at all and execs runc
when it certainly is not. Everything else goes to DEST-python: it starts the
interpreter with -I -S, puts migrt's source and the venv's site-packages on sys.path
by hand, and hands over to `migrt.front.fast`, which decides exactly.

Usage: python -I -S launcher.py --source DIR --python PYTHON [--no-front] DEST
"""
import os
import sys

TEMPLATE = """#!{python} -IS
# migrt launcher, written by migrt.front.launcher: do not edit.
import sys
sys.path[:0] = [{source!r}]
sys.path.append({site!r})
from migrt.front.fast import main
main()
"""


def site_packages(python):
    """Return the site-packages dir of the venv that owns `python`."""
    venv = os.path.dirname(os.path.dirname(os.path.abspath(python)))
    lib = os.path.join(venv, "lib")
    for name in sorted(os.listdir(lib)):
        cand = os.path.join(lib, name, "site-packages")
        if name.startswith("python") and os.path.isdir(cand):
            return cand
    raise SystemExit(f"launcher: no site-packages under {lib}")


def _put(dest, text):
    tmp = dest + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)


def write(dest, source, python, front=True):
    """Write DEST (the front door) and DEST-python; with front=False, DEST is Python."""
    text = TEMPLATE.format(python=python, source=os.path.abspath(source),
                           site=site_packages(python))
    if not front:
        _put(dest, text)
        return dest
    py = dest + "-python"
    _put(py, text)
    with open(os.path.join(os.path.abspath(source), "migrt", "front", "front.sh")) as f:
        door = f.read()
    _put(dest, door.replace("@PY_LAUNCHER@", shell_quote(os.path.abspath(py))))
    return dest


def shell_quote(s):
    return "'" + s.replace("'", "'\\''") + "'"


def main(argv):
    args = {"--source": None, "--python": sys.executable}
    rest = []
    front = True
    it = iter(argv)
    for a in it:
        if a == "--no-front":
            front = False
        elif a in args:
            args[a] = next(it)
        else:
            rest.append(a)
    if len(rest) != 1 or not args["--source"]:
        raise SystemExit(__doc__)
    write(rest[0], args["--source"], args["--python"], front=front)


if __name__ == "__main__":
    main(sys.argv[1:])
