"""Least privilege for the node agent: the side that faces the network runs without root.

The agent has two jobs of very different risk. Its network side talks to peers: TLS,
frames, JSON, zstd, chunks written into staging. Everything a hostile peer can reach is
there, and none of it needs privilege. Restoring a staged migration (runc, CRIU, mounts,
cgroups) needs root. `migrt agent --user NAME` splits the two:

    root parent   makes the staging dirs (owned by NAME, 0700), binds the port, forks,
                  closes its copy of the listening socket, and from then on only answers
                  requests on a private socketpair, one at a time
    child         drops to NAME (no supplementary groups, no capabilities, no_new_privs)
                  and runs all of the agent's networking, staging and verification

The socketpair is the one narrow path from the network side to root. It carries eight
requests, each checked by the parent before anything is done:

    restore  mid, bundle, id  a staged migration of *this* agent's staging dir, in state
                              `staged`; an id runc accepts; a bundle that is a root-owned
                              directory (no symlink on the way) with a root-owned regular
                              config.json; restored into the agent's own --restore-root
                              (a peer cannot name another runc root)    -> pid
    arm      mid, bundle, id, restore plan
                              `restore`'s checks, for a migration of this staging dir
                              still in state `receiving`; the plan only runc restore
                              flags of a fixed set, CRIU's tcp-close, the source's
                              descriptors (strings): starts the restore, which waits at
                              CRIU's gate for `restore`, and re-checks the migration
                              then as any restore does                   -> armed or why not
    disarm   mid              stop that armed restore (nothing restored)
    check    bundle, id       the bundle and id checks of `restore`, before the source
                              is frozen (the precheck)                   -> ok or why not
    exists   id               is there a container of that id in --restore-root -> bool
    fill     mid              has the memory of a local lazy restore all come in
                              (migrt.agent.fill; a failed fill stops that copy) -> state
    map_locks                 does this node's CRIU restore a POSIX lock on a file
                              the process maps (migrt.criu.probe; no arguments)  -> bool
    recover                   migrt.migration.recovery for this node               -> outcomes

A compromised network side can ask for no more than that: it cannot name a checkpoint
outside staging, a host path to write, another runc root, or a command to run.
"""
import json
import os
import pwd
import signal
import socket
import sys
import threading

MAX_MSG = 1 << 16


class Refused(Exception):
    """The root side refused a request from the network side."""


def _send(sock, obj):
    sock.sendall(json.dumps(obj).encode())


def _recv(sock):
    data = sock.recv(MAX_MSG)
    if not data:
        raise EOFError("the other side of the agent is gone")
    return json.loads(data)


# ---------------------------------------------------------------- root side

class RootHelper:
    """The root parent: answers the network side's requests, after checking them."""

    def __init__(self, agent, uid, gid):
        self.agent = agent          # a migrt.agent.server.Agent with the same settings
        self.uid = uid
        self.gid = gid

    def handle(self, req):
        op = req.get("op") if isinstance(req, dict) else None
        try:
            if op == "restore":
                pid = self.restore(req)
                out = {"ok": True, "pid": pid}
                timing = getattr(self.agent, "timings", {}).pop(req.get("mid"), None)
                if timing is not None:      # where its time went (server.restore_figures)
                    out["timing"] = timing
                return out
            if op == "arm":
                armed, why = self.arm(req)
                return {"ok": True, "armed": armed, "why": why}
            if op == "disarm":
                from migrt.agent import staging as stg
                if stg.valid_mid(req.get("mid")):
                    self.agent.disarm(req["mid"])
                return {"ok": True}
            if op == "exists":
                return {"ok": True, "exists": self.exists(req)}
            if op == "check":
                self.check(req)
                return {"ok": True}
            if op == "net":
                self._check_bundle(req.get("bundle"))
                from migrt.agent.server import bundle_net
                return {"ok": True, "net": bundle_net(req["bundle"])}
            if op == "fill":
                return dict(zip(("state", "error"), self.fill(req)), ok=True)
            if op == "stop":
                return {"ok": True, "stopped": self.stop(req)}
            if op == "map_locks":
                from migrt.criu import probe
                from migrt.runc import criu_path
                kept, why = probe.kept_map_locks(criu_path())
                return {"ok": True, "kept": kept, "why": why}
            if op == "recover":
                from migrt.migration import recovery
                from migrt.agent.server import log
                out = recovery.resolve_pending(self.agent.secret, log)
                self.agent.sweep_private()
                return {"ok": True, "outcomes": out}
            return {"error": f"unknown request {op!r}"}
        except Refused as e:
            return {"error": str(e)}
        except Exception as e:          # one bad request must not end the root side
            return {"error": f"{type(e).__name__}: {e}"}

    def _check_root(self, req):
        root = req.get("root")
        if root not in (None, "", self.agent.root):
            raise Refused(f"restores go to this agent's runc root {self.agent.root}, "
                          f"not {root!r}")
        return self.agent.root

    def _checked(self, req, state):
        """A restore's (or arm's) migration, bundle, id and root, each checked: the
        migration this agent's, in `state`. (staged, bundle, id, root), or Refused."""
        from migrt.agent import staging as stg
        mid, bundle, cid = req.get("mid"), req.get("bundle"), req.get("id")
        if not stg.valid_mid(mid):
            raise Refused("not a migration id")
        if not stg.valid_cid(cid):
            raise Refused("not a container id runc accepts")
        root = self._check_root(req)
        staged = stg.Staged(mid, self.agent.staging, self.agent.disk)
        rec = staged.read()
        arriving = state == "receiving"
        if not rec or rec.get("state") != state or (arriving and staged.linked()):
            raise Refused(f"migration {mid} is not {'arriving' if arriving else 'staged'} here")
        self._check_bundle(bundle)
        return staged, bundle, cid, root

    def restore(self, req):
        from migrt.agent import server
        staged, bundle, cid, root = self._checked(req, "staged")
        try:
            return self.agent.restore(staged, {"bundle": bundle, "id": cid, "root": root})
        except server.Refused as e:
            raise Refused(str(e))
        finally:
            self._give_back(staged.dir)

    def arm(self, req):
        """`restore`'s checks, for a migration still arriving: its restore is started now
        and waits at CRIU's gate (migrt.agent.server.Agent.arm)."""
        from migrt.agent import server
        staged, bundle, cid, root = self._checked(req, "receiving")
        try:
            plan = server.arm_plan(req)
            return self.agent.arm(staged, dict(plan, bundle=bundle, id=cid, root=root))
        except server.Refused as e:
            raise Refused(str(e))

    def fill(self, req):
        """One look at a local lazy restore's memory fill (migrt.agent.fill); a failed
        fill stops the destination copy, which only root can do."""
        from migrt.agent import fill, staging as stg
        mid = req.get("mid")
        if not stg.valid_mid(mid):
            raise Refused("not a migration id")
        staged = stg.Staged(mid, self.agent.staging, self.agent.disk)
        try:
            # what it acts on is its own record of the restore, never the staged record
            return fill.check(staged, self.agent.mine(mid))
        finally:
            self._give_back(staged.dir)

    def stop(self, req):
        """Stop the copy restored here for a migration whose source could not serve
        every page (migrt.agent.fill.stop): only root can."""
        from migrt.agent import fill, staging as stg
        mid = req.get("mid")
        if not stg.valid_mid(mid):
            raise Refused("not a migration id")
        why = str(req.get("why") or "stopped by the source")[:500]
        staged = stg.Staged(mid, self.agent.staging, self.agent.disk)
        try:
            return fill.stop(staged, self.agent.mine(mid), why)
        finally:
            self._give_back(staged.dir)

    def _check_bundle(self, bundle):
        import stat
        if not isinstance(bundle, str) or not os.path.isabs(bundle):
            raise Refused("the bundle must be an absolute path")
        if os.path.realpath(bundle) != os.path.normpath(bundle):
            raise Refused(f"bundle {bundle}: a symlink on the way")
        try:
            st = os.lstat(bundle)
            cst = os.lstat(os.path.join(bundle, "config.json"))
        except OSError as e:
            raise Refused(f"bundle {bundle}: {e.strerror}")
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
            raise Refused(f"bundle {bundle}: not a root-owned directory")
        if not stat.S_ISREG(cst.st_mode) or cst.st_uid != 0:
            raise Refused(f"bundle {bundle}: config.json is not a root-owned regular file")

    def _give_back(self, d):
        """Records the restore wrote as root go back to the network side, which reads them
        (root's own regular files only, one link each: never a file linked in from
        elsewhere)."""
        import stat
        try:
            for n in os.listdir(d):
                p = os.path.join(d, n)
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode) and st.st_uid == 0 and st.st_nlink == 1:
                    os.lchown(p, self.uid, self.gid)
        except OSError:
            pass

    def check(self, req):
        """Before anything is sent: could `restore` of this bundle and id work?"""
        self._check_bundle(req.get("bundle"))
        if req.get("id") is not None and self.exists(req):
            raise Refused(f"a container {req['id']} already exists on the destination")

    def exists(self, req):
        from migrt.agent import staging as stg
        cid = req.get("id")
        if not stg.valid_cid(cid):
            raise Refused("not a container id runc accepts")
        return os.path.exists(os.path.join(self._check_root(req), cid, "state.json"))

    def serve(self, sock):
        while True:
            try:
                req = _recv(sock)
            except (EOFError, OSError):
                return
            except ValueError:
                req = None
            _send(sock, self.handle(req))


# ---------------------------------------------------------------- network side

class Client:
    """The network side's handle on the root side (what migrt.agent.server calls)."""

    def __init__(self, sock):
        self.sock = sock
        self.lock = threading.Lock()
        self.timings = {}           # mid -> the root side's figures of its restore

    def call(self, req):
        with self.lock:
            _send(self.sock, req)
            return _recv(self.sock)

    def restore(self, staged, msg):
        from migrt.agent.server import Refused as AgentRefused
        r = self.call({"op": "restore", "mid": staged.mid, "bundle": msg.get("bundle"),
                       "id": msg.get("id"), "root": msg.get("root")})
        if r.get("error"):
            raise AgentRefused(r["error"])
        if isinstance(r.get("timing"), dict):
            self.timings[staged.mid] = r["timing"]
        return r.get("pid")

    def arm(self, staged, msg):
        r = self.call(dict({k: msg.get(k) for k in ("bundle", "id", "root", "restore_flags",
                                                    "lazy", "criu_conf", "descriptors",
                                                    "memory")},
                           op="arm", mid=staged.mid))
        if r.get("error"):
            return False, r["error"]
        return bool(r.get("armed")), r.get("why")

    def disarm(self, mid):
        self.call({"op": "disarm", "mid": mid})

    def exists(self, cid, root=None):
        r = self.call({"op": "exists", "id": cid, "root": root})
        return r.get("exists") if r.get("ok") else None

    def check(self, bundle, cid, root=None):
        """None if the root side would restore into this bundle and id, else why not."""
        r = self.call({"op": "check", "bundle": bundle, "id": cid, "root": root})
        return r.get("error")

    def net(self, bundle):
        """The destination bundle's network namespace and its addresses (root reads it)."""
        r = self.call({"op": "net", "bundle": bundle})
        return r.get("net") if r.get("ok") else {"netns": "unknown", "error": r.get("error")}

    def fill(self, mid):
        r = self.call({"op": "fill", "mid": mid})
        if r.get("ok"):
            return r.get("state"), r.get("error")
        return "filling", r.get("error")     # not known: nothing may be rolled back on it

    def stop(self, mid, why):
        r = self.call({"op": "stop", "mid": mid, "why": why})
        return bool(r.get("ok") and r.get("stopped"))

    def map_locks(self):
        """(kept, why): the root side's CRIU probe of POSIX locks on mapped files."""
        r = self.call({"op": "map_locks"})
        if r.get("ok"):
            return bool(r.get("kept")), r.get("why") or ""
        return False, r.get("error") or "no answer from the agent's root side"

    def recover(self, secret=None, log=None):
        for line in self.call({"op": "recover"}).get("outcomes") or []:
            if log:
                log(line)


def drop_privileges(uid, gid):
    """For good: no groups, real/effective/saved ids, no_new_privs; checked."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(38, 1, 0, 0, 0)                 # PR_SET_NO_NEW_PRIVS
    except OSError:
        pass
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise RuntimeError("could not drop root")


def _chown_tree(top, uid, gid):
    for dirpath, dirnames, filenames in os.walk(top):
        for n in [dirpath] + [os.path.join(dirpath, f) for f in filenames]:
            try:
                os.lchown(n, uid, gid)
            except OSError:
                pass


def run(listen, secret, user, **kw):
    """`migrt agent --user NAME`: root parent and unprivileged network side."""
    from migrt.agent import server
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise SystemExit(f"migrt agent: no user {user!r}")
    if os.geteuid() != 0:
        raise SystemExit("migrt agent --user: start it as root (it drops to that user)")
    agent = server.make(listen, secret, **kw)
    for d in (agent.staging, agent.disk):
        _chown_tree(d, pw.pw_uid, pw.pw_gid)
    host, port = agent.bind()
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            parent_sock.close()
            drop_privileges(pw.pw_uid, pw.pw_gid)
            try:                                       # die with the root side
                import ctypes
                ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)   # PR_SET_PDEATHSIG
            except OSError:
                pass
            if os.getppid() == 1:
                os._exit(1)
            agent.privileged = Client(child_sock)
            agent.start_metrics()
            sys.stdout.write(f"migrt agent listening on {host}:{port} "
                             f"(network side as {user}, pid {os.getpid()})\n")
            sys.stdout.flush()
            agent.serve_until_signalled()
        except BaseException as e:       # never return into the parent's code
            sys.stderr.write(f"migrt agent: network side failed: {e}\n")
            code = 1
        finally:
            os._exit(code)
    child_sock.close()
    agent.sock.close()                   # root keeps no network socket

    def forward(sig, _frame):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    agent.warm()                         # restores run on this side
    agent.sweep_private(startup=True)    # a crash's leftovers: bundles' configs put back
    try:
        RootHelper(agent, pw.pw_uid, pw.pw_gid).serve(parent_sock)
        _, status = os.waitpid(pid, 0)
    finally:
        agent.close_staging()
    return os.waitstatus_to_exitcode(status)
