"""The agent's TCP server: one thread per connection, one Session per migration.

Control connection (from `migrt migrate`), in order:
  precheck -> {ok, mid}        can this node take the container? (nothing frozen yet)
  commit   -> {ok, marker}     all data connections are done; check against the manifest
  restore  -> {ok, pid}        run `migrt run --detach` (the marker) on the given bundle, or
  wait     -> {ok, container}  wait until someone creates a container from the marker
  release  -> {ok}             the source is gone; the migration is complete
  abort                        drop the staged copy
A control connection that drops before `restore` succeeded drops the staged copy too.
Data connections (`op: data`, mid) carry chunks into that migration's Stage.
`op: status` (mid) says what this node knows of a migration: its staged state, or
`awaited` when no byte has come yet but a container create waits for it (a pod made
for it ahead of time, migrt.runtime.sources.staged).
`op: migrate` makes this node the source: it runs `migrt migrate` of one of its
containers to another agent, with a migration id the caller chose, and answers with
its report; asked again with the same id it waits for that same run (the Kubernetes
controller, migrt.kube, reattaches so after a restart). Asked with `events:
["restored"]`, it first sends `{"event": "restored", ...}` once the copy runs on the
destination (before the source is released); `status` with `net` adds the addresses of
the migration's container there (restored, or the pod sandbox a waiting create joins).
Asked with `hold` (seconds), the run keeps its source frozen once the copy runs there
(`migrt migrate --hold-source`) until a later `migrate` of the same id with `go` (or
the hold's end): migrt.kube takes a Never-restarting Job's old pod out of its Job
meanwhile.
"""
import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import zstandard

from migrt.criu import failpoints
from migrt.migration import recovery
from migrt.runc import criu_path, quick_status, runc_path
from migrt.runtime import checkpoints
from migrt.runtime.lifecycle import runc_error, wait_exit
from migrt.agent import fill, staging as stg
from migrt.safeio import makedirs_private, read_regular, write_private
from migrt.image import manifest as mf
from migrt.transfer import receiver, wire

RESERVE = 16 << 20
MAX_PENDING = int(os.environ.get("MIGRT_AGENT_MAX_HANDSHAKES", "64"))
MAX_CONNS = int(os.environ.get("MIGRT_AGENT_MAX_CONNS", "512"))
HANDSHAKE_GRACE = 0.25
# seconds a refused data connection is drained before closing (wire.Conn.close)
REFUSE_LINGER = 2.0


def bundle_net(bundle):
    """What the destination bundle's container gets for a network (its IPs, for the
    source to tell whether its TCP connections can move; migrt.migration.handover)."""
    from migrt.migration import handover
    try:
        return handover.bundle_net(bundle)
    except (OSError, ValueError) as e:
        return {"netns": "unknown", "error": str(e)}


def log(msg):
    sys.stderr.write(f"migrt agent: {msg}\n")
    sys.stderr.flush()


class Refused(Exception):
    pass


ARM_FLAGS = checkpoints.RESTORE_FLAGS + ("--auto-dedup",)


def _exit_or_kill(p, timeout):
    """Wait for a restorer (its own session) to exit: True; after `timeout` seconds
    its whole group (runc, CRIU) is killed and reaped: False."""
    try:
        wait_exit(p, timeout)
        return True
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        p.wait()
        return False


def arm_plan(msg):
    """The restore plan of an `arm` request, checked: runc restore flags of a fixed set
    only, CRIU's tcp-close or nothing, the source's descriptors as a short list of
    strings. Anything else: Refused."""
    flags, conf, desc = msg.get("restore_flags"), msg.get("criu_conf") or [], \
        msg.get("descriptors")
    if not isinstance(flags, list) or any(f not in ARM_FLAGS for f in flags) \
            or len(set(flags)) != len(flags) or conf not in ([], ["tcp-close"]) \
            or not isinstance(desc, list) or len(desc) > 64 \
            or not all(isinstance(d, str) and len(d) < 4096 for d in desc):
        raise Refused("arm: not a restore plan this agent runs")
    memory = msg.get("memory")
    return {"restore_flags": flags, "lazy": msg.get("lazy") is True, "criu_conf": conf,
            "descriptors": desc,
            "memory": memory if isinstance(memory, int) and memory >= 0 else None}


def restore_figures(root, cid, timing):
    """Where a restore's time went: the agent's own (`migrt run --detach` in a spare,
    the check that it runs), the restoring runtime's (migrt.runtime.lifecycle's record:
    rootfs, runc restore) and CRIU's (its stats-restore image and its log's span)."""
    from migrt.criu import stats as criustats
    from migrt.runc import RECORD
    out = {"migrt_run_s": round(timing.get("restore", 0), 4),
           "check_running_s": round(timing.get("total", 0) - timing.get("restore", 0), 4)}
    try:
        rec = json.loads(read_regular(os.path.join(root, cid, RECORD), 1 << 20))
    except (OSError, ValueError):
        return out
    if not isinstance(rec, dict):
        return out
    if isinstance(rec.get("restore_seconds"), (int, float)):
        out["lifecycle_s"] = rec["restore_seconds"]
    t = rec.get("timing") if isinstance(rec.get("timing"), dict) else {}
    for k in ("prepare_s", "before_runc_s", "runc_s", "after_runc_s", "armed_before_s"):
        if isinstance(t.get(k), (int, float)):
            out[k] = t[k]
    if isinstance(t.get("armed"), str):
        out["armed"] = t["armed"][:300]
    work = rec.get("work") if isinstance(rec.get("work"), str) else None
    if work:
        ran = criustats.log_span(os.path.join(work, "restore.log"))
        opened = criustats.restore_gate_opened_at(os.path.join(work, "restore.log"))
        if ran is not None and opened is not None:
            ran = max(0.0, ran - opened)      # armed: CRIU's start-up came before the freeze
        st = criustats.read((work, rec.get("image_dir")), "restore")
        if ran is not None:
            out["criu_s"] = round(ran, 4)
            if "runc_s" in out:
                out["runc_s"] = round(max(0.0, out["runc_s"] - ran), 4)   # runc's own
        if st:
            out["criu"] = {k: (round(v, 4) if isinstance(v, float) else v)
                           for k, v in st.items()}
            if ran is not None:
                out["criu"]["other_s"] = round(max(0.0, ran - st.get("restore_s", 0)), 4)
    return out


class Session:
    def __init__(self, agent, staged, stage, hello):
        self.agent = agent
        self.staged = staged
        self.stage = stage
        self.hello = hello
        self.data_threads = 0
        self.restored = False
        self.failed = False
        self.lazy = False
        self.kept = False       # handed off: the staged copy outlives this session


class Agent:
    def __init__(self, listen, secret, staging, disk, quota=None, ttl=600, root="/run/runc",
                 runtime=None, log_dir="/var/log/migrt", allow_bundles=None, metrics=None,
                 staging_size=None):
        self.listen = listen
        self.secret = secret
        self.staging = os.path.abspath(staging)
        self.disk = os.path.abspath(disk)
        self.quota = quota
        self.ttl = ttl
        self.root = root
        self.runtime = runtime
        self.log_dir = log_dir
        self.restore_timeout = float(os.environ.get("MIGRT_RESTORE_TIMEOUT", "120"))
        self.sessions = {}
        self.timings = {}           # mid -> where its restore's time went (restore_figures)
        self.privileged = None      # migrt.agent.privsep.Client when the network side is not root
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self._criu_features = {}
        self._spare = None          # migrt.front.spare.Spare, started by warm()
        self.armed = {}             # mid -> a restore started before its images (arm())
        # connections still in their handshake, oldest first (see serve)
        self._pending = collections.OrderedDict()
        self._conns = 0             # authenticated connections being served
        self._dropped = 0
        self.metrics_listen = metrics       # HOST:PORT for Prometheus, or None (off)
        from migrt.agent.metrics import Metrics
        self.metrics = Metrics(self)
        for d in (self.staging, self.disk):
            makedirs_private(d)
        # memory images on a tmpfs, always (migrt.agent.stagefs): StageFsError if not possible
        from migrt.agent import stagefs
        self.stagefs = stagefs.ensure(self.staging, staging_size, log=log)
        if os.geteuid() == 0:
            from migrt.criu import kdat       # CRIU's kernel probes cached, not redone
            kdat.ensure(log=log)
        for d in (self.staging, self.disk):
            os.chmod(d, 0o700)
        os.environ["MIGRT_STAGING"] = self.staging
        os.environ["MIGRT_STAGING_DISK"] = self.disk
        # what the root side knows of the restores it did, where only root can write
        # (the staging dirs belong to the network side, an unprivileged user with --user)
        self.private = stg.private_root(self.staging)
        if os.geteuid() == 0:
            makedirs_private(self.private)
            os.chmod(self.private, 0o700)
            stg.note_disk(self.staging, self.disk)

    def close_staging(self):
        """On exit: unmount the staging tmpfs this agent mounted (migrt.agent.stagefs)."""
        if self.stagefs.get("mounted"):
            from migrt.agent import stagefs
            stagefs.release(self.staging, log=log)

    # ------------------------------------------------------------ serving
    def bind(self):
        host, _, port = self.listen.rpartition(":")
        fam = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host.strip("[]") or "0.0.0.0", int(port)))
        self.sock.listen(64)
        return self.sock.getsockname()[:2]

    def serve_until_signalled(self):
        """serve() until SIGTERM or SIGINT."""
        def stop(*_):
            self.stop.set()
            self.sock.close()
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.serve()

    def start_metrics(self):
        """Serve Prometheus metrics (--metrics), from the network side's process."""
        if self.metrics_listen:
            from migrt.agent import metrics
            try:
                srv = metrics.serve(self.metrics, self.metrics_listen)
            except (OSError, ValueError) as e:
                raise SystemExit(f"migrt agent: --metrics {self.metrics_listen}: cannot listen: "
                                 f"{getattr(e, 'strerror', None) or e}")
            log("metrics on http://%s:%d/metrics" % srv.server_address[:2])

    def serve(self):
        for mid in stg.sweep(self.staging, self.ttl, startup=True, log=log, disk=self.disk):
            pass
        if not self.privileged:
            self.sweep_private(startup=True)
        # migrations this node was the source of, left by a `migrt migrate` that died
        threading.Thread(target=self._recover, daemon=True).start()
        stg.sweep_disk(self.staging, self.disk)
        threading.Thread(target=self._janitor, daemon=True).start()
        while not self.stop.is_set():
            try:
                s, peer = self.sock.accept()
            except OSError:
                if self.stop.is_set():
                    break
                raise
            if self._admit(s):
                threading.Thread(target=self._handle, args=(s, peer), daemon=True).start()

    def _admit(self, s):
        """Bound what unauthenticated peers can hold: at most MAX_PENDING connections in
        their handshake (each has a thread, for up to 10 s). When that is full, the
        oldest goes if it has had HANDSHAKE_GRACE seconds (an honest handshake takes
        milliseconds), else the newcomer is turned away: idle or slow peers cannot keep
        honest ones out, and nothing unauthenticated holds more than MAX_PENDING threads."""
        now = time.monotonic()
        with self.lock:
            if len(self._pending) >= MAX_PENDING:
                self._dropped += 1
                if self._dropped in (1, 10, 100) or self._dropped % 1000 == 0:
                    log(f"{self._dropped} unauthenticated connection(s) dropped so far: "
                        f"more than {MAX_PENDING} at once in their handshake")
                old, (since, dupfd) = next(iter(self._pending.items()))
                if now - since < HANDSHAKE_GRACE:
                    s.close()
                    return False
                del self._pending[old]
                # through our own duplicate of its descriptor (the handshake has wrapped
                # the socket object by now): its thread wakes up and closes it
                try:
                    victim = socket.socket(fileno=dupfd)
                except OSError:
                    os.close(dupfd)
                else:
                    try:
                        victim.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    victim.close()
            try:
                self._pending[s] = (now, os.dup(s.fileno()))
            except OSError:             # out of descriptors: this one waits for none
                s.close()
                return False
            return True

    def _handshake_over(self, s):
        with self.lock:
            entry = self._pending.pop(s, None)
        if entry is not None:
            os.close(entry[1])

    def _authenticated(self):
        """Count an authenticated connection in; False beyond MAX_CONNS (a bound for
        peers that hold the secret too: a buggy or runaway source)."""
        with self.lock:
            if self._conns >= MAX_CONNS:
                return False
            self._conns += 1
            return True

    def _janitor(self):
        every = max(1.0, min(30.0, self.ttl / 4))
        while not self.stop.wait(every):
            with self.lock:
                active = set(self.sessions)
            for s in stg.all_staged(self.staging, self.disk):
                if (s.read() or {}).get("state") == fill.FILLING:
                    state, why = self.fill_check(s)
                    if state != fill.FILLING:
                        log(f"{s.mid}: memory fill " + ("done" if state == "restored" else why))
            stg.sweep(self.staging, self.ttl, active=active, log=log, disk=self.disk)
            from migrt.runtime.sources import staged as src
            src.sweep_notes(self.staging, self.ttl)
            stg.sweep_disk(self.staging, self.disk)
            self._recover()
            try:        # container records with no event for MIGRT_RECORD_DAYS
                from migrt.plugins import record
                record.sweep()
            except Exception as e:
                log(f"container records: {e}")

    def _recover(self):
        if self.privileged:
            self.privileged.recover(log=log)
        else:
            recovery.resolve_pending(self.secret, log)
            self.sweep_private()

    # ------------------------------------------------------------ root-only records
    def _private_dir(self, mid):
        if not stg.valid_mid(mid):
            raise Refused("not a migration id")
        return os.path.join(self.private, mid)

    def mine(self, mid):
        """This agent's own record of the restore it did for migration mid (root-only),
        or None: the container it restored and the runc root it used."""
        try:
            rec = json.loads(read_regular(os.path.join(self._private_dir(mid), "restore.json")))
            return rec if isinstance(rec, dict) else None
        except (OSError, ValueError, Refused):
            return None

    def _put_back_config(self, mid):
        """The destination bundle's config.json as it was before the agent added its
        marker (after the restore, whatever its outcome, and after a crash)."""
        d = self._private_dir(mid)
        rec = self.mine(mid) or {}
        bundle = rec.get("bundle")
        if not bundle:
            return
        cfg = os.path.join(bundle, "config.json")
        try:
            orig = read_regular(os.path.join(d, "config.json.orig"))
            now = read_regular(cfg)
        except OSError:
            return
        if now != orig and f"MIGRT_RESTORE_FROM=staged:{mid}".encode() in now:
            try:
                write_private(cfg, orig, 0o600)
                os.chmod(cfg, rec.get("config_mode", 0o600))
            except OSError as e:
                log(f"{mid}: could not put back {cfg}: {e}")

    def sweep_private(self, startup=False):
        """Root-only records of migrations that are decided (their staged copy gone):
        the bundle's config put back if a crash left the marker, then removed. At
        startup no restore is running: every bundle's config goes back."""
        try:
            names = os.listdir(self.private)
        except OSError:
            return
        for mid in names:
            if not stg.valid_mid(mid):
                continue
            if os.path.exists(os.path.join(self.staging, mid)):
                if startup:
                    self._put_back_config(mid)
                continue
            self._put_back_config(mid)
            shutil.rmtree(os.path.join(self.private, mid), ignore_errors=True)

    def _handle(self, s, peer):
        try:
            conn, hello = wire.accept(s, self.secret)
        except wire.AuthError:
            log(f"refused {peer[0]}:{peer[1]}: authentication failed")
            return
        except (wire.ProtocolError, OSError) as e:
            log(f"dropped {peer[0]}:{peer[1]}: {e}")
            return
        finally:
            self._handshake_over(s)
        if not self._authenticated():
            log(f"refused {peer[0]}:{peer[1]}: {MAX_CONNS} connections already served")
            try:
                conn.send_json({"error": f"the agent already serves {MAX_CONNS} connections"})
            except OSError:
                pass
            conn.close()
            return
        try:
            op = hello.get("op")
            if op == "control":
                self._control(conn, hello, peer)
            elif op == "data":
                self._data(conn, hello)
            elif op == "status":
                self._status(conn, hello)
            elif op == "migrate":
                self._migrate_out(conn, hello)
            elif op == "drop":
                self._drop(conn, hello)
            else:
                conn.send_json({"error": f"unknown operation {op!r}"})
        except (wire.ProtocolError, OSError) as e:
            log(f"{peer[0]}:{peer[1]}: {e}")
        except Exception as e:     # a malformed request costs its connection, nothing more
            log(f"{peer[0]}:{peer[1]}: malformed request ({type(e).__name__}: {e})")
            try:
                conn.send_json({"error": f"malformed request ({type(e).__name__})"})
            except OSError:
                pass
        finally:
            conn.close(linger=conn.linger)
            with self.lock:
                self._conns -= 1

    # ------------------------------------------------------------ checks
    def criu_feature(self, name):
        if name not in self._criu_features:
            p = subprocess.run([criu_path(), "check", "--feature", name], capture_output=True)
            self._criu_features[name] = p.returncode == 0
        return self._criu_features[name]

    def map_locks_kept(self):
        """(kept, why): does this node's CRIU restore a POSIX lock on a mapped file? The
        probe needs root: with --user the root side runs it."""
        if self.privileged:
            return self.privileged.map_locks()
        from migrt.criu import probe
        return probe.kept_map_locks(criu_path())

    def node_facts(self):
        """This node's CPU, kernel and CRIU facts, for the source's pre-migrate plugins."""
        try:
            from migrt.plugins import nodefacts
            return nodefacts.collect()
        except Exception as e:       # facts are advisory: plugins refuse without them
            log(f"node facts unavailable: {e}")
            return None

    def precheck(self, msg):
        src = msg.get("node") or {}
        here = mf.node_info()
        if src.get("arch") != here["arch"]:
            raise Refused(f"architecture differs: source {src.get('arch')}, destination {here['arch']}")
        missing = sorted(set(src.get("cpu_flags") or []) - set(here["cpu_flags"]))
        if missing:
            raise Refused(f"destination CPU lacks features the source has: {' '.join(missing[:8])}")
        if not os.access(criu_path(), os.X_OK):
            raise Refused("criu is not installed on the destination")
        if msg.get("mode") == "lazy" and not self.criu_feature("uffd-noncoop"):
            raise Refused("destination kernel lacks userfaultfd (needed for --lazy)")
        if msg.get("map_locks"):
            # a process of the container holds a POSIX lock on a file it maps shared
            # (SQLite in WAL mode): the restore here must keep it (migrt.criu.probe)
            kept, why = self.map_locks_kept()
            if not kept:
                held = msg["map_locks"] if isinstance(msg["map_locks"], dict) else {}
                raise Refused(f"process {held.get('pid', '?')} holds a POSIX lock on "
                              f"{held.get('path', 'a file')}, which it also maps shared, and "
                              f"the destination's CRIU ({criu_path()}) restores such a process "
                              f"without that lock ({why}; an SQLite database in WAL mode would "
                              f"be at risk; packaging/install.sh builds a CRIU that keeps it)")
        need = int(msg.get("estimate") or 0)
        st = os.statvfs(self.staging)
        free = st.f_bavail * st.f_frsize
        if need + RESERVE > free and self.stagefs.get("mounted") and not self.privileged:
            from migrt.agent import stagefs           # our own tmpfs: sized to this migration
            free = stagefs.grow(self.staging, need + RESERVE, log=log) or free
        if need + RESERVE > free:
            raise Refused(f"no room on the destination: staging {self.staging} has "
                          f"{free >> 20} MiB free, the image needs about {need >> 20} MiB")
        if self.stagefs.get("fstype") == "tmpfs":
            from migrt.agent import stagefs           # a tmpfs's size is no promise of memory
            avail = stagefs.mem_available()
            if need + RESERVE > avail:
                raise Refused(f"no room on the destination: staging {self.staging} is a tmpfs "
                              f"and the node has {avail >> 20} MiB of memory available, the "
                              f"image needs about {need >> 20} MiB")
        if self.quota is not None and need > self.quota:
            raise Refused(f"no room on the destination: the image needs about {need >> 20} MiB, "
                          f"the staging quota is {self.quota >> 20} MiB")
        rneed = int(msg.get("rootfs_estimate") or 0)
        st = os.statvfs(self.disk)
        if rneed > st.f_bavail * st.f_frsize:
            raise Refused(f"no room on the destination disk {self.disk} for the rootfs changes")
        bundle = msg.get("bundle")
        if bundle and self.privileged:       # bundles and runc roots are root's to read
            err = self.privileged.check(bundle, msg.get("id"), msg.get("root"))
            if err:
                raise Refused(err)
            return self.privileged.net(bundle)
        elif bundle:
            if not os.path.isfile(os.path.join(bundle, "config.json")):
                raise Refused(f"destination bundle {bundle} has no config.json")
            root = msg.get("root") or self.root
            cid = msg.get("id")
            if cid and os.path.exists(os.path.join(root, cid, "state.json")):
                raise Refused(f"a container {cid} already exists on the destination")
            return bundle_net(bundle)
        return None

    # ------------------------------------------------------------ control
    def _control(self, conn, hello, peer):
        msg = conn.read_json()
        if msg.get("op") != "precheck":
            conn.send_json({"error": "expected precheck"})
            return
        try:
            net = self.precheck(msg)
        except Refused as e:
            self.metrics.inc("migrt_migrations_received_total", result="refused")
            conn.send_json({"error": str(e)})
            return
        page_tls = None
        frames = False
        if msg.get("mode") == "lazy":
            # the lazy-pages daemon's TLS identity, pinned to the source's (migrt.criu.pagetls)
            from migrt.criu import pagetls
            try:
                page_tls = (*pagetls.identity("migrt lazy pages"),
                            pagetls.peer_cert(msg.get("page_tls_cert")))
            except ValueError as e:
                conn.send_json({"error": str(e)})
                return
            # the page stream in frames after the handshake when both CRIUs can: the
            # source offers, this node decides, and says so in the reply
            frames = msg.get("page_frames") is True and pagetls.frames_possible()
        mid = msg.get("mid")
        if mid is not None:
            # chosen by the source (a pod waits for it already): used once only
            from migrt.runtime.sources import staged as src
            if not stg.valid_mid(mid) or os.path.exists(os.path.join(self.staging, mid)) \
                    or os.path.exists(src.dropped_path(self.staging, mid)):
                conn.send_json({"error": f"migration id {mid!r} is not valid or already used"})
                return
        else:
            mid = stg.new_mid()
        staged = stg.Staged(mid, self.staging, self.disk)
        # a staged copy sent for one bundle must not be restored into another
        # (migrt.runtime.sources.staged): another pod must not take this workload's memory
        for_bundle = msg.get("bundle") if isinstance(msg.get("bundle"), str) else None
        caps = msg.get("caps") if isinstance(msg.get("caps"), list) else []
        staged.create(source=f"{peer[0]}", container=msg.get("container"), mode=msg.get("mode"),
                      for_bundle=os.path.abspath(for_bundle) if for_bundle else None,
                      fill_ok="fill" in caps)
        if page_tls:
            pagetls.write(staged.tls_dir, *page_tls, frames=frames)
        stage = receiver.Stage(staged.image_dir, staged.rootfs_dir, quota=self.quota)
        sess = Session(self, staged, stage, msg)
        with self.lock:
            self.sessions[mid] = sess
        log(f"{mid}: receiving {msg.get('container')} from {peer[0]} ({msg.get('mode')})")
        reply = {"ok": True, "mid": mid, "staging": staged.image_dir,
                 "facts": self.node_facts(), "boot_id": mf.boot_id()}
        if msg.get("map_locks"):
            reply["map_locks"] = "kept"      # checked above (an older agent says nothing)
        if net is not None:       # the destination container's network namespace and IPs
            reply["net"] = net
        # what this node's CRIU understands (migrt.criu.features): its lazy-pages daemon,
        # its restore gate (the `arm` op)
        from migrt.criu import features
        reply["criu_features"] = sorted(features.of(criu_path()))
        if page_tls:
            reply["page_tls_cert"] = page_tls[1].decode()
            reply["page_frames"] = frames
        conn.send_json(reply)
        try:
            self._control_loop(conn, sess)
        except (wire.ProtocolError, OSError) as e:
            if not sess.restored:
                log(f"{mid}: source went away ({e}); dropping the staged copy")
        finally:
            with self.lock:
                self.sessions.pop(mid, None)
            if getattr(sess, "armed", False) and not sess.restored:
                try:                # its restore, started before the freeze, stops at its gate
                    (self.privileged or self).disarm(mid)
                except Exception as e:
                    log(f"{mid}: stopping the armed restore: {e}")
            try:
                stage.close()
            except Exception as e:          # the staged copy must go all the same
                log(f"{mid}: closing the stage: {e}")
            try:
                rec = staged.read() or {}
            except (OSError, ValueError) as e:
                log(f"{mid}: staged record unreadable ({e})")
                rec = {}
            if not sess.restored and not sess.kept and rec.get("state") != "restored":
                staged.remove()
                # a pod's create waiting for it (migrt.runtime.sources.staged) stops now
                # (only one that waits: a note per aborted precheck would pile up)
                from migrt.runtime.sources import staged as src
                if os.path.exists(src.awaited_path(self.staging, mid)):
                    src.note_dropped(self.staging, mid, "its source rolled back")
            done = sess.restored or rec.get("state") in ("restored", "done")
            self.metrics.inc("migrt_migrations_received_total",
                             result="restored" if done else
                             "failed" if sess.failed or rec.get("state") == "failed" else "dropped")

    def _control_loop(self, conn, sess):
        staged = sess.staged
        while True:
            msg = conn.read_json()
            op = msg.get("op")
            if op == "commit":
                try:
                    if sess.stage.error:
                        raise receiver.StageError(sess.stage.error)
                    m = sess.stage.finish(msg.get("manifest"))
                except (receiver.StageError, wire.ProtocolError) as e:
                    conn.send_json({"error": f"verification failed: {e}"})
                    return
                except Exception as e:  # a bad manifest raises CheckpointError
                    conn.send_json({"error": f"verification failed: {e}"})
                    return
                fields = {"state": "staged", "bytes": sum(e["size"] for e in m["files"])}
                if msg.get("lazy_address"):
                    fields["lazy_address"] = msg["lazy_address"]
                    sess.lazy = True
                if msg.get("final", True):
                    staged.update(**fields)
                    log(f"{staged.mid}: staged and verified ({fields['bytes']} bytes)")
                conn.send_json({"ok": True, "marker": f"staged:{staged.mid}"})
            elif op == "restore":
                t0 = time.monotonic()
                try:
                    pid = (self.privileged or self).restore(staged, msg)
                except Refused as e:
                    sess.failed = True
                    conn.send_json({"error": f"restore failed on the destination: {e}"})
                    return
                took = time.monotonic() - t0
                self.metrics.observe("migrt_restore_duration_seconds", took)
                sess.restored = True
                reply = {"ok": True, "pid": pid, "restore_seconds": took}
                timing = (self.privileged or self).timings.pop(staged.mid, None)
                if isinstance(timing, dict):
                    reply["timing"] = dict(timing, agent_s=round(took, 4))
                if (staged.read() or {}).get("state") == fill.FILLING:
                    reply["filling"] = True       # running; its memory still coming in
                conn.send_json(reply)
            elif op == "arm":
                # before the freeze: the restore is started now and waits at CRIU's gate
                # for `restore` (a restore that cannot be armed runs as usual then)
                if sess.restored or not isinstance(msg.get("bundle"), str):
                    conn.send_json({"error": "arm: needs a bundle, before the restore"})
                    return
                t0 = time.monotonic()
                try:
                    armed, why = (self.privileged or self).arm(staged, msg)
                except Refused as e:
                    armed, why = False, str(e)
                sess.armed = armed
                conn.send_json({"ok": True, "armed": armed, "why": why,
                                "seconds": round(time.monotonic() - t0, 4)})
            elif op == "filled":
                # the source waits for this before it lets its copy go
                state, why = self.fill_wait(staged, float(msg.get("timeout", 600)))
                if state == "restored":
                    conn.send_json({"ok": True})
                else:
                    # failed: the copy here was stopped, the source may resume (and the
                    # staged copy goes with this session); still filling (timed out):
                    # nobody knows yet, the source must wait
                    if state == "failed":
                        sess.restored = False
                        sess.failed = True
                        log(f"{staged.mid}: {why}; the container here was stopped")
                    conn.send_json({"error": f"restore failed on the destination: {why}",
                                    "stopped": state == "failed"})
                    return
            elif op == "wait":
                deadline = time.monotonic() + float(msg.get("timeout", 300))
                while True:
                    rec = staged.read() or {}
                    if rec.get("state") in ("restored", fill.FILLING):
                        sess.restored = True
                        reply = {"ok": True, "container": rec.get("container"),
                                 "pid": rec.get("pid")}
                        if rec.get("state") == fill.FILLING:
                            reply["filling"] = True
                        conn.send_json(reply)
                        break
                    if rec.get("state") == "failed":
                        conn.send_json({"error": f"restore failed on the destination: "
                                                 f"{rec.get('error', '?')}"})
                        return
                    if time.monotonic() > deadline:
                        conn.send_json({"error": "no container was created from the marker "
                                                 "in time"})
                        return
                    time.sleep(0.02)
            elif op == "release":
                # (lazy mode: the source releases only once its page server has served
                # every page, so nothing here is read any more)
                if (staged.read() or {}).get("state") == fill.FILLING:
                    # the image still feeds the container's memory: not before that ends
                    self.fill_wait(staged, 600)
                staged.update(state="done")
                staged.remove()
                conn.send_json({"ok": True})
                return
            elif op == "keep":
                # handoff (a StatefulSet pod, migrt.kube.statefulset): the source lets its
                # container go once this is answered, so the staged copy is the workload
                # now; it stays until its restore is released, and a failed restore can
                # be tried again from it (migrt.runtime.sources.staged)
                rec = staged.read() or {}
                if rec.get("state") != "staged":
                    conn.send_json({"error": f"migration {staged.mid} is "
                                             f"{rec.get('state')}, not staged"})
                    return
                staged.update(retain=True, kept_at=time.time())
                sess.kept = True
                log(f"{staged.mid}: kept for a later restore (the source lets go)")
                conn.send_json({"ok": True, "marker": f"staged:{staged.mid}"})
                return
            elif op == "stop":
                # lazy mode: the source's page server failed before every page was
                # served; the copy here lacks part of its memory and must not run on
                why = str(msg.get("why") or "stopped by the source")[:500]
                stopped = sess.restored and self.stop_copy(staged, why)
                if stopped:
                    sess.restored = False
                    sess.failed = True
                    why = (staged.read() or {}).get("error") or why
                    log(f"{staged.mid}: {why}; the container here was stopped")
                conn.send_json({"ok": bool(stopped), "stopped": bool(stopped)}
                               if stopped else
                               {"error": "the restored container here could not be stopped",
                                "stopped": False})
                return
            elif op == "why":
                conn.send_json({"ok": True, "reason": sess.stage.error})
            elif op == "abort":
                conn.send_json({"ok": True})
                return
            else:
                conn.send_json({"error": f"unknown operation {op!r}"})
                return

    def _marked_bundle(self, staged, msg):
        """Check a restore's bundle and id, and give the bundle's config.json the marker
        (the caller's kept in the private dir, put back once runc has read it)."""
        bundle = msg.get("bundle")
        cid = msg.get("id")
        root = msg.get("root") or self.root
        if not bundle or not cid:
            raise Refused("restore needs a bundle and a container id")
        priv = self._private_dir(staged.mid)
        shutil.rmtree(priv, ignore_errors=True)
        makedirs_private(priv)
        cfg = os.path.join(bundle, "config.json")
        try:
            orig = read_regular(cfg)
            mode = os.stat(cfg).st_mode & 0o7777
            spec = json.loads(orig)
            env = [e for e in spec["process"].get("env", [])
                   if not e.startswith("MIGRT_RESTORE_FROM=")]
            spec["process"]["env"] = env + [f"MIGRT_RESTORE_FROM=staged:{staged.mid}"]
            write_private(os.path.join(priv, "config.json.orig"), orig)
            write_private(os.path.join(priv, "restore.json"), json.dumps(
                {"mid": staged.mid, "container": cid, "root": root,
                 "bundle": os.path.abspath(bundle), "config_mode": mode}).encode())
            write_private(cfg, json.dumps(spec).encode(), mode)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            shutil.rmtree(priv, ignore_errors=True)
            raise Refused(f"bundle {bundle}: {e}")
        return bundle, cid, root, priv

    def restore(self, staged, msg):
        """Create the container from the staged migration through migrt's marker (the
        restore armed for it, if it was and still matches)."""
        a = self._take_armed(staged.mid)
        if a is not None and ((a["bundle"], a["id"], a["root"]) != (
                msg.get("bundle"), msg.get("id"), msg.get("root") or self.root)
                or a["spawned"]["proc"].poll() is not None):
            # another bundle or id than armed, or its restorer is gone (killed, failed
            # while it waited): it stops, and the restore runs as if never armed
            why = "its restorer is gone" if a["spawned"]["proc"].poll() is not None \
                else "another bundle or id"
            self._disarm(a)
            log(f"{staged.mid}: armed restore not used ({why}); restoring as usual")
            a = None
        if a is None:
            bundle, cid, root, priv = self._marked_bundle(staged, msg)
            spawned = None
        else:
            bundle, cid, root, priv = a["bundle"], a["id"], a["root"], a["priv"]
            spawned = a["spawned"]
        ok = False
        try:
            failpoints.hit("agent.before-restore")
            if spawned is None:
                spawned = self._spawn_restorer(bundle, cid, root, priv)
            else:
                spawned["t0"] = time.monotonic()
                a["gate"].open()            # the images are here: the armed restore goes on
            pid = self._await_restorer(staged, spawned, cid, root)
            ok = True
            return pid
        finally:
            if not ok and a is not None and not a["gate"].is_open:
                a["gate"].abort()           # nothing restored: the armed restore stops
                self._reap(spawned)
            # runc has read it: the bundle keeps what its owner wrote, marker or not
            self._put_back_config(staged.mid)
            if not ok:
                shutil.rmtree(priv, ignore_errors=True)

    def arm(self, staged, msg):
        """Start the restore of a migration not yet staged (before its source freezes):
        `migrt run --detach` with the marker, whose runc and CRIU wait at CRIU's gate
        (migrt.runtime.lifecycle._arm_restore) until `restore` lets them go. Returns
        (armed, why not)."""
        from migrt.criu import gate as cgate
        plan = arm_plan(msg)
        self.disarm(staged.mid)
        bundle, cid, root, priv = self._marked_bundle(staged, msg)
        gate = spawned = None
        try:
            arm_dir = os.path.join(priv, "arm")
            makedirs_private(arm_dir)
            write_private(os.path.join(arm_dir, "arm.json"), json.dumps(plan).encode())
            gate = cgate.Gate(arm_dir)
            from migrt.runtime.lifecycle import ARMED_ENV
            t0 = time.monotonic()
            spawned = self._spawn_restorer(bundle, cid, root, priv, {ARMED_ENV: arm_dir})
            ready = gate.wait_ready(spawned["proc"], 60)
        except BaseException:
            if gate is not None:
                gate.abort()
            if spawned is not None:
                self._reap(spawned)
            self._put_back_config(staged.mid)
            shutil.rmtree(priv, ignore_errors=True)
            raise
        if not ready:
            gate.abort()
            self._reap(spawned)
            self._put_back_config(staged.mid)
            why = runc_error(spawned["errlog"], 0) or "its runc did not reach CRIU's gate"
            shutil.rmtree(priv, ignore_errors=True)
            return False, why
        with self.lock:
            self.armed[staged.mid] = {"bundle": bundle, "id": cid, "root": root,
                                      "priv": priv, "gate": gate, "spawned": spawned}
        log(f"{staged.mid}: restore armed as {cid} in {root} "
            f"({time.monotonic() - t0:.3f}s to CRIU's gate)")
        return True, None

    def _take_armed(self, mid):
        with self.lock:
            return self.armed.pop(mid, None)

    def disarm(self, mid):
        """Stop the restore armed for `mid`, if any (its migration ended without one):
        CRIU stops at its gate, runc and migrt clean up, the bundle's config goes back."""
        a = self._take_armed(mid)
        if a is not None:
            self._disarm(a)
            log(f"{mid}: armed restore stopped")

    def _disarm(self, a):
        a["gate"].abort()
        self._reap(a["spawned"])
        mid = os.path.basename(a["priv"])
        self._put_back_config(mid)
        shutil.rmtree(a["priv"], ignore_errors=True)

    def _reap(self, spawned, timeout=30):
        _exit_or_kill(spawned["proc"], timeout)
        self._close_spawned(spawned)

    def _close_spawned(self, spawned):
        for name in ("w", "in_r", "in_w"):
            fd = spawned.pop(name, None)
            if fd is not None:
                os.close(fd)
        if not spawned.get("warmed"):
            spawned["warmed"] = True
            # the next spare starts once this restore is over: its start-up (0.07 s of
            # CPU) taken during the restore came out of the downtime on a 2-core node
            threading.Thread(target=self.warm, daemon=True).start()

    def _spawn_restorer(self, bundle, cid, root, priv, extra_env=None):
        """`migrt run --detach` of the marked bundle, in the spare restorer if one is
        ready; its stdout and stderr go to the container's log."""
        makedirs_private(self.log_dir)
        out_path = os.path.join(self.log_dir, f"{cid}.log")
        r, w = os.pipe()
        in_r, in_w = os.pipe()
        with os.fdopen(os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                               | os.O_CLOEXEC, 0o600), "ab") as logf:
            # The container's stdout/stderr must be pipes (as containerd gives them); a
            # detached reader outlives the agent so that an agent restart does not
            # break the container's pipes.
            subprocess.Popen(["cat"], stdin=r, stdout=logf, stderr=subprocess.DEVNULL,
                             start_new_session=True, close_fds=True)
        os.close(r)
        env = dict(os.environ, MIGRT_STAGING=self.staging, **(extra_env or {}))
        # root-only: runc would follow a link planted in the network side's staging dir
        errlog = os.path.join(priv, "create.log")
        os.close(os.open(errlog, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        argv = [self.runtime, "--root", root, "--log", errlog, "--log-format", "json",
                "run", "--detach", "--bundle", bundle, cid]     # create and start in one call
        # The container inherits runc's stdio: stdout and stderr both go to the log pipe,
        # so the error line is read back from the --log file.
        spawned = {"w": w, "in_r": in_r, "in_w": in_w, "errlog": errlog,
                   "t0": time.monotonic()}
        try:
            # its own session, so that a restore that hangs (runc restore --lazy-pages
            # after a failed page transfer does) can be stopped with its runc and CRIU
            spare = self._take_spare()
            spawned["how"] = "a pre-started restorer" if spare is not None else "a new process"
            if spare is not None:
                spawned["proc"] = spare.run(argv[1:], env, (in_r, w, w))
            else:
                spawned["proc"] = subprocess.Popen(argv, stdin=in_r, stdout=w, stderr=w,
                                                   env=env, start_new_session=True)
        except BaseException:
            self._close_spawned(spawned)
            raise
        return spawned

    def _await_restorer(self, staged, spawned, cid, root):
        p, errlog = spawned["proc"], spawned["errlog"]
        env = dict(os.environ, MIGRT_STAGING=self.staging)
        t0 = spawned["t0"]
        try:
            if not _exit_or_kill(p, self.restore_timeout):
                from migrt.runtime.lifecycle import unmount_criu_leftovers
                subprocess.run([self.runtime, "--root", root, "delete", "--force", cid],
                               capture_output=True, env=env)
                unmount_criu_leftovers(types.SimpleNamespace(root=root), cid, remove=True)
                raise Refused(f"restore did not finish in {self.restore_timeout:.0f}s; stopped")
            self.last_timing = {"restore": time.monotonic() - t0}
        finally:
            self._close_spawned(spawned)
        if p.returncode != 0:
            raise Refused(runc_error(errlog, 0) or f"migrt run --detach exited {p.returncode}")
        failpoints.hit("agent.after-create")
        # what `runc state` would say, read from runc's state dir (runc itself when that
        # cannot tell: `state` through migrt is the same call, after an interpreter start)
        quick = quick_status(root, cid)
        if quick is not None:
            state = {"status": quick[0], "pid": quick[1]}
        else:
            st = subprocess.run([runc_path(), "--root", root, "state", cid],
                                capture_output=True, text=True, env=env)
            try:
                state = json.loads(st.stdout)
            except ValueError:
                state = {}
        if state.get("status") != "running":
            subprocess.run([self.runtime, "--root", root, "delete", "--force", cid],
                           capture_output=True, env=env)
            raise Refused(f"container {cid} is {state.get('status', 'gone')} after restore")
        self.last_timing["total"] = time.monotonic() - t0
        self.timings[staged.mid] = restore_figures(root, cid, self.last_timing)
        log(f"{staged.mid}: restored as {cid} (pid {state.get('pid')}) in {root} "
            f"(restore {self.last_timing['restore']:.3f}s in {spawned['how']}, checked running "
            f"{self.last_timing['total']:.3f}s)")
        return state.get("pid")

    def warm(self):
        """Start a spare restorer (migrt.front.spare) so the next restore skips its start-up."""
        from migrt.front import spare
        launcher = spare.launcher_for(self.runtime)
        if launcher is None:
            return
        try:
            s = spare.Spare(launcher)
        except OSError as e:
            log(f"no spare restorer: {e}")
            return
        with self.lock:
            old, self._spare = self._spare, s
        if old is not None:
            old.discard()

    def _take_spare(self):
        with self.lock:
            s, self._spare = self._spare, None
        if s is not None and s.alive():
            return s
        if s is not None:
            s.discard()
        return None

    # ------------------------------------------------------------ data
    def _data(self, conn, hello):
        mid = hello.get("mid")
        with self.lock:
            sess = self.sessions.get(mid)
        if sess is None:
            conn.send_json({"error": f"no migration {mid!r} in progress"})
            return
        dctx = zstandard.ZstdDecompressor()
        frames = 0
        while True:
            try:
                kind, payload = conn.read_frame()
            except (wire.ProtocolError, OSError) as e:
                # e.g. TLS "bad record mac": the stream was damaged on the way; the source
                # learns it on the control connection ("why"), not from its broken pipe
                sess.stage.fail(f"data stream damaged on the way: {e}")
                log(f"{mid}: data stream damaged on the way: {e}")
                # the source stops at once on any message here (migrt.transfer.sender)
                try:
                    conn.send_json({"error": f"data stream damaged on the way: {e}"})
                except (OSError, ValueError):
                    pass
                conn.linger = REFUSE_LINGER
                return
            if kind == b"J":
                if payload.get("op") == "eof":
                    if sess.stage.error:
                        conn.send_json({"error": sess.stage.error})
                    else:
                        conn.send_json({"ok": True, "frames": frames})
                    return
                conn.send_json({"error": "unexpected control message on a data connection"})
                conn.linger = REFUSE_LINGER
                return
            head, data = payload
            self.metrics.inc("migrt_received_bytes_total", len(data))
            try:
                sess.stage.write(head, data, dctx)
            except receiver.StageError as e:
                sess.stage.fail(str(e))
                log(f"{mid}: {e}")
                conn.send_json({"error": str(e)})
                conn.linger = REFUSE_LINGER     # so the reason reaches the sender
                return
            frames += 1

    def fill_check(self, staged):
        """One look at a local lazy restore's memory fill (migrt.agent.fill)."""
        if self.privileged:
            return self.privileged.fill(staged.mid)
        return fill.check(staged, self.mine(staged.mid))

    def stop_copy(self, staged, why):
        """Stop the copy restored here for `staged` (migrt.agent.fill.stop)."""
        if self.privileged:
            return self.privileged.stop(staged.mid, why)
        return fill.stop(staged, self.mine(staged.mid), why)

    def fill_wait(self, staged, timeout):
        deadline = time.monotonic() + timeout
        while True:
            state, why = self.fill_check(staged)
            if state != fill.FILLING:
                return state, why
            if time.monotonic() > deadline:
                return state, f"memory fill still running after {timeout:.0f}s"
            time.sleep(0.02)

    def _status(self, conn, hello):
        mid = hello.get("mid")
        if not stg.valid_mid(mid):
            conn.send_json({"error": "bad migration id"})
            return
        staged = stg.Staged(mid, self.staging, self.disk)
        if (staged.read() or {}).get("state") == fill.FILLING:
            self.fill_check(staged)             # moves it on if the daemon is done
        rec = staged.read()
        reply = {"ok": True, "state": (rec or {}).get("state", "unknown"),
                 "container": (rec or {}).get("container")}
        if rec is None and self._awaited(mid):
            reply["state"] = "awaited"
        if hello.get("net") and not self.privileged:
            addrs = self._addresses(rec, mid, reply["state"])
            if addrs is not None:
                reply["addresses"] = addrs
        if (rec or {}).get("retain"):
            reply.update(retain=True, attempts=rec.get("attempts", 0),
                         last_error=rec.get("last_error"))
        with self.lock:
            active = mid in self.sessions
        if hello.get("stop") and rec and not active and rec.get("state") == "restored":
            # lazy mode, from the source's recovery: the page server of a `migrt migrate`
            # that died ended before it had served every page, so the copy here lacks
            # part of its memory and must not run on (a live migrate asks in its session)
            why = str(hello["stop"])[:500]
            reply["stopped"] = bool(self.stop_copy(staged, why))
            if reply["stopped"]:
                why = (staged.read() or {}).get("error") or why
                log(f"{mid}: {why}; the container here was stopped (the source's recovery)")
            rec = staged.read()
            reply["state"] = (rec or {}).get("state", "unknown")
        if hello.get("release") and rec and not active \
                and rec.get("state") in ("restored", "failed", "done"):
            # the source decided (migrt.migration.recovery): nothing here is needed now
            staged.remove()
            log(f"{mid}: released by the source's recovery ({rec.get('state')})")
        # does the container run here? (migrt.migration.recovery: a staged record is gone once
        # dropped *or* released, so its absence alone cannot say)
        cid, root = hello.get("id"), hello.get("root") or self.root
        if self.privileged and isinstance(cid, str):
            exists = self.privileged.exists(cid, hello.get("root"))
            if exists is not None:
                reply["container_exists"] = exists
        elif isinstance(cid, str) and isinstance(root, str) and stg.valid_cid(cid):
            reply["container_exists"] = os.path.exists(os.path.join(root, cid, "state.json"))
        conn.send_json(reply)


    def _drop(self, conn, hello):
        """The caller gives up a migration before it started (migrt.kube cancels a move):
        a create waiting for it fails at once instead of at its time limit."""
        mid = hello.get("mid")
        if not stg.valid_mid(mid):
            conn.send_json({"error": "bad migration id"})
            return
        with self.lock:
            active = mid in self.sessions
        staged = stg.Staged(mid, self.staging, self.disk)
        rec = staged.read() or {}
        if not active and rec.get("retain") and rec.get("state") == "staged" \
                and hello.get("kept"):
            # a handed-off copy nobody will restore (migrt.kube: the handoff failed and
            # the source runs on, or the pod was made fresh): the caller knows
            staged.remove()
            log(f"{mid}: kept copy dropped ({str(hello.get('why'))[:200]})")
            conn.send_json({"ok": True})
            return
        if active or os.path.exists(os.path.join(self.staging, mid)):
            conn.send_json({"error": f"migration {mid} has started; it cannot be dropped"})
            return
        from migrt.runtime.sources import staged as src
        src.note_dropped(self.staging, mid, str(hello.get("why") or "cancelled")[:200])
        conn.send_json({"ok": True})

    def _addresses(self, rec, mid, state):
        """The IP addresses of migration mid's container here (migrt.kube publishes them
        as its pod's IP before the kubelet does): those of the restored container's
        network namespace, or, while a create waits for it (`awaited`), of the namespace
        its bundle joins (a pod's, made before the migration). None if unknown."""
        from migrt.migration import handover
        try:
            if rec and rec.get("state") in ("restored", fill.FILLING) and rec.get("pid"):
                return handover.addresses(f"/proc/{int(rec['pid'])}/ns/net")
            if state == "awaited":
                from migrt.runtime.sources import staged as src
                with open(src.awaited_path(self.staging, mid)) as f:
                    net = handover.bundle_net(json.load(f)["bundle"])
                return net.get("addresses")
        except (OSError, ValueError, TypeError, KeyError, subprocess.SubprocessError):
            pass
        return None

    def _awaited(self, mid):
        from migrt.runtime.sources import staged as src
        try:
            with open(src.awaited_path(self.staging, mid)) as f:
                pid = int(json.load(f)["pid"])
            os.kill(pid, 0)
            return True
        except (OSError, ValueError, KeyError, TypeError):
            return False

    # ------------------------------------------------------------ source side
    MODES = {"full": [], "precopy": ["--precopy"], "lazy": ["--lazy"],
             "precopy-lazy": ["--precopy", "--lazy"]}

    def _migrate_out(self, conn, hello):
        """Run `migrt migrate` of a container of this node (see the module's doc). The
        run is a process of its own session with its output in files, so that neither
        a dropped caller nor an agent restart stops a migration halfway."""
        msg = conn.read_json()
        cid, mid, to = msg.get("container"), msg.get("mid"), msg.get("to")
        mode = msg.get("mode") or "full"
        if not (stg.valid_cid(cid) and stg.valid_mid(mid) and isinstance(to, str)
                and to.rpartition(":")[2].isdigit() and mode in self.MODES):
            conn.send_json({"error": "migrate needs a container id, a migration id, "
                                     "a destination HOST:PORT and a mode ("
                                     + ", ".join(self.MODES) + ")"})
            return
        if self.privileged:
            conn.send_json({"error": "this agent runs its network side unprivileged "
                                     "(--user): it cannot migrate its containers out"})
            return
        d = os.path.join(os.environ.get("MIGRT_STATE_DIR", "/run/migrt"), "out")
        os.makedirs(d, mode=0o700, exist_ok=True)
        base = os.path.join(d, mid)
        started = os.path.exists(base + ".pid")
        if msg.get("go"):
            # a run started with `hold`: its source, kept frozen since the copy runs on
            # the destination, may go now (migrt.kube: the old pod has left its Job)
            if not started:
                conn.send_json({"error": f"no migration {mid} was started on this node"})
                return
            with open(os.open(base + ".go", os.O_WRONLY | os.O_CREAT, 0o600), "w"):
                pass
            conn.send_json({"ok": True, "done": os.path.exists(base + ".rc")})
            return
        if not started:
            if not msg.get("start", True):
                conn.send_json({"error": f"no migration {mid} was started on this node"})
                return
            root = self.root
            if not os.path.exists(os.path.join(root, cid, "state.json")):
                conn.send_json({"error": f"no container {cid} on this node (runc root {root})",
                                "rc": 3})
                return
            secret = os.path.join(d, "secret")
            if not os.path.exists(secret):
                with open(os.open(secret + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                  0o600), "wb") as f:
                    f.write(self.secret if isinstance(self.secret, bytes)
                            else str(self.secret).encode())
                os.replace(secret + ".tmp", secret)
            argv = [self.runtime, "--root", root, "migrate", cid, "--to", to,
                    "--secret-file", secret, "--json", "--mid", mid,
                    "--restored-file", base + ".restored",
                    "--wait", str(float(msg.get("wait") or 120))] + self.MODES[mode] \
                + (["--handoff"] if msg.get("handoff") else []) \
                + (["--hold-source", base + ".go", "--hold-timeout",
                    str(float(msg["hold"]))] if isinstance(msg.get("hold"), (int, float))
                   and not isinstance(msg.get("hold"), bool) and msg["hold"] > 0 else [])
            with open(os.open(base + ".pid", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                      "w") as f:
                p = subprocess.Popen(
                    ["sh", "-c", 'out=$1; shift; "$@" >"$out.json" 2>"$out.err"; '
                                 'echo $? >"$out.rc.tmp"; mv "$out.rc.tmp" "$out.rc"',
                     "migrate-out", base] + argv,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, start_new_session=True)
                f.write(str(p.pid))
            threading.Thread(target=p.wait, daemon=True).start()     # no zombie
            log(f"{mid}: migrating {cid} out to {to} ({mode})")
        conn.send_json({"ok": True, "started": not started})
        deadline = time.monotonic() + float(msg.get("timeout") or 3600)
        # asked for (`events`), one frame {"event": "restored", ...} before the outcome
        # once the copy runs on the destination (a caller that does not ask gets none)
        events = isinstance(msg.get("events"), list) and "restored" in msg["events"]
        while not os.path.exists(base + ".rc"):
            if events and os.path.exists(base + ".restored"):
                events = False
                try:
                    with open(base + ".restored") as f:
                        note = json.load(f)
                except (OSError, ValueError):
                    note = {}
                note = note if isinstance(note, dict) else {}
                conn.send_json(dict(note, event="restored"))
            if time.monotonic() > deadline:
                conn.send_json({"error": f"migration {mid} still running", "running": True})
                return
            time.sleep(0.02)
        with open(base + ".rc") as f:
            rc = int(f.read().strip() or 1)
        report = None
        try:
            with open(base + ".json") as f:
                report = json.load(f)
        except (OSError, ValueError):
            pass
        err = ""
        try:
            with open(base + ".err", errors="replace") as f:
                lines = [ln.strip() for ln in f if ln.strip().startswith("migrt:")
                         or "Error" in ln]
            err = lines[-1] if lines else ""
        except OSError:
            pass
        reply = {"ok": rc == 0, "rc": rc, "report": report}
        if rc != 0:
            reply["error"] = err or f"migrt migrate exited {rc}"
        conn.send_json(reply)


def make(listen, secret, **kw):
    """An Agent, or SystemExit with one line when its staging dir cannot be a tmpfs."""
    from migrt.agent import stagefs
    try:
        return Agent(listen, secret, **kw)
    except stagefs.StageFsError as e:
        raise SystemExit(f"migrt agent: {e}")


def run(listen, secret, **kw):
    agent = make(listen, secret, **kw)
    try:
        host, port = agent.bind()
        agent.warm()
        agent.start_metrics()
        sys.stdout.write(f"migrt agent listening on {host}:{port}\n")
        sys.stdout.flush()
        agent.serve_until_signalled()
    finally:
        agent.close_staging()
    return 0
