"""The hook points of migrt's plugins, named after the container lifecycle stages.

This module is the plugins' contract (pluggy's "hookspec" module, runc's HookName
constants): each stage below is declared once, with when it runs, what the context
holds and what a plugin may do there. A plugin implements a stage by defining a method
named after it with dashes turned into underscores (`pre_checkpoint(self, ctx)`).

Every stage receives one dict, `ctx`, with at least:
    call      runc's global flags of this invocation (`call.root`, `call.log`)
    cid       the container id
    bundle    the bundle directory (absolute), or None when unknown
    spec      the bundle's config.json as a dict (None when unreadable)
    options   (added by the framework) this plugin's options for this bundle
A stage may add keys for the stages after it in the same process; the framework
returns the ctx to the caller.

A plugin refuses by raising migrt.errors.RefusedError("<plugin>: <reason>"). In the
`pre-*` stages that happens before anything is frozen or created: the caller reports
the one line and the container is left as it was.
"""

PRE_CREATE = "pre-create"
"""Before `runc create`/`run` of a fresh container (no restore marker).
ctx["spec"] may be changed (return it in ctx); the core writes it back to config.json
before runc reads it."""

POST_CREATE = "post-create"
"""After `runc create` succeeded. ctx["pid"] is the container's init pid (host view)."""

PRE_CHECKPOINT = "pre-checkpoint"
"""Before `runc checkpoint`: the container still runs and nothing is frozen yet.
ctx["image_dir"] is where CRIU will write; ctx["mode"] is "dump" (the container stops),
"leave-running" (it goes on after the dump) or "pre-dump" (memory only, iterative).
Plugins put what CRIU does not carry into <image_dir>/migrt/plugins/<name>/ and may
quiesce hardware state (CUDA lock/checkpoint) or ask the workload to drain. Refusing
here leaves the container running untouched."""

POST_CHECKPOINT = "post-checkpoint"
"""After `runc checkpoint` returned. ctx["mode"] as above. When the checkpoint failed,
ctx["error"] holds the failure line: plugins undo what pre-checkpoint did (unlock CUDA,
tell the workload to resume). In leave-running mode they do the same on success."""

PRE_RESTORE = "pre-restore"
"""Before `runc restore` of a bundle carrying the restore marker. ctx["image_dir"] is
the checkpoint. ctx["spec"] (marker already removed) may be changed: the core writes
it to config.json before runc reads it. This is the destination's last chance to
refuse (missing device, incompatible CPU, missing CRIU plugin) with nothing created."""

POST_RESTORE = "post-restore"
"""After `runc restore --detach` succeeded: the container runs again. ctx["pid"] is
its init pid. Plugins resume hardware state (CUDA restore/unlock) and tell the
workload where it now runs."""

PRE_MIGRATE = "pre-migrate"
"""`migrt migrate`, before anything on the source is touched. ctx["destination"] is
the destination (a "host:port" string, or a dict with "address" and, when the agent
reported them, "facts" as collected by migrt.plugins.nodefacts.collect()). Plugins
refuse destinations where the restore would fail or crash."""

DELETE = "delete"
"""`delete` of a container a plugin handled, before runc deletes it. ctx["record"] is
migrt's record of the container. Clean up per-container state."""

ALL = (PRE_CREATE, POST_CREATE, PRE_CHECKPOINT, POST_CHECKPOINT, PRE_RESTORE,
       POST_RESTORE, PRE_MIGRATE, DELETE)

# Which stages each core action can reach is migrt.plugins.gate.STAGE_GROUPS (kept there so
# that the hot path imports nothing from this package).


def method_name(stage):
    return stage.replace("-", "_")
