"""packaging/install.sh on fresh Debian 12 and 13 roots, as a node operator runs it
(MIGRT_NO_TEST_DEPS=1), in a chroot: packaging/check-fresh-install.sh unpacks a pristine
minbase root (debootstrapped once per machine, cached under /opt/migrt/test/roots),
runs the install and compares `dpkg-query -W` and /etc/os-release before and after.

What a node operator checks: the install only ADDS packages (nothing upgraded,
downgraded or removed, the release is still the release), CRIU 4.2.1 answers at
/usr/local/sbin/criu, migrt answers, and apt's sources name no other release. Needs the
Debian mirror. Each root takes a few minutes (most of it the CRIU and, on Debian 12,
Python builds): the report's timings are printed."""
import json
import os
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "..", "packaging", "check-fresh-install.sh")


@pytest.mark.parametrize("release,python", [("bookworm", "3.13"), ("trixie", "3.13")])
def test_install_on_a_fresh_root_only_adds_packages(release, python, tmp_path):
    report = tmp_path / "report.json"
    p = subprocess.run(["bash", SCRIPT, release, str(report)], capture_output=True,
                       text=True, timeout=3600)
    print(p.stderr)
    assert report.exists(), p.stderr[-3000:]
    r = json.loads(report.read_text())
    print(f"{release}: root {r['seconds']['root']} s (cached: {r['root_cached']}), "
          f"install.sh {r['seconds']['install']} s, {len(r['added'])} packages added")
    assert r["install_exit"] == 0, p.stderr[-3000:]
    assert r["changed"] == [], "install.sh upgraded or downgraded packages"
    assert r["removed"] == [], "install.sh removed packages"
    assert r["os_release_unchanged"]
    assert r["other_suites"] == []
    assert r["criu_version"] == "4.2.1"
    assert r["migrt_version"]
    assert r["venv_python"].startswith(python)
    added = {a.split(":")[0].split("=")[0] for a in r["added"]}
    assert {"runc", "iptables"} <= added
    # the CRIU build's tools were purged again; the libraries criu loads stayed
    assert not added & {"gcc", "protobuf-compiler", "libprotobuf-dev", "make"}
    assert {"libprotobuf-c1", "libnet1"} <= added
    # and the distribution's own criu (Debian 13's runc recommends it) stays out
    assert "criu" not in added
    assert r["failures"] == [] and p.returncode == 0
