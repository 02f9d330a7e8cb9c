"""isolation: what the workload sees stays independent of the node it runs on.

- Hostname: the checkpoint's hostname is kept (CRIU restores the UTS namespace; the
  plugin also writes it into the destination spec so runc's view agrees).
- Host files: runtimes bind-mount /etc/hosts, /etc/resolv.conf and /etc/hostname from
  node paths. Their content as the container saw it is saved with the checkpoint and
  the restored container gets the same content (a copy in <bundle>/.migrt/isolation),
  also when the destination bundle mounts other files or none (CRIU would otherwise
  fail on the missing external mount).
- Compatibility: the checkpoint records the node's architecture, CPU instruction-set
  flags, CRIU version and the CRIU/kernel features restores rely on. A destination
  that lacks one is refused: before restore on the destination, and in `migrt migrate`
  before the source is touched when the destination reports its facts.
"""
import json
import os
import subprocess

from migrt.errors import RefusedError
from migrt.runc import criu_path
from migrt.plugins import Plugin, nodefacts, plugin_dir, proc

HOST_FILES = ("/etc/hosts", "/etc/resolv.conf", "/etc/hostname")
RECORD = "isolation.json"


def _bind_mounts(spec):
    out = {}
    for m in (spec or {}).get("mounts") or []:
        if isinstance(m, dict) and m.get("destination") in HOST_FILES:
            out[m["destination"]] = m
    return out


class Isolation(Plugin):
    name = "isolation"
    description = "keep hostname and host-mounted files; refuse incompatible destinations"
    order = 20
    detect = {"mounts": list(HOST_FILES), "restore": True, "groups": ["checkpoint", "migrate"]}
    options = {
        "pin_files": {"type": "boolean", "default": True,
                      "description": "restore /etc/hosts, resolv.conf, hostname as the "
                                     "checkpoint saw them"},
        "pin_hostname": {"type": "boolean", "default": True,
                         "description": "keep the checkpoint's hostname in the spec"},
        "check": {"type": "boolean", "default": True,
                  "description": "refuse destinations lacking CPU/kernel/CRIU features"},
    }

    def pre_checkpoint(self, ctx):
        if ctx.get("mode") == "pre-dump":
            return
        spec = ctx.get("spec") or {}
        pid = proc.init_pid(ctx)
        files = {}
        d = plugin_dir(ctx, self.name)
        for dest, m in _bind_mounts(spec).items():
            try:
                data = proc.read_in_root(pid, dest)     # as the workload sees it
            except Exception:
                continue
            name = dest.strip("/").replace("/", "_")
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
            files[dest] = {"file": name, "options": m.get("options") or ["rbind", "rprivate"]}
        rec = {"hostname": spec.get("hostname"), "files": files,
               "facts": nodefacts.collect()}
        # CRIU's own view of the CPU (CPUID, xsave features), checked on the destination.
        criu = criu_path()
        try:
            rec["cpuinfo"] = subprocess.run([criu, "cpuinfo", "dump", "-D", d],
                                            capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            rec["cpuinfo"] = False
        with open(os.path.join(d, RECORD), "w") as f:
            json.dump(rec, f, indent=1)

    def pre_migrate(self, ctx):
        if not ctx["options"].get("check"):
            return
        dest = ctx.get("destination")
        facts = dest.get("facts") if isinstance(dest, dict) else None
        if not facts:
            return       # nothing reported: the destination checks again before restore
        problems = nodefacts.incompatible(nodefacts.collect(), facts)
        if problems:
            where = dest.get("address") or "the destination"
            raise RefusedError(f"isolation: {where} cannot run this container: "
                               + "; ".join(problems) + "; nothing was touched")

    def pre_restore(self, ctx):
        d = plugin_dir(ctx, self.name, create=False)
        try:
            with open(os.path.join(d, RECORD)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            return
        opts = ctx["options"]
        if opts.get("check") and rec.get("facts"):
            here = nodefacts.collect()
            problems = nodefacts.incompatible(rec["facts"], here)
            if not problems and rec.get("cpuinfo") and \
                    rec["facts"].get("cpu_flags") != here.get("cpu_flags"):
                # Another CPU model: ask CRIU too (skipped when the flags are the same,
                # since this stage is part of the restore's downtime).
                criu = criu_path()
                p = subprocess.run([criu, "cpuinfo", "check", "-D", d], capture_output=True,
                                   text=True, timeout=30)
                if p.returncode != 0:
                    problems.append("`criu cpuinfo check` refuses this CPU: "
                                    + (p.stderr.strip().splitlines() or ["(no output)"])[-1])
            if problems:
                raise RefusedError("isolation: this node cannot restore the checkpoint: "
                                   + "; ".join(problems))
        spec = ctx["spec"]
        if opts.get("pin_hostname") and rec.get("hostname"):
            spec["hostname"] = rec["hostname"]
        if not opts.get("pin_files") or not rec.get("files"):
            return
        own = os.path.join(ctx["bundle"], ".migrt", "isolation")
        os.makedirs(own, mode=0o755, exist_ok=True)
        mounts = spec.setdefault("mounts", [])
        have = _bind_mounts(spec)
        for dest, info in rec["files"].items():
            with open(os.path.join(d, info["file"]), "rb") as f:
                data = f.read()
            path = os.path.join(own, info["file"])
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.chmod(path + ".tmp", 0o644)
            os.replace(path + ".tmp", path)
            if dest in have:
                have[dest]["source"] = path
            else:
                mounts.append({"destination": dest, "type": "bind", "source": path,
                               "options": info.get("options") or ["rbind", "rprivate"]})
        ctx["spec_changed"] = True


plugin = Isolation
