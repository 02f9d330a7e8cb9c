"""A small CRI client: what the kubelet says to containerd, for the end-to-end tests.

The runtime handler named in a pod's RuntimeClass only reaches containerd through the CRI
API (`RunPodSandbox.runtime_handler`), so this is the path that proves the shipped
drop-in. Only the few calls and fields the tests need are here, encoded by hand (the
field numbers are those of k8s.io/cri-api runtime/v1 api.proto) and sent with grpcio,
so no generated code or protoc is needed.
"""
import time

import grpc

# NamespaceMode
POD, CONTAINER, NODE = 0, 1, 2
# ContainerState
CONTAINER_STATES = {0: "CREATED", 1: "RUNNING", 2: "EXITED", 3: "UNKNOWN"}


# --- protobuf wire format: just enough to build requests and read replies ---------------
def _varint(n):
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field, wire):
    return _varint((field << 3) | wire)


def msg(*fields):
    """Encode a message from (field, value) pairs; value: int, str, bytes or a list."""
    out = bytearray()
    for field, value in fields:
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or isinstance(v, int):
                out += _key(field, 0) + _varint(int(v))
            else:
                data = v.encode() if isinstance(v, str) else bytes(v)
                out += _key(field, 2) + _varint(len(data)) + data
    return bytes(out)


def parse(data):
    """Decode a message into {field: [values]} (ints for varints, bytes otherwise)."""
    out, i = {}, 0
    while i < len(data):
        key, i = _read_varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _read_varint(data, i)
        elif wire == 2:
            n, i = _read_varint(data, i)
            v, i = data[i:i + n], i + n
        elif wire == 1:
            v, i = data[i:i + 8], i + 8
        elif wire == 5:
            v, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
        out.setdefault(field, []).append(v)
    return out


def _read_varint(data, i):
    shift = n = 0
    while True:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i
        shift += 7


def _str(fields, n, default=""):
    return fields[n][0].decode() if n in fields else default


def _int(fields, n, default=0):
    return fields[n][0] if n in fields else default


class CRIError(Exception):
    def __init__(self, method, err):
        self.code = err.code()
        self.details = err.details()
        super().__init__(f"{method}: {self.code.name}: {self.details}")


class CRI:
    """runtime.v1 RuntimeService over containerd's socket."""

    def __init__(self, address):
        self.channel = grpc.insecure_channel(f"unix://{address}")

    def close(self):
        self.channel.close()

    def call(self, method, body, service="RuntimeService", timeout=60):
        rpc = self.channel.unary_unary(f"/runtime.v1.{service}/{method}",
                                       request_serializer=None, response_deserializer=None)
        try:
            return parse(rpc(body, timeout=timeout))
        except grpc.RpcError as e:
            raise CRIError(method, e) from None

    def version(self):
        f = self.call("Version", msg((1, "v1")))
        return {"runtime_name": _str(f, 2), "runtime_version": _str(f, 3)}

    # --- pods ---
    @staticmethod
    def sandbox_config(name, log_dir, uid=None):
        ns_opts = msg((1, NODE), (2, CONTAINER), (3, POD))
        linux = msg((2, msg((1, ns_opts))))
        meta = msg((1, name), (2, uid or f"uid-{name}"), (3, "default"), (4, 0))
        return msg((1, meta), (3, log_dir), (8, linux))

    def run_pod(self, config, handler):
        f = self.call("RunPodSandbox", msg((1, config), (2, handler)), timeout=120)
        return _str(f, 1)

    def stop_pod(self, pod_id):
        self.call("StopPodSandbox", msg((1, pod_id)), timeout=120)

    def remove_pod(self, pod_id):
        self.call("RemovePodSandbox", msg((1, pod_id)), timeout=120)

    # --- containers ---
    def create(self, pod_id, sandbox_config, name, image, command, env=None, log_path=None,
               timeout=120):
        envs = [msg((1, k), (2, v)) for k, v in (env or {}).items()]
        sec = msg((3, msg((1, NODE), (2, CONTAINER), (3, POD))))
        config = msg((1, msg((1, name), (2, 0))), (2, msg((1, image))), (3, list(command)),
                     (6, envs), (11, log_path or f"{name}.log"), (15, msg((2, sec))))
        f = self.call("CreateContainer", msg((1, pod_id), (2, config), (3, sandbox_config)),
                      timeout=timeout)
        return _str(f, 1)

    def start(self, cid):
        self.call("StartContainer", msg((1, cid)), timeout=120)

    def stop(self, cid, timeout=0):
        self.call("StopContainer", msg((1, cid), (2, timeout)), timeout=timeout + 60)

    def remove(self, cid):
        self.call("RemoveContainer", msg((1, cid)), timeout=60)

    def status(self, cid):
        f = self.call("ContainerStatus", msg((1, cid)))
        s = parse(f[1][0])
        return {"id": _str(s, 1), "state": CONTAINER_STATES[_int(s, 3)],
                "exit_code": _int(s, 7), "reason": _str(s, 10), "message": _str(s, 11),
                "log_path": _str(s, 15)}

    def exec_sync(self, cid, cmd, timeout=10):
        f = self.call("ExecSync", msg((1, cid), (2, list(cmd)), (3, timeout)),
                      timeout=timeout + 30)
        code = _int(f, 3)
        if code >= 1 << 63:
            code -= 1 << 64
        return (f.get(1, [b""])[0].decode(errors="replace"),
                f.get(2, [b""])[0].decode(errors="replace"), code)


def log_lines(path):
    """The messages of a CRI log file ("<time> <stream> <P|F> <msg>" per line)."""
    try:
        with open(path, errors="replace") as f:
            raw = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in raw:
        parts = line.split(" ", 3)
        if len(parts) == 4:
            out.append(parts[3])
    return out


def wait_state(cri, cid, state, timeout=20):
    end = time.monotonic() + timeout
    st = None
    while time.monotonic() < end:
        st = cri.status(cid)
        if st["state"] == state:
            return st
        time.sleep(0.1)
    raise AssertionError(f"container {cid} not {state} after {timeout}s: {st}")
