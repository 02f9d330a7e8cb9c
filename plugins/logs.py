"""logs: a migrated container's logs continue, and migrt keeps its own record of it.

- The workload's output log (the CRI log file the shim or conmon writes: option
  `path`, CRI-O's io.kubernetes.cri-o.LogPath annotation, or containerd's
  io.kubernetes.cri.sandbox-log-directory + container name) is saved with each
  checkpoint and put back in front of the destination's log before restore, so the
  user of the new container still sees what was written before the move.
- CRIU's dump and restore logs and an event per checkpoint and restore (mode,
  timings, error) go to the container's record (migrt.plugins.record), which travels
  inside the checkpoint: `migrt logs <id>` on the destination shows the whole history.
"""
import glob
import json
import os
import socket
import time
import uuid

from migrt.plugins import Plugin, plugin_dir, record

CARRIED = "events.jsonl"
OUTPUT = "container.log"


def _log_path(ctx):
    opt = ctx["options"].get("path")
    if opt:
        return opt
    ann = (ctx.get("spec") or {}).get("annotations") or {}
    if ann.get("io.kubernetes.cri-o.LogPath"):
        return ann["io.kubernetes.cri-o.LogPath"]
    d, name = ann.get("io.kubernetes.cri.sandbox-log-directory"), \
        ann.get("io.kubernetes.cri.container-name")
    if d and name:
        logs = sorted(glob.glob(os.path.join(d, name, "*.log")), key=os.path.getmtime)
        return logs[-1] if logs else os.path.join(d, name, "0.log")
    return None


class Logs(Plugin):
    name = "logs"
    description = "carry the container's output log and migrt's record across moves"
    order = 5       # first: it sees every other plugin's refusal in post-checkpoint
    detect = {"restore": True, "groups": ["checkpoint", "migrate"]}
    options = {
        "dir": {"type": "string", "default": "",
                "description": "where container records live (default /var/lib/migrt/containers)"},
        "path": {"type": "string", "default": "",
                 "description": "the container's output log file (else from CRI annotations)"},
        "keep": {"type": "integer", "default": 20, "minimum": 1,
                 "description": "CRIU logs kept per container"},
        "max_bytes": {"type": "integer", "default": 16 << 20, "minimum": 0,
                      "description": "how much of the output log's tail a checkpoint carries"},
    }

    def __init__(self):
        self._t0 = {}

    def _base(self, ctx):
        return ctx["options"].get("dir") or None

    def _root(self, ctx):
        call = ctx.get("call")
        return getattr(call, "root", None)

    def pre_checkpoint(self, ctx):
        # Everything the checkpoint carries is written now: the core seals the image
        # (migrt's manifest of digests) before post-checkpoint runs.
        cid = ctx["cid"]
        ev = {"id": uuid.uuid4().hex[:16], "time": record._stamp(time.time()),
              "node": socket.gethostname(), "event": "checkpoint", "mode": ctx.get("mode"),
              "image": ctx.get("image_dir")}
        self._t0[("ckpt", cid)] = (time.monotonic(), ev)
        image = ctx.get("image_dir")
        if ctx.get("mode") == "pre-dump" or not image:
            return
        d = plugin_dir(ctx, self.name)
        with open(os.path.join(d, CARRIED), "w") as f:
            for e in record.events(cid, self._base(ctx), self._root(ctx))[-(record.CARRY_EVENTS - 1):] + [ev]:
                f.write(json.dumps(e, sort_keys=True) + "\n")
        src = _log_path(ctx)
        if src and os.path.isfile(src):
            size = os.path.getsize(src)
            with open(src, "rb") as f, open(os.path.join(d, OUTPUT), "wb") as out:
                f.seek(max(0, size - ctx["options"]["max_bytes"]))
                out.write(f.read())

    def post_checkpoint(self, ctx):
        cid = ctx["cid"]
        t0, ev = self._t0.pop(("ckpt", cid), (None, {"event": "checkpoint",
                                                    "mode": ctx.get("mode"),
                                                    "image": ctx.get("image_dir")}))
        base = self._base(ctx)
        dump_log = None
        for d in filter(None, (ctx.get("work_dir"), ctx.get("image_dir"))):
            name = "pre-dump.log" if ctx.get("mode") == "pre-dump" else "dump.log"
            if os.path.exists(os.path.join(d, name)):
                dump_log = os.path.join(d, name)
                break
        ev = dict(ev, ok=not ctx.get("error"),
                  criu_log=record.keep_criu_log(cid, dump_log, ctx.get("mode") or "dump",
                                                ctx["options"]["keep"], base, self._root(ctx)))
        if t0 is not None:
            ev["seconds"] = round(time.monotonic() - t0, 3)
        if ctx.get("error"):
            ev["error"] = ctx["error"]
        record.append(cid, ev, base, self._root(ctx))

    def pre_restore(self, ctx):
        self._t0[("restore", ctx["cid"])] = time.monotonic()
        d = plugin_dir(ctx, self.name, create=False)
        carried = []
        try:
            with open(os.path.join(d, CARRIED)) as f:
                carried = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError):
            pass
        if carried:
            record.merge(ctx["cid"], carried, self._base(ctx), self._root(ctx))
        saved = os.path.join(d, OUTPUT)
        dest = _log_path(ctx)
        if dest and os.path.isfile(saved):
            os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
            with open(saved, "rb") as f:
                before = f.read()
            # Nothing runs in the container yet: put the old output in front of
            # whatever the shim may already have written, in place (it holds the fd).
            with open(dest, "a+b") as f:
                f.seek(0)
                current = f.read()
                if not current.startswith(before):
                    f.seek(0)
                    f.truncate()
                    f.write(before + current)

    def post_restore(self, ctx):
        cid = ctx["cid"]
        t0 = self._t0.pop(("restore", cid), None)
        base = self._base(ctx)
        kept = None
        try:
            kept = record.keep_criu_log(cid, os.path.join(ctx["work_dir"], "restore.log"),
                                        "restore", ctx["options"]["keep"], base,
                                        self._root(ctx))
        except Exception:
            pass
        ev = {"event": "restore", "image": ctx.get("image_dir"), "pid": ctx.get("pid"),
              "ok": True, "criu_log": kept}
        if t0 is not None:
            ev["seconds"] = round(time.monotonic() - t0, 3)
        record.append(cid, ev, base, self._root(ctx))


plugin = Logs
