"""`migrt doctor`: check this node for everything migrt needs, and say how to fix it.

Each check returns one Finding: ok, warn (migrt works, a feature is missing) or missing
(migrt cannot do its job here), with the fix in one line. The exit status is 1 when any
required check is missing, so an install script or a DaemonSet's readiness probe can use
it. The checks only read, with one exception that leaves nothing behind: a real CRIU
probe (migrt.criu.probe) dumps and restores a tiny helper process holding a TCP connection
and file locks, in its own network namespace and a temporary dir.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

import click

OK, WARN, MISSING = "ok", "warn", "MISSING"

CONTAINERD_CONFIG = "/etc/containerd/config.toml"
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
CRIO_CONFIG = "/etc/crio/crio.conf"
CRIO_DROP_INS = "/etc/crio/crio.conf.d"
CRI_TABLES = {2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}
REGISTER = "python3 /opt/migrt/lib/packaging/containerd_register.py register"
MIN_STAGING = 256 << 20
# Debian 12's runc (1.1.5) is the oldest seen working with CRIU 4.
MIN_RUNC = (1, 1)
MIN_CRIU = (4, 0)
INSTALL = ("bash packaging/install.sh (it builds CRIU 4.2.1 from Debian's source into "
           "/usr/local/sbin/criu)")
CAP_SYS_RESOURCE = 24


class Finding:
    def __init__(self, name, status, detail, fix=None, required=True):
        self.name, self.status, self.detail, self.fix = name, status, detail, fix
        self.required = required

    def as_dict(self):
        return {"check": self.name, "status": self.status, "detail": self.detail,
                "fix": self.fix, "required": self.required}


class Node:
    """What the checks look at; tests replace it with a fake node."""

    def criu(self):
        """The CRIU migrt and its runc use (migrt.runc.criu_path), or None."""
        from migrt.runc import criu_path
        path = criu_path()
        return path if os.path.isabs(path) and os.access(path, os.X_OK) else None

    def criu_probe(self, criu):
        """Dump and restore a helper holding a TCP connection and file locks."""
        from migrt.criu import probe as criuprobe
        return criuprobe.run(criu)

    def capabilities(self):
        """This process's effective capability set, as a number (None if unknown)."""
        try:
            for line in self.read("/proc/self/status").splitlines():
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
        except (OSError, ValueError):
            pass
        return None

    def which(self, name, extra=("/usr/sbin", "/sbin", "/usr/local/sbin")):
        found = shutil.which(name)
        if found:
            return found
        for d in extra:
            p = os.path.join(d, name)
            if os.access(p, os.X_OK):
                return p
        return None

    def run(self, argv, timeout=30):
        """(exit code, stdout + stderr); (127, why) when it cannot run at all."""
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            return 127, str(e)
        return p.returncode, p.stdout + p.stderr

    def stat(self, path):
        return os.stat(path)

    def exists(self, path):
        return os.path.exists(path)

    def read(self, path):
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")

    def glob(self, pattern):
        return sorted(glob.glob(pattern))

    def statvfs(self, path):
        while not os.path.exists(path):
            path = os.path.dirname(path)
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize

    def fstype(self, path):
        from migrt.agent import stagefs
        return stagefs.mount_of(path)[1]

    def staging_mounted_by_agent(self, path):
        from migrt.agent import stagefs
        return bool(stagefs.mounted_by_us(path))

    def staging_tmpfs_size(self):
        from migrt.agent import stagefs
        size = os.environ.get("MIGRT_STAGING_SIZE")
        if size:
            from migrt.commands.agent import _size
            size = _size(size)
        return stagefs.default_size(size)

    def env(self, name):
        return os.environ.get(name)


def version_of(text):
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(x) for x in m.groups() if x is not None) if m else None


def show(v):
    return ".".join(map(str, v)) if v else "?"


# --- the checks -------------------------------------------------------------------------

def check_runc(node):
    path = os.environ.get("MIGRT_RUNC") or node.which("runc")
    if not path:
        return Finding("runc", MISSING, "runc not found (MIGRT_RUNC, PATH, /usr/sbin)",
                       f"apt-get install runc, or {INSTALL}")
    rc, out = node.run([path, "--version"])
    v = version_of(out)
    if rc != 0 or not v:
        return Finding("runc", MISSING, f"{path} --version failed: {out.strip()[:200]}",
                       "reinstall runc")
    if v < MIN_RUNC:
        return Finding("runc", MISSING, f"runc {show(v)} ({path}) is older than "
                       f"{show(MIN_RUNC)}", f"install runc {show(MIN_RUNC)} or later: {INSTALL}")
    return Finding("runc", OK, f"runc {show(v)} ({path})")


def check_criu(node):
    path = node.criu()
    if not path:
        return [Finding("criu", MISSING, "criu not found: runc needs it on PATH for every "
                        "checkpoint and restore", INSTALL)]
    rc, out = node.run([path, "--version"])
    v = version_of(out)
    found = []
    if not v or v < MIN_CRIU:
        found.append(Finding("criu", MISSING, f"CRIU {show(v)} ({path}): 4.x is required "
                             "(3.x fails `criu check` on current kernels: vDSO bounds)",
                             INSTALL))
        return found
    rc, out = node.run([path, "check"], timeout=60)
    if rc != 0 or "Looks good" not in out:
        err = [ln for ln in out.splitlines() if "Error" in ln or "error" in ln][:2]
        found.append(Finding("criu check", MISSING, f"CRIU {show(v)} ({path}): `criu check` "
                             f"failed: {'; '.join(err) or out.strip()[:200]}",
                             "run `criu check` as root and fix what it names (kernel "
                             "config, or a newer CRIU)"))
    else:
        found.append(Finding("criu", OK, f"CRIU {show(v)} ({path}): criu check: Looks good"))
        found.append(check_criu_probe(node, path, v))
    found.append(check_criu_features(path))
    rc, out = node.run([path, "check", "--feature", "uffd-noncoop"])
    if rc == 0:
        found.append(Finding("lazy restore", OK, "uffd-noncoop supported: post-copy "
                             "(lazy-pages) migration available", required=False))
    else:
        found.append(Finding("lazy restore", WARN, "uffd-noncoop not supported: no post-copy "
                             "(lazy-pages) migration; migrations stop the container for the "
                             "whole copy", "a kernel with CONFIG_USERFAULTFD (5.x or later)",
                             required=False))
    rc, out = node.run([path, "check", "--feature", "network_lock_nftables"])
    if rc == 0:
        found.append(Finding("network lock", OK, "nftables network lock supported: "
                             "migrations lock the container's network inside CRIU (no "
                             "iptables programs during the downtime)", required=False))
    else:
        found.append(Finding("network lock", WARN, "no nftables network lock (CRIU without "
                             "libnftables, or a kernel without nf_tables): migrations lock "
                             "with iptables, about 0.1 s more downtime",
                             "a kernel with CONFIG_NF_TABLES and a CRIU built with "
                             "libnftables (Debian's is)", required=False))
    rc, out = node.run([path, "check", "--feature", "mem_dirty_track"])
    if rc == 0:
        found.append(Finding("pre-copy", OK, "mem_dirty_track supported: iterative pre-dump "
                             "available", required=False))
    else:
        found.append(Finding("pre-copy", WARN, "soft-dirty memory tracking is off in this "
                             "kernel: no pre-dump / iterative pre-copy (lazy restore still "
                             "works)", "a kernel with CONFIG_MEM_SOFT_DIRTY", required=False))
    return found


def check_criu_features(path):
    """Which of migrt's CRIU patches (packaging/criu-patches) this CRIU carries, read
    from the binary (migrt.criu.features): migrt drives a CRIU without one as before,
    only slower, so a missing one is a warning that says what it costs."""
    from migrt.criu import features
    have = features.of(path)
    missing = [n for n in features.KNOWN if n not in have]
    if not missing:
        return Finding("criu patches", OK, f"{path} carries migrt's CRIU patches: "
                       + ", ".join(n for n in features.KNOWN), required=False)
    return Finding("criu patches", WARN, f"{path} lacks migrt's CRIU patches: "
                   + "; ".join(f"{n} ({features.KNOWN[n]})" for n in missing),
                   INSTALL, required=False)


def check_criu_probe(node, path, v):
    """What `criu check` does not tell: can CRIU dump and restore what servers hold?"""
    r = node.criu_probe(path)
    if r.ok and r.map_locks is False:
        return Finding("criu probe", WARN, f"CRIU {show(v)} dumped and restored a process "
                       "holding an established TCP connection and file locks, but it lost "
                       "its POSIX lock on a file it maps shared: migrate refuses containers "
                       "that hold such a lock (SQLite in WAL mode does)",
                       "install.sh's CRIU (packaging/criu-patches keeps that lock): "
                       + INSTALL, required=False)
    if r.ok:
        return Finding("criu probe", OK, f"CRIU {show(v)} dumped and restored a process "
                       "holding an established TCP connection (--tcp-established) and file "
                       "locks (--file-locks)")
    if r.stage == "setup":
        return Finding("criu probe", WARN, f"could not run the CRIU probe: {r.error}",
                       "run `migrt doctor` as root on the node", required=False)
    hint = ""
    if re.search(r"sockets\.c.*Can't get \d+:\d+ opt", r.error):
        hint = (" (CRIU before 4.2 cannot read socket options on kernels 6.16 and later: "
                "no server can be checkpointed)")
    return Finding("criu probe", MISSING, f"CRIU {show(v)} ({path}) failed to {r.stage} a "
                   f"process holding a TCP connection and file locks: {r.error}{hint}",
                   INSTALL if hint else "see `migrt logs --criu`; a newer CRIU: " + INSTALL)


def check_sys_resource(node):
    caps = node.capabilities()
    if caps is None:
        return Finding("CAP_SYS_RESOURCE", WARN, "cannot read this process's capabilities",
                       required=False)
    if caps & (1 << CAP_SYS_RESOURCE):
        return Finding("CAP_SYS_RESOURCE", OK, "root has CAP_SYS_RESOURCE: CRIU can dump "
                       "processes of any uid", required=False)
    return Finding("CAP_SYS_RESOURCE", WARN, "root lacks CAP_SYS_RESOURCE here (a sandbox or "
                   "restricted VM): CRIU cannot dump a process that runs as a non-root uid "
                   "(\"Can't get rlimit: Operation not permitted\"); containers running as "
                   "root still migrate", "run the node (or migrt's agent) with "
                   "CAP_SYS_RESOURCE in its bounding set", required=False)


def check_iptables(node):
    missing = [t for t in ("iptables-restore", "ip6tables-restore") if not node.which(t)]
    if missing:
        return Finding("iptables", MISSING, f"{', '.join(missing)} not found: CRIU locks the "
                       "container's network with them and every dump fails without them "
                       "(\"Locking network failed\")", "apt-get install iptables")
    return Finding("iptables", OK, "iptables-restore and ip6tables-restore found")


def check_userfaultfd(node):
    if node.exists("/dev/userfaultfd") or node.exists("/proc/sys/vm/unprivileged_userfaultfd"):
        return Finding("userfaultfd", OK, "the kernel has userfaultfd", required=False)
    return Finding("userfaultfd", WARN, "no userfaultfd in this kernel: lazy restore "
                   "(post-copy migration) is not possible", "a kernel with CONFIG_USERFAULTFD",
                   required=False)


def check_page_server(node):
    from migrt.criu import lazycheck
    why = lazycheck.problem(read=node.read)
    if why is None:
        return Finding("page server", OK, "CRIU's page server can size its pipe "
                       "(lazy migrations from this node)", required=False)
    return Finding("page server", WARN, why.split("; raise it")[0],
                   f"sysctl -w fs.pipe-max-size={lazycheck.PAGE_SERVER_PIPE} (persisted by "
                   "packaging/install.sh in /etc/sysctl.d/90-migrt.conf)", required=False)


CAP_SYS_ADMIN = 21


def check_staging(node, staging, need=MIN_STAGING):
    """The agent keeps memory images on a tmpfs: the one there, or one it mounts itself
    when it starts (migrt.agent.stagefs)."""
    kind = node.fstype(staging)
    if kind == "tmpfs":
        free = node.statvfs(staging)
        who = "a tmpfs the migrt agent mounted" if node.staging_mounted_by_agent(staging) \
            else "tmpfs"
        detail = f"{staging}: {free >> 20} MiB free on {who}"
        if free < need:
            return Finding("staging room", MISSING, detail + f"; migrations stage memory "
                           f"images there and need at least {need >> 20} MiB (as much as the "
                           "largest container's memory)", f"a bigger tmpfs on {staging} "
                           "(mount -o remount,size=...), or point MIGRT_STAGING elsewhere")
        return Finding("staging room", OK, detail)
    if node.env("MIGRT_STAGING_ON_DISK") == "1":
        free = node.statvfs(staging)
        return Finding("staging room", WARN, f"{staging}: {free >> 20} MiB free on {kind}; "
                       "MIGRT_STAGING_ON_DISK=1 keeps staged memory images on that disk "
                       "(slower restores)", f"unset MIGRT_STAGING_ON_DISK: the agent then mounts "
                       f"a tmpfs on {staging}", required=False)
    size = node.staging_tmpfs_size()
    caps = node.capabilities()
    if caps is not None and not caps & (1 << CAP_SYS_ADMIN):
        return Finding("staging room", MISSING, f"{staging} is on {kind}, not a tmpfs, and "
                       "without CAP_SYS_ADMIN the agent cannot mount one there: it refuses "
                       "to start", f"run the agent as root, or mount a tmpfs there: mount -t "
                       f"tmpfs -o size=4G tmpfs {staging}")
    detail = (f"{staging} is on {kind}, not a tmpfs: `migrt agent` mounts a private tmpfs "
              f"there when it starts ({size >> 20} MiB: $MIGRT_STAGING_SIZE or half of "
              "memory, at most what is available) and unmounts it when it exits")
    if size < need:
        return Finding("staging room", MISSING, detail + f"; migrations need at least "
                       f"{need >> 20} MiB", "more free memory on this node", )
    return Finding("staging room", OK, detail)


def containerd_effective(node, config):
    """The config containerd would use, with 1.x's import rule: each imported file
    replaces the whole plugins."<id>" tables it names. Returns (doc, files read)."""
    doc = tomllib.loads(node.read(config))
    files = [config]
    pending = list(doc.get("imports", []))
    while pending:
        pattern = pending.pop(0)
        if not os.path.isabs(pattern):
            pattern = os.path.join(os.path.dirname(config), pattern)
        for path in (node.glob(pattern) if "*" in pattern else [pattern]):
            if path in files:
                continue
            files.append(path)
            sub = tomllib.loads(node.read(path))
            for k, v in sub.items():
                if k == "plugins":
                    doc.setdefault("plugins", {}).update(v)
                elif k == "imports":
                    pending.extend(v)
                elif k != "version" or "version" not in doc:
                    doc[k] = v
    return doc, files


def check_kdat(stamp="/usr/local/share/migrt/criu-build"):
    """CRIU's kernel-feature cache (migrt.criu.kdat): on a tmpfs, or every dump and
    restore probes the kernel again (0.04 to 0.05 s each, in the downtime)."""
    from migrt.criu import kdat
    try:
        with open(stamp) as f:
            ours = f"rundir={kdat.DIR}" in f.read()
    except OSError:
        ours = False
    if not ours:
        return Finding("CRIU kernel cache", OK, "CRIU is not install.sh's build: it keeps "
                       "its cache where it was built to (on a tmpfs /run, as usual)",
                       required=False)
    ok, line = kdat.state()
    return Finding("CRIU kernel cache", OK if ok else WARN, line,
                   None if ok else f"start the agent (it mounts a tmpfs on {kdat.DIR}), or "
                   f"mount one there", required=False)


def check_containerd(node, config=CONTAINERD_CONFIG, migrt_path=None):
    if not node.which("containerd"):
        return None
    if not node.exists(config):
        return Finding("containerd", MISSING, f"containerd is installed but {config} does "
                       "not exist, so no runtime handler migrt", REGISTER)
    try:
        doc, files = containerd_effective(node, config)
    except (OSError, tomllib.TOMLDecodeError) as e:
        return Finding("containerd", MISSING, f"cannot read containerd's config: {e}",
                       f"fix {config}")
    version = doc.get("version", 1)
    table = CRI_TABLES.get(version)
    if table is None:
        return Finding("containerd", MISSING, f"{config}: config version {version}: migrt's "
                       "drop-ins need version 2 (containerd 1.6/1.7) or 3 (2.x)",
                       "containerd config migrate > new.toml, then " + REGISTER)
    cri = doc.get("plugins", {}).get(table, {})
    runtimes = cri.get("containerd", {}).get("runtimes", {})
    default = cri.get("containerd", {}).get("default_runtime_name", "runc")
    where = ", ".join(files)
    if runtimes and default not in runtimes:
        return Finding("containerd", MISSING, f"{where}: runtimes are defined but not the "
                       f"default runtime '{default}': containerd's CRI plugin will not load "
                       "(pods of every runtime class fail)", f"add [plugins.\"{table}\"."
                       f"containerd.runtimes.{default}] runtime_type = \"io.containerd.runc.v2\""
                       f" (an imported file replaces the whole [plugins.\"{table}\"] table)")
    rt = runtimes.get("migrt")
    if not rt:
        return Finding("containerd", MISSING, f"{where}: no runtime handler 'migrt'",
                       REGISTER + "; systemctl restart containerd")
    binary = (rt.get("options") or {}).get("BinaryName")
    if rt.get("runtime_type") != "io.containerd.runc.v2":
        return Finding("containerd", MISSING, f"handler migrt has runtime_type "
                       f"{rt.get('runtime_type')!r}, not io.containerd.runc.v2", REGISTER)
    if not binary or not os.access(binary, os.X_OK):
        return Finding("containerd", MISSING, f"handler migrt's BinaryName {binary!r} is not "
                       "an executable", "install migrt there (packaging/install.sh writes "
                       "/usr/local/bin/migrt) or fix BinaryName")
    if migrt_path and os.path.realpath(binary) != os.path.realpath(migrt_path):
        return Finding("containerd", WARN, f"handler migrt runs {binary}, this is "
                       f"{migrt_path}", "point BinaryName at the migrt you mean", required=False)
    return Finding("containerd", OK, f"runtime handler migrt -> {binary} (config version "
                   f"{version}; {where}); restart containerd if you just changed it")


def check_containerd_running(node, address=CONTAINERD_SOCKET):
    """A running containerd: did its CRI plugin load? (A config it cannot use fails only
    there, and only in containerd's log.)"""
    if not node.which("containerd"):
        return None                 # check_callers says it is not installed
    if not node.exists(address):
        return Finding("containerd CRI", WARN, f"containerd is installed but not running "
                       f"here (no socket at {address}): cannot ask it whether its CRI plugin "
                       f"loaded", "systemctl start containerd (or --containerd-address)",
                       required=False)
    if not node.which("ctr"):
        return Finding("containerd CRI", WARN, f"cannot ask containerd at {address}: no ctr "
                       f"binary", "install containerd's ctr", required=False)
    rc, out = node.run(["ctr", "--address", address, "--timeout", "5s", "plugins", "ls"],
                       timeout=15)
    if rc != 0:
        return Finding("containerd CRI", WARN, f"cannot ask containerd at {address}: "
                       f"{out.strip()[:200]}", "is containerd running?", required=False)
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 3 and cols[0] in ("io.containerd.grpc.v1", "io.containerd.cri.v1") \
                and cols[1] in ("cri", "runtime"):
            if cols[-1] == "ok":
                return Finding("containerd CRI", OK, "the running containerd's CRI plugin "
                               "is loaded (restart containerd after changing its config)")
            return Finding("containerd CRI", MISSING, f"the running containerd's CRI plugin "
                           f"did not load ({cols[-1]}): no pod of any runtime class can run",
                           "journalctl -u containerd | grep -i cri (then fix the config "
                           "and restart containerd)")
    return None


def check_crio(node, config=CRIO_CONFIG, drop_ins=CRIO_DROP_INS):
    if not node.which("crio"):
        return None
    files = [f for f in [config] + node.glob(os.path.join(drop_ins, "*.conf"))
             if node.exists(f)]
    path = None
    for f in files:
        try:
            doc = tomllib.loads(node.read(f))
        except (OSError, tomllib.TOMLDecodeError) as e:
            return Finding("cri-o", MISSING, f"cannot read {f}: {e}", f"fix {f}")
        rt = doc.get("crio", {}).get("runtime", {}).get("runtimes", {}).get("migrt")
        if rt is not None:
            path = rt.get("runtime_path") or "/usr/local/bin/migrt"
    if path is None:
        return Finding("cri-o", MISSING, "CRI-O has no runtime handler 'migrt'",
                       f"cp containerd-config/crio-migrt.conf {drop_ins}/50-migrt.conf; "
                       "systemctl restart crio")
    if not os.access(path, os.X_OK):
        return Finding("cri-o", MISSING, f"CRI-O handler migrt's runtime_path {path} is not "
                       "an executable", "install migrt there or fix runtime_path")
    return Finding("cri-o", OK, f"runtime handler migrt -> {path}")


def check_podman(node):
    """podman runs migrt with --runtime; can this node's podman be reached at all?"""
    if not node.which("podman"):
        return Finding("podman", WARN, "not installed (optional: `podman --runtime "
                       "/usr/local/bin/migrt` is one way to use migrt)", required=False)
    rc, out = node.run(["podman", "info", "--format", "{{.Version.Version}}"], timeout=30)
    if rc != 0:
        return Finding("podman", WARN, f"podman is installed but `podman info` failed: "
                       f"{(out.strip().splitlines() or ['?'])[-1][:200]}",
                       "podman info (as root) says why", required=False)
    return Finding("podman", OK, f"podman {out.strip()} answers; run it with --runtime "
                   f"pointing at migrt", required=False)


def check_checkpoint_dirs(node):
    """The places a restore marker may name (MIGRT_CHECKPOINT_DIRS): whoever can write
    there can make a pod restore any memory image, so only root may."""
    from migrt.runtime.checkpoints import allowed_dirs
    out = []
    for d in allowed_dirs():
        try:
            st = node.stat(d)
        except FileNotFoundError:
            out.append(Finding("checkpoint dir", WARN, f"{d} does not exist (a marker naming "
                               f"it says so; `migrt image ls` finds nothing there)",
                               f"mkdir -p -m 700 {d}", required=False))
            continue
        except OSError as e:
            out.append(Finding("checkpoint dir", WARN, f"{d}: {e.strerror}", required=False))
            continue
        import stat as st_
        if not st_.S_ISDIR(st.st_mode):
            out.append(Finding("checkpoint dir", MISSING, f"{d} is not a directory",
                               f"remove it, then mkdir -p -m 700 {d}"))
        elif st.st_uid != 0 or st.st_mode & 0o022:
            out.append(Finding("checkpoint dir", MISSING, f"{d} is writable by others than "
                               f"root (owner uid {st.st_uid}, mode {st.st_mode & 0o7777:o}): "
                               f"anyone able to write there can make a pod restore their "
                               f"image", f"chown root {d}; chmod go-w {d}"))
        else:
            out.append(Finding("checkpoint dir", OK, f"{d} (root only)", required=False))
    return out


def check_callers(found_containerd, found_crio, node):
    """At least one container manager must register migrt; none installed is a warning."""
    out = [f for f in (found_containerd, found_crio) if f is not None]
    if not out:
        return [Finding("container manager", WARN, "neither containerd nor CRI-O is "
                        "installed: migrt can still be used with podman --runtime or directly",
                        "install containerd or CRI-O to use migrt as a Kubernetes runtime "
                        "class", required=False)]
    if any(f.status == OK for f in out):
        for f in out:           # one registered manager is enough
            if f.status == MISSING and "no runtime handler" in f.detail:
                f.status, f.required = WARN, False
    return out


def run_checks(node=None, staging=None, containerd_config=CONTAINERD_CONFIG,
               crio_config=CRIO_CONFIG, crio_drop_ins=CRIO_DROP_INS, migrt_path=None,
               containerd_address=CONTAINERD_SOCKET):
    node = node or Node()
    staging = staging or os.environ.get("MIGRT_STAGING", "/run/migrt/staged")
    found = [check_runc(node)]
    found += check_criu(node)
    found.append(check_sys_resource(node))
    found.append(check_iptables(node))
    found.append(check_userfaultfd(node))
    found.append(check_page_server(node))
    found.append(check_staging(node, staging))
    found.append(check_kdat())
    found += check_callers(check_containerd(node, containerd_config, migrt_path),
                           check_crio(node, crio_config, crio_drop_ins), node)
    running = check_containerd_running(node, containerd_address)
    if running is not None:
        found.append(running)
    found.append(check_podman(node))
    found += check_checkpoint_dirs(node)
    return found


def verdict(findings):
    """The overall answer: ok, ok with warnings, or cannot work (and what is missing)."""
    bad = [f.name for f in findings if f.status == MISSING and f.required]
    warn = [f.name for f in findings if f.status != OK and not (f.status == MISSING and f.required)]
    return {"verdict": "cannot work" if bad else "ok with warnings" if warn else "ok",
            "ok": not bad, "missing": bad, "warnings": warn}


def render(findings, color=False):
    marks = {OK: "ok", WARN: "warn", MISSING: "MISSING"}
    paint = {OK: "green", WARN: "yellow", MISSING: "red"}
    lines = []
    for f in findings:
        mark = f"{marks[f.status]:<8}"
        if color:
            mark = click.style(mark, fg=paint[f.status], bold=f.status == MISSING)
        lines.append(f"  {mark} {f.name}: {f.detail}")
        if f.fix and f.status != OK:
            lines.append(f"  {'':<8}   fix: {f.fix}")
    bad = [f for f in findings if f.status == MISSING and f.required]
    warn = [f for f in findings if f.status != OK and not (f.status == MISSING and f.required)]
    lines.append("")
    if bad:
        lines.append(f"migrt cannot work on this node: {len(bad)} required thing(s) missing "
                     f"({', '.join(f.name for f in bad)}).")
    else:
        lines.append("migrt can run on this node" + (f" ({len(warn)} warning(s))." if warn
                                                     else "."))
    return "\n".join(lines)


@click.command(name="doctor")
@click.option("--json", "as_json", is_flag=True, help="print the findings as JSON")
@click.option("--staging", default=None,
              help="where migrations stage memory images [default: $MIGRT_STAGING or "
                   "/run/migrt/staged]")
@click.option("--containerd-config", default=CONTAINERD_CONFIG, show_default=True)
@click.option("--containerd-address", default=CONTAINERD_SOCKET, show_default=True,
              help="socket of the running containerd to ask whether its CRI plugin loaded")
@click.option("--crio-config", default=CRIO_CONFIG, show_default=True)
@click.option("--crio-drop-ins", default=CRIO_DROP_INS, show_default=True)
def command(as_json, staging, containerd_config, containerd_address, crio_config,
            crio_drop_ins):
    """Check this node for what migrt needs; exit 1 if something required is missing."""
    me = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if me and me.endswith("-python") and os.path.exists(me[:-len("-python")]):
        me = me[:-len("-python")]       # the front door execs its Python launcher
    findings = run_checks(staging=staging, containerd_config=containerd_config,
                          crio_config=crio_config, crio_drop_ins=crio_drop_ins,
                          migrt_path=me if me and os.access(me, os.X_OK) else None,
                          containerd_address=containerd_address)
    if as_json:
        click.echo(json.dumps(dict(verdict(findings),
                                   findings=[f.as_dict() for f in findings]), indent=2))
    else:
        click.echo("migrt doctor: what this node has for migrt\n")
        click.echo(render(findings, color=sys.stdout.isatty()))
    if any(f.status == MISSING and f.required for f in findings):
        sys.exit(1)
