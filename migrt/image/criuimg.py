"""Just enough of CRIU's image format to describe a checkpoint (`migrt image inspect`).

CRIU images are an 8-byte magic followed by (u32 length, protobuf message) entries.
Reading the few fields migrt shows needs no protobuf library.
"""
import os
import struct


def varint(b, i):
    """Decode the protobuf varint at b[i]; return (value, next index)."""
    shift = result = 0
    while True:
        c = b[i]
        i += 1
        result |= (c & 0x7F) << shift
        if not c & 0x80:
            return result, i
        shift += 7


def fields(msg):
    """Decode one protobuf message into {field_number: [values]} (bytes for length-delimited)."""
    out = {}
    i = 0
    n = len(msg)
    while i < n:
        key, i = varint(msg, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = varint(msg, i)
        elif wt == 1:
            v = msg[i:i + 8]
            i += 8
        elif wt == 2:
            ln, i = varint(msg, i)
            v = msg[i:i + ln]
            i += ln
        elif wt == 5:
            v = msg[i:i + 4]
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        out.setdefault(num, []).append(v)
    return out


def entries(path, skip=8):
    with open(path, "rb") as f:
        data = f.read()
    i = skip
    while i + 4 <= len(data):
        (ln,) = struct.unpack_from("<I", data, i)
        i += 4
        yield data[i:i + ln]
        i += ln


def processes(image_dir):
    """[{pid, ppid, threads, comm, memory}] from pstree, core and pagemap images."""
    path = os.path.join(image_dir, "pstree.img")
    if not os.path.exists(path):
        return []
    procs = []
    for e in entries(path):
        f = fields(e)
        pid = f.get(1, [0])[0]
        p = {"pid": pid, "ppid": f.get(2, [0])[0], "threads": len(f.get(5, [])) or 1,
             "comm": "?", "memory": 0}
        try:
            core = next(entries(os.path.join(image_dir, f"core-{pid}.img")))
            tc = fields(core).get(3)
            if tc:
                p["comm"] = fields(tc[0]).get(6, [b"?"])[0].decode(errors="replace")
        except (OSError, StopIteration, ValueError, IndexError):
            pass
        try:
            it = entries(os.path.join(image_dir, f"pagemap-{pid}.img"))
            next(it)
            for pm in it:
                p["memory"] += fields(pm).get(2, [0])[0] * 4096
        except (OSError, StopIteration, ValueError, IndexError):
            pass
        procs.append(p)
    return procs
