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
