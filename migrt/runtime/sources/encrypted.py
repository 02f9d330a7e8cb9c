"""`MIGRT_RESTORE_FROM=encrypted:<dir>`: restore a checkpoint encrypted at rest.

`<dir>` must lie in the allowed checkpoint locations, like a plain checkpoint. It is
decrypted (migrt.crypto, with the key its header names) into a fresh root-only dir on
tmpfs, checked like any checkpoint (complete, no symlinks, this architecture, every
manifest digest), restored, and the plaintext removed as soon as CRIU has read it.
Plaintext left by a migrt process that died (or by an attached `run`, whose restore
lasts as long as the container) is removed by the next encrypted restore.
"""
import os
import shutil
from migrt.safeio import makedirs_private

PLAIN_DIR = "plain"


def plain_root():
    return os.path.join(os.environ.get("MIGRT_STATE_DIR", "/run/migrt"), PLAIN_DIR)


def sweep():
    """Remove plaintext dirs whose migrt process is gone."""
    top = plain_root()
    try:
        names = os.listdir(top)
    except FileNotFoundError:
        return
    for n in names:
        pid = n.split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(top, n), ignore_errors=True)


def resolve(rest, bundle):
    from migrt import crypto
    from migrt.runtime import checkpoints
    value = f"encrypted:{rest}"
    if not os.path.isabs(rest):
        from migrt.errors import CheckpointError
        raise CheckpointError(f"checkpoint {value}: must be an absolute path")
    src = checkpoints.check_allowed(rest, value)
    if not os.path.isdir(src):
        from migrt.errors import CheckpointError
        raise CheckpointError(f"checkpoint {value} does not exist")
    sweep()
    top = plain_root()
    makedirs_private(top)
    os.chmod(top, 0o700)
    plain = os.path.join(top, f"{os.getpid()}-{os.urandom(6).hex()}")
    try:
        crypto.decrypt_image(src, plain)
        checkpoints.validate(plain, value)
        flags = checkpoints.manifest_flags(plain)
        prepare = checkpoints.manifest_prepare(plain)
    except BaseException:
        shutil.rmtree(plain, ignore_errors=True)
        raise

    def drop(*_):
        shutil.rmtree(plain, ignore_errors=True)

    return checkpoints.RestoreSource(plain, restore_flags=flags, prepare=prepare,
                                     on_restored=drop, on_failed=drop, description=value)
