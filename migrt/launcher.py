"""Write the `migrt` executable.

A console_scripts wrapper would start Python with site processing, which costs tens of
milliseconds on every runc call a container manager makes. The launcher written here
starts the interpreter with -I -S, puts migrt's source and the venv's site-packages on
sys.path by hand, and hands over to `migrt.fast`.

Usage: python -I -S launcher.py --source DIR --python PYTHON DEST
"""
import os
import sys

TEMPLATE = """#!{python} -IS
# migrt launcher, written by migrt.launcher: do not edit.
import sys
sys.path[:0] = [{source!r}]
sys.path.append({site!r})
from migrt.fast import main
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


def write(dest, source, python):
    text = TEMPLATE.format(python=python, source=os.path.abspath(source),
                           site=site_packages(python))
    tmp = dest + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)


def main(argv):
    args = {"--source": None, "--python": sys.executable}
    rest = []
    it = iter(argv)
    for a in it:
        if a in args:
            args[a] = next(it)
        else:
            rest.append(a)
    if len(rest) != 1 or not args["--source"]:
        raise SystemExit(__doc__)
    write(rest[0], args["--source"], args["--python"])


if __name__ == "__main__":
    main(sys.argv[1:])
