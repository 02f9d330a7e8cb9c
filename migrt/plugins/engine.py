"""The plugin stages of one container, for callers that drive runc themselves.

`migrt migrate` (the migration engine) and the node agent do not go through
migrt.runtime.lifecycle, so they run the stages with this object: one line per stage.

    hooks = ForContainer(root, cid)
    hooks.pre_migrate({"address": "10.0.0.2:7000", "facts": facts_from_the_agent})
    hooks.pre_checkpoint(image_dir, mode="dump", work_dir=work)   # may raise RefusedError
    ... runc checkpoint ...
    hooks.post_checkpoint(image_dir, mode="dump", work_dir=work, error=None or "why")
    hooks.record({"event": "migrate", "phases": {...}, "ok": True})

A container no plugin applies to costs one spec read and the hookgate lookup.
"""
import json
import os

from migrt.plugins import gate as hookgate
from migrt.front.argv import Call
from migrt.errors import MigrtError


class ForContainer:
    def __init__(self, root, cid, log=None, log_format="json"):
        argv = ["--root", root]
        if log:
            argv += ["--log", log, "--log-format", log_format]
        self.call = Call(argv)
        self.cid = cid
        from migrt.runc import container_bundle
        self.bundle, _ = container_bundle(self.call, cid)
        self.spec = None
        if self.bundle:
            try:
                with open(os.path.join(self.bundle, "config.json")) as f:
                    self.spec = json.load(f)
            except (OSError, ValueError):
                pass
        self.names = hookgate.active(self.spec, self.bundle, stage="migrate") \
            if isinstance(self.spec, dict) else []

    def _run(self, stage, **ctx):
        if not self.names:
            return ctx
        from migrt.plugins import run_stage
        return run_stage(stage, self.names, call=self.call, cid=self.cid, bundle=self.bundle,
                         spec=self.spec, **ctx)

    def pre_migrate(self, destination):
        return self._run("pre-migrate", destination=destination)

    def pre_checkpoint(self, image_dir, mode="dump", work_dir=None, destination=None):
        return self._run("pre-checkpoint", image_dir=image_dir, mode=mode, work_dir=work_dir,
                         destination=destination)

    def post_checkpoint(self, image_dir, mode="dump", work_dir=None, error=None):
        ctx = {"image_dir": image_dir, "mode": mode, "work_dir": work_dir}
        if error:
            ctx["error"] = error
        return self._run("post-checkpoint", **ctx)

    def record(self, event):
        """Add an event to the container's record (shown by `migrt logs`)."""
        from migrt.plugins import record
        try:
            return record.append(self.cid, event, root=self.call.root)
        except (OSError, ValueError) as e:
            raise MigrtError(f"logs: cannot record {event.get('event')}: {e}")
