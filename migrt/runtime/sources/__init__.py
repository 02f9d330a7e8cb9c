"""Restore sources named by `MIGRT_RESTORE_FROM=<scheme>:<rest>` (see migrt.runtime.checkpoints)."""
