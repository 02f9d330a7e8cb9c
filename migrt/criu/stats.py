"""CRIU's own figures for a dump or a restore, for the migration report.

CRIU writes `stats-dump` / `stats-restore` into its work dir (the image dir when no work
dir is given): a service image, that is a 4-byte service magic, the 4-byte stats magic,
then one entry (a 4-byte little-endian length and a protobuf `stats_entry`, CRIU's
images/stats.proto). The few varint fields wanted here are read directly: field 1 of
stats_entry is the dump's entry, field 2 the restore's; in them, times are microseconds.
Its log gives the rest: every line starts with "(SS.ffffff)", the time since CRIU
started, so the last line's stamp is how long CRIU ran.
"""
import os
import re
import struct

SERVICE_MAGIC = 0x55105940
STATS_MAGIC = 0x57093306

DUMP_FIELDS = {1: "freezing_time", 2: "frozen_time", 3: "memdump_time", 4: "memwrite_time",
               5: "pages_scanned", 6: "pages_skipped_parent", 7: "pages_written",
               8: "irmap_resolve", 9: "pages_lazy", 10: "page_pipes", 11: "page_pipe_bufs",
               12: "shpages_scanned", 13: "shpages_skipped_parent", 14: "shpages_written"}
RESTORE_FIELDS = {1: "pages_compared", 2: "pages_skipped_cow", 3: "forking_time",
                  4: "restore_time", 5: "pages_restored"}
TIMES = {"freezing_time", "frozen_time", "memdump_time", "memwrite_time", "irmap_resolve",
         "forking_time", "restore_time"}


class StatsError(ValueError):
    pass


def _varint(buf, i):
    out = shift = 0
    while True:
        if i >= len(buf):
            raise StatsError("truncated varint")
        b = buf[i]
        i += 1
        out |= (b & 0x7f) << shift
        if not b & 0x80:
            return out, i
        shift += 7
        if shift > 63:
            raise StatsError("varint too long")


def _fields(buf):
    """(field number, wire type, value) of a protobuf message: varints as ints,
    length-delimited as bytes; fixed 32/64 skipped as bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise StatsError("truncated field")
            v, i = buf[i:i + n], i + n
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise StatsError(f"wire type {wt} not expected")
        yield num, wt, v


def decode(data):
    """{"dump": {...}} or {"restore": {...}} from a stats image's bytes; times in
    seconds (as "<name>_s"), counts as they are."""
    if len(data) < 12:
        raise StatsError("too short for a CRIU stats image")
    magic, kind, size = struct.unpack_from("<III", data, 0)
    if magic != SERVICE_MAGIC or kind != STATS_MAGIC:
        raise StatsError("not a CRIU stats image (magic %#x %#x)" % (magic, kind))
    entry = data[12:12 + size]
    if len(entry) != size:
        raise StatsError("truncated stats entry")
    out = {}
    for num, wt, v in _fields(entry):
        if wt != 2 or num not in (1, 2):
            continue
        names = DUMP_FIELDS if num == 1 else RESTORE_FIELDS
        part = out.setdefault("dump" if num == 1 else "restore", {})
        for fnum, fwt, fv in _fields(v):
            name = names.get(fnum)
            if name is None or fwt != 0:
                continue
            if name in TIMES:
                part[name[:-len("_time")] + "_s" if name.endswith("_time")
                     else name + "_s"] = fv / 1e6
            else:
                part[name] = fv
    return out


def read(dirs, what):
    """CRIU's `stats-<what>` (dump or restore) from the first of dirs that has it,
    decoded, or None."""
    for d in dirs:
        if not d:
            continue
        try:
            with open(os.path.join(d, f"stats-{what}"), "rb") as f:
                return decode(f.read(1 << 16)).get(what)
        except (OSError, StatsError):
            continue
    return None


_STAMP = re.compile(rb"^\((\d+)\.(\d+)\)")


def log_span(path):
    """Seconds CRIU ran, from its log's last "(SS.ffffff)" stamp, or None."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            tail = f.read()
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        s = _stamp(line)
        if s is not None:
            return s
    return None


def _stamp(line):
    m = _STAMP.match(line)
    return int(m.group(1)) + int(m.group(2)) / 10 ** len(m.group(2)) if m else None


def gate_passed_at(path, action=b"pre-dump"):
    """When CRIU went on after its `action` scripts (migrt.criu.gate waits in the
    pre-dump one), in its log's seconds: the stamp of the first line after "Running
    pre-dump scripts" and the tab-indented lines naming each script, or None. What CRIU
    did before it is not in the downtime."""
    marker = b"Running " + action + b" scripts"
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 18)
    except OSError:
        return None
    lines = head.splitlines()
    for i, line in enumerate(lines):
        if marker in line:
            for later in lines[i + 1:]:
                s = _stamp(later)
                if s is not None and not later[later.index(b")") + 1:].startswith(b" \t"):
                    return s
            return None
    return None


def restore_gate_opened_at(path):
    """When an armed restore's CRIU went on from its gate (migrt.criu.gate.RestoreGate:
    the log line "restore gate open"), in its log's seconds, or None: what it did before
    was done before the source froze."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    for line in head.splitlines():
        if b"restore gate open" in line:
            return _stamp(line)
    return None
