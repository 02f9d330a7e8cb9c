"""What a restore marker names, and whether it can be restored here.

`MIGRT_RESTORE_FROM=<value>` in a bundle's process.env names the checkpoint:

- an absolute path: a checkpoint directory made by `runc checkpoint` or
  `migrt checkpoint` (the latter adds migrt/manifest.json, verified before restore);
- `scheme:rest` (e.g. `staged:<migration-id>`): resolved by
  `migrt.runtime.sources.<scheme>.resolve(rest, bundle)`, which returns a RestoreSource.

Markers are refused unless they resolve (symlinks and `..` followed) under one of the
allowed checkpoint locations: MIGRT_CHECKPOINT_DIRS (colon-separated), by default
/var/lib/migrt/checkpoints and /run/migrt. A pod spec must not be able to name an
arbitrary host path and restore another workload's memory.

Everything is checked before runc is called: a missing or incomplete checkpoint, a
symlink inside it, or one made on another architecture gets its own message.

A checkpoint taken from a Kubernetes pod records the pod's namespace (from the
annotation containerd or CRI-O put in the bundle); a pod of another namespace cannot
restore it, even by naming it, unless the node allows that (MIGRT_ALLOW_CROSS_NAMESPACE=1).
"""
import os
import platform
import re
import struct

from migrt.errors import CheckpointError

# the dump's flags that its restore needs too (runc restore takes the same ones)
RESTORE_FLAGS = ("--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks")
# In a lazy migration with a pre-copy (migrate --precopy --lazy), the dump made while
# the container ran, in this subdir of the images dir (CRIU's own name for an earlier
# dump of the same tasks): the lazy pages that are the same as there are read from it
PRECOPY_PARENT = "parent"

DEFAULT_DIRS = ("/var/lib/migrt/checkpoints", "/run/migrt")

# The files without which CRIU cannot even start a restore.
REQUIRED = ("inventory.img", "pstree.img")

# CRIU image magics (criu/include/magic.h).
IMG_COMMON_MAGIC = 0x54564319
CORE_MAGIC = 0x55053847

# CoreEntry.mtype (images/core.proto, enum march) and uname machine names.
MARCH = {1: "x86_64", 2: "arm", 3: "aarch64", 4: "ppc64le", 5: "s390x", 6: "mips64",
         7: "loongarch64", 8: "riscv64"}


class RestoreSource:
    """A checkpoint ready to restore, and what to do around the restore.

    image_dir      CRIU images (runc restore --image-path)
    restore_flags  extra `runc restore` flags the checkpoint needs (--tcp-established...)
    lazy_address   "host:port" of a page server: restore with lazy-pages from it
    lazy_tls       its TLS files (migrt.criu.pagetls.files), or None for plain TCP
    lazy_local     restore with lazy-pages from image_dir itself: the container runs
                   before its memory is all back (migrt.runtime.sources.staged); the daemon
                   reports in the restore's work dir (FILL_STATUS), which the agent
                   finds through migrt's record of the container (migrt.agent.fill)
    prepare        callable(bundle, spec, journal) run before runc restore (rootfs
                   changes, noted in the migrt.image.rootfs.Journal to be undone on failure)
    on_restored    callable(cid, pid, root, spec) after the container runs (root: runc's
                   --root)
    pending        a path that exists until the migration behind this restore has ended
                   (a lazy one's staged dir: its memory still comes from the source), or
                   None: a pod's container restarted meanwhile is refused (podrules)
    on_failed      callable(cid, message) after a failed restore was cleaned up
    criu_conf      CRIU config-file lines the restore needs (runc has no flag for them)
    cleanup        callable() once the restore is over, however it ended (attached `run`
                   included): what was made only for it goes (an unpacked archive)
    """

    def __init__(self, image_dir, restore_flags=(), lazy_address=None, prepare=None,
                 on_restored=None, on_failed=None, description=None, lazy_tls=None,
                 lazy_local=False, criu_conf=()):
        self.image_dir = image_dir
        self.criu_conf = list(criu_conf)
        self.restore_flags = list(restore_flags)
        self.lazy_address = lazy_address
        self.lazy_tls = lazy_tls
        self.lazy_local = lazy_local and not lazy_address
        self.prepare = prepare
        self.on_restored = on_restored
        self.on_failed = on_failed
        self.description = description or image_dir
        self.namespace = None       # the pod namespace an engine archive recorded
        self.cleanup = None
        self.pending = None


def check_namespace(image_dir, spec, marker, theirs=None):
    """Refuse a restore into a pod of another namespace than the checkpointed pod's
    (`theirs`: the namespace an engine archive recorded, if the image has no manifest)."""
    if os.environ.get("MIGRT_ALLOW_CROSS_NAMESPACE") == "1":
        return
    from migrt.image.manifest import pod_namespace
    here = pod_namespace(spec)
    if here is None:            # not a pod: root on this node restoring by hand
        return
    import json
    from migrt.safeio import read_regular
    try:
        theirs = (json.loads(read_regular(os.path.join(image_dir, "migrt", "manifest.json")))
                  .get("container") or {}).get("namespace") or theirs
    except (OSError, ValueError, AttributeError):
        pass                    # no manifest: validate() already decided about it
    if theirs and theirs != here:
        raise CheckpointError(
            f"checkpoint {marker} was taken from a pod in namespace {theirs!r}; this pod "
            f"is in {here!r} (a node can allow it with MIGRT_ALLOW_CROSS_NAMESPACE=1)")


def allowed_dirs():
    env = os.environ.get("MIGRT_CHECKPOINT_DIRS")
    dirs = [d for d in env.split(":") if d] if env else list(DEFAULT_DIRS)
    return [os.path.realpath(d) for d in dirs]


def check_allowed(path, value):
    from migrt.errors import shown
    real = os.path.realpath(path)
    for d in allowed_dirs():
        if real == d or real.startswith(d.rstrip("/") + "/"):
            return real
    raise CheckpointError(
        f"checkpoint {value}: {shown(real)} is outside the allowed checkpoint locations "
        f"({':'.join(allowed_dirs())}; set MIGRT_CHECKPOINT_DIRS)")


def resolve(value, bundle):
    """Turn a marker value into a validated RestoreSource."""
    from migrt.errors import shown as display
    shown = display(value)
    m = re.match(r"^([a-z][a-z0-9_-]{0,63}):(.+)$", value, re.S)
    if m and not value.startswith("/"):
        scheme, rest = m.groups()
        import importlib
        try:
            mod = importlib.import_module(f"migrt.runtime.sources.{scheme.replace('-', '_')}")
        except ImportError:
            raise CheckpointError(f"checkpoint {shown}: unknown checkpoint source {scheme!r}")
        return mod.resolve(rest, bundle)
    if not os.path.isabs(value) or "\0" in value or len(value) > 4096:
        raise CheckpointError(f"checkpoint {shown}: must be an absolute path or scheme:name")
    real = check_allowed(value, shown)
    if os.path.isfile(real) or (os.path.isdir(real) and _archive_dir(real)):
        return resolve_archive(real, shown)
    validate(real, shown)
    return RestoreSource(real, restore_flags=manifest_flags(real), prepare=manifest_prepare(real),
                         description=value)


def _archive_dir(path):
    from migrt.image import archive
    return archive.is_archive_dir(path)


def resolve_archive(real, value):
    """A podman / CRI-O / kubelet checkpoint archive: the .tar (plain, gzip or zstd,
    unpacked into a private dir that goes when the restore is over) or the directory it
    was unpacked into. Its rootfs-diff.tar and deleted.files go into the new bundle's
    rootfs; an archive `migrt image export` wrote carries a migrt image in checkpoint/,
    verified and applied as any migrt image."""
    import shutil
    from migrt.image import archive
    unpacked = None
    if os.path.isfile(real):
        unpacked = archive.unpack_private(real, value)
        root = unpacked
    else:
        root = real

    def drop(*_args):
        if unpacked:
            shutil.rmtree(unpacked, ignore_errors=True)

    try:
        image_dir = os.path.join(root, archive.CHECKPOINT)
        validate(image_dir, value)
        archive.check_rootfs_diff(root, value)
        archive.deleted_files(root, value)
        info = archive.describe(root)
        from migrt.image import rootfs_of
        flags, migrt_prep = [], None
        if os.path.exists(os.path.join(image_dir, "migrt", "manifest.json")):
            flags, migrt_prep = manifest_flags(image_dir), manifest_prepare(image_dir)
            # a migrt image podman or CRI-O packed: their rootfs-diff.tar is the layer
            from migrt.image import manifest as mf
            if (mf.load(image_dir).get("rootfs") or {}).get("kind") == "engine":
                migrt_prep = None

        def prepare(bundle, spec, journal=None):
            if migrt_prep:
                migrt_prep(bundle, spec, journal=journal)
            else:
                # an engine's rootfs-diff.tar: not journalled (a failed restore leaves
                # what it unpacked in the new container's rootfs)
                archive.apply_rootfs(root, rootfs_of(bundle, spec), value)
    except BaseException:
        drop()
        raise
    src = RestoreSource(image_dir, restore_flags=flags, prepare=prepare, description=value)
    src.namespace = info.get("namespace")
    src.cleanup = drop
    return src


def validate(image_dir, name=None):
    """Refuse a checkpoint dir that is missing, incomplete, foreign or tampered with."""
    name = name or image_dir
    if not os.path.exists(image_dir):
        raise CheckpointError(f"checkpoint {name} does not exist")
    if not os.path.isdir(image_dir):
        raise CheckpointError(f"checkpoint {name} is not a directory (nor a checkpoint "
                              f"archive)")
    try:
        entries = os.listdir(image_dir)
    except OSError as e:
        raise CheckpointError(f"checkpoint {name}: cannot read: {e.strerror}")
    import stat
    for e in sorted(entries):
        try:
            st = os.lstat(os.path.join(image_dir, e))
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode):
            raise CheckpointError(f"checkpoint {name}: {e} is a symlink; refusing to restore")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise CheckpointError(f"checkpoint {name}: {e} is not a regular file; "
                                  f"refusing to restore")
    missing = [f for f in REQUIRED if f not in entries]
    cores = sorted(e for e in entries if e.startswith("core-") and e.endswith(".img"))
    if not cores:
        missing.append("core-*.img")
    if missing:
        hint = ""
        if "inventory.img" in missing and os.path.isfile(os.path.join(image_dir, "checkpoint",
                                                                      "inventory.img")):
            hint = " (its checkpoint/ subdirectory holds CRIU's images)"
        raise CheckpointError(f"checkpoint {name} is incomplete: missing "
                              f"{', '.join(missing)}{hint}")
    if os.path.exists(os.path.join(image_dir, "migrt", "manifest.json")):
        from migrt import image
        image.verify_image(image_dir)
    here = platform.machine()
    for core in cores:
        arch = core_arch(os.path.join(image_dir, core), name)
        if arch != here:
            raise CheckpointError(
                f"checkpoint {name} was made on {arch} ({core}); this node is {here}")


def core_arch(path, name):
    """Read CoreEntry.mtype from a CRIU core-<pid>.img."""
    from migrt.safeio import read_regular
    try:
        head = read_regular(path, 64)
    except OSError as e:
        raise CheckpointError(f"checkpoint {name}: cannot read {os.path.basename(path)}: {e.strerror}")
    base = os.path.basename(path)
    if len(head) < 14:
        raise CheckpointError(f"checkpoint {name}: {base} is truncated")
    magic, kind, size = struct.unpack_from("<III", head)
    if magic != IMG_COMMON_MAGIC or kind != CORE_MAGIC:
        raise CheckpointError(f"checkpoint {name}: {base} is not a CRIU core image")
    if head[12] != 0x08:          # field 1 (mtype), wire type varint
        raise CheckpointError(f"checkpoint {name}: {base} has no machine type")
    try:
        from migrt.image.criuimg import varint
        value, _ = varint(head, 13)
    except IndexError:
        raise CheckpointError(f"checkpoint {name}: {base} is truncated")
    return MARCH.get(value, f"unknown machine type {value}")


def manifest_flags(image_dir):
    """runc restore flags recorded at checkpoint time (migrt images only)."""
    path = os.path.join(image_dir, "migrt", "manifest.json")
    if not os.path.exists(path):
        return []
    import json
    from migrt.safeio import read_regular
    try:
        man = json.loads(read_regular(path, 64 << 20))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}")
    return [f for f in man.get("criu_flags", []) if f in RESTORE_FLAGS]


def manifest_criu_conf(man):
    """CRIU options the restore needs that runc has no flag for (CRIU's config file,
    migrt.criu.config): --tcp-close, when the dump restored connections closed because
    the container's IP changes (migrt.migration.migrate)."""
    return ["tcp-close"] if "--tcp-close" in (man.get("criu_flags") or []) else []


def manifest_prepare(image_dir):
    if not os.path.exists(os.path.join(image_dir, "migrt", "manifest.json")):
        return None
    from migrt import image
    prep = getattr(image, "prepare_restore", None)
    if prep is None:
        return None
    return lambda bundle, spec, journal=None: prep(image_dir, bundle, spec, journal=journal)
