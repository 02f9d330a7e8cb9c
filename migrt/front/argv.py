"""Parse argv the way runc (urfave/cli v1 over Go's flag package) does.

migrt only needs to understand enough to decide whether a call is its business; the
argv it hands to runc is always the caller's own tokens, untouched. Go's flag syntax:
`-f`, `--f`, `-f=v`, `--f=v`, `-f v` (value flags only); bool flags take no separate
value; parsing stops at the first non-flag token or at `--`. CRI-O's conmon sends
`--root=<dir>` as one token, containerd sends `--root <dir>`: both are handled here.

Stdlib only, no imports at all: this module is on every container operation's path.
"""

# runc's global flags. value=True means the flag takes a value.
GLOBAL_FLAGS = {
    "debug": False, "log": True, "log-format": True, "root": True, "criu": True,
    "systemd-cgroup": False, "rootless": True, "help": False, "h": False,
    "version": False, "v": False,
}

# Per-command flags migrt must understand (only the commands it may act on).
COMMAND_FLAGS = {
    "create": {"bundle": True, "b": True, "console-socket": True, "pid-file": True,
               "no-pivot": False, "no-new-keyring": False, "preserve-fds": True,
               "help": False, "h": False},
    "run": {"bundle": True, "b": True, "console-socket": True, "detach": False, "d": False,
            "keep": False, "pid-file": True, "no-subreaper": False, "no-pivot": False,
            "no-new-keyring": False, "preserve-fds": True, "help": False, "h": False},
    "start": {"help": False, "h": False},
    "delete": {"force": False, "f": False, "help": False, "h": False},
    "checkpoint": {"image-path": True, "work-path": True, "parent-path": True,
                   "leave-running": False, "tcp-established": False, "ext-unix-sk": False,
                   "shell-job": False, "lazy-pages": False, "status-fd": True,
                   "page-server": True, "file-locks": False, "pre-dump": False,
                   "manage-cgroups-mode": True, "empty-ns": True, "auto-dedup": False,
                   "tcp-skip-in-flight": False,
                   "help": False, "h": False},
}

ALIASES = {"b": "bundle", "d": "detach", "f": "force", "h": "help", "v": "version"}


class ArgvError(Exception):
    """The argv is not something migrt understands; hand it to runc as it is."""


def parse_flags(tokens, spec):
    """Parse leading flags of `tokens` against `spec`.

    Returns (flags, rest): flags maps canonical name -> value (True for bools),
    rest is the tokens from the first positional on. Raises ArgvError on an unknown
    flag or a value flag with no value (runc will report those itself).
    """
    flags = {}
    i = 0
    n = len(tokens)
    while i < n:
        tok = tokens[i]
        if tok == "--":
            i += 1
            break
        if len(tok) < 2 or tok[0] != "-":
            break
        name = tok[2:] if tok.startswith("--") else tok[1:]
        value = None
        eq = name.find("=")
        if eq >= 0:
            name, value = name[:eq], name[eq + 1:]
        if name not in spec:
            raise ArgvError(f"flag provided but not defined: -{name}")
        canon = ALIASES.get(name, name)
        if spec[name]:
            if value is None:
                if i + 1 >= n:
                    raise ArgvError(f"flag needs an argument: -{name}")
                i += 1
                value = tokens[i]
            flags[canon] = value
        else:
            if value is None or value in ("true", "1", "t", "T", "TRUE", "True"):
                flags[canon] = True
            elif value in ("false", "0", "f", "F", "FALSE", "False"):
                flags[canon] = False
            else:
                raise ArgvError(f"invalid boolean value {value!r} for -{name}")
        i += 1
    return flags, tokens[i:]


class Call:
    """One runtime invocation: runc's global flags, the command and its own args."""

    __slots__ = ("argv", "globals", "command", "args")

    def __init__(self, argv):
        self.argv = list(argv)          # everything after argv[0], untouched
        self.globals, rest = parse_flags(self.argv, GLOBAL_FLAGS)
        self.command = rest[0] if rest else None
        self.args = rest[1:]

    @property
    def root(self):
        return self.globals.get("root") or "/run/runc"

    @property
    def log(self):
        return self.globals.get("log")

    @property
    def log_format(self):
        return self.globals.get("log-format") or "text"

    def global_tokens(self):
        """The caller's global-flag tokens, in their order and spelling."""
        n = len(self.argv) - len(self.args) - (1 if self.command is not None else 0)
        return self.argv[:n]

    def command_flags(self):
        """Parse this command's flags; returns (flags, positional args)."""
        return parse_flags(self.args, COMMAND_FLAGS[self.command])
