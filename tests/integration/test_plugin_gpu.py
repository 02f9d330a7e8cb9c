"""gpu plugin, real runc and CRIU, against the fake cuda-checkpoint and fake driver
files (no GPU here): the calls and their order are the ones real hardware would get."""
import pytest

from fakes import plugintest as pt

# Holds GPU 0, the control node and UVM open as a CUDA process does after cuInit
# (without mapping UVM memory); children must not inherit them (a sleep that exits
# between lock and checkpoint is a real process vanishing, not a test subject).
CUDA_LIKE = ("exec 4</dev/nvidia0 6</dev/nvidiactl 7</dev/nvidia-uvm; i=0; "
             "while :; do i=$((i+1)); echo tick $i; sleep 0.05 4<&- 6<&- 7<&-; done")
# Stand-ins for the driver's nodes: ordinary character devices CRIU can dump.
CTL, UVM = ("/dev/nvidiactl", 1, 7), ("/dev/nvidia-uvm", 1, 8)
L4 = "NVIDIA L4"
GPU_A = "GPU-aaaaaaaa-0000-0000-0000-000000000001"
GPU_B0 = "GPU-bbbbbbbb-0000-0000-0000-000000000000"
GPU_B1 = "GPU-bbbbbbbb-0000-0000-0000-000000000001"


@pytest.fixture
def nodes(tmp_path, migrt_bin):
    n = pt.Nodes(tmp_path, migrt_bin)
    yield n
    n.cleanup()


def gpu_node(nodes, tmp_path, name, gpus, criu_plugin=False):
    d = tmp_path / f"gpu-{name}"
    driver = pt.fake_driver(str(d / "driver"), gpus)
    log = str(d / "calls.jsonl")
    tool = pt.fake_tool(str(d / "bin"), driver, log)
    libdir = d / "criu-lib"
    libdir.mkdir(parents=True)
    if criu_plugin:
        (libdir / "cuda_plugin.so").write_bytes(b"")
    rt = nodes(name, config=f"plugins:\n  gpu:\n    cuda_checkpoint: {tool}\n"
                            f"    driver_root: {driver}\n    criu_libdir: {libdir}\n")
    rt.calls_log = log
    return rt


def _run_source(nodes, make_bundle, tmp_path, criu_plugin=False, extra=None, env=(),
                prefix=""):
    a = gpu_node(nodes, tmp_path, "a", [(3, GPU_A, L4)], criu_plugin)
    src = make_bundle(["sh", "-c", prefix + CUDA_LIKE], name=pt.uniq("src"), env=list(env))
    pt.grant(src, "/dev/nvidia0", 1, 3)
    for path, maj, mi in [CTL, UVM] + list(extra or ()):
        pt.grant(src, path, maj, mi)
    rc, out, err = a.create("c1", src, start=True)
    assert rc == 0, err.text
    pt.wait_lines(out, lambda x: x.startswith("tick 3"))
    return a, out


def test_cuda_state_is_checkpointed_and_restored_onto_another_gpu(nodes, make_bundle, tmp_path):
    a, out = _run_source(nodes, make_bundle, tmp_path)
    img = tmp_path / "ckpt"
    p = pt.checkpoint(a, "c1", img)
    assert p.returncode == 0, p.stderr
    assert pt.calls(a.calls_log) == ["get-state", "lock", "checkpoint"]
    last = int(out.lines()[-1].split()[1])

    b = gpu_node(nodes, tmp_path, "b", [(7, GPU_B0, L4), (5, GPU_B1, L4)])
    dst = make_bundle(["sh", "-c", CUDA_LIKE], name=pt.uniq("dst"))
    pt.grant(dst, "/dev/nvidia1", 1, 5)           # this node gives the container its GPU 1
    pt.grant(dst, *CTL)
    pt.grant(dst, *UVM)
    rc, out2, err2 = pt.restore(b, "c2", dst, img)
    assert rc == 0, err2.text
    made = pt.calls(b.calls_log)
    assert f"restore {GPU_A}={GPU_B1}" in made
    assert made.index(f"restore {GPU_A}={GPU_B1}") < made.index("unlock")
    pid = b.state("c2")["pid"]
    p = __import__("subprocess").run([pt.FAKE_CUDA, "--get-state", "--pid", str(pid)],
                                     capture_output=True, text=True,
                                     env={"FAKE_NVIDIA_DRIVER": str(tmp_path / "gpu-b" / "driver")})
    assert p.stdout.strip() == "running"
    pt.wait_lines(out2, lambda x: x.startswith("tick "))
    assert int(out2.lines()[0].split()[1]) == last + 1
    assert b.exec_out("c2", "stat", "-c", "%t:%T", "/dev/nvidia0").strip() == "1:5"


@pytest.mark.parametrize("what,extra,env,message", [
    ("MIG", [("/dev/nvidia-caps/nvidia-cap1", 1, 7)], (),
     "gpu: the container uses a MIG partition (/dev/nvidia-caps/nvidia-cap1)"),
    ("MPS", [], ("CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps",),
     "gpu: the container is an MPS client (/tmp/nvidia-mps)"),
])
def test_unsupported_gpu_use_is_refused_before_anything_is_locked(
        nodes, make_bundle, tmp_path, what, extra, env, message):
    a, out = _run_source(nodes, make_bundle, tmp_path, extra=extra, env=env)
    p = pt.checkpoint(a, "c1", tmp_path / "ckpt")
    assert p.returncode != 0
    assert message in p.stderr
    assert "nothing was frozen" in p.stderr
    assert not [c for c in pt.calls(a.calls_log) if c.startswith(("lock", "checkpoint"))]
    assert a.state("c1")["status"] == "running"


def test_criu_cuda_plugin_does_the_work_and_cannot_remap(nodes, make_bundle, tmp_path):
    a, out = _run_source(nodes, make_bundle, tmp_path, criu_plugin=True)
    img = tmp_path / "ckpt"
    p = pt.checkpoint(a, "c1", img)
    assert p.returncode == 0, p.stderr
    # CRIU's plugin locks and checkpoints inside `criu dump`: no double work from migrt
    assert pt.calls(a.calls_log) == ["get-state"]
    b = gpu_node(nodes, tmp_path, "b", [(5, GPU_B1, L4)], criu_plugin=True)
    dst = make_bundle(["sh", "-c", CUDA_LIKE], name=pt.uniq("dst"))
    pt.grant(dst, "/dev/nvidia0", 1, 5)
    pt.grant(dst, *CTL)
    pt.grant(dst, *UVM)
    rc, out2, err2 = pt.restore(b, "c2", dst, img)
    assert rc != 0
    assert f"{GPU_A}->{GPU_B1}) but CRIU's cuda plugin restores onto the same GPUs only" \
        in err2.text
    assert b.state("c2") is None


def test_failed_dump_gives_the_gpu_back_to_the_source(nodes, make_bundle, tmp_path):
    # /dev/vcs0 (c 7:0) is a device CRIU cannot dump: the checkpoint fails after the
    # plugin locked and checkpointed CUDA; the source must get its GPU back.
    a, out = _run_source(nodes, make_bundle, tmp_path, extra=[("/dev/vcs0", 7, 0)],
                         prefix="exec 5</dev/vcs0; ")
    p = pt.checkpoint(a, "c1", tmp_path / "ckpt")
    assert p.returncode != 0
    assert pt.calls(a.calls_log)[:3] == ["get-state", "lock", "checkpoint"], p.stderr
    assert pt.calls(a.calls_log)[3:] == ["restore", "unlock"]
    assert a.state("c1")["status"] == "running"
    n = int(out.lines()[-1].split()[1])
    pt.wait_lines(out, lambda x: x == f"tick {n + 3}")


def test_leave_running_checkpoint_resumes_cuda_on_the_source(nodes, make_bundle, tmp_path):
    a, out = _run_source(nodes, make_bundle, tmp_path)
    p = a.run("checkpoint", "--leave-running", "--image-path", str(tmp_path / "ckpt"), "c1")
    assert p.returncode == 0, p.stderr
    assert pt.calls(a.calls_log) == ["get-state", "lock", "checkpoint", "restore", "unlock"]
    n = int(out.lines()[-1].split()[1])
    pt.wait_lines(out, lambda x: x == f"tick {n + 3}")
