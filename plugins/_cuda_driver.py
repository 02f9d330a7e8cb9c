"""The CUDA driver API's process checkpoint calls, through ctypes (used by the gpu plugin).

NVIDIA's driver exports, since r570 (CUDA 12.8), the calls `cuda-checkpoint` is built on:

    CUresult cuCheckpointProcessGetState(int pid, CUprocessState *state)
    CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args)
    CUresult cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *args)
    CUresult cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *args)
    CUresult cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *args)
    CUresult cuCheckpointProcessGetRestoreThreadId(int pid, int *tid)

States: RUNNING=0, LOCKED=1, CHECKPOINTED=2, FAILED=3. Lock needs RUNNING, checkpoint
LOCKED, restore CHECKPOINTED (and leaves LOCKED), unlock LOCKED; otherwise the call
returns CUDA_ERROR_ILLEGAL_STATE. Every args struct is 64 bytes whose reserved fields
must be zero. CUcheckpointRestoreArgs carries GPU UUID pairs (old -> new) from CUDA 13.0
(r580) on; before that the whole struct is reserved, so a remap needs driver >= 13000.

The library is `libcuda.so.1` (or MIGRT_LIBCUDA, or the gpu plugin's `libcuda` option).
Loading it costs nothing until the gpu plugin needs it: nothing on migrt's pass-through
path imports this module.
"""
import ctypes
import os

LIB_ENV = "MIGRT_LIBCUDA"
DEFAULT_LIB = "libcuda.so.1"
REMAP_VERSION = 13000          # cuDriverGetVersion() from which restore takes GPU pairs

CALLS = ("cuCheckpointProcessGetState", "cuCheckpointProcessLock",
         "cuCheckpointProcessCheckpoint", "cuCheckpointProcessRestore",
         "cuCheckpointProcessUnlock")

STATES = {0: "running", 1: "locked", 2: "checkpointed", 3: "failed"}

# CUresult values the checkpoint calls document (plus the ones cuInit may give), each
# with what it means for a checkpoint, in one line.
ERRORS = {
    1: ("CUDA_ERROR_INVALID_VALUE", "invalid argument"),
    2: ("CUDA_ERROR_OUT_OF_MEMORY", "out of memory"),
    3: ("CUDA_ERROR_NOT_INITIALIZED", "the CUDA driver is not initialized in migrt"),
    4: ("CUDA_ERROR_DEINITIALIZED", "the CUDA driver is shutting down"),
    34: ("CUDA_ERROR_STUB_LIBRARY", "the library is the CUDA toolkit's stub, not the driver"),
    35: ("CUDA_ERROR_INSUFFICIENT_DRIVER", "the kernel driver is older than the library"),
    100: ("CUDA_ERROR_NO_DEVICE", "no CUDA GPU is visible to migrt"),
    101: ("CUDA_ERROR_INVALID_DEVICE", "a GPU the process needs is not on this node"),
    304: ("CUDA_ERROR_OPERATING_SYSTEM", "an operating system call failed"),
    401: ("CUDA_ERROR_ILLEGAL_STATE", "the process is not in the state this step needs"),
    500: ("CUDA_ERROR_NOT_FOUND", "no such process"),
    600: ("CUDA_ERROR_NOT_READY", "the process is busy with another checkpoint operation"),
    800: ("CUDA_ERROR_NOT_PERMITTED", "not permitted"),
    801: ("CUDA_ERROR_NOT_SUPPORTED", "not supported for this process (not a CUDA process, "
                                      "or it uses something the driver cannot checkpoint)"),
    803: ("CUDA_ERROR_SYSTEM_DRIVER_MISMATCH", "the library does not match the kernel driver"),
    909: ("CUDA_ERROR_TIMEOUT", "timed out waiting for the process's CUDA work"),
    999: ("CUDA_ERROR_UNKNOWN", "unknown error"),
}

_u64 = ctypes.c_uint64
_uint = ctypes.c_uint


class CUuuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


class LockArgs(ctypes.Structure):          # CUcheckpointLockArgs
    _fields_ = [("timeoutMs", _uint), ("reserved0", _uint), ("reserved1", _u64 * 7)]


class CheckpointArgs(ctypes.Structure):    # CUcheckpointCheckpointArgs
    _fields_ = [("reserved", _u64 * 8)]


class GpuPair(ctypes.Structure):           # CUcheckpointGpuPair
    _fields_ = [("oldUuid", CUuuid), ("newUuid", CUuuid)]


class RestoreArgs(ctypes.Structure):       # CUcheckpointRestoreArgs (CUDA 13.0)
    _fields_ = [("gpuPairs", ctypes.POINTER(GpuPair)), ("gpuPairsCount", _uint),
                ("reserved", ctypes.c_char * (52 - ctypes.sizeof(ctypes.c_void_p))),
                ("reserved1", _u64)]


class UnlockArgs(ctypes.Structure):        # CUcheckpointUnlockArgs
    _fields_ = [("reserved", _u64 * 8)]


for _s in (LockArgs, CheckpointArgs, RestoreArgs, UnlockArgs):
    assert ctypes.sizeof(_s) == 64, _s


class DriverError(Exception):
    """A failed call: .code is the CUresult, str() one line naming the call and code."""

    def __init__(self, call, code, lib=None):
        self.call, self.code = call, code
        name, what = ERRORS.get(code, (None, None))
        if name is None and lib is not None:
            name = _error_name(lib, code)
        super().__init__(f"{call}: {name or 'CUresult'} ({code}): {what or 'unexpected error'}")


class Unavailable(Exception):
    """The driver API cannot be used on this node (the reason, in one line)."""


def uuid_bytes(uuid):
    """'GPU-aaaaaaaa-0000-...' (the driver's text form) -> the 16 bytes of a CUuuid."""
    text = uuid[4:] if uuid.startswith("GPU-") else uuid
    raw = bytes.fromhex(text.replace("-", ""))
    if len(raw) != 16:
        raise ValueError(f"not a GPU UUID: {uuid}")
    return raw


def _error_name(lib, code):
    fn = getattr(lib, "cuGetErrorName", None)
    if fn is None:
        return None
    out = ctypes.c_char_p()
    try:
        if fn(ctypes.c_int(code), ctypes.byref(out)) == 0 and out.value:
            return out.value.decode(errors="replace")
    except Exception:
        pass
    return None


def library_path(option=""):
    return option or os.environ.get(LIB_ENV) or DEFAULT_LIB


class Driver:
    """One loaded driver library. Raises Unavailable when it cannot checkpoint."""

    def __init__(self, path=None):
        self.path = library_path(path)
        try:
            self.lib = ctypes.CDLL(self.path)
        except OSError as e:
            raise Unavailable(f"cannot load {self.path} ({e})") from None
        self.version = None
        ver = getattr(self.lib, "cuDriverGetVersion", None)
        if ver is not None:
            v = ctypes.c_int(0)
            ver.argtypes, ver.restype = [ctypes.POINTER(ctypes.c_int)], ctypes.c_int
            if ver(ctypes.byref(v)) == 0:
                self.version = v.value
        missing = [c for c in CALLS if getattr(self.lib, c, None) is None]
        if missing:
            raise Unavailable(f"{self.path} (driver API {self.version_text()}) has no "
                              f"{missing[0]} (the checkpoint calls need driver r570 / "
                              "CUDA 12.8 or later)")
        sig = {"cuCheckpointProcessGetState": ctypes.POINTER(ctypes.c_int),
               "cuCheckpointProcessLock": ctypes.POINTER(LockArgs),
               "cuCheckpointProcessCheckpoint": ctypes.POINTER(CheckpointArgs),
               "cuCheckpointProcessRestore": ctypes.POINTER(RestoreArgs),
               "cuCheckpointProcessUnlock": ctypes.POINTER(UnlockArgs),
               "cuCheckpointProcessGetRestoreThreadId": ctypes.POINTER(ctypes.c_int)}
        for name, argp in sig.items():
            fn = getattr(self.lib, name, None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_int, argp], ctypes.c_int
        init = self.lib.cuInit
        init.argtypes, init.restype = [ctypes.c_uint], ctypes.c_int
        rc = init(0)
        if rc != 0:
            raise Unavailable("cuInit failed: " + str(DriverError("cuInit", rc, self.lib))
                              .partition(": ")[2])

    def version_text(self):
        v = self.version
        return f"{v // 1000}.{v % 1000 // 10}" if v else "unknown"

    def can_remap(self):
        return bool(self.version and self.version >= REMAP_VERSION)

    def _call(self, name, pid, arg):
        rc = getattr(self.lib, name)(int(pid), arg)
        if rc != 0:
            raise DriverError(name, rc, self.lib)

    def state(self, pid):
        s = ctypes.c_int(-1)
        self._call("cuCheckpointProcessGetState", pid, ctypes.byref(s))
        return STATES.get(s.value, f"state {s.value}")

    def lock(self, pid, timeout_ms=0):
        self._call("cuCheckpointProcessLock", pid, ctypes.byref(LockArgs(timeoutMs=int(timeout_ms))))

    def checkpoint(self, pid):
        self._call("cuCheckpointProcessCheckpoint", pid, ctypes.byref(CheckpointArgs()))

    def restore(self, pid, gpu_map=None):
        """gpu_map: {old uuid: new uuid}, naming every GPU the process was checkpointed on."""
        args = RestoreArgs()
        if gpu_map:
            if not self.can_remap():
                raise Unavailable(f"restoring onto other GPUs needs driver API 13.0 (r580) "
                                  f"or later; {self.path} is {self.version_text()}")
            pairs = (GpuPair * len(gpu_map))()
            for i, (old, new) in enumerate(sorted(gpu_map.items())):
                pairs[i].oldUuid.bytes[:] = uuid_bytes(old)
                pairs[i].newUuid.bytes[:] = uuid_bytes(new)
            args.gpuPairs = ctypes.cast(pairs, ctypes.POINTER(GpuPair))
            args.gpuPairsCount = len(gpu_map)
        self._call("cuCheckpointProcessRestore", pid, ctypes.byref(args))

    def unlock(self, pid):
        self._call("cuCheckpointProcessUnlock", pid, ctypes.byref(UnlockArgs()))

    def restore_tid(self, pid):
        tid = ctypes.c_int(0)
        self._call("cuCheckpointProcessGetRestoreThreadId", pid, ctypes.byref(tid))
        return tid.value
