"""Prometheus metrics of a node: what its agent received, what `migrt migrate` sent.

`migrt agent --metrics HOST:PORT` serves them (off by default) as the plain-text
exposition format on GET /metrics, from the standard library's HTTP server in a thread
of the agent's network side. The agent counts what it receives itself; `migrt migrate`
is a process of its own, so each migration it ends appends one JSON line to the node's
spool (SPOOL, /run/migrt/metrics/sent.jsonl) and the agent reads new lines at each
scrape. Names:

  migrt_migrations_received_total{result}   restored | failed | dropped | refused
  migrt_migrations_sent_total{result,mode}  ok | refused | rolled_back | in_doubt | unfinished | error
  migrt_migrations_in_flight                migrations this agent is receiving or restoring
  migrt_received_bytes_total                payload bytes read from data connections
  migrt_sent_bytes_total{kind}              wire | image (from migrt migrate's reports)
  migrt_restore_duration_seconds            histogram: the agent's restores
  migrt_downtime_seconds{mode}              histogram: frozen until running on the destination
  migrt_phase_duration_seconds{phase}       histogram: precheck, dump, transfer, restore, ...
  migrt_staging_bytes{area}                 bytes held by staged migrations (tmpfs, disk)
"""
import json
import os
import threading
import time

SPOOL = os.path.join(os.environ.get("MIGRT_STATE_DIR", "/run/migrt"), "metrics", "sent.jsonl")
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SPOOL_MAX = 4 << 20          # a spool nobody scrapes is cut back to its newest lines


def spool_path():
    return os.environ.get("MIGRT_METRICS_SPOOL", SPOOL)


def record_sent(report=None, result="ok", mode=None, error=None):
    """Called by `migrt migrate` when it ends, however it ends. Never raises."""
    try:
        path = spool_path()
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        r = report or {}
        line = {"time": time.time(), "result": result, "mode": mode or r.get("mode"),
                "phases": r.get("phases") or {}, "bytes": r.get("bytes") or {}}
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, (json.dumps(line, separators=(",", ":")) + "\n").encode())
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > SPOOL_MAX:
            with open(path, "rb") as f:
                f.seek(-SPOOL_MAX // 2, 2)
                tail = f.read().split(b"\n", 1)[-1]
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(tail)
            os.replace(tmp, path)
    except Exception:
        pass


def _fmt(v):
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


def _labels(d):
    if not d:
        return ""
    esc = lambda s: str(s).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(d.items())) + "}"


class Histogram:
    def __init__(self):
        self.counts = [0] * len(BUCKETS)
        self.sum = 0.0
        self.n = 0

    def observe(self, v):
        self.n += 1
        self.sum += v
        for i, b in enumerate(BUCKETS):
            if v <= b:
                self.counts[i] += 1


class Metrics:
    """Counters, gauges and histograms, keyed by (name, sorted labels)."""

    HELP = {
        "migrt_migrations_received_total": ("counter", "Migrations this agent received, by result"),
        "migrt_migrations_sent_total": ("counter", "Migrations migrt migrate sent from this node, by result"),
        "migrt_migrations_in_flight": ("gauge", "Migrations this agent is receiving or restoring"),
        "migrt_received_bytes_total": ("counter", "Payload bytes this agent read from data connections"),
        "migrt_sent_bytes_total": ("counter", "Bytes migrt migrate sent from this node (wire: after compression)"),
        "migrt_restore_duration_seconds": ("histogram", "Restores this agent ran"),
        "migrt_downtime_seconds": ("histogram", "Time a migrated container was frozen, source side"),
        "migrt_phase_duration_seconds": ("histogram", "Duration of each phase of migrations sent from this node"),
        "migrt_staging_bytes": ("gauge", "Bytes held by staged migrations on this node"),
    }

    def __init__(self, agent=None):
        self.agent = agent
        self.lock = threading.Lock()
        self.counters = {}
        self.hists = {}
        self.spool_offset = 0
        self.spool_inode = None
        for r in ("restored", "failed", "dropped", "refused"):
            self.counters[("migrt_migrations_received_total", (("result", r),))] = 0
        self.counters[("migrt_received_bytes_total", ())] = 0

    def inc(self, name, by=1, **labels):
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + by

    def observe(self, name, value, **labels):
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            h = self.hists.get(key)
            if h is None:
                h = self.hists[key] = Histogram()
            h.observe(float(value))

    def read_spool(self):
        """Take in the lines `migrt migrate` added since the last look."""
        path = spool_path()
        try:
            st = os.stat(path)
        except OSError:
            return
        if st.st_ino != self.spool_inode or st.st_size < self.spool_offset:
            self.spool_inode, self.spool_offset = st.st_ino, 0
        try:
            with open(path, "rb") as f:
                f.seek(self.spool_offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        self.spool_offset += end
        for line in data[:end].splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if not isinstance(r, dict):
                continue
            mode = str(r.get("mode") or "unknown")
            self.inc("migrt_migrations_sent_total", result=str(r.get("result", "error")), mode=mode)
            b = r.get("bytes") if isinstance(r.get("bytes"), dict) else {}
            for kind in ("wire", "image"):
                if isinstance(b.get(kind), (int, float)):
                    self.inc("migrt_sent_bytes_total", b[kind], kind=kind)
            phases = r.get("phases") if isinstance(r.get("phases"), dict) else {}
            for ph, v in phases.items():
                if not isinstance(v, (int, float)):
                    continue
                if ph == "downtime":
                    self.observe("migrt_downtime_seconds", v, mode=mode)
                self.observe("migrt_phase_duration_seconds", v, phase=str(ph))

    def gauges(self):
        out = {}
        a = self.agent
        if a is None:
            return out
        with a.lock:
            out[("migrt_migrations_in_flight", ())] = len(a.sessions)
        for area, top in (("tmpfs", a.staging), ("disk", a.disk)):
            out[("migrt_staging_bytes", (("area", area),))] = _du(top)
        return out

    def render(self):
        self.read_spool()
        with self.lock:
            counters = dict(self.counters)
            hists = {k: (list(h.counts), h.sum, h.n) for k, h in self.hists.items()}
        gauges = self.gauges()
        lines = []
        by_name = {}
        for (name, labels), v in list(counters.items()) + list(gauges.items()):
            by_name.setdefault(name, []).append((labels, v))
        for (name, labels), h in hists.items():
            by_name.setdefault(name, []).append((labels, h))
        for name in sorted(set(by_name) | set(self.HELP)):
            kind, text = self.HELP.get(name, ("untyped", name))
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, v in sorted(by_name.get(name, []), key=lambda x: x[0]):
                d = dict(labels)
                if kind == "histogram":
                    counts, total, n = v
                    for b, c in zip(BUCKETS, counts):
                        lines.append(f"{name}_bucket{_labels(dict(d, le=_fmt(float(b))))} {c}")
                    lines.append(f"{name}_bucket{_labels(dict(d, le='+Inf'))} {n}")
                    lines.append(f"{name}_sum{_labels(d)} {_fmt(float(total))}")
                    lines.append(f"{name}_count{_labels(d)} {n}")
                else:
                    lines.append(f"{name}{_labels(d)} {_fmt(v)}")
        return "\n".join(lines) + "\n"


def _du(top):
    """Bytes allocated under top (holes not counted: a punched-out image is free)."""
    total = 0
    for dirpath, _, files in os.walk(top):
        for n in files:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
            except OSError:
                pass
    return total


def serve(metrics, listen):
    """Serve GET /metrics on listen ("HOST:PORT") in a daemon thread; returns the server."""
    import http.server
    import socketserver

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404, "only /metrics here")
                return
            try:
                body = metrics.render().encode()
            except Exception as e:      # a scrape never takes the agent down
                self.send_error(500, f"{type(e).__name__}: {e}")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if ":" in host:
        Server.address_family = __import__("socket").AF_INET6
    srv = Server((host, int(port)), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True, name="metrics").start()
    return srv
