"""Downtime of `migrt migrate` (full, pre-copy, lazy) against the floors, on this machine.

    /opt/migrt/venv/bin/python tests/bench/bench_migrate.py [--sizes 256,1024] [--markdown]

For each memory size a static C workload (memtouch.c) touches that much memory in a
busybox container; then, one after the other:

- runc floor: plain `runc checkpoint` to tmpfs, then `runc restore` from it (no transfer);
- runc with the source kept: `runc pause`, `runc checkpoint --leave-running`, `runc restore
  --auto-dedup`, then delete the source: what migrt must do by design even if the
  transfer cost nothing (the source stays until the copy runs; memory is not doubled);
- migrt full (defaults) / full with zstd level 1 forced / precopy / lazy / precopy-lazy
  (`--precopy --lazy`): `migrt migrate --json` to an agent on
  loopback (two runc roots), downtime = freeze until the destination runs the container;
- podman: `podman container checkpoint --export` + `podman container restore --import`.

--criu LABEL=PATH[,LABEL=PATH...] runs every migrt mode once per CRIU build given (migrate,
its agent and the runc they start use that `criu`, see MIGRT_CRIU), in the same rounds:
before/after figures of a CRIU change on the same machine at the same time. For lazy
mode the notes give when the last page was served and the source released (seconds
after the restore), the page arrival rate (the workload's memory over that time) and
the workload's rounds per second from the migrate command's start to the source's
release, against the same figure measured just before it (memtouch does 10 a second
when nothing slows it), and the CPU each end of the page stream used per GiB (the
source's CRIU, which dumps and then serves the pages, and the destination's lazy-pages
daemon): with each end on a core of its own, the slower end bounds the rate.

--env LABEL=VAR=VALUE[+VAR=VALUE],... does the same with environments instead of builds
(`--env frames=,records=MIGRT_PAGE_FRAMES=0`). --stream-floor also moves the memory, each
round, the way tests/bench/streamfloor.c does: the stream's unavoidable work (read the
stopped task, AES-128-GCM, loopback TCP, decrypt, UFFDIO_COPY), without CRIU or a
workload; each lazy run's arrival is then given as a ratio to the floor of its own round,
which this VM's varying speed (the same work takes 1.5 times as long from one hour to
the next) moves alike.

Prints one table (markdown with --markdown) and the raw reports as JSON on stderr.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import ocitest  # noqa: E402
from migrt.runtime import bundlekit  # noqa: E402


def build_workload(dest):
    out = os.path.join(dest, "memtouch")
    subprocess.run(["gcc", "-O2", "-static", "-o", out, os.path.join(HERE, "memtouch.c")],
                   check=True)
    return out


class CriuCpu(ocitest.Sampler):
    """CPU seconds of the two ends of a lazy migration's page stream: the source's CRIU
    (its page server, under the title "criu: dump") and the destination's `criu
    lazy-pages`, read from /proc every 50 ms while they run (so up to 50 ms of each
    end's last moments is not counted)."""

    ROLES = ((b"criu: dump", "page_server"), (b"lazy-pages", "lazy_pages_daemon"))

    def __init__(self):
        super().__init__()
        self.last = {}
        self.threads = {}
        self.hz = os.sysconf("SC_CLK_TCK")

    def sample(self):
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read(200)
                role = next((r for k, r in self.ROLES if k in cmd), None)
                if role is None:
                    continue
                total = self._cpu(f"/proc/{pid}/stat")
                # a thread that ended before its process is not listed any more
                seen = self.threads.setdefault(pid, {})
                for tid in os.listdir(f"/proc/{pid}/task"):
                    try:
                        seen[tid] = max(seen.get(tid, 0),
                                        self._cpu(f"/proc/{pid}/task/{tid}/stat"))
                    except OSError:
                        pass
                self.last[pid] = (role, total, max(seen.values(), default=0))
            except OSError:
                pass

    def _cpu(self, stat_path):
        """utime + stime of a /proc stat file, in seconds."""
        with open(stat_path) as f:
            st = f.read().rsplit(")", 1)[1].split()
        return (int(st[11]) + int(st[12])) / self.hz

    def seconds(self):
        """{role: CPU seconds, role + "_thread": its busiest thread's}: with both ends
        of the stream on one machine, their sum is what the cores must give; on nodes
        of their own, the busiest thread bounds each end."""
        out = {}
        for role, t, busiest in self.last.values():
            out[role] = round(out.get(role, 0) + t, 2)
            out[role + "_thread"] = round(max(out.get(role + "_thread", 0), busiest), 2)
        return out


class Bench:
    def __init__(self, work, migrt):
        self.work = work
        self.migrt = migrt
        self.rootfs = bundlekit.make_rootfs(os.path.join(work, "rootfs"))
        shutil.copy(build_workload(work), os.path.join(self.rootfs, "bin", "memtouch"))
        self.n = 0
        self.env = dict(os.environ, MIGRT_STATE_DIR=os.path.join("/dev/shm", os.path.basename(work)))

    def bundle(self, mib, tag):
        self.n += 1
        name = f"{tag}-{self.n}"
        return bundlekit.make_bundle(os.path.join(self.work, name), ["/bin/memtouch", str(mib), "5"],
                                     rootfs=self.rootfs, cgroups_path=f"/migrt-bench/{name}")

    def start(self, rt, cid, mib):
        b = self.bundle(mib, "src")
        code, out, err = rt.create(cid, b, start=True)
        assert code == 0, err.text
        ocitest.wait_for(lambda: "ready" in out.text, timeout=120, what="workload ready")
        time.sleep(0.5)
        return b, out

    # ------------------------------------------------------------ floors
    def runc_floor(self, mib, keep_source=False):
        """Plain runc, no transfer. keep_source: what any migration that keeps its promise
        must do even with a free transfer: the source frozen and kept until the copy runs
        (runc pause, checkpoint --leave-running, delete after), and the memory not
        doubled meanwhile (restore --auto-dedup, as the agent restores)."""
        ra = ocitest.Runtime("runc", os.path.join(self.work, "runc-a"))
        rb = ocitest.Runtime("runc", os.path.join(self.work, "runc-b"))
        try:
            b, out = self.start(ra, "w", mib)
            img = tempfile.mkdtemp(dir="/dev/shm", prefix="bench-img-")
            t0 = time.monotonic()
            if keep_source:
                assert ra.run("pause", "w").returncode == 0
                p = ra.run("checkpoint", "--leave-running", "--image-path", img,
                           "--work-path", img, "w")
            else:
                p = ra.run("checkpoint", "--image-path", img, "--work-path", img, "w")
            t1 = time.monotonic()
            assert p.returncode == 0, p.stderr
            dst = self.bundle(mib, "dst")
            for d in ("data", "tmp"):
                shutil.rmtree(os.path.join(dst, "rootfs", d))
                shutil.copytree(os.path.join(b, "rootfs", d), os.path.join(dst, "rootfs", d))
            t2 = time.monotonic()
            code, _, err = self._restore(rb, "w", dst, img,
                                         ["--auto-dedup"] if keep_source else [])
            t3 = time.monotonic()
            assert code == 0, err
            if keep_source:
                ra.run("delete", "--force", "w")
            size = sum(os.path.getsize(os.path.join(img, f)) for f in os.listdir(img))
            shutil.rmtree(img, ignore_errors=True)
            return {"checkpoint": t1 - t0, "restore": t3 - t2, "downtime": (t1 - t0) + (t3 - t2),
                    "image_bytes": size}
        finally:
            ra.cleanup()
            rb.cleanup()

    def _restore(self, rt, cid, bundle, img, extra=()):
        out_r, out_w = os.pipe()
        in_r, in_w = os.pipe()
        p = subprocess.run(["runc", "--root", rt.root, "restore", "--detach", "--image-path", img,
                            "--work-path", img, "--bundle", bundle, *extra, cid],
                           stdin=in_r, stdout=out_w, stderr=out_w)
        os.close(out_w)
        os.close(in_r)
        o = ocitest.Output(out_r)
        return p.returncode, None, o.text

    # ------------------------------------------------------------ migrt
    def count(self, rt):
        """memtouch's round counter in the container (None if unreadable just now)."""
        c = rt.exec_out("w", "cat", "/tmp/count").strip()
        return int(c) if c.isdigit() else None

    def migrt_run(self, mib, extra, criu=None, more_env=None):
        env = dict(self.env, MIGRT_CRIU=criu) if criu else self.env
        if more_env:
            env = dict(env, **more_env)
        ra = ocitest.Runtime(self.migrt, os.path.join(self.work, f"m-a-{self.n}"), env=env)
        rb = ocitest.Runtime(self.migrt, os.path.join(self.work, f"m-b-{self.n}"), env=env)
        secret = os.path.join(self.work, "secret")
        if not os.path.exists(secret):
            with open(os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(os.urandom(24).hex())
        agent = subprocess.Popen(
            [self.migrt, "--root", rb.root, "agent", "--listen", "127.0.0.1:0", "--secret-file",
             secret, "--staging", os.path.join(self.env["MIGRT_STATE_DIR"], "staged"),
             "--disk", os.path.join(self.work, "disk"), "--log-dir", os.path.join(self.work, "logs")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        try:
            addr = agent.stdout.readline().decode().split()[-1]
            b, out = self.start(ra, "w", mib)
            dst = self.bundle(mib, "dst")
            # the workload's pace undisturbed, then during the migration (until the
            # source is released), from its counter
            c0, t0 = self.count(ra), time.monotonic()
            time.sleep(2)
            c1, t1 = self.count(ra), time.monotonic()
            before = os.times()
            with CriuCpu() as ends:
                p = subprocess.run([self.migrt, "--root", ra.root, "migrate", "w", "--to", addr,
                                    "--secret-file", secret, "--bundle", dst, "--dest-root",
                                    rb.root, "--json"] + extra, capture_output=True, text=True,
                                   env=env, timeout=600)
            after = os.times()
            t2 = time.monotonic()
            if p.returncode != 0:
                return {"error": p.stderr.strip()[-300:]}
            rep = json.loads(p.stdout)
            c2 = self.count(rb)
            if None not in (c0, c1, c2):
                rep["workload_rounds_per_s"] = {"before": round((c1 - c0) / (t1 - t0), 1),
                                                "during": round((c2 - c1) / (t2 - t1), 1)}
            if "--lazy" in extra:
                rep["cpu_stream_ends_s"] = ends.seconds()
            rep["cpu_migrate_s"] = round((after.children_user - before.children_user)
                                         + (after.children_system - before.children_system), 2)
            # the workload rewrites the file (truncate, then write): a read may catch it
            # empty, so look again
            rep["counter_on_destination"] = ocitest.wait_for(
                lambda: int(c) if (c := rb.exec_out("w", "cat", "/tmp/count").strip()).isdigit()
                else None, timeout=10, what="the counter on the destination")
            return rep
        finally:
            agent.terminate()
            agent.wait(30)
            ra.cleanup()
            rb.cleanup()

    # ------------------------------------------------------------ podman
    def podman(self, mib):
        if not shutil.which("podman"):
            return {"error": "podman not installed"}
        tag = "localhost/migrt-bench-memtouch:latest"
        tar = os.path.join(self.work, "rootfs.tar")
        if not os.path.exists(tar):
            subprocess.run(["tar", "-C", self.rootfs, "-cf", tar, "."], check=True)
            subprocess.run(["podman", "import", tar, tag], check=True, capture_output=True)
        name = f"migrt-bench-{os.getpid()}"
        subprocess.run(["podman", "rm", "-f", name], capture_output=True)
        p = subprocess.run(["podman", "run", "-d", "--name", name, "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096",
                            "--network", "none", tag, "/bin/memtouch", str(mib), "5"],
                           capture_output=True, text=True)
        if p.returncode != 0:
            return {"error": p.stderr.strip()[-300:]}
        try:
            ocitest.wait_for(lambda: "ready" in subprocess.run(
                ["podman", "logs", name], capture_output=True, text=True).stdout,
                timeout=120, what="podman workload")
            time.sleep(0.5)
            exp = os.path.join("/dev/shm", f"{name}.tar")
            t0 = time.monotonic()
            c = subprocess.run(["podman", "container", "checkpoint", "--export", exp, name],
                               capture_output=True, text=True)
            t1 = time.monotonic()
            if c.returncode != 0:
                return {"error": c.stderr.strip()[-300:]}
            subprocess.run(["podman", "rm", "-f", name], capture_output=True)
            t2 = time.monotonic()
            r = subprocess.run(["podman", "container", "restore", "--import", exp],
                               capture_output=True, text=True)
            t3 = time.monotonic()
            if r.returncode != 0:
                return {"error": r.stderr.strip()[-300:]}
            size = os.path.getsize(exp)
            os.unlink(exp)
            return {"checkpoint": t1 - t0, "restore": t3 - t2, "downtime": (t1 - t0) + (t3 - t2),
                    "image_bytes": size}
        finally:
            subprocess.run(["podman", "rm", "-f", name], capture_output=True)


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _spread(xs):
    return f" (runs: {', '.join('%.2f' % x for x in xs)})" if len(xs) > 1 else ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--modes", default="full,full-z1,precopy,lazy")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds (floor, then every mode) per size; the table shows medians")
    ap.add_argument("--no-podman", action="store_true")
    ap.add_argument("--no-kept", action="store_true",
                    help="skip the runc floor with the source kept (pause, --leave-running)")
    ap.add_argument("--no-floor", action="store_true",
                    help="skip the runc floor (at 8 GiB it needs twice the memory on tmpfs)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--criu", default="",
                    help="LABEL=PATH,...: run each migrt mode with each of these CRIU builds")
    ap.add_argument("--env", default="",
                    help="LABEL=VAR=VALUE[+VAR=VALUE],...: run each migrt mode in each of these "
                    "environments, for migrate and the agent (LABEL= alone: unchanged), e.g. "
                    "frames=,records=MIGRT_PAGE_FRAMES=0")
    ap.add_argument("--stream-floor", action="store_true",
                    help="each round, also move the memory as tests/bench/streamfloor.c does "
                    "(read, AES-128-GCM, loopback TCP, decrypt, UFFDIO_COPY: the stream's "
                    "unavoidable work, no CRIU, no workload), and give lazy rows their ratio "
                    "to it, round by round")
    ap.add_argument("--warm-mib", type=int, default=0,
                    help="before every case, fill and free this much memory (uffdfill.c): "
                    "on a VM that hands free memory back to its host, new memory costs a "
                    "host fault per page until it was used again lately; this takes that "
                    "cost out of every case alike (see bench_memfloor.py)")
    args = ap.parse_args()
    variants = [tuple(v.split("=", 1)) for v in args.criu.split(",") if v]
    envs = []
    for v in (e for e in args.env.split(",") if e):
        label, _, rest = v.partition("=")
        pairs = [kv.split("=", 1) for kv in rest.split("+") if kv]
        if not label or any(len(kv) != 2 for kv in pairs):
            ap.error(f"--env {v}: LABEL=VAR=VALUE[+VAR=VALUE]")
        envs.append((label, dict(pairs)))
    if variants and envs:
        ap.error("--criu and --env: one or the other")
    for label, path in variants:
        if os.path.basename(path) != "criu" or not os.access(path, os.X_OK):
            ap.error(f"--criu {label}={path}: must be an executable file named criu")
    work = tempfile.mkdtemp(prefix="migrt-bench-", dir="/var/tmp")
    migrt = ocitest.build_launcher(os.path.join(work, "migrt"))
    b = Bench(work, migrt)
    filler = None
    if args.warm_mib:
        filler = os.path.join(work, "uffdfill")
        subprocess.run(["gcc", "-O2", "-o", filler, os.path.join(HERE, "uffdfill.c")], check=True)
    streamfloor = None
    if args.stream_floor:
        streamfloor = os.path.join(work, "streamfloor")
        subprocess.run(["gcc", "-O2", "-o", streamfloor, os.path.join(HERE, "streamfloor.c"),
                        "-lcrypto"], check=True)

    def stream_floor(mib):
        out = subprocess.run([streamfloor, str(mib), "1"], capture_output=True, text=True,
                             check=True).stdout
        line = [ln for ln in out.splitlines() if ln.startswith("round 1:")][0]
        return float(line.split()[2])

    def warm():
        if filler:
            subprocess.run([filler, str(args.warm_mib // 2 * 2 or 2), "2048"], check=True,
                           capture_output=True)
    # full: the defaults (--zstd-level auto picks 0 for an agent on this machine)
    extra = {"full": [], "full-z1": ["--zstd-level", "1"], "full-z0": ["--zstd-level", "0"],
             "full-z3": ["--zstd-level", "3"], "full-zfast": ["--zstd-level", "-5"],
             "precopy": ["--precopy"], "lazy": ["--lazy"],
             "precopy-lazy": ["--precopy", "--lazy"]}
    # (row name, mode, CRIU path or None, environment or None)
    modes = [(m if not variants else f"{m}, criu {label}", m, path, None)
             for m in args.modes.split(",") for label, path in (variants or [(None, None)])]
    if envs:
        modes = [(f"{m}, {label}", m, None, env) for m in args.modes.split(",")
                 for label, env in envs]
    rows, raw = [], {}
    try:
        for mib in [int(s) for s in args.sizes.split(",")]:
            # rounds interleave the methods, so that a noisy minute hits all of them alike
            floors, kept, reps = [], [], {m[0]: [] for m in modes}
            streams = []
            for r in range(args.repeat):
                if streamfloor:
                    warm()
                    streams.append(stream_floor(mib))
                if not args.no_floor:
                    warm()
                    floors.append(b.runc_floor(mib))
                if not args.no_kept:
                    warm()
                    kept.append(b.runc_floor(mib, keep_source=True))
                for name, mode, criu, env in modes:
                    warm()
                    reps[name].append(b.migrt_run(mib, extra[mode], criu, env))
                    if streams:
                        reps[name][-1]["stream_floor_s"] = streams[-1]
            floor = None
            if floors:
                raw[f"{mib}-runc"] = floors
                fd = [x["downtime"] for x in floors]
                floor = _median(fd)
                rows.append((mib, "runc checkpoint + restore (tmpfs, no transfer)", floor,
                             None, floors[0]["image_bytes"], None, None,
                             f"checkpoint {_median([x['checkpoint'] for x in floors]):.2f}s, "
                             f"restore {_median([x['restore'] for x in floors]):.2f}s"
                             + _spread(fd)))
            if kept:
                raw[f"{mib}-runc-kept"] = kept
                kd = [x["downtime"] for x in kept]
                rows.append((mib, "runc, source kept (pause, checkpoint --leave-running, "
                             "restore --auto-dedup; no transfer)", _median(kd),
                             _median(kd) / floor if floor else None, kept[0]["image_bytes"], None, None,
                             f"checkpoint {_median([x['checkpoint'] for x in kept]):.2f}s, "
                             f"restore {_median([x['restore'] for x in kept]):.2f}s; the least "
                             f"a migration that keeps the source until the copy runs can "
                             f"do" + _spread(kd)))
            if streams:
                raw[f"{mib}-stream-floor"] = streams
                sf = _median(streams)
                rows.append((mib, "stream floor (streamfloor.c: process_vm_readv, AES-128-GCM, "
                             "loopback TCP, decrypt, UFFDIO_COPY; one thread per end, no "
                             "workload)", None, None, None, None, (mib << 20) / 1e6 / sf,
                             f"all the memory moved in {sf:.2f}s (median; "
                             + ", ".join(f"{x:.2f}" for x in streams) + ")"))
            for name, mode, _, _ in modes:
                raw[f"{mib}-{name}"] = reps[name]
                bad = [x["error"] for x in reps[name] if "error" in x]
                good = [x for x in reps[name] if "error" not in x]
                if bad:
                    rows.append((mib, f"migrt migrate ({name})", None, None, None, None, None,
                                 f"FAILED {len(bad)} of {len(reps[name])}: " + bad[0][:120]))
                    if not good:
                        continue
                dts = [x["phases"]["downtime"] for x in good]
                med = _median(dts)
                rep = min(good, key=lambda x: abs(x["phases"]["downtime"] - med))
                ph, by = rep["phases"], rep["bytes"]
                note = (f"dump {ph['dump']:.2f}s, restore {ph['restore']:.2f}s, "
                        f"after-dump transfer {ph.get('transfer_after_dump', 0):.2f}s, "
                        f"zstd level {rep.get('zstd_level')}, "
                        f"compress CPU {rep.get('cpu_compress_s', 0):.1f}s, "
                        f"migrate CPU {rep['cpu_migrate_s']:.1f}s")
                if mode == "precopy":
                    note += (f"; round 1: {by.get('image_precopy', 0) / 1e6:.0f} MB, "
                             f"frozen {ph.get('precopy_dump_freeze', 0):.2f}s while dumped")
                if mode == "precopy-lazy":
                    same = _median([x.get("lazy_pages_from_precopy", 0) for x in good])
                    sent = _median([x.get("lazy_pages_sent", 0) for x in good])
                    note += (f"; pre-copy {by.get('image_precopy', 0) / 1e6:.0f} MB while it "
                             f"ran ({ph.get('precopy', 0):.2f}s), {rep.get('lazy_precopy')}; "
                             f"after the restore {same * 4096 / 1e6:.0f} MB taken from it, "
                             f"{sent * 4096 / 1e6:.0f} MB sent (medians)")
                if mode in ("lazy", "precopy-lazy"):
                    served = [x["phases"].get("pages_served_after_restore") for x in good]
                    served = _median([x for x in served if x is not None] or [0])
                    rel = _median([x["phases"].get("source_released_after_restore", 0)
                                   for x in good])
                    note += (f"; pages served {served:.2f}s after the restore (median; "
                             f"{(mib << 20) / 1e6 / max(served, 1e-3):.0f} MB/s), source "
                             f"released {rel:.2f}s after it")
                    ratios = [x["phases"]["pages_served_after_restore"] / x["stream_floor_s"]
                              for x in good if x.get("stream_floor_s")
                              and x["phases"].get("pages_served_after_restore")]
                    if ratios:
                        note += (f" ({_median(ratios):.2f}x the stream floor of its round, "
                                 f"median)")
                    ends = [x["cpu_stream_ends_s"] for x in good if "cpu_stream_ends_s" in x]
                    if ends:
                        gib = max(mib / 1024, 1 / 1024)
                        def per_gib(key):
                            return _median([e.get(key, 0) for e in ends]) / gib
                        note += (f"; CPU per GiB: page server {per_gib('page_server'):.2f}s "
                                 f"(busiest thread {per_gib('page_server_thread'):.2f}s), "
                                 f"lazy-pages daemon {per_gib('lazy_pages_daemon'):.2f}s "
                                 f"(busiest thread {per_gib('lazy_pages_daemon_thread'):.2f}s)")
                    rates = [x["workload_rounds_per_s"] for x in good
                             if "workload_rounds_per_s" in x]
                    if rates:
                        note += (f"; workload {_median([r['during'] for r in rates]):.1f} "
                                 f"rounds/s from the migrate's start to the release "
                                 f"({_median([r['before'] for r in rates]):.1f} before)")
                elif "fill_after_restore" in ph:
                    # running once restored; the memory came in from the destination's
                    # staged copy after that, before the source went
                    note += (f"; memory filled in {ph['fill_after_restore']:.2f}s after the "
                             f"restore")
                rows.append((mib, f"migrt migrate ({name})", med, med / floor if floor else None, by.get("image"),
                             by.get("wire"), rep.get("throughput_MBps"), note + _spread(dts)))
            if not args.no_podman:
                pod = b.podman(mib)
                raw[f"{mib}-podman"] = pod
                if "error" in pod:
                    rows.append((mib, "podman checkpoint --export + restore --import", None, None,
                                 None, None, None, "FAILED: " + pod["error"][:120]))
                else:
                    rows.append((mib, "podman checkpoint --export + restore --import",
                                 pod["downtime"], pod["downtime"] / floor if floor else None,
                                 pod["image_bytes"], None, None,
                                 f"checkpoint {pod['checkpoint']:.2f}s, restore {pod['restore']:.2f}s"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(b.env["MIGRT_STATE_DIR"], ignore_errors=True)
    json.dump(raw, sys.stderr, indent=1)
    sys.stderr.write("\n")
    f = lambda v, fmt: (fmt % v) if v is not None else "-"  # noqa: E731
    if args.markdown:
        print("| memory | method | downtime (s), median | vs runc floor | image (MB) | on the wire (MB) | MB/s | notes |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} MiB | {r[1]} | {f(r[2], '%.2f')} | {f(r[3], '%.2fx')} | "
                  f"{f(r[4] and r[4] / 1e6, '%.0f')} | {f(r[5] and r[5] / 1e6, '%.0f')} | "
                  f"{f(r[6], '%.0f')} | {r[7]} |")
    else:
        for r in rows:
            print(f"{r[0]:>5} MiB  {r[1]:<48} {f(r[2], '%6.2f')} s  {f(r[3], '%5.2fx')}  "
                  f"image {f(r[4] and r[4] / 1e6, '%6.0f')} MB  wire {f(r[5] and r[5] / 1e6, '%6.0f')} MB  "
                  f"{f(r[6], '%5.0f')} MB/s  {r[7]}")


if __name__ == "__main__":
    main()
