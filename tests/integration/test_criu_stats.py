"""migrt.criu.stats reads CRIU's own stats images: checked against what CRIU itself
prints for the same dump and restore (--display-stats), on a real process."""
import os
import re
import signal
import subprocess
import time

import pytest

from migrt.criu import stats
from migrt.runc import criu_path


def displayed(text):
    """CRIU's --display-stats lines: {"Frozen time": 26632, "Memory pages written": 59}."""
    out = {}
    for m in re.finditer(r"^([A-Za-z][A-Za-z ]+): (\d+)", text, re.M):
        out[m.group(1)] = int(m.group(2))
    return out


@pytest.fixture
def loop_process(tmp_path):
    """One process (no children: its pid alone must be free again for the restore) with
    a MiB of its own memory, in its own session, its stdio on /dev/null."""
    p = subprocess.Popen(["/usr/bin/python3", "-I", "-S", "-c",
                          "import time\nb = bytearray(range(256)) * 4096\n"
                          "while 1: time.sleep(0.05)"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    pids = [p.pid]
    yield p, pids
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    p.wait()


def test_decoder_matches_what_criu_displays(tmp_path, loop_process):
    proc, pids = loop_process
    time.sleep(0.3)                 # past its start-up
    img = tmp_path / "img"
    img.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    criu = criu_path()
    d = subprocess.run([criu, "dump", "-t", str(proc.pid), "-D", str(img), "-W", str(work),
                        "-o", "dump.log", "-v4", "--display-stats"],
                       capture_output=True, text=True, timeout=60)
    assert d.returncode == 0, d.stdout + d.stderr
    shown = displayed(d.stdout + d.stderr)
    assert (work / "stats-dump").exists(), "CRIU writes its stats into its work dir"
    got = stats.read([str(work)], "dump")
    assert got["freezing_s"] == shown["Freezing time"] / 1e6
    assert got["frozen_s"] == shown["Frozen time"] / 1e6
    assert got["memdump_s"] == shown["Memory dump time"] / 1e6
    assert got["memwrite_s"] == shown["Memory write time"] / 1e6
    assert got["pages_scanned"] == shown["Memory pages scanned"]
    assert got["pages_written"] == shown["Memory pages written"] > 0
    # what was written is in the page images, page for page
    pages = sum(os.path.getsize(img / n) for n in os.listdir(img) if n.startswith("pages-"))
    assert pages == got["pages_written"] * 4096
    span = stats.log_span(str(work / "dump.log"))
    assert span is not None and got["freezing_s"] + got["frozen_s"] <= span + 1e-3

    proc.wait()     # dumped: CRIU ended it
    r = subprocess.run([criu, "restore", "-D", str(img), "-W", str(work), "-o", "restore.log",
                        "-v4", "--display-stats", "-d", "--pidfile", str(tmp_path / "pid")],
                       capture_output=True, text=True, timeout=60)
    try:
        pids.append(int((tmp_path / "pid").read_text()))
    except (OSError, ValueError):
        pass
    assert r.returncode == 0, r.stdout + r.stderr
    shown = displayed(r.stdout + r.stderr)
    got = stats.read([str(work)], "restore")
    assert got["restore_s"] == shown["Restore time"] / 1e6
    assert got["forking_s"] == shown["Forking time"] / 1e6
    assert got["pages_restored"] == shown["Pages restored"] > 0
    assert got["pages_compared"] == shown["Pages compared"]
    assert got["pages_skipped_cow"] == shown["Pages skipped COW"]
    span = stats.log_span(str(work / "restore.log"))
    assert span is not None and got["forking_s"] <= got["restore_s"] <= span + 1e-3


def test_not_a_stats_image_is_refused(tmp_path):
    bad = tmp_path / "stats-dump"
    bad.write_bytes(b"\x19\x43\x56\x54" + b"\0" * 20)
    with pytest.raises(stats.StatsError):
        stats.decode(bad.read_bytes())
    assert stats.read([str(tmp_path)], "dump") is None
    assert stats.log_span(str(tmp_path / "none.log")) is None
