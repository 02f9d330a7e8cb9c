"""Plugin parts that need no root: the notification file format a shell can source,
the GPU refusals, GPU inventory parsing, node compatibility and the fake
cuda-checkpoint's documented command line."""
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from migrt.errors import RefusedError  # noqa: E402
from migrt.plugins import nodefacts, proc, registry  # noqa: E402
from fakes import plugintest as pt  # noqa: E402


def load(name):
    return registry.load_file(os.path.join(REPO, "plugins", f"{name}.py"))


def test_notification_event_is_sourceable_by_sh(tmp_path):
    rdma = sys.modules[load("rdma").__class__.__module__]
    seq = rdma.write_event(None, str(tmp_path), "restored", node="node b;rm -rf /",
                           destination="10.0.0.2:7000")
    out = subprocess.run(["sh", "-c", f'. {tmp_path}/event; echo "$seq|$event|$node|$destination"'],
                         capture_output=True, text=True).stdout.strip()
    assert out == f"{seq}|restored|nodebrm-rf/|10.0.0.2:7000"


def gpu_ctx(**opts):
    gpu = load("gpu")
    options = {k: v.get("default") for k, v in gpu.options.items()}
    options.update(opts)
    return gpu, {"cid": "c", "spec": {"process": {"env": []}, "linux": {}}, "options": options}


def test_uvm_mapping_is_refused_unless_allowed(monkeypatch):
    gpu, ctx = gpu_ctx()
    monkeypatch.setattr(proc, "mapped_paths", lambda pid: {"/usr/lib/libcuda.so.1", "/dev/nvidia-uvm"})
    monkeypatch.setattr(proc, "environ", lambda pid: {})
    with pytest.raises(RefusedError, match="process 42 uses UVM managed memory"):
        gpu._checks(ctx, [42])
    gpu, ctx = gpu_ctx(allow_uvm=True)
    gpu._checks(ctx, [42])


def test_mig_uuid_in_visible_devices_is_refused():
    gpu, ctx = gpu_ctx()
    ctx["spec"]["process"]["env"] = ["NVIDIA_VISIBLE_DEVICES=MIG-4f2a-0000"]
    with pytest.raises(RefusedError, match="MIG partition"):
        gpu._checks(ctx, [])


def test_gpu_inventory_from_driver_files(tmp_path):
    gpu_mod = sys.modules[load("gpu").__class__.__module__]
    root = pt.fake_driver(str(tmp_path), [(0, "GPU-a", "NVIDIA H100"), (3, "GPU-b", "NVIDIA H100")])
    inv = gpu_mod.inventory(root)
    assert inv[3]["uuid"] == "GPU-b" and inv[0]["model"] == "NVIDIA H100"


def test_compatibility_reasons():
    src = {"arch": "x86_64", "cpu_flags": ["fpu", "sse2", "avx2", "avx512f"], "criu": "4.1.1",
           "criu_features": {"timens": True, "uffd-noncoop": True}}
    dst = {"arch": "x86_64", "cpu_flags": ["fpu", "sse2", "avx2", "hypervisor"], "criu": "4.0",
           "criu_features": {"timens": False, "uffd-noncoop": False}}
    problems = nodefacts.incompatible(src, dst)
    assert problems == ["CPU lacks avx512f", "CRIU 4.0 is older than the checkpoint's 4.1.1",
                        "kernel/CRIU lack timens"]
    assert nodefacts.incompatible(src, src) == []


def test_fake_cuda_checkpoint_speaks_the_documented_cli():
    def cc(*args):
        p = subprocess.run([pt.FAKE_CUDA, *args], capture_output=True, text=True)
        return p.returncode, p.stdout.strip()
    rc, out = cc("--help")
    assert rc == 0 and "--device-map" in out and "--get-restore-tid" in out
    rc, out = cc("--get-state", "--pid", str(os.getpid()))
    assert rc == 1 and out == f'Could not get state on process ID {os.getpid()}: "operation not supported"'
    rc, out = cc("--action", "freeze", "--pid", "1")
    assert rc == 1 and out.startswith("CUDA checkpoint and restore utility")
    assert cc("--pid")[0] == 1


def test_amd_gpu_without_criu_amdgpu_plugin_is_refused(tmp_path):
    gpu, ctx = gpu_ctx(criu_libdir=str(tmp_path))
    ctx["spec"]["linux"]["devices"] = [{"path": "/dev/kfd", "type": "c", "major": 511, "minor": 0}]
    ctx.update(mode="dump", image_dir=str(tmp_path / "img"))
    with pytest.raises(RefusedError, match=f"CRIU's amdgpu plugin is not in {tmp_path}"):
        gpu.pre_checkpoint(ctx)
    (tmp_path / "amdgpu_plugin.so").write_bytes(b"")
    ctx["options"]["amdgpu_env"] = {"KFD_MAX_BUFFER_SIZE": "0"}
    gpu.pre_checkpoint(ctx)
    assert os.environ.pop("KFD_MAX_BUFFER_SIZE") == "0"      # handed to CRIU through runc
    assert os.path.exists(tmp_path / "img" / "migrt" / "plugins" / "gpu" / "gpu.json")


def test_gpus_named_by_visible_devices_when_a_hook_injects_them(tmp_path):
    root = pt.fake_driver(str(tmp_path), [(0, "GPU-a", "L4"), (1, "GPU-b", "L4")])
    gpu, ctx = gpu_ctx(driver_root=root)
    ctx["spec"]["process"]["env"] = ["NVIDIA_VISIBLE_DEVICES=1,GPU-a"]
    assert [(g["path"], g["uuid"]) for g in gpu._gpus(ctx, ctx["spec"])] == \
        [("visible:0", "GPU-b"), ("visible:1", "GPU-a")]


def test_device_hook_never_follows_links_out_of_the_restored_dev(tmp_path):
    import importlib.util
    from importlib.machinery import SourceFileLoader
    loader = SourceFileLoader("criu_devices", os.path.join(REPO, "hooks", "criu-devices"))
    hook = importlib.util.module_from_spec(importlib.util.spec_from_loader("criu_devices", loader))
    loader.exec_module(hook)
    assert hook.clean("/dev/nvidia0") and hook.clean("/dev/dri/renderD128")
    assert not hook.clean("/dev/../etc/passwd") and not hook.clean("/etc/passwd")
    base = tmp_path / "yard-dev"
    base.mkdir()
    (base / "dri").symlink_to("/etc")                 # planted by the workload
    (base / "accel0").write_text("not a device")
    assert hook.walk_safe(str(base), "dri/renderD128") is None
    assert hook.walk_safe(str(base), "accel0") is None
    assert hook.walk_safe(str(base), "infiniband/uverbs0") == str(base / "infiniband" / "uverbs0")
    assert (base / "infiniband").is_dir()


def test_container_files_are_reached_inside_its_root(tmp_path):
    """A link the workload plants must resolve inside its root, never to the host's."""
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hosts").symlink_to("/etc/secret")    # absolute: inside its root
    (root / "etc" / "secret").write_text("container's own\n")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.chroot(str(root))
        os.write(w, b"x")
        time.sleep(30)
        os._exit(0)
    try:
        os.close(w)
        assert os.read(r, 1) == b"x"         # chrooted now
        assert proc.read_in_root(pid, "/etc/hosts") == b"container's own\n"
        rdma = sys.modules[load("rdma").__class__.__module__]
        rdma.write_event(pid, "/notify", "resumed", node="x")
        assert "event=resumed" in (root / "notify" / "event").read_text()
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_cuda_image_env_without_gpus_is_left_alone(tmp_path, monkeypatch):
    """NVIDIA_VISIBLE_DEVICES=all comes with every CUDA base image: no GPU, no refusal."""
    gpu, ctx = gpu_ctx(cuda_checkpoint=str(tmp_path / "absent"))
    ctx["spec"]["process"]["env"] = ["NVIDIA_VISIBLE_DEVICES=all"]
    ctx.update(mode="dump", image_dir=str(tmp_path / "img"))
    monkeypatch.setattr(proc, "container_pids", lambda ctx: [os.getpid()])
    gpu.pre_checkpoint(ctx)
    assert not os.path.exists(tmp_path / "img")


def test_a_process_that_let_its_gpu_go_is_skipped_not_refused():
    """Between the state query and the lock, one process exits (or is a fork that only
    inherited the device descriptors and closed them): it has no CUDA state to keep, so
    the checkpoint goes on; a process that still has CUDA state and cannot be locked is
    refused, and what was locked is given back."""
    gpu, ctx = gpu_ctx()

    class Iface:
        label = "cuda-checkpoint"

        def __init__(self, gone):
            self.gone, self.calls = gone, []

        def state(self, pid):
            return None if pid in self.gone else "running"

        def act(self, action, pid, gpu_map=None):
            self.calls.append((action, pid))
            return "operation not supported" if pid in self.gone or pid == 9 else None

    iface = Iface(gone={7})
    gpu._lock_and_checkpoint(ctx, iface, [5, 7, 8])
    assert iface.calls == [("lock", 5), ("checkpoint", 5), ("lock", 7), ("lock", 8),
                           ("checkpoint", 8)]
    gpu._held.pop(ctx["cid"], None)
    iface = Iface(gone=set())
    with pytest.raises(RefusedError, match="could not lock process 9"):
        gpu._lock_and_checkpoint(ctx, iface, [5, 9])
    assert iface.calls[-2:] == [("restore", 5), ("unlock", 5)]
