"""gpu: checkpoint and restore the GPU state of a container's processes.

NVIDIA: CRIU cannot dump GPU memory, so before the dump each CUDA process is locked
and checkpointed through the driver's checkpoint interface (lock with a timeout, then
checkpoint: device memory moves to host memory and the process lets go of the GPU);
after restore it is restored and unlocked. The GPUs' UUIDs are recorded at checkpoint
(from /proc/driver/nvidia/gpus/*/information); when the destination grants other GPUs
at the same container paths (see the devices plugin) the restore passes the UUID map,
which the driver requires to name every checkpointed GPU.

Two ways into the same driver interface (option `interface`):
- `cuda-checkpoint`, NVIDIA's utility: `--get-state`, `--action lock --timeout`,
  `--action checkpoint`, `--action restore [--device-map old=new,...]`, `--action
  unlock`;
- `driver-api`, the CUDA driver library's own calls (libcuda.so.1, r570 / CUDA 12.8 and
  later: cuCheckpointProcessGetState/Lock/Checkpoint/Restore/Unlock), through ctypes in
  _cuda_driver.py; the GPU map needs CUDA 13.0 (r580) there too;
- `auto` (default): cuda-checkpoint when it is installed, else the driver API when the
  library has the calls, else a refusal naming why neither can be used.

CRIU's own CUDA plugin (cuda_plugin.so in CRIU's plugin dir) does the same four steps
inside `criu dump`/`criu restore`. When it is installed this plugin does not repeat
them: it only makes the checks below, records the GPUs and verifies the processes run
again after restore. CRIU 4.1's plugin cannot remap GPUs, so a restore that needs a
remap with it installed is refused with that reason.

Refused before anything is locked or frozen: MIG partitions (/dev/nvidia-caps or MIG-
UUIDs), MPS clients (CUDA_MPS_PIPE_DIRECTORY, a mounted MPS pipe dir), UVM managed
memory (a process maps /dev/nvidia-uvm; cuda-checkpoint documents no UVM support and
leaves a process in a bad state when it meets it), no usable checkpoint interface.

AMD: CRIU's amdgpu plugin does the work inside CRIU; this plugin refuses a container
using /dev/kfd when amdgpu_plugin.so is not installed, and passes the plugin's KFD_*
settings (option amdgpu_env) to CRIU through the environment runc hands it.

Nothing here has run on GPU hardware: it is tested against tests/fakes/cuda-checkpoint
and tests/fakes/fake_libcuda.c, stand-ins that follow the documented interfaces and states.
"""
import atexit
import glob
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

from migrt.errors import MigrtError, RefusedError
from migrt.plugins import Plugin, plugin_dir, proc

RECORD = "gpu.json"
NVIDIA_GPU = re.compile(r"^/dev/nvidia(\d+)$")
INTERFACES = ("auto", "cuda-checkpoint", "driver-api")


def driver_module():
    """plugins/_cuda_driver.py (ctypes; loaded only when the driver API is wanted)."""
    name = "migrt_plugins._cuda_driver"
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_cuda_driver.py")
    if not os.path.exists(path):
        return importlib.import_module(name)      # installed as the migrt_plugins package
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception:
        del sys.modules[name]
        raise
    return mod


class CudaCheckpointTool:
    """The driver's checkpoint interface through the cuda-checkpoint utility."""
    name = label = "cuda-checkpoint"

    def __init__(self, path, timeout_ms):
        self.path, self.timeout_ms = path, timeout_ms

    def _run(self, *args):
        try:
            p = subprocess.run([self.path, *map(str, args)], capture_output=True, text=True,
                               timeout=max(60, self.timeout_ms / 1000 + 30))
        except subprocess.TimeoutExpired:
            return 124, "timed out"
        return p.returncode, (p.stdout + p.stderr).strip()

    def state(self, pid):
        rc, out = self._run("--get-state", "--pid", pid)
        return out.split()[0] if rc == 0 and out else None

    def act(self, action, pid, gpu_map=None):
        """None when done, else the tool's one-line reason."""
        args = ["--action", action, "--pid", pid]
        if action == "lock":
            args += ["--timeout", self.timeout_ms]
        if gpu_map:
            args += ["--device-map", ",".join(f"{a}={b}" for a, b in sorted(gpu_map.items()))]
        rc, out = self._run(*args)
        return None if rc == 0 else (out or f"exit status {rc}")

    def cannot_remap(self):
        rc, out = self._run("--help")
        if "--device-map" not in out:
            return ("restoring onto other GPUs needs cuda-checkpoint --device-map (driver "
                    "r580 or later); this one has none")
        return None


class DriverApi:
    """The same interface through the CUDA driver library's cuCheckpointProcess* calls."""
    name = "driver-api"
    label = "the CUDA driver API"

    def __init__(self, driver, timeout_ms):
        self.driver, self.timeout_ms = driver, timeout_ms

    def state(self, pid):
        try:
            return self.driver.state(pid)
        except driver_module().DriverError:
            return None          # not a CUDA process (CUDA_ERROR_NOT_SUPPORTED), or gone

    def act(self, action, pid, gpu_map=None):
        mod = driver_module()
        try:
            if action == "lock":
                self.driver.lock(pid, self.timeout_ms)
            elif action == "restore":
                self.driver.restore(pid, gpu_map or None)
            else:
                getattr(self.driver, action)(pid)
        except (mod.DriverError, mod.Unavailable, ValueError) as e:
            return str(e)
        return None

    def cannot_remap(self):
        if self.driver.can_remap():
            return None
        return (f"restoring onto other GPUs needs the driver API's GPU pairs (CUDA 13.0, "
                f"driver r580 or later); {self.driver.path} is {self.driver.version_text()}")


def inventory(driver_root):
    """{minor: {"uuid", "model", "bus"}} of this node's NVIDIA GPUs."""
    out = {}
    for info in glob.glob(os.path.join(driver_root, "gpus", "*", "information")):
        fields = {}
        try:
            with open(info) as f:
                for line in f:
                    k, sep, v = line.partition(":")
                    if sep:
                        fields[k.strip()] = v.strip()
        except OSError:
            continue
        try:
            minor = int(fields.get("Device Minor", ""))
        except ValueError:
            continue
        out[minor] = {"uuid": fields.get("GPU UUID"), "model": fields.get("Model"),
                      "bus": fields.get("Bus Location") or os.path.basename(os.path.dirname(info))}
    return out


def nvidia_devices(spec):
    devs = ((spec or {}).get("linux") or {}).get("devices") or []
    return [d for d in devs if isinstance(d, dict) and NVIDIA_GPU.match(str(d.get("path")))]


def amd_devices(spec):
    devs = ((spec or {}).get("linux") or {}).get("devices") or []
    return [d for d in devs if isinstance(d, dict) and
            (d.get("path") == "/dev/kfd" or str(d.get("path", "")).startswith("/dev/dri/renderD"))]


class Gpu(Plugin):
    name = "gpu"
    description = ("lock/checkpoint CUDA state (cuda-checkpoint or the CUDA driver API) or "
                   "drive CRIU's amdgpu plugin")
    order = 30
    detect = {"devices": ["/dev/nvidia[0-9]*", "/dev/nvidiactl", "/dev/kfd", "/dev/dri/renderD*"],
              "env": ["NVIDIA_VISIBLE_DEVICES"]}
    options = {
        "interface": {"type": "string", "enum": list(INTERFACES), "default": "auto",
                      "description": "how to reach the driver's checkpoint interface: "
                                     "cuda-checkpoint, driver-api (libcuda's "
                                     "cuCheckpointProcess* calls) or auto (cuda-checkpoint "
                                     "when installed, else the driver API)"},
        "cuda_checkpoint": {"type": "string", "default": "cuda-checkpoint",
                            "description": "the cuda-checkpoint utility (name on PATH or path)"},
        "libcuda": {"type": "string", "default": "",
                    "description": "the CUDA driver library for interface driver-api "
                                   "(default: $MIGRT_LIBCUDA, else libcuda.so.1)"},
        "driver_root": {"type": "string", "default": "/proc/driver/nvidia",
                        "description": "the NVIDIA driver's proc dir (GPU UUIDs by minor)"},
        "criu_libdir": {"type": "string", "default": "",
                        "description": "CRIU's plugin dir (default: from CRIU's config, else /usr/lib/criu)"},
        "lock_timeout_ms": {"type": "integer", "default": 10000, "minimum": 0,
                            "description": "how long `--action lock` may wait for CUDA work"},
        "allow_uvm": {"type": "boolean", "default": False,
                      "description": "do not refuse processes mapping /dev/nvidia-uvm (newer drivers)"},
        "amdgpu_env": {"type": "object", "default": {},
                       "description": "KFD_* settings for CRIU's amdgpu plugin"},
    }

    def __init__(self):
        self._held = {}      # cid -> (interface, pids this plugin locked+checkpointed)
        self._plans = {}     # cid -> restore plan (destination side)
        self._drivers = {}   # library path -> _cuda_driver.Driver or its Unavailable reason

    # ------------------------------------------------------------ helpers

    def _tool(self, ctx):
        t = ctx["options"]["cuda_checkpoint"]
        path = t if os.sep in t else shutil.which(t)
        if not path or not os.access(path, os.X_OK):
            return None
        return path

    def _driver(self, ctx):
        """A loaded driver library with the checkpoint calls, or the reason there is none."""
        try:
            mod = driver_module()
        except Exception as e:
            return None, f"cannot load the driver API binding ({type(e).__name__}: {e})"
        path = mod.library_path(ctx["options"].get("libcuda") or "")
        if path not in self._drivers:
            try:
                self._drivers[path] = mod.Driver(path)
            except mod.Unavailable as e:
                self._drivers[path] = str(e)
        got = self._drivers[path]
        return (None, got) if isinstance(got, str) else (got, None)

    def _interface(self, ctx):
        """(interface, None), or (None, why neither cuda-checkpoint nor the driver API)."""
        opts = ctx["options"]
        choice = opts.get("interface") or "auto"
        timeout = opts["lock_timeout_ms"]
        if choice != "driver-api":
            tool = self._tool(ctx)
            if tool:
                return CudaCheckpointTool(tool, timeout), None
            if choice == "cuda-checkpoint":
                return None, f"{opts['cuda_checkpoint']} not found"
        drv, why = self._driver(ctx)
        if drv:
            return DriverApi(drv, timeout), None
        if choice == "driver-api":
            return None, f"the CUDA driver API cannot be used: {why}"
        return None, (f"{opts['cuda_checkpoint']} not found and the CUDA driver API cannot "
                      f"be used: {why}")

    def _libdir(self, ctx):
        return ctx["options"].get("criu_libdir") or proc.criu_libdir(ctx.get("spec"))

    def _criu_plugin(self, ctx, name):
        path = os.path.join(self._libdir(ctx), name)
        return path if os.path.exists(path) else None

    def _kind(self, spec):
        env = proc.spec_env(spec)
        vis = env.get("NVIDIA_VISIBLE_DEVICES", "")
        if nvidia_devices(spec) or (vis and vis.lower() not in ("void", "none")):
            return "nvidia"
        if amd_devices(spec):
            return "amd"
        return None

    def _checks(self, ctx, pids):
        """Refusals that must come before anything is locked or frozen."""
        spec = ctx.get("spec") or {}
        env = proc.spec_env(spec)
        devs = ((spec.get("linux") or {}).get("devices")) or []
        caps = [d["path"] for d in devs if isinstance(d, dict)
                and str(d.get("path", "")).startswith("/dev/nvidia-caps")]
        if caps or "MIG-" in env.get("NVIDIA_VISIBLE_DEVICES", ""):
            what = ", ".join(caps) or env.get("NVIDIA_VISIBLE_DEVICES")
            raise RefusedError(f"gpu: the container uses a MIG partition ({what}); "
                               "cuda-checkpoint cannot checkpoint MIG instances; nothing was frozen")
        mps = env.get("CUDA_MPS_PIPE_DIRECTORY")
        if not mps:
            for m in spec.get("mounts") or []:
                if isinstance(m, dict) and "nvidia-mps" in str(m.get("destination", "")) + str(m.get("source", "")):
                    mps = m.get("destination")
        if not mps:
            for pid in pids:
                mps = proc.environ(pid).get("CUDA_MPS_PIPE_DIRECTORY")
                if mps:
                    break
        if mps:
            raise RefusedError(f"gpu: the container is an MPS client ({mps}); its CUDA "
                               "context lives in the MPS server and cannot be checkpointed; "
                               "nothing was frozen")
        if not ctx["options"].get("allow_uvm"):
            for pid in pids:
                if "/dev/nvidia-uvm" in proc.mapped_paths(pid):
                    raise RefusedError(f"gpu: process {pid} uses UVM managed memory (maps "
                                       "/dev/nvidia-uvm), which cuda-checkpoint does not "
                                       "support; nothing was frozen")

    def _cuda_pids(self, ctx, pids):
        """Processes holding an NVIDIA device open (candidates to ask the driver about)."""
        out = []
        for pid in pids:
            for target in proc.open_paths(pid).values():
                if NVIDIA_GPU.match(target) or target == "/dev/nvidiactl":
                    out.append(pid)
                    break
        return out

    def _gpus(self, ctx, spec):
        inv = inventory(ctx["options"]["driver_root"])
        gpus = []
        for d in nvidia_devices(spec):
            info = inv.get(d.get("minor")) or {}
            gpus.append({"path": d["path"], "minor": d.get("minor"), "uuid": info.get("uuid"),
                         "model": info.get("model")})
        if not gpus:
            # GPUs injected by a prestart hook (nvidia-container-runtime's legacy mode)
            # are not in linux.devices: NVIDIA_VISIBLE_DEVICES names them by index or UUID.
            vis = proc.spec_env(spec).get("NVIDIA_VISIBLE_DEVICES", "")
            by_uuid = {v["uuid"]: m for m, v in inv.items()}
            for i, tok in enumerate(t.strip() for t in vis.split(",")
                                    if t.strip() and t.strip() not in ("all", "none", "void")):
                minor = int(tok) if tok.isdigit() else by_uuid.get(tok)
                info = inv.get(minor)
                if info:
                    gpus.append({"path": f"visible:{i}", "minor": minor, "uuid": info["uuid"],
                                 "model": info.get("model")})
        return gpus

    # ------------------------------------------------------------ source side

    def pre_migrate(self, ctx):
        if self._kind(ctx.get("spec")) == "nvidia":
            self._checks(ctx, proc.container_pids(ctx))

    def pre_checkpoint(self, ctx):
        if ctx.get("mode") == "pre-dump":
            return     # GPU memory is not in a pre-dump (CRIU's plugin skips it too)
        spec = ctx.get("spec") or {}
        kind = self._kind(spec)
        rec = {"kind": kind}
        if kind == "amd":
            if not self._criu_plugin(ctx, "amdgpu_plugin.so"):
                raise RefusedError(f"gpu: the container uses an AMD GPU (/dev/kfd) but CRIU's "
                                   f"amdgpu plugin is not in {self._libdir(ctx)}; nothing was frozen")
            os.environ.update({k: str(v) for k, v in (ctx["options"].get("amdgpu_env") or {}).items()})
            rec["devices"] = [d["path"] for d in amd_devices(spec)]
        elif kind == "nvidia":
            pids = proc.container_pids(ctx)
            candidates = self._cuda_pids(ctx, pids)
            if not candidates and not nvidia_devices(spec):
                return     # e.g. a CUDA image's NVIDIA_VISIBLE_DEVICES=all on a node without GPUs
            self._checks(ctx, pids)
            iface = None
            if candidates:
                iface, why = self._interface(ctx)
                if iface is None:
                    raise RefusedError(f"gpu: {why}; the container's CUDA state cannot be "
                                       "checkpointed; nothing was frozen")
            criu_plugin = self._criu_plugin(ctx, "cuda_plugin.so")
            cuda = []
            for pid in candidates:
                state = iface.state(pid)
                if state:
                    cuda.append((pid, state))
            rec.update(gpus=self._gpus(ctx, spec), criu_plugin=bool(criu_plugin),
                       interface=iface.name if iface else None,
                       processes=[{"pid": p, "state": s} for p, s in cuda])
            if not criu_plugin:
                self._lock_and_checkpoint(ctx, iface, [p for p, s in cuda if s == "running"])
        else:
            return
        with open(os.path.join(plugin_dir(ctx, self.name), RECORD), "w") as f:
            json.dump(rec, f, indent=1)

    def _lock_and_checkpoint(self, ctx, iface, pids):
        done = []
        self._held[ctx["cid"]] = (iface, done)
        # If the checkpoint fails and the core never calls post-checkpoint, the source's
        # processes must not stay locked: release them when this process exits.
        atexit.register(self._release_quietly, dict(ctx, options=dict(ctx["options"])))
        for pid in pids:
            err = iface.act("lock", pid)
            if err and iface.state(pid) is None:
                # gone since it was asked, or a fork that had only inherited the device
                # descriptors and has let them go: no CUDA state of its own to keep
                continue
            if err:
                self._release(ctx)
                raise RefusedError(f"gpu: {iface.label} could not lock process {pid}: {err}; "
                                   "nothing was frozen")
            done.append([pid, "locked"])
            err = iface.act("checkpoint", pid)
            if err:
                self._release(ctx)
                raise RefusedError(f"gpu: {iface.label} could not checkpoint process {pid}: "
                                   f"{err}; nothing was frozen")
            done[-1][1] = "checkpointed"

    def _release(self, ctx):
        """Give the GPU back to processes this plugin checkpointed (source keeps running)."""
        errors = []
        iface, held = self._held.pop(ctx["cid"], (None, []))
        for pid, state in reversed(held):
            steps = (["restore", "unlock"] if state == "checkpointed" else ["unlock"])
            for action in steps:
                err = iface.act(action, pid)
                if err:
                    errors.append(f"{action} {pid}: {err}")
                    break
        if errors:
            raise MigrtError("gpu: could not resume CUDA on the source: " + "; ".join(errors))

    def _release_quietly(self, ctx):
        if ctx["cid"] in self._held:
            try:
                self._release(ctx)
            except Exception:
                pass

    def post_checkpoint(self, ctx):
        if ctx["cid"] not in self._held:
            return
        if ctx.get("error") or ctx.get("mode") == "leave-running":
            self._release(ctx)
        else:
            self._held.pop(ctx["cid"], None)    # dumped and gone

    # ------------------------------------------------------------ destination side

    def pre_restore(self, ctx):
        try:
            with open(os.path.join(plugin_dir(ctx, self.name, create=False), RECORD)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            return
        if rec.get("kind") == "amd":
            if not self._criu_plugin(ctx, "amdgpu_plugin.so"):
                raise RefusedError(f"gpu: the checkpoint holds AMD GPU state but CRIU's "
                                   f"amdgpu plugin is not in {self._libdir(ctx)}")
            os.environ.update({k: str(v) for k, v in (ctx["options"].get("amdgpu_env") or {}).items()})
            return
        if rec.get("kind") != "nvidia":
            return
        iface, why = self._interface(ctx)
        if iface is None:
            raise RefusedError(f"gpu: {why}; cannot restore the checkpoint's CUDA state")
        dest = {g["path"]: g for g in self._gpus(ctx, ctx["spec"])}
        dmap = {}
        for g in rec.get("gpus") or []:
            there = dest.get(g["path"])
            if there is None or not there.get("uuid"):
                raise RefusedError(f"gpu: the checkpoint ran on {g.get('uuid')} at {g['path']}, "
                                   f"but this bundle grants no NVIDIA GPU of this node there")
            if g.get("model") and there.get("model") and g["model"] != there["model"]:
                raise RefusedError(f"gpu: {g['path']} is a {there['model']} here but the "
                                   f"checkpoint ran on a {g['model']} (the driver restores onto "
                                   "the same chip only)")
            if g.get("uuid"):
                dmap[g["uuid"]] = there["uuid"]
        remap = any(a != b for a, b in dmap.items())
        local_plugin = self._criu_plugin(ctx, "cuda_plugin.so")
        if rec.get("criu_plugin"):
            if not local_plugin:
                raise RefusedError("gpu: the checkpoint was made with CRIU's cuda plugin, "
                                   f"which is not in {self._libdir(ctx)} here (CRIU would "
                                   "refuse: missing required plugin)")
            if remap:
                raise RefusedError("gpu: the checkpoint must move to other GPUs ("
                                   + ", ".join(f"{a}->{b}" for a, b in dmap.items() if a != b)
                                   + ") but CRIU's cuda plugin restores onto the same GPUs only")
        elif remap:
            why = iface.cannot_remap()
            if why:
                raise RefusedError(f"gpu: {why}")
        self._plans[ctx["cid"]] = {"map": dmap if remap else {}, "interface": iface,
                                   "criu_plugin": bool(rec.get("criu_plugin"))}

    def post_restore(self, ctx):
        plan = self._plans.pop(ctx["cid"], None)
        if plan is None:
            return
        pids = proc.container_pids(ctx)
        iface = plan["interface"]
        states = {pid: iface.state(pid) for pid in pids}
        if plan["criu_plugin"]:
            stuck = [f"{p} ({s})" for p, s in states.items() if s in ("locked", "checkpointed")]
            if stuck:
                raise MigrtError("gpu: after restore CUDA is not running in " + ", ".join(stuck))
            return
        for pid, state in states.items():
            if state != "checkpointed":
                continue
            for action in ("restore", "unlock"):
                err = iface.act(action, pid, plan["map"] if action == "restore" else None)
                if err:
                    raise MigrtError(f"gpu: {iface.label} {action} of process {pid} failed: {err}")


plugin = Gpu
