"""Staged migrations on a node: where they live, their records, and their cleanup.

A migration arriving at the agent is staged in two places: its memory images (CRIU's
files and the manifest) on tmpfs, `<staging>/<mid>/image`, and the container's rootfs
changes on the node's disk, `<disk>/<mid>/rootfs`, so that they can be renamed into the
destination bundle. `<staging>/<mid>/migration.json` records its state:

    receiving -> staged -> restoring -> restored
                        \\-> failed

`MIGRT_RESTORE_FROM=staged:<mid>` names a staged migration (migrt.runtime.sources.staged).
"""
import json
import os
import re
import shutil
import time
from migrt.safeio import makedirs_private

DEFAULT_STAGING = "/run/migrt/staged"
DEFAULT_DISK = "/var/lib/migrt/staged"
MID_RE = re.compile(r"^m-[0-9a-f]{8,32}$")
CID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,1023}$")
RECORD = "migration.json"


def staging_root():
    return os.environ.get("MIGRT_STAGING", DEFAULT_STAGING)


def staging_key(staging):
    import hashlib
    return hashlib.sha1(os.path.realpath(staging).encode()).hexdigest()[:16]


def private_root(staging=None):
    """Root's own records of the restores for one staging dir (one agent): two agents
    on a node (other staging dirs) never sweep each other's records."""
    return os.path.join(os.environ.get("MIGRT_STATE_DIR", "/run/migrt"), "agent",
                        staging_key(staging or staging_root()))


def _disk_note(staging):
    return os.path.join(os.environ.get("MIGRT_STATE_DIR", "/run/migrt"), "agent",
                        f"disk-{staging_key(staging)}.json")


def note_disk(staging, disk):
    """The agent (as root) notes where its staging dir's rootfs changes go, for the
    runtime that restores a `staged:` marker without the agent's settings (containerd
    runs it): in root's own dir, never in the staged record."""
    from migrt.safeio import makedirs_private, write_private
    p = _disk_note(staging)
    makedirs_private(os.path.dirname(p))
    write_private(p, json.dumps({"staging": os.path.realpath(staging),
                                 "disk": os.path.abspath(disk)}).encode())


def disk_root(staging=None):
    """Where the rootfs changes of this staging dir's migrations are: $MIGRT_STAGING_DISK,
    else what its agent noted (note_disk, root-owned only), else the default."""
    env = os.environ.get("MIGRT_STAGING_DISK")
    if env:
        return env
    from migrt.safeio import open_regular
    try:
        fd = open_regular(_disk_note(staging or staging_root()))
        with os.fdopen(fd, "rb") as f:
            if os.fstat(f.fileno()).st_uid == 0:
                disk = json.loads(f.read(1 << 16)).get("disk")
                if isinstance(disk, str) and os.path.isabs(disk):
                    return disk
    except (OSError, ValueError, AttributeError):
        pass
    return DEFAULT_DISK


def valid_mid(mid):
    return isinstance(mid, str) and bool(MID_RE.match(mid))


def valid_cid(cid):
    """A container id as runc accepts it (no path separators, no `..`)."""
    return isinstance(cid, str) and bool(CID_RE.match(cid)) and cid not in (".", "..")


def new_mid():
    return "m-" + os.urandom(8).hex()


class Staged:
    """One staged migration."""

    def __init__(self, mid, staging=None, disk=None):
        if not valid_mid(mid):
            raise ValueError(f"not a migration id: {mid!r}")
        self.mid = mid
        self.dir = os.path.join(staging or staging_root(), mid)
        self.image_dir = os.path.join(self.dir, "image")
        self.tls_dir = os.path.join(self.dir, "tls")       # lazy mode's page TLS identity
        self.record_path = os.path.join(self.dir, RECORD)
        # derived, never read from the record (which the agent's network side writes)
        self.disk_dir = os.path.join(disk or disk_root(staging), mid)
        self.rootfs_dir = os.path.join(self.disk_dir, "rootfs")

    def create(self, **fields):
        for d in (os.path.dirname(self.dir), os.path.dirname(self.disk_dir)):
            makedirs_private(d)
        os.mkdir(self.dir, 0o700)
        makedirs_private(self.disk_dir)
        os.chmod(self.disk_dir, 0o700)
        self.write(dict(fields, mid=self.mid, state="receiving", created=time.time()))

    def linked(self):
        """Is any of this migration's own dirs a symlink? (The network side owns them;
        root must not be sent elsewhere through one.)"""
        return any(os.path.islink(p) for p in (self.dir, self.image_dir, self.disk_dir,
                                                self.rootfs_dir, self.tls_dir))

    def read(self):
        """The record (never through a symlink, never blocking on a FIFO)."""
        from migrt.safeio import read_regular
        if os.path.islink(self.dir):
            return None
        try:
            rec = json.loads(read_regular(self.record_path, 1 << 20))
            return rec if isinstance(rec, dict) else None
        except (OSError, ValueError):
            return None

    def write(self, rec):
        from migrt.safeio import write_private
        if os.path.islink(self.dir):
            raise OSError(40, "a symlink, not the migration's dir", self.dir)
        rec["updated"] = time.time()
        write_private(self.record_path, json.dumps(rec).encode())

    def update(self, **fields):
        rec = self.read() or {"mid": self.mid}
        rec.update(fields)
        self.write(rec)
        return rec

    def drop_images(self):
        """The memory images are not needed once the container runs (non-lazy)."""
        shutil.rmtree(self.image_dir, ignore_errors=True)
        if self.disk_dir:
            shutil.rmtree(self.disk_dir, ignore_errors=True)

    def remove(self):
        self.drop_images()
        # renamed away first: a record another thread writes meanwhile (a data
        # connection's failure) then finds no dir, instead of landing in a dir rmtree
        # has already listed and leaving a lone migration.json behind
        gone = f"{self.dir}.removing-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.rename(self.dir, gone)
        except FileNotFoundError:
            return
        except OSError:
            gone = self.dir
        shutil.rmtree(gone, ignore_errors=True)


def all_staged(staging, disk=None):
    try:
        names = os.listdir(staging)
    except FileNotFoundError:
        return []
    out = []
    for n in sorted(names):
        if valid_mid(n):
            out.append(Staged(n, staging, disk))
    return out


def sweep(staging, ttl, active=(), startup=False, log=None, disk=None):
    """Remove staged migrations older than ttl, and (at startup) any left half-received
    by a previous agent. Disk dirs with no tmpfs record (tmpfs lost at reboot) go too."""
    now = time.time()
    removed = []
    for s in all_staged(staging, disk):
        if s.mid in active:
            continue
        rec = s.read()
        if rec is None:
            # no record (yet): one being created has its dir and not yet its record
            # (Staged.create), so its age is its dir's, never "since 1970" (that swept
            # a migration arriving while the janitor ran: its transfer then failed)
            try:
                rec = {"updated": os.lstat(s.dir).st_mtime}
            except OSError:
                continue
        state = rec.get("state")
        age = now - rec.get("updated", rec.get("created", 0))
        lazy_busy = (state == "restored" and rec.get("lazy") and age < ttl) \
            or state == "filling"       # its image still feeds a running container
        if rec.get("retain") and state in ("staged", "restoring"):
            # handed off (the `keep` op): its source is gone, this is the workload; it
            # goes when its restore is released or the caller drops it, never by age
            continue
        # at startup a staged copy has lost its control session (the source rolls back
        # or asks for status, which then says "unknown"): nobody will restore it
        if (startup and state in ("receiving", "staged", None)) or (age > ttl and not lazy_busy) \
                or (state in ("failed", "done") and not rec.get("lazy")):
            s.remove()
            removed.append(s.mid)
            if log:
                log(f"removed staged migration {s.mid} ({state}, {age:.0f}s old)")
    return removed


def sweep_disk(staging, disk):
    try:
        names = os.listdir(disk)
    except FileNotFoundError:
        return
    for n in names:
        if valid_mid(n) and not os.path.exists(os.path.join(staging, n)):
            shutil.rmtree(os.path.join(disk, n), ignore_errors=True)
