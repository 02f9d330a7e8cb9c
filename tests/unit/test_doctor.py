"""`migrt doctor` on fake nodes: what it finds missing, what it tells the user to do, and
its exit status. No root, no runc, no CRIU needed."""
import os
import subprocess
import sys

import pytest

from migrt.criu import probe as criuprobe
from migrt.commands import doctor as d

GOOD_RUNS = {
    ("runc", "--version"): (0, "runc version 1.1.15+ds1\ncommit: x\n"),
    ("criu", "--version"): (0, "Version: 4.1.1\n"),
    ("criu", "check"): (0, "Looks good.\n"),
    ("criu", "check", "--feature", "uffd-noncoop"): (0, "uffd-noncoop is supported\n"),
    ("criu", "check", "--feature", "mem_dirty_track"): (1, "Dirty tracking is OFF\n"),
    ("criu", "check", "--feature", "network_lock_nftables"):
        (0, "network_lock_nftables is supported\n"),
}

V2_REGISTERED = """version = 2
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.migrt]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.migrt.options]
  BinaryName = "/bin/sh"
"""


class FakeNode(d.Node):
    def __init__(self, tools=("runc", "criu", "iptables-restore", "ip6tables-restore",
                              "containerd"), runs=None, files=None, free=8 << 30,
                 fstype="tmpfs", probe=None, caps=0x1ffffffffff):
        self.tools = set(tools)
        self.probe = probe or criuprobe.Result(True)
        self.caps = caps
        self.probed = []
        self.runs = {**GOOD_RUNS, **(runs or {})}
        self.files = dict(files or {})
        self.free, self.kind = free, fstype
        self.stats = {}

    def staging_mounted_by_agent(self, path):
        return False

    def staging_tmpfs_size(self):
        return 12 << 30

    def env(self, name):
        return None

    def which(self, name, extra=()):
        return f"/usr/sbin/{name}" if name in self.tools else None

    def criu(self):
        return self.which("criu")

    def criu_probe(self, criu):
        self.probed.append(criu)
        return self.probe

    def capabilities(self):
        return self.caps

    def run(self, argv, timeout=30):
        key = (os.path.basename(argv[0]),) + tuple(argv[1:])
        return self.runs.get(key, (127, "not faked"))

    def exists(self, path):
        return path in self.files or path in ("/dev/userfaultfd",)

    def stat(self, path):
        """Every checkpoint dir a fake node has is root's, mode 700, unless faked."""
        if path in self.stats:
            if self.stats[path] is None:
                raise FileNotFoundError(path)
            return self.stats[path]
        return os.stat_result((0o40700, 0, 0, 2, 0, 0, 0, 0, 0, 0))

    def read(self, path):
        if path not in self.files:
            raise FileNotFoundError(path)
        return self.files[path]

    def glob(self, pattern):
        import fnmatch
        return sorted(p for p in self.files if fnmatch.fnmatch(p, pattern))

    def statvfs(self, path):
        return self.free

    def fstype(self, path):
        return self.kind


def by_name(findings):
    return {f.name: f for f in findings}


def required_missing(findings):
    return [f.name for f in findings if f.status == d.MISSING and f.required]


@pytest.fixture(autouse=True)
def no_migrt_runc(monkeypatch):
    monkeypatch.delenv("MIGRT_RUNC", raising=False)


def test_healthy_node_passes_with_feature_warnings():
    node = FakeNode(files={d.CONTAINERD_CONFIG: V2_REGISTERED})
    found = d.run_checks(node)
    assert required_missing(found) == []
    f = by_name(found)
    assert f["criu"].status == d.OK and "4.1.1" in f["criu"].detail
    assert f["pre-copy"].status == d.WARN and not f["pre-copy"].required
    assert f["lazy restore"].status == d.OK
    assert f["network lock"].status == d.OK and "nftables" in f["network lock"].detail
    assert f["containerd"].status == d.OK and "/bin/sh" in f["containerd"].detail
    assert "migrt can run on this node" in d.render(found)


def test_no_nftables_lock_is_a_warning_not_a_stop():
    node = FakeNode(runs={("criu", "check", "--feature", "network_lock_nftables"):
                          (1, "Nftables based locking requires libnftables\n")},
                    files={d.CONTAINERD_CONFIG: V2_REGISTERED})
    found = d.run_checks(node)
    assert required_missing(found) == []
    f = by_name(found)["network lock"]
    assert f.status == d.WARN and not f.required and "iptables" in f.detail


def test_old_criu_is_missing_with_the_install_fix():
    node = FakeNode(runs={("criu", "--version"): (0, "Version: 3.17.1\n")},
                    files={d.CONTAINERD_CONFIG: V2_REGISTERED})
    found = d.run_checks(node)
    assert required_missing(found) == ["criu"]
    assert "4.x is required" in by_name(found)["criu"].detail
    assert "install.sh" in by_name(found)["criu"].fix


def test_failing_criu_check_quotes_the_error():
    node = FakeNode(runs={("criu", "check"): (1, "Error (criu/vdso.c:1): vdso: Unexpected rt "
                                                  "vDSO area bounds\n")},
                    files={d.CONTAINERD_CONFIG: V2_REGISTERED})
    found = d.run_checks(node)
    assert required_missing(found) == ["criu check"]
    assert "Unexpected rt vDSO area bounds" in by_name(found)["criu check"].detail


def test_no_runc_no_iptables():
    node = FakeNode(tools=("criu", "containerd"), files={d.CONTAINERD_CONFIG: V2_REGISTERED})
    found = d.run_checks(node)
    assert set(required_missing(found)) >= {"runc", "iptables"}
    assert "Locking network failed" in by_name(found)["iptables"].detail
    assert "apt-get install iptables" in by_name(found)["iptables"].fix


def test_small_staging_is_missing_and_disk_staging_gets_a_tmpfs():
    found = by_name(d.run_checks(FakeNode(free=10 << 20,
                                          files={d.CONTAINERD_CONFIG: V2_REGISTERED})))
    assert found["staging room"].status == d.MISSING
    found = by_name(d.run_checks(FakeNode(fstype="ext4",
                                          files={d.CONTAINERD_CONFIG: V2_REGISTERED})))
    s = found["staging room"]
    assert s.status == d.OK and "mounts a private tmpfs there" in s.detail, s.detail


def test_containerd_without_migrt_handler_names_the_register_command():
    node = FakeNode(files={d.CONTAINERD_CONFIG: "version = 2\n"})
    found = by_name(d.run_checks(node))
    assert found["containerd"].status == d.MISSING
    assert "containerd_register.py register" in found["containerd"].fix


def test_drop_in_that_wipes_the_cri_table_is_caught():
    """containerd 1.x: an import naming the CRI table replaces it, runc included."""
    main = ('version = 2\nimports = ["/etc/containerd/conf.d/*.toml"]\n'
            '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
            '  runtime_type = "io.containerd.runc.v2"\n')
    only_migrt = ('version = 2\n'
                  '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.migrt]\n'
                  '  runtime_type = "io.containerd.runc.v2"\n')
    node = FakeNode(files={d.CONTAINERD_CONFIG: main,
                           "/etc/containerd/conf.d/migrt.toml": only_migrt})
    f = by_name(d.run_checks(node))["containerd"]
    assert f.status == d.MISSING and "CRI plugin will not load" in f.detail


def test_shipped_drop_in_imported_is_ok(tmp_path):
    shipped = open(os.path.join(os.path.dirname(__file__), "..", "..", "containerd-config",
                                "containerd-v2-migrt.toml")).read()
    main = 'version = 2\nimports = ["/etc/containerd/conf.d/*.toml"]\n'
    node = FakeNode(files={d.CONTAINERD_CONFIG: main,
                           "/etc/containerd/conf.d/migrt.toml": shipped})
    f = by_name(d.run_checks(node))["containerd"]
    # the shipped BinaryName does not exist on a unit-test machine: that is what it says
    if not os.access("/usr/local/bin/migrt", os.X_OK):
        assert f.status == d.MISSING and "/usr/local/bin/migrt" in f.detail
    else:
        assert f.status in (d.OK, d.WARN)


def test_crio_registered_is_enough_without_containerd():
    conf = '[crio.runtime.runtimes.migrt]\nruntime_path = "/bin/sh"\n'
    node = FakeNode(tools=("runc", "criu", "iptables-restore", "ip6tables-restore", "crio"),
                    files={"/etc/crio/crio.conf.d/50-migrt.conf": conf})
    found = d.run_checks(node)
    assert required_missing(found) == []
    assert by_name(found)["cri-o"].status == d.OK


def test_one_registered_manager_is_enough():
    node = FakeNode(tools=("runc", "criu", "iptables-restore", "ip6tables-restore", "crio",
                           "containerd"), files={d.CONTAINERD_CONFIG: V2_REGISTERED})
    found = d.run_checks(node)
    assert required_missing(found) == []
    assert by_name(found)["cri-o"].status == d.WARN


def test_command_exit_status_and_json(tmp_path):
    """The real command on this machine: exit 1 exactly when something required is
    missing, and --json lists the same findings."""
    import json
    repo = os.path.join(os.path.dirname(__file__), "..", "..")
    cfg = tmp_path / "config.toml"
    cfg.write_text("version = 2\n")
    argv = [sys.executable, "-m", "migrt", "doctor", "--json", "--containerd-config", str(cfg)]
    p = subprocess.run(argv, capture_output=True, text=True, cwd=repo, timeout=120)
    doc = json.loads(p.stdout)
    found = doc["findings"]
    bad = [f for f in found if f["status"] == "MISSING" and f["required"]]
    assert p.returncode == (1 if bad else 0), (p.returncode, bad, p.stderr)
    # the overall verdict agrees with the findings
    assert doc["ok"] is (not bad) and doc["missing"] == [f["check"] for f in bad]
    assert doc["verdict"] == ("cannot work" if bad else "ok with warnings"
                              if any(f["status"] != "ok" for f in found) else "ok")
    if any(f["check"] == "containerd" for f in found):
        assert bad, "containerd has no migrt handler in this config: must be missing"


def test_running_containerd_whose_cri_plugin_failed_is_missing():
    runs = {("ctr", "--address", d.CONTAINERD_SOCKET, "--timeout", "5s", "plugins", "ls"):
            (0, "TYPE                  ID   PLATFORMS    STATUS\n"
                "io.containerd.grpc.v1 cri  linux/amd64  error\n")}
    node = FakeNode(tools=("runc", "criu", "iptables-restore", "ip6tables-restore",
                           "containerd", "ctr"), runs=runs,
                    files={d.CONTAINERD_CONFIG: V2_REGISTERED, d.CONTAINERD_SOCKET: ""})
    f = by_name(d.run_checks(node))["containerd CRI"]
    assert f.status == d.MISSING and "did not load" in f.detail
    ok = {k: (0, v[1].replace("error", "ok")) for k, v in runs.items()}
    node.runs.update(ok)
    assert by_name(d.run_checks(node))["containerd CRI"].status == d.OK


def test_page_server_pipe_limit_is_a_warning_with_its_fix():
    low = FakeNode(files={d.CONTAINERD_CONFIG: V2_REGISTERED,
                          "/proc/self/status": "CapEff:\t000001fffeffffff\n",
                          "/proc/sys/fs/pipe-max-size": "1048576\n"})
    f = d.check_page_server(low)
    assert f.status == d.WARN and not f.required
    assert "fs.pipe-max-size is 1048576" in f.detail and "sysctl -w" in f.fix
    ok = FakeNode(files={"/proc/self/status": "CapEff:\t000001fffeffffff\n",
                         "/proc/sys/fs/pipe-max-size": "4194304\n"})
    assert d.check_page_server(ok).status == d.OK


# --- the real-workload checks: CRIU probe, CAP_SYS_RESOURCE, staging on tmpfs ----------

def test_healthy_node_probes_criu_for_tcp_and_file_locks():
    node = FakeNode(files={d.CONTAINERD_CONFIG: V2_REGISTERED})
    f = by_name(d.run_checks(node))
    assert node.probed == ["/usr/sbin/criu"], "the probe runs the CRIU that was checked"
    assert f["criu probe"].status == d.OK
    assert "TCP" in f["criu probe"].detail and "file locks" in f["criu probe"].detail
    assert f["CAP_SYS_RESOURCE"].status == d.OK


def test_criu_that_cannot_dump_tcp_fails_the_node_and_says_why():
    """What CRIU 4.1.1 says on kernel 6.18 (seen on this machine)."""
    err = "Error (criu/sockets.c:628): sockets: Can't get 1:16 opt: Operation not supported"
    node = FakeNode(files={d.CONTAINERD_CONFIG: V2_REGISTERED},
                    probe=criuprobe.Result(False, "dump", err))
    found = d.run_checks(node)
    assert required_missing(found) == ["criu probe"]
    f = by_name(found)["criu probe"]
    assert "failed to dump" in f.detail and "Can't get 1:16 opt" in f.detail
    assert "4.2" in f.detail and "install.sh" in f.fix
    assert "migrt cannot work on this node" in d.render(found)


def test_criu_that_fails_to_restore_names_the_stage():
    node = FakeNode(files={d.CONTAINERD_CONFIG: V2_REGISTERED},
                    probe=criuprobe.Result(False, "restore", "Error (criu/files-reg.c:1): x"))
    f = by_name(d.run_checks(node))["criu probe"]
    assert f.status == d.MISSING and f.required and "failed to restore" in f.detail


def test_probe_that_could_not_run_is_a_warning_not_a_verdict_on_criu():
    node = FakeNode(files={d.CONTAINERD_CONFIG: V2_REGISTERED},
                    probe=criuprobe.Result(False, "setup", "not root: CRIU needs root"))
    found = d.run_checks(node)
    assert required_missing(found) == []
    f = by_name(found)["criu probe"]
    assert f.status == d.WARN and not f.required and "not root" in f.detail


def test_criu_check_failing_skips_the_probe():
    node = FakeNode(runs={("criu", "check"): (1, "Error (criu/vdso.c:1): bounds\n")},
                    files={d.CONTAINERD_CONFIG: V2_REGISTERED})
    found = by_name(d.run_checks(node))
    assert "criu probe" not in found and node.probed == []


def test_root_without_cap_sys_resource_warns_but_the_node_passes():
    """This machine's root lacks CAP_SYS_RESOURCE: a warning, not a failed node."""
    node = FakeNode(files={d.CONTAINERD_CONFIG: V2_REGISTERED},
                    caps=0x1fffeffffff)   # this machine's CapEff
    found = d.run_checks(node)
    assert required_missing(found) == []
    f = by_name(found)["CAP_SYS_RESOURCE"]
    assert f.status == d.WARN and not f.required and "non-root uid" in f.detail


def test_capabilities_are_read_from_proc_status():
    node = d.Node()
    node.read = lambda path: "Name:\tx\nCapEff:\t0000000001000000\n"
    assert node.capabilities() == 1 << 24
    node.read = lambda path: "Name:\tx\n"
    assert node.capabilities() is None


def test_staging_not_on_tmpfs_and_no_mount_allowed_is_missing_with_the_mount_command():
    f = by_name(d.run_checks(FakeNode(fstype="ext4", caps=0x1ffffffffff & ~(1 << 21),
                                      files={d.CONTAINERD_CONFIG: V2_REGISTERED})))
    s = f["staging room"]
    assert s.status == d.MISSING and "not a tmpfs" in s.detail and "CAP_SYS_ADMIN" in s.detail
    assert "mount -t tmpfs" in s.fix and "/run/migrt/staged" in s.fix


def test_staging_on_disk_on_purpose_warns():
    node = FakeNode(fstype="ext4", files={d.CONTAINERD_CONFIG: V2_REGISTERED})
    node.env = lambda name: "1" if name == "MIGRT_STAGING_ON_DISK" else None
    s = by_name(d.run_checks(node))["staging room"]
    assert s.status == d.WARN and not s.required and "MIGRT_STAGING_ON_DISK" in s.detail


def test_staging_default_is_the_agents():
    from migrt.agent import staging
    node = FakeNode(files={d.CONTAINERD_CONFIG: V2_REGISTERED})
    f = by_name(d.run_checks(node))["staging room"]
    assert f.detail.startswith(staging.DEFAULT_STAGING + ":")


def test_probe_error_is_the_cause_not_the_harmless_rlimit_line(tmp_path):
    """CRIU 4.1.1's dump log on this machine: the RLIMIT_NOFILE line comes first on every
    run without CAP_SYS_RESOURCE and is not why the dump failed."""
    log = tmp_path / "dump.log"
    log.write_text(
        "(00.070370) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: "
        "Operation not permitted\n(00.1) inet: Collected\n"
        "(00.117207) Error (criu/sockets.c:628): sockets: Can't get 1:16 opt: Operation not "
        "supported\n(00.209755) Error (criu/cr-dump.c:2111): Dumping FAILED.\n")
    assert criuprobe._first_error(str(log)) == \
        "Error (criu/sockets.c:628): sockets: Can't get 1:16 opt: Operation not supported"


def test_checkpoint_dirs_podman_and_an_unreachable_containerd_are_reported(monkeypatch):
    monkeypatch.setenv("MIGRT_CHECKPOINT_DIRS", "/ck/a:/ck/b:/ck/c")
    node = FakeNode(tools=("runc", "criu", "iptables-restore", "ip6tables-restore",
                           "containerd", "ctr", "podman"),
                    runs={("podman", "info", "--format", "{{.Version.Version}}"):
                          (125, "Error: cannot open storage\n")},
                    files={d.CONTAINERD_CONFIG: V2_REGISTERED})
    node.stats["/ck/a"] = None
    node.stats["/ck/b"] = os.stat_result((0o40777, 0, 0, 2, 0, 0, 0, 0, 0, 0))
    found = d.run_checks(node)
    dirs = [f for f in found if f.name == "checkpoint dir"]
    assert [f.status for f in dirs] == [d.WARN, d.MISSING, d.OK]
    assert "/ck/a does not exist" in dirs[0].detail and "writable by others" in dirs[1].detail
    running = by_name(found)["containerd CRI"]
    assert running.status == d.WARN and "not running" in running.detail
    pm = by_name(found)["podman"]
    assert pm.status == d.WARN and "cannot open storage" in pm.detail
    v = d.verdict(found)
    assert v["verdict"] == "cannot work" and v["missing"] == ["checkpoint dir"]


def test_criu_that_drops_a_lock_on_a_mapped_file_is_a_warning_naming_sqlite():
    """What CRIU 4.2.1 without packaging/criu-patches does: everything else works."""
    node = FakeNode(files={d.CONTAINERD_CONFIG: V2_REGISTERED},
                    probe=criuprobe.Result(True, map_locks=False))
    found = d.run_checks(node)
    assert required_missing(found) == []
    f = by_name(found)["criu probe"]
    assert f.status == d.WARN and "maps shared" in f.detail and "SQLite" in f.detail
    assert "criu-patches" in f.fix
