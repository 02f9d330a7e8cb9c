"""Helpers for the plugin tests: simulated nodes with their own plugin config, and the
fake NVIDIA driver tree (the format of /proc/driver/nvidia/gpus/*/information)."""
import json
import os
import stat
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import ocitest  # noqa: E402
from migrt.runtime import bundlekit  # noqa: E402

FAKE_CUDA = os.path.join(HERE, "cuda-checkpoint")


class Nodes:
    """Simulated nodes, each a runc root plus its own MIGRT_CONFIG, state and records."""

    def __init__(self, tmp_path, binary):
        self.tmp = tmp_path
        self.binary = binary
        self.rts = []

    def __call__(self, name, config="plugins: {}\n", env=None):
        d = self.tmp / f"node-{name}"
        d.mkdir(exist_ok=True)
        (d / "config.yaml").write_text(config)
        e = {"MIGRT_CONFIG": str(d / "config.yaml"), "MIGRT_STATE_DIR": str(d / "state"),
             "MIGRT_LOG_DIR": str(d / "records"), "MIGRT_CHECKPOINT_DIRS": str(self.tmp)}
        e.update(env or {})
        rt = ocitest.Runtime(self.binary, str(d / "root"), env=e)
        rt.dir = d
        self.rts.append(rt)
        return rt

    def cleanup(self):
        for rt in self.rts:
            rt.cleanup()


def grant(bundle, path, major, minor, kind="c"):
    """Grant a device node to a bundle (spec device + cgroup allow rule)."""
    spec = bundlekit.read_spec(bundle)
    spec["linux"].setdefault("devices", []).append(
        {"path": path, "type": kind, "major": major, "minor": minor, "fileMode": 0o666,
         "uid": 0, "gid": 0})
    spec["linux"].setdefault("resources", {}).setdefault("devices", []).append(
        {"allow": True, "type": kind, "major": major, "minor": minor, "access": "rwm"})
    bundlekit.write_spec(bundle, spec)


def checkpoint(rt, cid, image):
    return rt.run("checkpoint", "--image-path", str(image), cid)


def restore(rt, cid, bundle, image):
    bundlekit.set_env(bundle, "MIGRT_RESTORE_FROM", str(image))
    return rt.create(cid, bundle)


def fake_driver(root, gpus):
    """gpus: [(minor, uuid, model)] -> a fake /proc/driver/nvidia at root."""
    for i, (minor, uuid, model) in enumerate(gpus):
        d = os.path.join(root, "gpus", f"0000:0{i + 1}:00.0")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "information"), "w") as f:
            f.write(f"Model: \t\t {model}\nIRQ:   \t\t {40 + i}\nGPU UUID: \t {uuid}\n"
                    f"Video BIOS: \t 90.00.00.00.01\nBus Type: \t PCIe\n"
                    f"DMA Size: \t 47 bits\nDMA Mask: \t 0x7fffffffffff\n"
                    f"Bus Location: \t 0000:0{i + 1}:00.0\nDevice Minor: \t {minor}\n"
                    f"GPU Excluded:\t No\n")
    return root


def fake_tool(dirpath, driver_root, log):
    """A per-node cuda-checkpoint: the fake, seeing that node's driver tree."""
    os.makedirs(dirpath, exist_ok=True)
    path = os.path.join(dirpath, "cuda-checkpoint")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nFAKE_NVIDIA_DRIVER='{driver_root}' FAKE_CUDA_LOG='{log}' "
                f"exec '{sys.executable}' '{FAKE_CUDA}' \"$@\"\n")
    os.chmod(path, 0o755)
    return path


def calls(log):
    """The fake's calls, as short strings: 'lock', 'checkpoint', 'get-state', ...

    A get-state that found no such process is left out: the workloads' shells fork a
    `sleep` that holds the device files for an instant before its redirections close
    them, and the plugin may list it and ask about it after it exited (the plugin then
    leaves it alone, as it should)."""
    out = []
    try:
        with open(log) as f:
            for line in f:
                e = json.loads(line)
                a = e["argv"]
                op = a[a.index("--action") + 1] if "--action" in a else a[0].lstrip("-")
                if "--device-map" in a:
                    op += " " + a[a.index("--device-map") + 1]
                if op == "get-state" and e.get("error") == "no such process":
                    continue
                out.append(op + (" !" + e["error"] if e.get("error") else ""))
    except FileNotFoundError:
        pass
    return out


def wait_lines(out, pred, timeout=10, what="output"):
    return ocitest.wait_for(lambda: [x for x in out.lines() if pred(x)], timeout=timeout,
                            what=what)


def uniq(prefix):
    """Bundle names double as cgroup paths: unique, so parallel runs never share one."""
    return ocitest.uid(prefix)
