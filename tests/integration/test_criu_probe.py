"""The real CRIU probe `migrt doctor` runs (migrt.criu.probe), against this node's CRIU:
install.sh's 4.2.1 must dump and restore a process holding an established TCP
connection and file locks. (Debian 13's 4.1.1 fails it on this kernel: "Can't get 1:16
opt: Operation not supported"; see README.)"""
import json
import os
import subprocess
import sys

from migrt.criu import probe as criuprobe
from migrt.runc import criu_path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..", "..")


def test_probe_dumps_and_restores_tcp_and_file_locks(tmp_path):
    criu = criu_path()
    out = subprocess.run([criu, "--version"], capture_output=True, text=True).stdout
    assert "Version: 4.2" in out, f"{criu}: {out!r} (packaging/install.sh installs 4.2.1)"
    r = criuprobe.run(criu, keep=str(tmp_path / "logs"))
    assert r.ok, r
    # packaging/criu-patches: the POSIX lock on the file the helper maps survives
    assert r.map_locks is True, r
    # CRIU really did what the finding claims, and on the helper's own namespace
    dump = (tmp_path / "logs" / "dump.log").read_text()
    restore = (tmp_path / "logs" / "restore.log").read_text()
    assert "TCP_ESTABLISHED" in dump and "Restoring TCP connection" in restore
    assert dump.count("lockinfo: ") >= 2, "CRIU dumped the flock and the POSIX lock"
    # nothing is left behind: no helper process, no temporary dir
    left = subprocess.run(["pgrep", "-f", "migrt-criu-probe-"], capture_output=True, text=True)
    assert left.stdout.strip() == ""
    assert not [d for d in os.listdir("/tmp") if d.startswith("migrt-criu-probe-")
                and os.path.exists(os.path.join("/tmp", d, "images"))]


def test_probe_with_a_criu_that_cannot_run_names_the_dump(tmp_path):
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho 'Error (criu/sockets.c:628): sockets: Can'\"'\"'t get 1:16 "
                    "opt: Operation not supported' >&2\nexit 1\n")
    fake.chmod(0o755)
    r = criuprobe.run(str(fake))
    assert not r.ok and r.stage == "dump"


def test_doctor_on_this_node_reports_the_probe_and_cap_sys_resource(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("version = 2\n")
    p = subprocess.run([sys.executable, "-m", "migrt", "doctor", "--json",
                        "--containerd-config", str(cfg)], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    found = {f["check"]: f for f in json.loads(p.stdout)["findings"]}
    assert found["criu probe"]["status"] == "ok", found["criu probe"]
    assert criu_path() in found["criu"]["detail"]
    with open("/proc/self/status") as f:
        caps = int([ln for ln in f if ln.startswith("CapEff:")][0].split()[1], 16)
    has = bool(caps & (1 << 24))
    cap = found["CAP_SYS_RESOURCE"]
    assert cap["status"] == ("ok" if has else "warn") and not cap["required"]


def test_doctor_says_which_of_migrts_criu_patches_the_criu_carries(tmp_path):
    """install.sh's CRIU carries every patch migrt looks for; CRIU as Debian ships it
    (the unpatched build below) none, and doctor says what each one missing costs."""
    from migrt.criu import features
    cfg = tmp_path / "config.toml"
    cfg.write_text("version = 2\n")

    def finding(env):
        p = subprocess.run([sys.executable, "-m", "migrt", "doctor", "--json",
                            "--containerd-config", str(cfg)], capture_output=True, text=True,
                           cwd=REPO, timeout=120, env=dict(os.environ, **env))
        return {f["check"]: f for f in json.loads(p.stdout)["findings"]}["criu patches"]
    ours = finding({})
    assert ours["status"] == "ok" and not ours["required"], ours
    assert all(n in ours["detail"] for n in features.KNOWN), ours
    criu = os.environ.get("MIGRT_TEST_LOCKDROP_CRIU", "/var/tmp/migrt-test/criu-4.2.1-unpatched")
    if not os.access(criu, os.X_OK):
        subprocess.run([os.path.join(REPO, "tests", "workloads", "build_lockdrop_criu.sh"), criu],
                       check=True, timeout=900)
    theirs = finding({"MIGRT_CRIU": criu})
    assert theirs["status"] == "warn" and criu in theirs["detail"], theirs
    assert "restore-gate (the destination's runc restore starts before the freeze)" \
        in theirs["detail"], theirs
    assert "install.sh" in theirs["fix"]


def test_probe_finds_a_criu_that_drops_the_lock_on_a_mapped_file():
    """CRIU 4.2.1 as Debian ships it (no packaging/criu-patches), built once by
    tests/workloads/build_lockdrop_criu.sh: all else works, the mapped file's lock is gone."""
    criu = os.environ.get("MIGRT_TEST_LOCKDROP_CRIU", "/var/tmp/migrt-test/criu-4.2.1-unpatched")
    if not os.access(criu, os.X_OK):
        subprocess.run([os.path.join(REPO, "tests", "workloads", "build_lockdrop_criu.sh"), criu],
                       check=True, timeout=900)
    r = criuprobe.run(criu)
    assert r.ok and r.map_locks is False, r
