"""migrt's plugin framework: what lets a bundle's hardware and habits survive a move.

A plugin is a Python object with a `name`, declarative `detect` rules, an option
schema, and methods named after the lifecycle stages it works in (see
migrt.plugins.stages, where each stage is declared and documented). Plugins come from
this project's `plugins/` folder and from installed packages that declare an entry
point in the `migrt.plugins` group, so a third party adds one without touching migrt.

The runtime core never imports this package on the pass-through path: migrt.plugins.gate
answers "which plugins apply to this bundle?" from a JSON cache, and only when the
answer is not empty does the core call `run_stage`.
"""
import time

from migrt.errors import MigrtError, RefusedError
from migrt.plugins import stages as _stages
from migrt.safeio import makedirs_private

__all__ = ["Plugin", "run_stage", "RefusedError", "plugin_dir"]


class Plugin:
    """Base class of a plugin. Subclasses set the attributes and define stage methods.

    name         lowercase, [a-z0-9_]: also the annotation prefix io.migrt.<name>.<option>
                 and the env prefix MIGRT_<NAME>_<OPTION>
    description  one line for `migrt plugins`
    order        stages run plugins in ascending order (devices before gpu: the gpu
                 plugin reads the device mapping the devices plugin wrote into the spec)
    options      JSON Schema "properties" of the plugin's options (each with a default)
    detect       when the plugin applies without the bundle naming it; any rule matches:
                   devices:     globs on linux.devices[].path
                   env:         names in process.env (with a non-empty value)
                   annotations: keys in the spec's annotations
                   mounts:      globs on mounts[].destination of bind mounts
                   restore:     True: applies when the bundle carries the restore marker
                   groups:      core actions in which the rule-less plugin applies
                                ("checkpoint", "restore", ...)
                 The rules are data so that migrt.plugins.gate evaluates them with the stdlib.
    """

    name = None
    description = ""
    order = 50
    options = {}
    detect = {}

    def __repr__(self):
        return f"<plugin {self.name}>"


def plugin_dir(ctx, name, create=True):
    """<image_dir>/migrt/plugins/<name>/: where a plugin keeps per-checkpoint data."""
    import os
    d = os.path.join(ctx["image_dir"], "migrt", "plugins", name)
    if create:
        makedirs_private(d)
    return d


def _implemented(plugin, stage):
    return callable(getattr(plugin, _stages.method_name(stage), None))


def run_stage(stage, names, **ctx):
    """Run `stage` of each named plugin, in plugin order; return the (updated) ctx.

    A RefusedError from a `pre-*` stage stops the stage; the plugins that already ran
    their part of it are then given their matching `post-*` stage with ctx["error"] set,
    so that nothing stays drained or locked. Failures in `post-*` and `delete` stages do
    not stop the other plugins: they are reported together afterwards.
    """
    if stage not in _stages.ALL:
        raise MigrtError(f"plugins: unknown stage {stage!r}")
    from migrt.plugins import registry, options as _options
    try:
        plugins = registry.resolve(names)
    except MigrtError:
        if stage == _stages.DELETE:
            return ctx      # a container must always be deletable, whatever the config
        raise
    method = _stages.method_name(stage)
    spec = ctx.get("spec")
    ran = []
    errors = []
    timings = ctx.setdefault("plugin_seconds", {})
    for p in plugins:
        fn = getattr(p, method, None)
        if not callable(fn):
            continue
        ctx["options"] = _options.for_bundle(p, spec)
        t0 = time.monotonic()
        try:
            fn(ctx)
        except RefusedError:
            ctx.pop("options", None)
            if stage.startswith("pre-"):
                _undo(stage, ran, ctx)
            raise
        except MigrtError as e:
            if stage.startswith("pre-"):
                ctx.pop("options", None)
                _undo(stage, ran, ctx)
                raise
            errors.append(str(e))
        except Exception as e:  # a plugin bug must still read as one line
            msg = f"{p.name}: {stage} failed: {type(e).__name__}: {e}"
            where = ctx.get("image_dir") or ctx.get("bundle")
            if isinstance(e, OSError) and not e.filename and where:
                msg += f" (in {where})"     # a failed write does not name its file
            if stage.startswith("pre-"):
                ctx.pop("options", None)
                _undo(stage, ran, ctx)
                raise MigrtError(msg) from e
            errors.append(msg)
        finally:
            timings[f"{p.name}:{stage}"] = round(time.monotonic() - t0, 4)
        ran.append(p)
    ctx.pop("options", None)
    if errors:
        raise MigrtError("; ".join(errors))
    return ctx


_UNDO = {"pre-checkpoint": "post-checkpoint", "pre-restore": None, "pre-create": None,
         "pre-migrate": None}


def _undo(stage, ran, ctx):
    post = _UNDO.get(stage)
    if not post or not ran:
        return
    from migrt.plugins import options as _options
    ctx = dict(ctx, error=ctx.get("error") or "refused")
    for p in reversed(ran):
        fn = getattr(p, _stages.method_name(post), None)
        if callable(fn):
            ctx["options"] = _options.for_bundle(p, ctx.get("spec"))
            try:
                fn(ctx)
            except Exception:
                pass
