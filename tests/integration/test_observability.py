"""What a node shows about its migrations: the agent's Prometheus metrics (scraped during
a real migration), `migrt logs`, and `migrt demo --json`."""
import json
import os
import re
import subprocess
import threading
import urllib.request

import ocitest
from test_migrate import free_port, two_nodes  # noqa: F401  (the fixture)


def scrape(address):
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"^([a-z_]+)(\{[^}]*\})? (\S+)$", line)
        assert m, f"not exposition format: {line!r}"
        values[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return text, values


def test_agent_metrics_scraped_during_a_real_migration(two_nodes, tmp_path):
    n = two_nodes
    maddr = f"127.0.0.1:{free_port()}"
    ag = n.agent()
    ag.kill()
    ag.argv += ["--metrics", maddr]
    ag.start()
    text, v = scrape(maddr)
    assert v['migrt_migrations_received_total{result="restored"}'] == 0
    assert v["migrt_migrations_in_flight"] == 0
    assert "# TYPE migrt_downtime_seconds histogram" in text

    bundle, out = n.source()
    fp = tmp_path / "fp"
    fp.mkdir()
    seen = {}

    def during():
        # the destination runs the container, the source is not yet released
        ocitest.wait_for(lambda: os.listdir(fp), timeout=60, what="the failpoint")
        seen["text"], seen["v"] = scrape(maddr)
    t = threading.Thread(target=during)
    t.start()
    p, rep = n.migrate(ag, "ctr", bundle=n.dest_bundle(), more_env={
        "MIGRT_FAILPOINTS": "migrate.before-release=pause(4)", "MIGRT_FAILPOINT_DIR": str(fp)})
    t.join(60)
    assert p.returncode == 0, p.stderr + ag.log()
    v = seen["v"]
    assert v["migrt_migrations_in_flight"] == 1, seen["text"]
    assert v["migrt_received_bytes_total"] > 0
    assert v['migrt_staging_bytes{area="tmpfs"}'] > 0
    assert v["migrt_restore_duration_seconds_count"] == 1

    text, v = scrape(maddr)
    assert v["migrt_migrations_in_flight"] == 0
    assert v['migrt_migrations_received_total{result="restored"}'] == 1
    assert v['migrt_migrations_sent_total{mode="full",result="ok"}'] == 1
    assert v['migrt_downtime_seconds_count{mode="full"}'] == 1
    assert abs(v['migrt_downtime_seconds_sum{mode="full"}'] - rep["phases"]["downtime"]) < 1e-3
    assert v['migrt_phase_duration_seconds_count{phase="dump"}'] == 1
    assert v['migrt_sent_bytes_total{kind="wire"}'] == rep["bytes"]["wire"]
    assert v['migrt_downtime_seconds_bucket{le="+Inf",mode="full"}'] == 1

    # a refused migration (no such container) counts as what it is
    p, _ = n.migrate(ag, "nosuch")
    assert p.returncode != 0
    _, v = scrape(maddr)
    sent = {k: x for k, x in v.items() if k.startswith("migrt_migrations_sent_total")}
    assert sum(sent.values()) == 2 and v['migrt_migrations_sent_total{mode="full",result="ok"}'] == 1


def test_progress_on_a_terminal_covers_every_phase(two_nodes):
    """On a terminal, `migrt migrate` shows each phase as it runs: the byte bar ends
    full, and the phases that move no bytes (restore, memory fill) show too."""
    import pty
    n = two_nodes
    ag = n.agent({"MIGRT_LOCAL_FILL_MIN": "0"})     # the fill, even of a busybox's memory
    n.source()
    master, slave = pty.openpty()
    argv = [n.a.binary, "--root", n.a.root, "migrate", "ctr", "--to", ag.address,
            "--secret-file", n.secret, "--bundle", n.dest_bundle(), "--dest-root", n.b.root]
    chunks = []
    reader = threading.Thread(target=lambda: _drain(master, chunks))
    reader.start()
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=slave, text=True, env=n.env,
                       timeout=120)
    os.close(slave)
    reader.join(10)
    os.close(master)
    shown = b"".join(chunks).decode(errors="replace")
    assert p.returncode == 0, shown + ag.log()
    assert "[" + "#" * 30 + "]" in shown, shown            # the bar ends full
    for phase in ("pre-checks", "freeze", "restore on the destination",
                  "release of the source"):
        assert phase in shown, (phase, shown)
    assert "migrated ctr" in p.stdout
    # full mode here restores all but the memory, then fills it in (userfaultfd)
    assert "memory fill on the destination" in shown, shown


def _drain(fd, chunks):
    while True:
        try:
            b = os.read(fd, 4096)
        except OSError:
            return
        if not b:
            return
        chunks.append(b)


def test_demo_json_prints_json_only(migrt_launcher, tmp_path):
    env = dict(os.environ, MIGRT_STATE_DIR=str(tmp_path / "state"))
    p = subprocess.run([migrt_launcher, "demo", "--json"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)          # nothing but the report on stdout
    assert report["counter_after"] > report["counter_before"]
    assert report["phases"]["downtime"] > 0
    assert "node A:" in p.stderr           # the narrative went to stderr


def test_a_staged_migration_exports_as_an_engine_archive(two_nodes, tmp_path):
    """`migrt image export staged:<id>`: the agent's staged copy (memory on tmpfs, rootfs
    changes on disk) as one archive; the marker restores that archive on the node."""
    n = two_nodes
    ag = n.agent()
    n.source()
    argv = [n.a.binary, "--root", n.a.root, "migrate", "ctr", "--to", ag.address,
            "--secret-file", n.secret, "--json", "--wait", "60"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=n.env)
    marker = None
    for line in proc.stderr:
        if "MIGRT_RESTORE_FROM=" in line:
            marker = line.split("with ", 1)[1].split(" ")[0].split("=", 1)[1]
            break
    assert marker and marker.startswith("staged:m-")
    env_b = dict(n.env, MIGRT_STAGING=ag.staging, MIGRT_CHECKPOINT_DIRS=str(tmp_path))
    arc = str(tmp_path / "staged.tar")
    p = subprocess.run([n.b.binary, "image", "export", marker, arc], capture_output=True,
                       text=True, env=env_b, timeout=120)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([n.b.binary, "image", "verify", "--json", arc], capture_output=True,
                       text=True, env=env_b, timeout=120)
    assert p.returncode == 0 and json.loads(p.stdout)["digests"] is True, p.stdout + p.stderr
    # let the migration finish as usual (its own marker), then restore the export as a
    # second copy under another root: the archive alone is enough
    dst = n.dest_bundle()
    ocitest.bundlekit.set_env(dst, "MIGRT_RESTORE_FROM", marker)
    rb = ocitest.Runtime(n.b.binary, n.b.root, env=env_b)
    code, _, derr = rb.create("ctr", dst, start=True)
    assert code == 0, derr.text
    assert proc.wait(60) == 0
    rb.run("kill", "ctr", "KILL")
    ocitest.wait_for(lambda: (rb.state("ctr") or {}).get("status") in (None, "stopped"),
                     what="the first copy stopped")
    rb.run("delete", "--force", "ctr")
    again = n.make_bundle(["sh", "-c", ocitest.COUNTER], name=ocitest.uid("dst2"))
    ocitest.bundlekit.set_env(again, "MIGRT_RESTORE_FROM", arc)
    rc2 = ocitest.Runtime(n.b.binary, str(tmp_path / "root-c"), env=env_b)
    try:
        code, out, derr = rc2.create("ctr2", again, start=True)
        assert code == 0, derr.text
        ocitest.wait_for(lambda: ocitest.last_count(out) > 0, timeout=20,
                         what="the counter restored from the exported archive")
    finally:
        rc2.cleanup()
