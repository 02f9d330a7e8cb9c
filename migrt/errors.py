"""One error contract for the whole runtime.

runc's callers read errors in two places: stderr, and, when they pass `--log FILE
--log-format json`, the last `{"level":"error",...}` line of FILE (containerd shows that
line to its user). Every migrt failure is a MigrtError carrying one clear line; `report`
writes it to both places, exactly once, and the process exits with its code.
"""
import os
import sys

# Exit codes. runc exits 1 on any failure, and callers only look at zero/non-zero;
# migrt's own commands use the finer codes below.
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3       # a precondition was not met; nothing was changed
EXIT_ROLLED_BACK = 4   # the operation failed and the source was resumed


class MigrtError(Exception):
    """A failure the user must see as one line. `where` names the file or peer."""

    exit_code = EXIT_FAILURE

    def __init__(self, msg, exit_code=None):
        super().__init__(msg)
        if exit_code is not None:
            self.exit_code = exit_code


class BundleError(MigrtError):
    """The bundle (its config.json) is missing or malformed."""


class CheckpointError(MigrtError):
    """A checkpoint named by a marker is missing, incomplete, damaged or foreign."""


class RuncError(MigrtError):
    """runc (or CRIU under it) failed."""


class RefusedError(MigrtError):
    """A check refused the operation before anything was touched."""

    exit_code = EXIT_REFUSED


MAX_LINE = 2000        # characters of one error line
MAX_ECHO = 200         # characters of a value from the caller echoed in it


def _escape(text):
    """Control characters (C0, C1, DEL) and the ones that reorder or hide text (bidi
    overrides and isolates, zero-width marks, line separators) as \\xNN / \\uNNNN."""
    out = []
    for ch in text:
        o = ord(ch)
        if o < 0x20 or 0x7f <= o < 0xa0 or o in (0x200b, 0x200c, 0x200d, 0x200e, 0x200f,
                                                  0x2028, 0x2029, 0xfeff) \
                or 0x202a <= o <= 0x202e or 0x2066 <= o <= 0x2069:
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _cut(text, limit):
    if len(text) <= limit:
        return text
    return text[:limit] + f"...({len(text) - limit} more characters)"


def quote(value, limit=MAX_ECHO):
    """A value from outside (a marker, a name) as it may appear in an error line:
    quoted, control characters escaped, at most `limit` characters of it."""
    return '"' + _cut(_escape(str(value)), limit) + '"'


def shown(value, limit=MAX_ECHO):
    """A value as echoed in an error line: as it is when it is plain (printable, short,
    no quote), else quote(value)."""
    value = str(value)
    if value.isprintable() and len(value) <= limit and '"' not in value \
            and value == _escape(value):
        return value
    return quote(value, limit)


def one_line(msg, limit=MAX_LINE):
    """An error message as one safe line: newlines joined, control characters escaped,
    cut to `limit` characters."""
    return _cut(_escape(" ".join(str(msg).splitlines())), limit)


def _timestamp():
    import time
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%06dZ" % int((t % 1) * 1e6)


def log_line(path, fmt, level, msg):
    """Append one runc-style log line to `path` (json or logrus text format)."""
    if fmt == "json":
        import json
        line = json.dumps({"level": level, "msg": msg, "time": _timestamp()},
                          separators=(",", ":"))
    else:
        escaped = msg.replace("\\", "\\\\").replace('"', '\\"')
        line = f'time="{_timestamp()}" level={level} msg="{escaped}"'
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def report(msg, log=None, log_format="text"):
    """Tell the caller about a failure: stderr always, plus the --log file if any."""
    msg = one_line(msg)
    # podman reads a runtime error containing "no such file or directory" as "the
    # runtime could not find an executable" ("OCI runtime attempted to invoke a command
    # that was not found"), and any "no such file" or "not found" in it as exit 127
    # (command not found), hiding what really failed: quoted CRIU/OS errors keep their
    # meaning in words it does not misread
    import re
    msg = re.sub(r"(?i)no such file or directory", "ENOENT (the file is missing)", msg)
    if log:
        try:
            log_line(log, log_format, "error", msg)
        except OSError as e:
            sys.stderr.write(f"migrt: cannot write log {log}: {e.strerror}\n")
    sys.stderr.write(f"migrt: {msg}\n")
    sys.stderr.flush()
