"""devices: a restored container keeps seeing its devices at the same paths, backed by
whatever device the destination bundle grants.

Device numbers are host-specific (GPU 0 on one node is GPU 3 on another, a driver's
major differs between kernels). At checkpoint the plugin records every device the
bundle grants and which of them the container's processes hold open. At restore it
maps each to a device the destination bundle grants: the same container path first,
then an explicit map (io.migrt.devices.map="/dev/nvidia0=/dev/nvidia3"), then a free
device of the same family (same path with the trailing number dropped, same type).
The destination spec is rewritten so the device keeps its old container path with the
destination's numbers, and a CRIU action script (hooks/criu-devices) replaces the
nodes CRIU rebuilt from the source's /dev before the held files are reopened.
A device held open with no counterpart is refused before anything is created.
"""
import json
import os
import re
import shlex
import sys

from migrt.errors import RefusedError
from migrt.plugins import Plugin, plugin_dir, proc

RECORD = "devices.json"


def _family(path):
    return re.sub(r"\d+$", "", path)


def _index(path):
    m = re.search(r"(\d+)$", path)
    return int(m.group(1)) if m else -1


def _spec_devices(spec):
    linux = spec.get("linux") or {}
    out = []
    for d in linux.get("devices") or []:
        if isinstance(d, dict) and d.get("path") and d.get("type") in ("c", "u", "b"):
            out.append(d)
    return out


def _check_path(path):
    """Device paths end up as paths a root action script writes: keep them tame."""
    if not (isinstance(path, str) and path.startswith("/dev/")
            and os.path.normpath(path) == path):
        raise RefusedError(f"devices: device path {path!r} is not a plain path under /dev")


def _fmt(d):
    return f"{d['path']} ({d.get('type', 'c')} {d.get('major')}:{d.get('minor')})"


class Devices(Plugin):
    name = "devices"
    description = "map the devices a checkpoint holds open onto the destination's, same paths"
    order = 10
    detect = {"devices": ["/dev/*"]}
    options = {
        "map": {"type": "object", "default": {},
                "description": "checkpoint device path = destination device path, ..."},
        "strict": {"type": "boolean", "default": False,
                   "description": "refuse also when a granted but unused device has no counterpart"},
    }

    # ------------------------------------------------------------ source side

    def pre_checkpoint(self, ctx):
        if ctx.get("mode") == "pre-dump" or not ctx.get("spec"):
            return
        devices = _spec_devices(ctx["spec"])
        held = {}
        by_num = {(d.get("major"), d.get("minor")): d["path"] for d in devices}
        for pid in proc.container_pids(ctx):
            for num, target in proc.open_rdevs(pid).items():
                path = target if target in {d["path"] for d in devices} else by_num.get(num)
                if path:
                    held.setdefault(path, []).append(pid)
        rec = {"devices": [dict(d, held=d["path"] in held) for d in devices]}
        with open(os.path.join(plugin_dir(ctx, self.name), RECORD), "w") as f:
            json.dump(rec, f, indent=1)

    # ------------------------------------------------------------ destination side

    def pre_restore(self, ctx):
        try:
            with open(os.path.join(plugin_dir(ctx, self.name, create=False), RECORD)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            return          # not checkpointed through this plugin: nothing to map
        spec = ctx["spec"]
        dest = _spec_devices(spec)
        for d in dest + list(rec.get("devices") or []):
            _check_path(d.get("path"))
        explicit = ctx["options"].get("map") or {}
        by_path = {d["path"]: d for d in dest}
        claimed = set()
        plan, missing, mapping = [], [], {}
        src_devices = sorted(rec.get("devices") or [], key=lambda d: (not d.get("held"),
                                                                     _index(d["path"])))
        for d in src_devices:
            target = None
            want = explicit.get(d["path"])
            if want:
                target = by_path.get(want)
                if target is None:
                    raise RefusedError(f"devices: map {d['path']}={want}: this bundle grants "
                                       f"no {want}")
            elif d["path"] in by_path and d["path"] not in claimed:
                target = by_path[d["path"]]
            else:
                fam = [x for x in dest if _family(x["path"]) == _family(d["path"])
                       and x.get("type") == d.get("type") and x["path"] not in claimed
                       and x["path"] not in {s["path"] for s in src_devices if s is not d}]
                fam.sort(key=lambda x: _index(x["path"]))
                target = fam[0] if fam else None
            if target is None:
                if d.get("held") or ctx["options"].get("strict"):
                    missing.append(d)
                else:
                    plan.append({"path": d["path"], "action": "remove",
                                 "was_num": [d.get("major"), d.get("minor")]})
                continue
            claimed.add(target["path"])
            mapping[d["path"]] = target
        if missing:
            grants = ", ".join(_fmt(d) for d in dest) or "no devices"
            what = ", ".join(_fmt(d) for d in missing)
            raise RefusedError(
                f"devices: the checkpoint holds {what} open, but this bundle grants no "
                f"matching device (it grants {grants}); grant one, or name it with "
                f"io.migrt.devices.map=<checkpoint path>=<granted path>")
        # Rewrite the destination spec: the granted device appears at the old path.
        for src_path, target in mapping.items():
            if target["path"] != src_path:
                target["path"] = src_path
        recorded = {d["path"]: d for d in src_devices}
        for d in _spec_devices(spec):
            old = recorded.get(d["path"])
            if old and (old.get("major"), old.get("minor"), old.get("type")) == \
                    (d.get("major"), d.get("minor"), d.get("type")):
                continue      # CRIU's copy of the node is already right
            plan.append({"path": d["path"], "type": "b" if d.get("type") == "b" else "c",
                         "major": d.get("major"), "minor": d.get("minor"),
                         "mode": d.get("fileMode", 0o666) & 0o7777,
                         "uid": d.get("uid", 0), "gid": d.get("gid", 0),
                         "was_num": [old.get("major"), old.get("minor")] if old else None})
        ctx["devices_mapping"] = {k: v["path"] for k, v in mapping.items()}
        ctx["spec_changed"] = True
        if not plan:
            return
        self._install(ctx, plan)

    def _install(self, ctx, plan):
        d = os.path.join(ctx["bundle"], ".migrt")
        os.makedirs(d, mode=0o700, exist_ok=True)
        plan_path = os.path.join(d, "devices-plan.json")
        for stale in (plan_path + ".done",):
            try:
                os.unlink(stale)
            except FileNotFoundError:
                pass
        with open(plan_path, "w") as f:
            json.dump({"nodes": plan}, f, indent=1)
        hook = os.path.join(proc.hooks_dir(), "criu-devices")
        wrapper = os.path.join(d, "criu-action")
        with open(wrapper + ".tmp", "w") as f:
            f.write("#!/bin/sh\n# written by migrt's devices plugin for this restore\n"
                    f"MIGRT_DEVICES_PLAN={shlex.quote(plan_path)} "
                    f"exec {shlex.quote(sys.executable)} {shlex.quote(hook)} \"$@\"\n")
        os.chmod(wrapper + ".tmp", 0o755)
        os.replace(wrapper + ".tmp", wrapper)
        proc.add_criu_config(ctx, self.name, [f"action-script {wrapper}"])

    def post_restore(self, ctx):
        plan = os.path.join(ctx["bundle"], ".migrt", "devices-plan.json")
        if os.path.exists(plan) and not os.path.exists(plan + ".done"):
            from migrt.errors import MigrtError
            raise MigrtError("devices: CRIU did not run the device action script "
                             f"(plan {plan}); device nodes keep the source's numbers")


plugin = Devices
