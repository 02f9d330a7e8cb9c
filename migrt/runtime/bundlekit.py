"""Build busybox OCI bundles: for the demo, the tests and the benchmarks.

A bundle is a directory with config.json and rootfs/. The rootfs is a static busybox
with its applets as symlinks, which is all a shell-loop workload needs. The spec comes
from `runc spec` and is then adjusted (no terminal, a writable rootfs, our command,
a cgroups path of our own so that two "nodes" on one machine do not collide).
"""
import json
import os
import shutil
import subprocess

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


def find_busybox():
    for p in BUSYBOX_CANDIDATES:
        if os.path.exists(p):
            out = subprocess.run(["file", "-L", p], capture_output=True, text=True).stdout \
                if shutil.which("file") else ""
            if "dynamically" in out:
                continue
            return p
    raise FileNotFoundError("a static busybox is needed (Debian package busybox-static)")


def make_rootfs(dest, busybox=None):
    """Create a busybox rootfs at `dest` (reused if it already has bin/busybox)."""
    if os.path.exists(os.path.join(dest, "bin", "busybox")):
        return dest
    busybox = busybox or find_busybox()
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for d in ("bin", "dev", "proc", "sys", "tmp", "etc", "root", "var", "run", "data"):
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
    os.chmod(os.path.join(tmp, "tmp"), 0o1777)
    shutil.copy2(busybox, os.path.join(tmp, "bin", "busybox"))
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for a in applets:
        if a != "busybox":
            os.symlink("busybox", os.path.join(tmp, "bin", a))
    os.makedirs(os.path.join(tmp, "usr"), exist_ok=True)
    os.symlink("../bin", os.path.join(tmp, "usr", "bin"))
    os.symlink("bin", os.path.join(tmp, "sbin"))
    with open(os.path.join(tmp, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
    with open(os.path.join(tmp, "etc", "group"), "w") as f:
        f.write("root:x:0:\n")
    os.rename(tmp, dest)
    return dest


def base_spec(runc="runc"):
    """The default spec of `runc spec`, as a dict."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([runc, "spec", "--bundle", d], check=True)
        with open(os.path.join(d, "config.json")) as f:
            return json.load(f)


def make_bundle(dest, args, rootfs=None, env=None, cgroups_path=None, hostname=None,
                runc="runc", copy_rootfs=True, mounts=None, annotations=None):
    """Create a bundle at `dest` running `args`.

    rootfs: a prepared rootfs dir to copy (or to point at when copy_rootfs is False);
    by default a fresh busybox rootfs is made in the bundle.
    """
    os.makedirs(dest, exist_ok=True)
    root_dir = os.path.join(dest, "rootfs")
    if rootfs is None:
        make_rootfs(root_dir)
        root_path = "rootfs"
    elif copy_rootfs:
        shutil.copytree(rootfs, root_dir, symlinks=True)
        root_path = "rootfs"
    else:
        root_path = os.path.abspath(rootfs)
    spec = base_spec(runc)
    spec["root"] = {"path": root_path, "readonly": False}
    proc = spec["process"]
    proc["terminal"] = False
    proc["args"] = list(args)
    proc["env"] = ["PATH=/bin:/usr/bin:/sbin", "HOME=/root"] + list(env or [])
    if hostname:
        spec["hostname"] = hostname
    if cgroups_path:
        spec["linux"]["cgroupsPath"] = cgroups_path
    if mounts:
        spec["mounts"].extend(mounts)
    if annotations:
        spec.setdefault("annotations", {}).update(annotations)
    write_spec(dest, spec)
    return dest


def read_spec(bundle):
    with open(os.path.join(bundle, "config.json")) as f:
        return json.load(f)


def write_spec(bundle, spec):
    path = os.path.join(bundle, "config.json")
    with open(path + ".tmp", "w") as f:
        f.write(json.dumps(spec, indent=2))
    os.replace(path + ".tmp", path)


def set_env(bundle, name, value):
    """Set (or with value None, remove) an env variable in the bundle's process.env."""
    spec = read_spec(bundle)
    env = [e for e in spec["process"].get("env", []) if not e.startswith(name + "=")]
    if value is not None:
        env.append(f"{name}={value}")
    spec["process"]["env"] = env
    write_spec(bundle, spec)
