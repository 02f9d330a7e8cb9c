"""gpu plugin through the CUDA driver API, real runc and CRIU, against the fake
libcuda.so.1 (tests/fakes/fake_libcuda.c, compiled here) and fake driver files (no GPU
here). The fake keeps each process's CUDA state in the container's own /dev/shm, so it
moves with the process through CRIU as the real state moves with its memory."""
import os
import shutil
import subprocess

import pytest

from fakes import plugintest as pt

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE_C = os.path.join(os.path.dirname(HERE), "fakes", "fake_libcuda.c")
STATE = "@/dev/shm/.fake-libcuda"      # inside each process's root (see fake_libcuda.c)

# As in test_plugin_gpu.py: holds GPU 0, the control node and UVM open as a CUDA process
# does after cuInit; children do not inherit them.
CUDA_LIKE = ("exec 4</dev/nvidia0 6</dev/nvidiactl 7</dev/nvidia-uvm; i=0; "
             "while :; do i=$((i+1)); echo tick $i; sleep 0.05 4<&- 6<&- 7<&-; done")
CTL, UVM = ("/dev/nvidiactl", 1, 7), ("/dev/nvidia-uvm", 1, 8)
L4 = "NVIDIA L4"
GPU_A = "GPU-aaaaaaaa-0000-0000-0000-000000000001"
GPU_B0 = "GPU-bbbbbbbb-0000-0000-0000-000000000000"
GPU_B1 = "GPU-bbbbbbbb-0000-0000-0000-000000000001"


@pytest.fixture(scope="module")
def libcuda(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler (cc/gcc) to build tests/fakes/fake_libcuda.c")
    path = str(tmp_path_factory.mktemp("libcuda") / "libcuda.so.1")
    p = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", path, FAKE_C],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot build the fake libcuda: {p.stderr.strip()[-300:]}")
    return path


@pytest.fixture
def nodes(tmp_path, migrt_bin):
    n = pt.Nodes(tmp_path, migrt_bin)
    yield n
    n.cleanup()


def api_node(nodes, tmp_path, name, gpus, libcuda, gpus_in_use=""):
    """A node without cuda-checkpoint: `interface: auto` must take the driver API."""
    d = tmp_path / f"gpu-{name}"
    driver = pt.fake_driver(str(d / "driver"), gpus)
    libdir = d / "criu-lib"
    libdir.mkdir(parents=True)
    log = str(d / "calls.log")
    rt = nodes(name, config=f"plugins:\n  gpu:\n    cuda_checkpoint: {d}/no-cuda-checkpoint\n"
                            f"    libcuda: {libcuda}\n    driver_root: {driver}\n"
                            f"    criu_libdir: {libdir}\n",
               env={"FAKE_LIBCUDA_DIR": STATE, "FAKE_LIBCUDA_LOG": log,
                    "FAKE_LIBCUDA_GPUS": gpus_in_use})
    rt.calls_log = log
    return rt


def calls(log):
    """['cuCheckpointProcessLock', 'cuCheckpointProcessRestore GPU-a=GPU-b', ...];
    a failed call ends in '!<CUresult>'."""
    out = []
    try:
        with open(log) as f:
            for line in f:
                name, pid, rc, *detail = line.rstrip("\n").split(" ", 3)
                if name == "cuInit":
                    continue
                short = name.replace("cuCheckpointProcess", "")
                if detail and "=" in detail[0] and name.endswith("Restore"):
                    short += " " + detail[0].strip()
                out.append(short + (f" !{rc}" if rc != "0" else ""))
    except FileNotFoundError:
        pass
    return out


def cuda_state(rt, cid):
    """The fake's state file inside the container (its pid namespace's pid 1)."""
    return rt.exec_out(cid, "cat", "/dev/shm/.fake-libcuda/1").split()


def _run_source(nodes, make_bundle, tmp_path, libcuda, extra=(), prefix=""):
    a = api_node(nodes, tmp_path, "a", [(3, GPU_A, L4)], libcuda, gpus_in_use=GPU_A)
    src = make_bundle(["sh", "-c", prefix + CUDA_LIKE], name=pt.uniq("src"))
    pt.grant(src, "/dev/nvidia0", 1, 3)
    for path, maj, mi in [CTL, UVM] + list(extra):
        pt.grant(src, path, maj, mi)
    rc, out, err = a.create("c1", src, start=True)
    assert rc == 0, err.text
    pt.wait_lines(out, lambda x: x.startswith("tick 3"))
    return a, out


def test_migration_through_the_driver_api_onto_another_gpu(nodes, make_bundle, tmp_path,
                                                           libcuda):
    a, out = _run_source(nodes, make_bundle, tmp_path, libcuda)
    img = tmp_path / "ckpt"
    p = pt.checkpoint(a, "c1", img)
    assert p.returncode == 0, p.stderr
    assert calls(a.calls_log) == ["GetState", "Lock", "Checkpoint"]
    last = int(out.lines()[-1].split()[1])

    b = api_node(nodes, tmp_path, "b", [(7, GPU_B0, L4), (5, GPU_B1, L4)], libcuda)
    dst = make_bundle(["sh", "-c", CUDA_LIKE], name=pt.uniq("dst"))
    pt.grant(dst, "/dev/nvidia1", 1, 5)            # this node gives the container its GPU 1
    pt.grant(dst, *CTL)
    pt.grant(dst, *UVM)
    rc, out2, err2 = pt.restore(b, "c2", dst, img)
    assert rc == 0, err2.text
    # (a `sleep` child that happens to exist is asked too: not a CUDA process, 801)
    assert [c for c in calls(b.calls_log) if c != "GetState !801"] == \
        ["GetState", f"Restore {GPU_A}={GPU_B1}", "Unlock"]
    assert cuda_state(b, "c2") == ["running", GPU_B1]
    pt.wait_lines(out2, lambda x: x.startswith("tick "))
    assert int(out2.lines()[0].split()[1]) == last + 1


def test_failed_dump_gives_the_gpu_back_through_the_driver_api(nodes, make_bundle, tmp_path,
                                                               libcuda):
    # /dev/vcs0 (c 7:0) is a device CRIU cannot dump (as in test_plugin_gpu.py)
    a, out = _run_source(nodes, make_bundle, tmp_path, libcuda, extra=[("/dev/vcs0", 7, 0)],
                         prefix="exec 5</dev/vcs0; ")
    p = pt.checkpoint(a, "c1", tmp_path / "ckpt")
    assert p.returncode != 0
    assert calls(a.calls_log) == ["GetState", "Lock", "Checkpoint", "Restore", "Unlock"]
    assert a.state("c1")["status"] == "running"
    assert cuda_state(a, "c1") == ["running", GPU_A]
    n = int(out.lines()[-1].split()[1])
    pt.wait_lines(out, lambda x: x == f"tick {n + 3}")


def test_no_interface_at_all_is_refused_before_anything_is_frozen(nodes, make_bundle, tmp_path):
    a, out = _run_source(nodes, make_bundle, tmp_path, str(tmp_path / "no-libcuda.so.1"))
    p = pt.checkpoint(a, "c1", tmp_path / "ckpt")
    assert p.returncode != 0
    assert "no-cuda-checkpoint not found and the CUDA driver API cannot be used: cannot load " \
        f"{tmp_path}/no-libcuda.so.1" in p.stderr
    assert "nothing was frozen" in p.stderr
    assert a.state("c1")["status"] == "running"
