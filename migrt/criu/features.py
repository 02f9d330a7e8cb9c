"""What this node's CRIU build does beyond CRIU as released, read from the binary itself.

A patch of packaging/criu-patches that changes how migrt may drive CRIU puts a string
"migrt-criu-feature:NAME" into CRIU's binary. migrt looks for it in the CRIU it runs
(the same one runc finds: migrt.runc.criu_path) and drives any other CRIU as before.
Nothing is run to find out: a CRIU run costs about 5 ms, a look through its 6 MB about 2,
and the answer is kept per binary (path, inode, size, mtime) for the process's life (the
agent's spare restorer looks in advance: migrt.front.spare).

Features:
    lazy-socket-wait    `criu restore --lazy-pages` waits (up to 10 s) for the
                        lazy-pages daemon's socket instead of failing at once, so the
                        daemon may be started together with runc, not before it.
    lazy-ranges         with MIGRT_CRIU_LAZY_RANGES=1 in its environment, a lazy dump
                        leaves a private anonymous VMA lazy whole, without reading its
                        page tables while the task is frozen; its page server then
                        answers PS_IOV_HOLE for pages the task never had, which only
                        a lazy-pages daemon of such a CRIU understands. So the source
                        asks for it only when the destination's CRIU says it has it
                        (the agent's precheck reply: criu_features).
    early-smaps         with MIGRT_CRIU_EARLY_SMAPS=1, a lazy dump reads its tasks'
                        /proc/PID/smaps before the freeze (while CRIU waits at
                        migrt's gate: migrt.criu.gate), uses that copy if the VMAs
                        are still the same once frozen, and checks their flags
                        again when its page server is done (a change fails the
                        dump: the copy is dropped, the source resumes).
    restore-gate        with MIGRT_CRIU_RESTORE_GATE naming a dir, `criu restore`
                        waits there before it reads an image (migrt.criu.gate.
                        RestoreGate), then reads them from that dir's "images" if
                        migrt linked it there: the destination starts runc restore
                        before the source is frozen (the agent's `arm` op).
    lazy-parent         a lazy migration with a pre-copy (`migrate --precopy --lazy`):
                        with MIGRT_CRIU_LAZY_PARENT_DIR naming the pre-copy's images,
                        the page server compares each lazy page with the pre-copy's
                        and answers "the same" without its data; the lazy-pages daemon
                        (MIGRT_CRIU_LAZY_PARENT=1, the pre-copy in its images dir's
                        parent/) reads those from there. Either end without it: every
                        page is sent, as without a pre-copy.
    stream-frames       with MIGRT_CRIU_STREAM_FRAMES=1 at both ends, a lazy
                        migration's page stream goes on after the TLS handshake in
                        AES-128-GCM frames keyed from the session (TLS exporter),
                        not in TLS records: about half the stream's cipher and copy
                        CPU. Set only when both ends' CRIUs carry it.
"""
import mmap
import os

MARKER = b"migrt-criu-feature:"
LAZY_SOCKET_WAIT = "lazy-socket-wait"
LAZY_RANGES = "lazy-ranges"
EARLY_SMAPS = "early-smaps"
RESTORE_GATE = "restore-gate"
NO_BREAKPOINTS = "no-breakpoints"
LAZY_PARENT = "lazy-parent"
STREAM_FRAMES = "stream-frames"
# what each one gives, for `migrt doctor` (and what a CRIU without it costs)
KNOWN = {
    LAZY_SOCKET_WAIT: "a lazy restore starts with its lazy-pages daemon, not after it",
    LAZY_RANGES: "a lazy dump's time frozen does not grow with memory",
    EARLY_SMAPS: "a lazy dump reads its tasks' smaps before the freeze",
    RESTORE_GATE: "the destination's runc restore starts before the freeze",
    NO_BREAKPOINTS: "no hardware breakpoint at dump or restore (10 to 30 ms each)",
    LAZY_PARENT: "with --precopy --lazy, lazy pages unchanged since the pre-copy are not sent",
    STREAM_FRAMES: "a lazy migration's page stream in frames keyed from TLS, not TLS records "
                   "(about a quarter less CPU per GiB at the two ends)",
}
_NAME = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-")
_seen = {}


def of(path):
    """The set of feature names the CRIU binary at `path` carries (empty if unreadable)."""
    try:
        st = os.stat(path)
    except OSError:
        return frozenset()
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    found = _seen.get(key)
    if found is None:
        found = _seen[key] = _scan(path)
    return found


def has(name, path=None):
    if path is None:
        from migrt.runc import criu_path
        path = criu_path()
    return name in of(path)


def _scan(path):
    names = set()
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            at = m.find(MARKER)
            while at >= 0:
                start = end = at + len(MARKER)
                while end < len(m) and m[end] in _NAME:
                    end += 1
                if end > start:
                    names.add(m[start:end].decode())
                at = m.find(MARKER, end)
    except (OSError, ValueError):       # unreadable, or empty (mmap of 0 bytes)
        return frozenset()
    return frozenset(names)
