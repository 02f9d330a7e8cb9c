"""The artefacts a node operator uses: the wheel, the single-file zipapp, containerd's
registration, the uninstall path, and the shipped configuration files. No root needed."""
import configparser
import glob
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PKG = os.path.join(REPO, "packaging")
CFG = os.path.join(REPO, "containerd-config")
sys.path.insert(0, PKG)

import containerd_register as reg  # noqa: E402
import ocitest  # noqa: E402



SYSTEM_PYTHON = ocitest.zipapp_python()

DEBIAN_STOCK = """version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""

KUBEADM_LIKE = """version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = true
"""


def runtimes(doc, table="io.containerd.grpc.v1.cri"):
    return doc["plugins"][table]["containerd"]["runtimes"]


# --- wheel ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("src")
    src = build / "migrt"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "build", "dist", "*.egg-info", ".pytest_cache"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "--no-build-isolation", "-q", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    (whl,) = glob.glob(str(out / "migrt-*.whl"))
    return whl


def test_wheel_has_the_runtime_and_a_command(wheel, tmp_path):
    z = zipfile.ZipFile(wheel)
    names = set(z.namelist())
    for f in ("migrt/front/fast.py", "migrt/front/argv.py", "migrt/runtime/lifecycle.py", "migrt/front/launcher.py",
              "migrt/cli.py", "migrt/commands/doctor.py"):
        assert f in names, f"{f} missing from the wheel"
    info = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert info, "the wheel installs no command"
    eps = z.read(info[0]).decode()
    assert "migrt = migrt.front.fast:main" in eps
    # what was packaged imports and runs (the hot path needs only the standard library)
    z.extractall(tmp_path)
    p = subprocess.run([sys.executable, "-I", "-S", "-c",
                        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
                        "sys.argv = ['migrt', 'state', 'no-such-container']; "
                        "from migrt.front.fast import main; main()"],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, MIGRT_RUNC="/bin/false"))
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr


# --- zipapp -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip(f"{SYSTEM_PYTHON} not found")
    out = str(tmp_path_factory.mktemp("pyz") / "migrt")
    p = subprocess.run([sys.executable, os.path.join(PKG, "build_zipapp.py"), "-o", out,
                        "--python", SYSTEM_PYTHON], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    return out


def fake_runc(tmp_path):
    runc = tmp_path / "runc"
    runc.write_text("#!/bin/sh\necho \"fake runc $*\"\ncase \"$*\" in *state*) exit 1;; esac\nexit 0\n")
    runc.chmod(0o755)
    return str(runc)


def test_zipapp_is_one_file_needing_only_system_python(pyz, tmp_path):
    with open(pyz, "rb") as f:
        assert f.readline() == f"#!{SYSTEM_PYTHON} -IS\n".encode()
    env = dict(os.environ, MIGRT_RUNC=fake_runc(tmp_path), PATH="/usr/bin:/bin")
    env.pop("PYTHONPATH", None)
    p = subprocess.run([pyz, "--version"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert p.returncode == 0 and "migrt: " in p.stdout, p.stderr
    p = subprocess.run([pyz, "--root", "/tmp/x", "state", "c1"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert (p.returncode, p.stdout) == (1, "fake runc --root /tmp/x state c1\n")
    # an own command with click, from the bundled copy: the system Python has no venv
    p = subprocess.run([pyz, "doctor", "--help"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert p.returncode == 0 and "Usage: migrt doctor" in p.stdout, p.stderr
    # the zip holds byte code for the target Python, so nothing compiles at start
    names = zipfile.ZipFile(pyz).namelist()
    assert "migrt/front/fast.pyc" in names and "click/__init__.pyc" in names


def test_zipapp_unpacks_compiled_dependencies_on_first_use(pyz, tmp_path):
    """xxhash, zstandard, psutil and jsonschema (checkpoint, migrate, agent) come out of
    the zip into a cache dir the first time they are imported, and only then."""
    main = zipfile.ZipFile(pyz).read("__main__.py").decode()
    probe = main.replace("from migrt.front.fast import main\nmain()\n",
                         "import xxhash, zstandard, psutil, jsonschema\n"
                         "jsonschema.validate(1, {'type': 'integer'})\n"
                         "print(xxhash.__file__)\n")
    assert probe != main
    cache = tmp_path / "cache"
    code = (f"import sys; sys.path.insert(0, {pyz!r}); "
            f"__file__ = {pyz + '/__main__.py'!r}; exec(compile({probe!r}, 'probe', 'exec'))")
    env = dict(os.environ, MIGRT_PYZ_CACHE=str(cache))
    p = subprocess.run([SYSTEM_PYTHON, "-I", "-S", "-c", code], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(str(cache) + "/pyz-"), p.stdout
    # a pass-through call leaves the cache alone
    cache2 = tmp_path / "cache2"
    env = dict(os.environ, MIGRT_PYZ_CACHE=str(cache2), MIGRT_RUNC=fake_runc(tmp_path))
    subprocess.run([pyz, "state", "c1"], capture_output=True, env=env, timeout=60)
    assert not cache2.exists()


# --- containerd registration -------------------------------------------------------------

def test_register_appends_to_debian_stock_config_and_unregister_restores_it(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text(DEBIAN_STOCK)
    assert reg.register(str(cfg), binary="/usr/local/bin/migrt") == 2
    text = cfg.read_text()
    assert text.startswith(DEBIAN_STOCK.rstrip("\n"))      # the node's own lines untouched
    doc = tomllib.loads(text)
    cri = doc["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["cni"]["bin_dir"] == "/usr/lib/cni"
    rts = runtimes(doc)
    assert rts["migrt"] == {"runtime_type": "io.containerd.runc.v2",
                            "options": {"BinaryName": "/usr/local/bin/migrt"}}
    # the stock config defines no runtimes: runc must be named, or CRI would not load
    assert rts["runc"]["runtime_type"] == "io.containerd.runc.v2"
    reg.register(str(cfg), binary="/usr/local/bin/migrt")       # again: same file
    assert cfg.read_text() == text
    assert reg.unregister(str(cfg))
    assert cfg.read_text() == DEBIAN_STOCK


def test_register_keeps_the_nodes_own_runc_settings(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text(KUBEADM_LIKE)
    reg.register(str(cfg))
    rts = runtimes(tomllib.loads(cfg.read_text()))
    assert rts["runc"]["options"] == {"SystemdCgroup": True}
    assert rts["migrt"]["options"]["BinaryName"] == "/usr/local/bin/migrt"
    assert cfg.read_text().count("runtimes.runc]") == 1


def test_register_v3_config_and_refusals(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("version = 3\n")
    assert reg.register(str(cfg)) == 3
    doc = tomllib.loads(cfg.read_text())
    assert runtimes(doc, "io.containerd.cri.v1.runtime")["migrt"]["runtime_type"] == \
        "io.containerd.runc.v2"
    v1 = tmp_path / "v1.toml"
    v1.write_text('[plugins.cri]\n  sandbox_image = "x"\n')
    with pytest.raises(reg.RegisterError, match="version 1 is not supported"):
        reg.register(str(v1))
    by_hand = tmp_path / "hand.toml"
    by_hand.write_text(KUBEADM_LIKE + '[plugins."io.containerd.grpc.v1.cri".containerd'
                                      '.runtimes.migrt]\n  runtime_type = "x"\n')
    before = by_hand.read_text()
    with pytest.raises(reg.RegisterError, match="already defines runtime handler migrt"):
        reg.register(str(by_hand))
    assert by_hand.read_text() == before


def test_register_creates_a_missing_config(tmp_path):
    cfg = tmp_path / "etc" / "config.toml"
    assert subprocess.run([sys.executable, os.path.join(PKG, "containerd_register.py"),
                           "register", "--config", str(cfg)], capture_output=True).returncode == 0
    doc = tomllib.loads(cfg.read_text())
    assert doc["version"] == 2 and "migrt" in runtimes(doc)


# --- uninstall ---------------------------------------------------------------------------

def test_uninstall_removes_only_migrts_files(tmp_path):
    sys.path.insert(0, REPO)
    from migrt.front import launcher
    prefix, bin_dir = tmp_path / "opt" / "migrt", tmp_path / "bin"
    (prefix / "lib" / "migrt" / "front").mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "migrt", "front", "front.sh"), prefix / "lib" / "migrt" / "front")
    bin_dir.mkdir()
    launcher.write(str(bin_dir / "migrt"), str(prefix / "lib"), sys.executable)
    assert (bin_dir / "migrt-python").exists()
    (bin_dir / "runc").write_text("#!/bin/sh\n")
    cfg = tmp_path / "containerd" / "config.toml"
    cfg.parent.mkdir()
    cfg.write_text(DEBIAN_STOCK)
    reg.register(str(cfg), binary=str(bin_dir / "migrt"))
    crio = tmp_path / "crio.conf.d"
    crio.mkdir()
    shutil.copy(os.path.join(CFG, "crio-migrt.conf"), crio / "50-migrt.conf")
    (crio / "10-other.conf").write_text("[crio.runtime]\n")
    units = tmp_path / "units"
    units.mkdir()
    shutil.copy(os.path.join(PKG, "migrt-agent.service"), units)
    data = tmp_path / "var-lib-migrt"
    (data / "checkpoints").mkdir(parents=True)
    env = dict(os.environ, MIGRT_PREFIX=str(prefix), MIGRT_BIN=str(bin_dir),
               MIGRT_CONTAINERD_CONFIG=str(cfg), MIGRT_CRIO_DROP_INS=str(crio),
               MIGRT_SYSTEMD_DIR=str(units), MIGRT_DATA_DIRS=str(data),
               MIGRT_SYSCTL_DIR=str(units))
    p = subprocess.run(["bash", os.path.join(PKG, "uninstall.sh")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert cfg.read_text() == DEBIAN_STOCK
    assert not (crio / "50-migrt.conf").exists() and (crio / "10-other.conf").exists()
    assert not (units / "migrt-agent.service").exists()
    assert not prefix.exists()
    migrt = bin_dir / "migrt"
    assert not migrt.exists() or migrt.is_symlink()     # a link to runc while shims run
    assert (bin_dir / "runc").read_text() == "#!/bin/sh\n"
    assert data.exists(), "checkpoints must survive an uninstall without --purge"
    p = subprocess.run(["bash", os.path.join(PKG, "uninstall.sh"), "--purge"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert not data.exists() and not migrt.exists() and not migrt.is_symlink()
    assert not (bin_dir / "migrt-python").exists()


def test_uninstall_leaves_a_foreign_migrt_command_alone(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "migrt").write_text("#!/bin/sh\necho someone else's\n")
    env = dict(os.environ, MIGRT_PREFIX=str(tmp_path / "none"), MIGRT_BIN=str(bin_dir),
               MIGRT_CONTAINERD_CONFIG=str(tmp_path / "none.toml"),
               MIGRT_CRIO_DROP_INS=str(tmp_path / "none.d"),
               MIGRT_SYSTEMD_DIR=str(tmp_path), MIGRT_DATA_DIRS=str(tmp_path / "nodata"),
               MIGRT_SYSCTL_DIR=str(tmp_path))
    p = subprocess.run(["bash", os.path.join(PKG, "uninstall.sh")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and (bin_dir / "migrt").exists(), p.stderr
    assert "not migrt's" in p.stderr


# --- shipped configuration and manifests ----------------------------------------------------

@pytest.mark.parametrize("name", ["containerd-v2-migrt.toml", "containerd-v3-migrt.toml",
                                  "crio-migrt.conf", "runtimeclass.yaml", "restore-pod.yaml"])
def test_each_shipped_file_says_where_it_goes_and_what_to_restart(name):
    text = open(os.path.join(CFG, name)).read()
    assert "Where it goes:" in text
    assert "restart" in text.lower() or "nothing to restart" in text


def test_containerd_drop_ins_register_handler_migrt_on_the_runc_shim():
    for name, version, table in (("containerd-v2-migrt.toml", 2, "io.containerd.grpc.v1.cri"),
                                 ("containerd-v3-migrt.toml", 3,
                                  "io.containerd.cri.v1.runtime")):
        with open(os.path.join(CFG, name), "rb") as f:
            doc = tomllib.load(f)
        assert doc["version"] == version
        rts = runtimes(doc, table)
        assert rts["migrt"]["runtime_type"] == "io.containerd.runc.v2"
        assert rts["migrt"]["options"]["BinaryName"] == "/usr/local/bin/migrt"
        assert rts["runc"]["runtime_type"] == "io.containerd.runc.v2"
        assert set(doc["plugins"]) == {table}          # nothing else is touched


def test_crio_drop_in():
    with open(os.path.join(CFG, "crio-migrt.conf"), "rb") as f:
        doc = tomllib.load(f)
    rt = doc["crio"]["runtime"]["runtimes"]["migrt"]
    assert rt["runtime_path"] == "/usr/local/bin/migrt" and rt["runtime_type"] == "oci"
    assert "default_runtime" not in doc["crio"]["runtime"]       # runc stays the default


def test_runtimeclass_and_restore_pod():
    rc = yaml.safe_load(open(os.path.join(CFG, "runtimeclass.yaml")))
    assert (rc["kind"], rc["handler"], rc["metadata"]["name"]) == ("RuntimeClass", "migrt",
                                                                  "migrt")
    pod = yaml.safe_load(open(os.path.join(CFG, "restore-pod.yaml")))
    assert pod["spec"]["runtimeClassName"] == "migrt"
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env["MIGRT_RESTORE_FROM"].startswith("/var/lib/migrt/checkpoints/")


def test_daemonset_installs_then_runs_the_agent_on_every_node():
    docs = list(yaml.safe_load_all(open(os.path.join(PKG, "daemonset.yaml"))))
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostPID"] and {"operator": "Exists"} in spec["tolerations"]
    (init,) = spec["initContainers"]
    (agent,) = spec["containers"]
    assert init["args"] == ["install"] and agent["args"] == ["agent"]
    assert init["image"] == agent["image"]
    assert init["securityContext"]["privileged"] and agent["securityContext"]["privileged"]
    assert agent["ports"][0]["containerPort"] == 7070
    rc = yaml.safe_load(open(os.path.join(CFG, "runtimeclass.yaml")))
    label = rc["scheduling"]["nodeSelector"]
    assert label == {"migrt.io/runtime": "ready"}
    script = open(os.path.join(PKG, "daemonset-node.sh")).read()
    assert "label ready" in script and "migrt.io/runtime" in script
    un = yaml.safe_load(open(os.path.join(PKG, "daemonset-uninstall.yaml")))
    assert un["spec"]["template"]["spec"]["containers"][0]["args"] == ["uninstall"]
    for f in ("daemonset-node.sh", "install.sh", "uninstall.sh"):
        assert subprocess.run(["bash", "-n", os.path.join(PKG, f)]).returncode == 0


def test_systemd_unit_runs_the_agent():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(os.path.join(PKG, "migrt-agent.service"))
    start = unit["Service"]["ExecStart"]
    assert "/usr/local/bin/migrt" in start and " agent " in start
    assert "--secret-file" in start
    assert unit["Service"]["KillMode"] == "process"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_register_twice_says_nothing_changed_and_asks_no_restart(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text(DEBIAN_STOCK)
    argv = [sys.executable, os.path.join(PKG, "containerd_register.py"), "register",
            "--config", str(cfg), "--binary", "/usr/local/bin/migrt"]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "now: systemctl restart containerd" in first.stdout
    st = os.stat(cfg)
    again = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert "restart containerd" not in again.stdout and "nothing changed" in again.stdout
    assert os.stat(cfg).st_mtime_ns == st.st_mtime_ns and os.stat(cfg).st_ino == st.st_ino


def test_uninstall_scan_quiet_when_a_process_exits_and_restart_advice_once(tmp_path):
    """A process that exits between uninstall.sh's /proc glob and its read must not
    print a shell error (a dangling cmdline stands in for it); containerd's restart
    advice is given once."""
    sys.path.insert(0, REPO)
    from migrt.front import launcher
    prefix, bin_dir = tmp_path / "opt" / "migrt", tmp_path / "bin"
    (prefix / "lib" / "migrt" / "front").mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "migrt", "front", "front.sh"), prefix / "lib" / "migrt" / "front")
    bin_dir.mkdir()
    launcher.write(str(bin_dir / "migrt"), str(prefix / "lib"), sys.executable)
    cfg = tmp_path / "config.toml"
    cfg.write_text(DEBIAN_STOCK)
    reg.register(str(cfg), binary=str(bin_dir / "migrt"))
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    os.symlink(str(tmp_path / "gone"), proc / "4242" / "cmdline")     # exited meanwhile
    (proc / "4243").mkdir()
    (proc / "4243" / "cmdline").write_bytes(b"/usr/bin/containerd-shim-runc-v2\0-id\0x\0")
    env = dict(os.environ, MIGRT_PREFIX=str(prefix), MIGRT_BIN=str(bin_dir),
               MIGRT_CONTAINERD_CONFIG=str(cfg), MIGRT_CRIO_DROP_INS=str(tmp_path / "none.d"),
               MIGRT_SYSTEMD_DIR=str(tmp_path), MIGRT_DATA_DIRS=str(tmp_path / "nodata"),
               MIGRT_SYSCTL_DIR=str(tmp_path), MIGRT_PROC=str(proc))
    p = subprocess.run(["bash", os.path.join(PKG, "uninstall.sh")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "No such file" not in p.stderr and "uninstall.sh: line" not in p.stderr, p.stderr
    assert p.stderr.count("restart containerd") == 1, p.stderr
    # the shim it did see keeps the command usable (a link to runc)
    assert os.path.islink(bin_dir / "migrt"), p.stderr
