#!/usr/bin/env python3
"""Register (or unregister) migrt as a CRI runtime handler in containerd's config.toml.

Why not just drop a file into /etc/containerd/conf.d/? containerd 1.x merges an imported
file by replacing each whole plugins."<id>" table it names: a drop-in naming the CRI
plugin's table would silently wipe every CRI setting of the main config (Debian's stock
config sets cni.bin_dir there; kubeadm nodes set SystemdCgroup for runc). So this tool
appends the tables of the shipped drop-in (containerd-config/containerd-v{2,3}-migrt.toml,
chosen by the config's `version`) to config.toml itself, between "# BEGIN migrt" and
"# END migrt", leaving out tables the config already defines (usually runtimes.runc).
Running it again replaces that block; `unregister` removes it and nothing else.

Usage: containerd_register.py register|unregister|show [--config FILE]
           [--drop-in FILE] [--binary PATH]
Needs Python 3.11+ (tomllib) and nothing else. Restart containerd afterwards.
"""
import argparse
import json
import os
import sys
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = [os.path.join(HERE, "..", "containerd-config"),        # a checkout
           "/opt/migrt/lib/containerd-config",                      # install.sh
           "/usr/share/migrt/containerd-config"]                    # the DaemonSet image
BEGIN = "# BEGIN migrt (written by migrt's containerd_register.py; do not edit)"
END = "# END migrt"
DEFAULT_CONFIG = "/etc/containerd/config.toml"
CRI_TABLE = {2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}


class RegisterError(Exception):
    pass


def find_drop_in(version):
    name = f"containerd-v{version}-migrt.toml"
    for d in SHIPPED:
        p = os.path.join(d, name)
        if os.path.exists(p):
            return os.path.abspath(p)
    raise RegisterError(f"{name} not found in {', '.join(SHIPPED)}")


def tables(doc, prefix=()):
    """Yield (path, scalars) for every table of a parsed TOML doc that has scalar keys."""
    scalars = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    if scalars and prefix:
        yield prefix, scalars
    for k, v in doc.items():
        if isinstance(v, dict):
            yield from tables(v, prefix + (k,))


def defined(doc, path):
    for k in path:
        if not isinstance(doc, dict) or k not in doc:
            return False
        doc = doc[k]
    return True


def _key(k):
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def render(path, scalars):
    lines = ["[" + ".".join(_key(k) for k in path) + "]"]
    for k, v in scalars.items():
        val = json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")
        lines.append(f"  {_key(k)} = {val}")
    return "\n".join(lines)


def strip_block(text):
    """Return `text` without our BEGIN..END block (and whether there was one)."""
    lines = text.splitlines(keepends=True)
    out, inside, found = [], False, False
    for line in lines:
        if line.startswith("# BEGIN migrt"):
            inside = found = True
            continue
        if inside:
            if line.startswith(END):
                inside = False
            continue
        out.append(line)
    if inside:
        raise RegisterError("a '# BEGIN migrt' line has no '# END migrt' after it")
    return "".join(out).rstrip("\n") + ("\n" if out else ""), found


def block_for(config_text, drop_in=None, binary=None):
    """The text to append to a config (without its own block) to register migrt."""
    try:
        doc = tomllib.loads(config_text)
    except tomllib.TOMLDecodeError as e:
        raise RegisterError(f"config is not valid TOML: {e}")
    version = doc.get("version", 1 if config_text.strip() else None)
    if version is None:
        version = 2
    if version not in CRI_TABLE:
        raise RegisterError(
            f"config version {version} is not supported: containerd 1.6/1.7 need "
            "`version = 2` at the top of config.toml (containerd config migrate), 2.x "
            "version 3")
    drop_in = drop_in or find_drop_in(version)
    with open(drop_in, "rb") as f:
        shipped = tomllib.load(f)
    if shipped.get("version") != version:
        raise RegisterError(f"{drop_in} is for config version {shipped.get('version')}, "
                            f"the config is version {version}")
    runtimes = ("plugins", CRI_TABLE[version], "containerd", "runtimes")
    if defined(doc, runtimes + ("migrt",)):
        raise RegisterError("the config already defines runtime handler migrt outside a "
                            "'# BEGIN migrt' block: edit or remove it by hand first")
    parts = []
    for path, scalars in tables(shipped):
        if defined(doc, path):
            continue            # e.g. the node's own runtimes.runc: keep it as it is
        if binary and path[-1] == "options" and "BinaryName" in scalars:
            scalars = dict(scalars, BinaryName=binary)
        parts.append(render(path, scalars))
    body = "\n\n".join(parts)
    return version, f"{BEGIN}\n# from {drop_in}\n{body}\n{END}\n"


def register(config, drop_in=None, binary=None):
    """Write migrt's block; returns the config version. `register.changed` says whether
    the file changed (a second run with the same settings changes nothing, and then
    containerd needs no restart)."""
    text = ""
    if os.path.exists(config):
        with open(config) as f:
            text = f.read()
    base, _ = strip_block(text)
    if not base.strip():
        base = "version = 2\n"
    version, block = block_for(base, drop_in, binary)
    new = base + ("\n" if base.strip() else "") + block
    tomllib.loads(new)      # never write a config containerd cannot read
    register.changed = new != text
    if register.changed:
        _write(config, new)
    return version


register.changed = False


def unregister(config):
    if not os.path.exists(config):
        return False
    with open(config) as f:
        text = f.read()
    base, found = strip_block(text)
    if found:
        _write(config, base)
    return found


def _write(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".migrt-tmp"
    with open(tmp, "w") as f:
        f.write(text)
    if os.path.exists(path):
        st = os.stat(path)
        os.chmod(tmp, st.st_mode & 0o7777)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["register", "unregister", "show"])
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--drop-in", help="the drop-in to take the tables from "
                    "(default: the shipped one for the config's version)")
    ap.add_argument("--binary", help="BinaryName to write (default: the drop-in's, "
                    "/usr/local/bin/migrt)")
    a = ap.parse_args(argv)
    try:
        if a.action == "register":
            v = register(a.config, a.drop_in, a.binary)
            if register.changed:
                print(f"migrt registered as runtime handler 'migrt' in {a.config} "
                      f"(config version {v}); now: systemctl restart containerd")
            else:
                print(f"migrt is already registered in {a.config} as this would write it "
                      f"(config version {v}): nothing changed, no restart needed")
        elif a.action == "unregister":
            if unregister(a.config):
                print(f"migrt removed from {a.config}; now: systemctl restart containerd")
            else:
                print(f"{a.config} has no migrt block: nothing to do")
        else:
            text = open(a.config).read() if os.path.exists(a.config) else ""
            print(block_for(strip_block(text)[0] or "version = 2\n", a.drop_in, a.binary)[1],
                  end="")
    except (RegisterError, OSError) as e:
        print(f"containerd_register: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
