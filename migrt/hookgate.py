"""Cheap answer to "does any plugin apply to this bundle?" for the hot path.

Stub until the plugin framework lands: no plugin applies.
"""


def active(spec, bundle):
    return []
