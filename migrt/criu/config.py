"""CRIU options for the `runc checkpoint` that `migrt migrate` runs.

runc passes CRIU no flag for some of what a migration needs (the network lock method,
TLS for lazy mode's page server). CRIU reads, besides runc's RPC options, the config
file that CRIU_CONFIG_FILE names, and before runc's own config file (the
org.criu.config annotation, else /etc/criu/runc.conf), so that a node's own choices
there still win. The file is written into the migration's work dir (root only).
"""
import os

NAME = "criu-migrt.conf"


def env(work_dir, lines, base=None):
    """The environment for a `runc checkpoint` whose CRIU also reads `lines` (config
    file syntax: an option without its dashes, then its value). A CRIU_CONFIG_FILE the
    caller set keeps its lines, after ours, so that its own choices win (a later line
    overrides an earlier one)."""
    env = dict(os.environ if base is None else base)
    lines = list(lines)
    if not lines:
        return env
    theirs = env.get("CRIU_CONFIG_FILE")
    if theirs:
        try:
            with open(theirs) as f:
                lines += f.read().splitlines()
        except OSError:
            pass
    path = os.path.join(work_dir, NAME)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    env["CRIU_CONFIG_FILE"] = path
    return env
