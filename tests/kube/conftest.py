"""Fixtures of the Kubernetes tier: one real two-node cluster for the whole session.

The first run on a machine builds Kubernetes (packaging/build-kubernetes.sh, ~14 min on 2
cores; later runs find it built). The migrt runtime handler of both nodes calls a small
wrapper that appends each argv to a log and execs the launcher under test, so a test can
tell which containers went through migrt and which did not.
"""
import os
import shutil
import stat
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cluster as kc  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        if f"{os.sep}kube{os.sep}" in str(item.fspath):
            item.add_marker(pytest.mark.kube)


@pytest.fixture(scope="session")
def kube_images(workdir, rootfs):
    return [kc.harness.oci_layout_tar(rootfs, str(workdir / "kube-busybox-oci.tar")),
            kc.harness.oci_layout_tar(rootfs, str(workdir / "kube-pause-oci.tar"),
                                      name=kc.PAUSE_IMAGE, cmd=kc.harness.PAUSE_CMD)]


@pytest.fixture(scope="session")
def migrt_calls_log(workdir):
    return str(workdir / "kube-migrt-calls.log")


@pytest.fixture(scope="session")
def traced_migrt(workdir, migrt_launcher, migrt_calls_log):
    """The migrt handler's binary: logs its argv, then execs migrt."""
    wrapper = workdir / "kube-migrt-traced"
    wrapper.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {migrt_calls_log}\n"
                       f"exec {migrt_launcher} \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return str(wrapper)


@pytest.fixture(scope="session")
def kube(workdir, migrt_launcher, traced_migrt, kube_images):
    need = [t for t in ("containerd", "containerd-shim-runc-v2", "ctr", "ip") if not shutil.which(t)]
    if need:
        pytest.skip(f"requires {', '.join(need)}")
    t0 = time.monotonic()
    bin_dir = kc.ensure_built(str(workdir / "build-kubernetes.log"))
    build_s = time.monotonic() - t0
    c = kc.Cluster(kc.make_base(), bin_dir, migrt_launcher, kube_images,
                   handler_binary=traced_migrt)
    c.start()
    c.timings["build_s"] = round(build_s, 1)
    sys.stderr.write(f"\nkube cluster: {c.timings}\n")
    yield c
    c.stop()
