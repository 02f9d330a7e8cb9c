"""The migrt checkpoint image: CRIU images plus what CRIU does not carry.

Placeholder API used by the runtime core (migrt.lifecycle); the migration engine
fills it in.
"""


def finalize_checkpoint(image_dir, container_id, state, bundle, criu_flags):
    """Called after a successful `migrt checkpoint`: add migrt's manifest to image_dir."""


def verify_image(image_dir):
    """Raise migrt.errors.CheckpointError naming the first bad file, if any."""
