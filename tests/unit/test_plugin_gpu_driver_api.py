"""gpu plugin through the CUDA driver API (cuCheckpointProcess* in libcuda.so.1), against
tests/fakes/fake_libcuda.c compiled here: the same structs, states and error codes as
NVIDIA's driver API, per-pid state in files. No GPU and no container: the processes are
pids the tests seed state files for."""
import ctypes
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from migrt.errors import BundleError, MigrtError, RefusedError  # noqa: E402
from migrt.plugins import options, proc, registry  # noqa: E402
from fakes import plugintest as pt  # noqa: E402

FAKE_C = os.path.join(REPO, "tests", "fakes", "fake_libcuda.c")
GPU_A = "GPU-aaaaaaaa-0000-0000-0000-000000000001"
GPU_B = "GPU-bbbbbbbb-0000-0000-0000-000000000002"
GPU_C = "GPU-cccccccc-0000-0000-0000-000000000003"
PID = 4242           # a process the tests make up: its state is a seeded file


def compiler():
    return shutil.which("cc") or shutil.which("gcc")


@pytest.fixture(scope="session")
def libs(tmp_path_factory):
    """{'new': driver 13.0 with the checkpoint calls, 'old': a pre-r570 driver without}."""
    cc = compiler()
    if not cc:
        pytest.skip("no C compiler (cc/gcc) to build tests/fakes/fake_libcuda.c")
    out = {}
    for kind, flags in (("new", []), ("old", ["-DNO_CHECKPOINT"])):
        d = tmp_path_factory.mktemp(f"libcuda-{kind}")
        path = str(d / "libcuda.so.1")
        p = subprocess.run([cc, "-shared", "-fPIC", "-O1", *flags, "-o", path, FAKE_C],
                           capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot build the fake libcuda ({cc}): {p.stderr.strip()[-300:]}")
        out[kind] = path
    return out


@pytest.fixture
def state(tmp_path, monkeypatch):
    d = tmp_path / "cuda-state"
    d.mkdir()
    monkeypatch.setenv("FAKE_LIBCUDA_DIR", str(d))
    monkeypatch.delenv("FAKE_LIBCUDA_VERSION", raising=False)
    monkeypatch.delenv("FAKE_LIBCUDA_INIT", raising=False)
    monkeypatch.delenv("FAKE_LIBCUDA_LOG", raising=False)
    return d


def seed(d, pid, st, *gpus):
    (d / str(pid)).write_text("\n".join([st, *gpus]) + "\n")


def current(d, pid):
    lines = (d / str(pid)).read_text().split()
    return lines[0], lines[1:]


def calls(d):
    try:
        return [line.split(" ", 3) for line in (d / "calls.log").read_text().splitlines()]
    except FileNotFoundError:
        return []


def load():
    return registry.load_file(os.path.join(REPO, "plugins", "gpu.py"))


def drvmod():
    mod = sys.modules[load().__class__.__module__]
    return mod.driver_module()


def gpu_ctx(tmp_path, **opts):
    gpu = load()
    o = {k: v.get("default") for k, v in gpu.options.items()}
    o.update(opts)
    return gpu, {"cid": "c", "options": o, "image_dir": str(tmp_path / "img"),
                 "spec": {"process": {"env": []},
                          "linux": {"devices": [{"path": "/dev/nvidia0", "type": "c",
                                                 "major": 195, "minor": 0}]}}}


@pytest.fixture
def as_cuda_process(monkeypatch):
    """The container is PID, holding /dev/nvidia0 open (what makes it a CUDA candidate)."""
    monkeypatch.setattr(proc, "container_pids", lambda ctx: [PID])
    monkeypatch.setattr(proc, "open_paths", lambda pid: {"4": "/dev/nvidia0"})
    monkeypatch.setattr(proc, "mapped_paths", lambda pid: set())
    monkeypatch.setattr(proc, "environ", lambda pid: {})


# ------------------------------------------------------------ the binding and the fake

def test_structs_have_the_driver_api_layout():
    m = drvmod()
    assert [ctypes.sizeof(s) for s in (m.LockArgs, m.CheckpointArgs, m.RestoreArgs,
                                       m.UnlockArgs)] == [64, 64, 64, 64]
    assert ctypes.sizeof(m.GpuPair) == 32
    assert m.RestoreArgs.gpuPairsCount.offset == ctypes.sizeof(ctypes.c_void_p)
    assert m.RestoreArgs.reserved1.offset == 56
    assert m.uuid_bytes(GPU_A) == bytes.fromhex("aaaaaaaa000000000000000000000001")
    with pytest.raises(ValueError):
        m.uuid_bytes("GPU-1234")
    assert m.STATES == {0: "running", 1: "locked", 2: "checkpointed", 3: "failed"}


def test_fake_library_exports_exactly_the_documented_calls(libs):
    nm = shutil.which("nm")
    if not nm:
        pytest.skip("no nm (binutils)")
    def exported(path):
        out = subprocess.run([nm, "-D", "--defined-only", path], capture_output=True,
                             text=True).stdout
        return sorted(line.split()[-1] for line in out.splitlines() if " T " in line)
    assert exported(libs["new"]) == sorted([
        "cuInit", "cuDriverGetVersion", "cuCheckpointProcessGetState",
        "cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint",
        "cuCheckpointProcessRestore", "cuCheckpointProcessUnlock",
        "cuCheckpointProcessGetRestoreThreadId"])
    assert exported(libs["old"]) == ["cuDriverGetVersion", "cuInit"]


def test_state_machine_and_error_codes(libs, state):
    m = drvmod()
    drv = m.Driver(libs["new"])
    assert drv.version == 13000 and drv.version_text() == "13.0" and drv.can_remap()
    seed(state, PID, "running", GPU_A)
    assert drv.state(PID) == "running"
    wrong = [(drv.checkpoint, "cuCheckpointProcessCheckpoint"),
             (drv.restore, "cuCheckpointProcessRestore"),
             (drv.unlock, "cuCheckpointProcessUnlock")]
    for call, name in wrong:                     # only lock is legal from RUNNING
        with pytest.raises(m.DriverError) as e:
            call(PID)
        assert e.value.code == 401
        assert str(e.value) == (f"{name}: CUDA_ERROR_ILLEGAL_STATE (401): the process is not "
                                "in the state this step needs")
    drv.lock(PID, 1500)
    assert drv.state(PID) == "locked"
    with pytest.raises(m.DriverError, match="ILLEGAL_STATE"):
        drv.lock(PID)
    drv.checkpoint(PID)
    assert drv.state(PID) == "checkpointed"
    for call in (drv.lock, drv.checkpoint, drv.unlock):
        with pytest.raises(m.DriverError, match="ILLEGAL_STATE"):
            call(PID)
    assert drv.restore_tid(PID) == PID
    drv.restore(PID)
    assert drv.state(PID) == "locked"
    drv.unlock(PID)
    assert drv.state(PID) == "running"
    with pytest.raises(m.DriverError) as e:       # no state file, not a GPU holder
        drv.state(os.getpid())
    assert str(e.value).startswith("cuCheckpointProcessGetState: CUDA_ERROR_NOT_SUPPORTED (801)")
    assert [c[:3] for c in calls(state) if c[0] == "cuCheckpointProcessLock"][0] == \
        ["cuCheckpointProcessLock", str(PID), "0"]
    assert ["cuCheckpointProcessLock", str(PID), "0", "timeoutMs=1500"] in calls(state)


def test_restore_map_must_name_every_gpu(libs, state):
    m = drvmod()
    drv = m.Driver(libs["new"])
    seed(state, PID, "checkpointed", GPU_A, GPU_B)
    with pytest.raises(m.DriverError, match=r"CUDA_ERROR_INVALID_VALUE \(1\)"):
        drv.restore(PID, {GPU_A: GPU_C})          # GPU_B left out
    drv.restore(PID, {GPU_A: GPU_B, GPU_B: GPU_A})  # swapped
    assert current(state, PID) == ("locked", [GPU_B, GPU_A])


def test_calls_before_cuinit_and_a_failing_cuinit(libs, state, monkeypatch):
    m = drvmod()
    # a fresh copy: its cuInit has not run
    lib = ctypes.CDLL(shutil.copy(libs["new"], str(state / "libcuda-copy.so")))
    st = ctypes.c_int()
    assert lib.cuCheckpointProcessGetState(PID, ctypes.byref(st)) == 3   # NOT_INITIALIZED
    monkeypatch.setenv("FAKE_LIBCUDA_INIT", "100")
    with pytest.raises(m.Unavailable, match=r"^cuInit failed: CUDA_ERROR_NO_DEVICE \(100\): "
                                            "no CUDA GPU is visible to migrt$"):
        m.Driver(str(state / "libcuda-copy.so"))


# ------------------------------------------------------------ the plugin

def test_lock_checkpoint_restore_unlock_through_the_driver_api(libs, state, tmp_path,
                                                               as_cuda_process):
    src_driver = pt.fake_driver(str(tmp_path / "drv-a"), [(0, GPU_A, "NVIDIA L4")])
    gpu, ctx = gpu_ctx(tmp_path, interface="driver-api", libcuda=libs["new"],
                       driver_root=src_driver, criu_libdir=str(tmp_path),
                       cuda_checkpoint=str(tmp_path / "absent"), lock_timeout_ms=7000)
    ctx["mode"] = "dump"
    seed(state, PID, "running", GPU_A)
    gpu.pre_checkpoint(ctx)
    assert current(state, PID)[0] == "checkpointed"
    made = [c[0] for c in calls(state)]
    assert made == ["cuInit", "cuCheckpointProcessGetState", "cuCheckpointProcessLock",
                    "cuCheckpointProcessCheckpoint"]
    assert calls(state)[2][3] == "timeoutMs=7000"
    import json
    rec = json.load(open(tmp_path / "img" / "migrt" / "plugins" / "gpu" / "gpu.json"))
    assert rec["interface"] == "driver-api"
    assert rec["gpus"] == [{"path": "/dev/nvidia0", "minor": 0, "uuid": GPU_A,
                            "model": "NVIDIA L4"}]
    gpu.post_checkpoint(ctx)                     # dumped: the source is gone
    assert current(state, PID)[0] == "checkpointed"

    # destination: the same container path, another GPU (minor 1 there is GPU_B)
    dst_driver = pt.fake_driver(str(tmp_path / "drv-b"), [(1, GPU_B, "NVIDIA L4")])
    gpu2, ctx2 = gpu_ctx(tmp_path, interface="driver-api", libcuda=libs["new"],
                         driver_root=dst_driver, criu_libdir=str(tmp_path),
                         cuda_checkpoint=str(tmp_path / "absent"))
    ctx2["spec"]["linux"]["devices"][0]["minor"] = 1
    (state / "calls.log").unlink()
    gpu2.pre_restore(ctx2)
    gpu2.post_restore(ctx2)
    assert current(state, PID) == ("running", [GPU_B])
    restore = [c for c in calls(state) if c[0] == "cuCheckpointProcessRestore"]
    assert restore == [["cuCheckpointProcessRestore", str(PID), "0", f"{GPU_A}={GPU_B}"]]
    assert [c[0] for c in calls(state)][-2:] == ["cuCheckpointProcessRestore",
                                                 "cuCheckpointProcessUnlock"]


def test_remap_needs_cuda_13_in_the_driver_api(libs, state, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_LIBCUDA_VERSION", "12080")
    gpu, ctx = gpu_ctx(tmp_path, interface="driver-api", libcuda=libs["new"],
                       driver_root=pt.fake_driver(str(tmp_path / "drv"), [(0, GPU_B, "L4")]),
                       criu_libdir=str(tmp_path))
    d = tmp_path / "img" / "migrt" / "plugins" / "gpu"
    d.mkdir(parents=True)
    (d / "gpu.json").write_text('{"kind": "nvidia", "criu_plugin": false, "gpus": '
                                f'[{{"path": "/dev/nvidia0", "uuid": "{GPU_A}", "model": "L4"}}]}}')
    with pytest.raises(RefusedError) as e:
        gpu.pre_restore(ctx)
    assert str(e.value) == (
        "gpu: restoring onto other GPUs needs the driver API's GPU pairs (CUDA 13.0, driver "
        f"r580 or later); {libs['new']} is 12.8")


def test_wrong_state_surfaces_as_one_line(libs, state, tmp_path, as_cuda_process, monkeypatch):
    gpu, ctx = gpu_ctx(tmp_path, interface="driver-api", libcuda=libs["new"],
                       driver_root=str(tmp_path), criu_libdir=str(tmp_path))
    ctx["mode"] = "dump"
    # something else locked the process between get-state and lock
    seed(state, PID, "locked")
    mod = sys.modules[gpu.__class__.__module__]
    monkeypatch.setattr(mod.DriverApi, "state", lambda self, pid: "running")
    with pytest.raises(RefusedError) as e:
        gpu.pre_checkpoint(ctx)
    msg = str(e.value)
    assert msg == (f"gpu: the CUDA driver API could not lock process {PID}: "
                   "cuCheckpointProcessLock: CUDA_ERROR_ILLEGAL_STATE (401): the process is "
                   "not in the state this step needs; nothing was frozen")
    assert "\n" not in msg


def test_failed_dump_gives_the_gpu_back_and_reports_a_stuck_process(
        libs, state, tmp_path, as_cuda_process):
    gpu, ctx = gpu_ctx(tmp_path, interface="driver-api", libcuda=libs["new"],
                       driver_root=str(tmp_path), criu_libdir=str(tmp_path))
    ctx["mode"] = "dump"
    seed(state, PID, "running")
    gpu.pre_checkpoint(ctx)
    gpu.post_checkpoint(dict(ctx, error="criu dump failed"))
    assert current(state, PID)[0] == "running"
    assert [c[0] for c in calls(state)][-2:] == ["cuCheckpointProcessRestore",
                                                 "cuCheckpointProcessUnlock"]
    # again, but someone restored+unlocked it behind our back: restore is refused
    gpu.pre_checkpoint(ctx)
    seed(state, PID, "running")
    with pytest.raises(MigrtError) as e:
        gpu.post_checkpoint(dict(ctx, error="criu dump failed"))
    assert str(e.value) == (f"gpu: could not resume CUDA on the source: restore {PID}: "
                            "cuCheckpointProcessRestore: CUDA_ERROR_ILLEGAL_STATE (401): "
                            "the process is not in the state this step needs")


# ------------------------------------------------------------ choosing the interface

def fake_tool(tmp_path):
    return pt.fake_tool(str(tmp_path / "bin"), str(tmp_path / "drv"), str(tmp_path / "cc.log"))


@pytest.mark.parametrize("choice,tool,lib,want", [
    ("auto", True, "new", "cuda-checkpoint"),
    ("auto", False, "new", "driver-api"),
    ("driver-api", True, "new", "driver-api"),
    ("cuda-checkpoint", True, "new", "cuda-checkpoint"),
    ("cuda-checkpoint", False, "new", "{tool} not found"),
    ("auto", False, "old", "{tool} not found and the CUDA driver API cannot be used: {lib} "
                           "(driver API 13.0) has no cuCheckpointProcessGetState (the "
                           "checkpoint calls need driver r570 / CUDA 12.8 or later)"),
    ("driver-api", True, "missing", "the CUDA driver API cannot be used: cannot load {lib} ("),
])
def test_interface_selection(libs, state, tmp_path, choice, tool, lib, want):
    tool_path = fake_tool(tmp_path) if tool else str(tmp_path / "no-cuda-checkpoint")
    lib_path = libs.get(lib, str(tmp_path / "nowhere" / "libcuda.so.1"))
    gpu, ctx = gpu_ctx(tmp_path, interface=choice, cuda_checkpoint=tool_path, libcuda=lib_path)
    iface, why = gpu._interface(ctx)
    if want in ("cuda-checkpoint", "driver-api"):
        assert why is None and iface.name == want
    else:
        assert iface is None
        assert why.startswith(want.format(tool=tool_path, lib=lib_path))


def test_library_from_env_when_no_option(libs, state, tmp_path, monkeypatch):
    monkeypatch.setenv("MIGRT_LIBCUDA", libs["new"])
    gpu, ctx = gpu_ctx(tmp_path, cuda_checkpoint=str(tmp_path / "absent"))
    iface, why = gpu._interface(ctx)
    assert why is None and iface.driver.path == libs["new"]


def test_refusal_names_both_interfaces_before_anything_is_frozen(tmp_path, state, monkeypatch,
                                                                  as_cuda_process):
    monkeypatch.setenv("MIGRT_LIBCUDA", str(tmp_path / "no-libcuda.so.1"))
    gpu, ctx = gpu_ctx(tmp_path, cuda_checkpoint=str(tmp_path / "absent"),
                       criu_libdir=str(tmp_path))
    ctx["mode"] = "dump"
    with pytest.raises(RefusedError) as e:
        gpu.pre_checkpoint(ctx)
    msg = str(e.value)
    assert msg.startswith(f"gpu: {tmp_path}/absent not found and the CUDA driver API cannot "
                          f"be used: cannot load {tmp_path}/no-libcuda.so.1 (")
    assert msg.endswith("; the container's CUDA state cannot be checkpointed; nothing was frozen")
    assert "\n" not in msg


def test_bundle_chooses_the_interface_by_annotation_or_env():
    gpu = load()
    spec = {"process": {"env": ["MIGRT_GPU_INTERFACE=cuda-checkpoint"]},
            "annotations": {"io.migrt.gpu.interface": "driver-api"}}
    assert options.for_bundle(gpu, spec, node={})["interface"] == "driver-api"
    del spec["annotations"]
    assert options.for_bundle(gpu, spec, node={"interface": "driver-api"})["interface"] == \
        "cuda-checkpoint"
    assert options.for_bundle(gpu, {}, node={})["interface"] == "auto"
    with pytest.raises(BundleError, match="is not one of auto, cuda-checkpoint, driver-api"):
        options.for_bundle(gpu, {"annotations": {"io.migrt.gpu.interface": "nvml"}}, node={})


def test_no_ctypes_on_the_hot_path():
    code = (f"import sys; sys.path.insert(0, {REPO!r}); import migrt.front.fast, migrt.plugins.gate; "
            "print('ctypes' in sys.modules, 'migrt_plugins._cuda_driver' in sys.modules)")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                         text=True)
    assert out.stdout.split() == ["False", "False"], out.stderr
