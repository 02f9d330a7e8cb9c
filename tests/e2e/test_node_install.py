"""The node as packaging/install.sh leaves it, and `migrt doctor` against real containerds.

These run after the install step (CI runs it first): /usr/local/bin/migrt exists and
/etc/containerd/config.toml carries install.sh's migrt block.
"""
import json
import os
import shutil
import subprocess
import tempfile

import pytest

import cri as C
import harness

INSTALLED = "/usr/local/bin/migrt"
NODE_CONFIG = "/etc/containerd/config.toml"


def doctor(migrt, *args):
    # the node's own checkpoint dirs (the tests' setting adds /tmp, which anyone can write)
    env = {k: v for k, v in os.environ.items() if k != "MIGRT_CHECKPOINT_DIRS"}
    p = subprocess.run([migrt, "doctor", "--json", *args], capture_output=True, text=True,
                       timeout=120, env=env)
    doc = json.loads(p.stdout)
    # {verdict, ..., findings}; a node installed from before the verdict has the list alone
    found = doc["findings"] if isinstance(doc, dict) else doc
    return p.returncode, {f["check"]: f for f in found}


@pytest.fixture
def installed():
    if not os.access(INSTALLED, os.X_OK):
        pytest.fail(f"{INSTALLED} missing: run packaging/install.sh first")
    with open(NODE_CONFIG) as f:
        if "# BEGIN migrt" not in f.read():
            pytest.fail(f"{NODE_CONFIG} has no migrt block: run packaging/install.sh first")
    return INSTALLED


def test_installed_node_passes_doctor(installed):
    code, found = doctor(installed)
    missing = [f for f in found.values() if f["status"] == "MISSING" and f["required"]]
    assert code == 0 and not missing, missing
    assert found["containerd"]["status"] == "ok"
    assert found["criu"]["status"] == "ok" and found["runc"]["status"] == "ok"


def test_node_config_as_installed_loads_in_containerd(installed, containerd_version,
                                                    migrt_launcher):
    """containerd started on the node's own config.toml (only address, root and state
    moved by command-line flags): its CRI plugin loads with handlers migrt and runc, and
    the node's own CRI settings are still there."""
    with open(NODE_CONFIG, "rb") as f:
        import tomllib
        node = tomllib.load(f)
    bin_dir = harness.containerd_builds()[containerd_version]
    exe = os.path.join(bin_dir, "containerd") if bin_dir else "containerd"
    base = tempfile.mkdtemp(prefix="migrt-node-", dir="/run")
    sock = os.path.join(base, "containerd.sock")
    log = open(os.path.join(base, "log"), "wb")
    proc = subprocess.Popen([exe, "--config", NODE_CONFIG, "--address", sock, "--root",
                             os.path.join(base, "root"), "--state",
                             os.path.join(base, "state")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    api = None
    try:
        harness.wait_for(lambda: os.path.exists(sock) or proc.poll() is not None,
                         timeout=20, what="containerd's socket")
        assert proc.poll() is None, open(os.path.join(base, "log")).read()[-2000:]
        api = C.CRI(sock)
        f = harness.wait_for(lambda: _status(api), timeout=20, what="CRI status")
        info = {}
        for entry in f.get(2, []):
            kv = C.parse(entry)
            info[kv[1][0].decode()] = kv[2][0].decode()
        config = json.loads(info["config"])
        rts = config["containerd"]["runtimes"]
        assert rts["migrt"]["options"]["BinaryName"] == INSTALLED
        assert "runc" in rts
        cni = node.get("plugins", {}).get("io.containerd.grpc.v1.cri", {}).get("cni", {})
        if "bin_dir" in cni:
            assert config["cni"]["binDir"] == cni["bin_dir"]
        # and doctor, asked about this running containerd, agrees
        code, found = doctor(migrt_launcher, "--containerd-address", sock)
        assert found["containerd CRI"]["status"] == "ok"
    finally:
        if api:
            api.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        harness.unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)


def _status(api):
    try:
        return api.call("Status", C.msg((1, True)))
    except C.CRIError:
        return None


def test_doctor_catches_a_drop_in_that_breaks_cri(start_containerd, migrt_launcher, tmp_path):
    """The classic 1.x mistake: a drop-in naming only runtimes.migrt. containerd starts,
    but its CRI plugin does not load; doctor says so, from the config and from the
    running containerd."""
    bad = tmp_path / "only-migrt.toml"
    bad.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.'
                   'migrt]\n  runtime_type = "io.containerd.runc.v2"\n'
                   '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.migrt.options]\n'
                   '  BinaryName = "/usr/local/bin/migrt"\n')
    c = start_containerd(mode="import", drop_in=str(bad), cri=False)
    code, found = doctor(migrt_launcher, "--containerd-config", c.config,
                         "--containerd-address", c.address)
    assert code == 1
    assert found["containerd"]["status"] == "MISSING"
    assert "CRI plugin will not load" in found["containerd"]["detail"]
    assert found["containerd CRI"]["status"] == "MISSING"

    good = start_containerd(mode="register")
    code, found = doctor(migrt_launcher, "--containerd-config", good.config,
                         "--containerd-address", good.address)
    assert found["containerd CRI"]["status"] == "ok"
    assert found["containerd"]["status"] in ("ok", "warn")
