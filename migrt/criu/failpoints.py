"""Named points where a test can stop or kill migrt's own processes (failpoints).

Fault tests must hit one exact phase of a migration: "the destination is restoring",
"the source is frozen and the image sent but not committed". Timing from outside cannot
do that reliably on a loaded CI machine, so the migration engine names those points and
`MIGRT_FAILPOINTS` arms them (the habit of etcd's gofail and TiKV's fail-rs):

    MIGRT_FAILPOINTS="migrate.before-release=pause(10),agent.before-restore=kill"

pause(S)  write `<MIGRT_FAILPOINT_DIR>/<name>.<pid>` and sleep S seconds (the test sees
          the file, then does its damage from outside: kill -9, cut the network...)
kill      SIGKILL this process on the spot
exit(N)   _exit(N) at once

Unset (always, outside tests) a failpoint costs one environment lookup.
"""
import os
import signal
import time

POINTS = (
    "migrate.before-freeze",      # destination prechecked, nothing frozen yet
    "migrate.dump-armed",         # runc checkpoint and its CRIU wait at the gate, not frozen
    "migrate.after-dump",         # source frozen, image dumped and sent, not committed
    "migrate.before-restore",     # committed and verified on the destination
    "migrate.before-release",     # destination runs the container; source still frozen
    "agent.before-restore",       # agent got `restore`, has not run `migrt create`
    "agent.after-create",         # container restored on the destination, not started
    "kube.sts-before-delete",     # controller: StatefulSet pod handed off, old pod not deleted
)


def hit(name):
    spec = os.environ.get("MIGRT_FAILPOINTS")
    if not spec:
        return
    for item in spec.split(","):
        point, _, action = item.strip().partition("=")
        if point != name:
            continue
        if action.startswith("pause"):
            secs = float(action[len("pause("):-1] or 5) if "(" in action else 5.0
            d = os.environ.get("MIGRT_FAILPOINT_DIR")
            if d:
                with open(os.path.join(d, f"{name}.{os.getpid()}"), "w") as f:
                    f.write(str(time.time()))
            time.sleep(secs)
        elif action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action.startswith("exit"):
            os._exit(int(action[len("exit("):-1] or 1) if "(" in action else 1)
