"""Fixtures of the end-to-end tier: a private containerd per test, busybox images, a
checkpoint directory migrt accepts, and a tracing wrapper that shows which calls reached
migrt."""
import os
import shutil
import stat
import sys
import tempfile
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


def pytest_generate_tests(metafunc):
    """`containerd_version`: every containerd build on this machine (see harness)."""
    if "containerd_version" in metafunc.fixturenames:
        builds = sorted(harness.containerd_builds()) or ["none"]
        metafunc.parametrize("containerd_version", builds)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if f"{os.sep}e2e{os.sep}" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def images(workdir, rootfs):
    """OCI layout tarballs: the busybox image and the CRI sandbox ("pause") image."""
    need = [t for t in ("containerd", "ctr", "containerd-shim-runc-v2") if not shutil.which(t)]
    if need:
        pytest.skip(f"requires containerd ({', '.join(need)} not found)")
    return {
        "busybox": harness.oci_layout_tar(rootfs, str(workdir / "busybox-oci.tar")),
        "pause": harness.oci_layout_tar(rootfs, str(workdir / "pause-oci.tar"),
                                        name=harness.PAUSE_IMAGE, cmd=harness.PAUSE_CMD),
    }


@pytest.fixture
def start_containerd(images, migrt_launcher):
    """start_containerd(binary=migrt, mode="register", cri=False) -> a running Containerd.

    Socket, root and state live under a fresh dir in /run (short socket paths); the
    containerd, its tasks, shims, mounts and dirs are all gone after the test.
    """
    started = []

    def start(binary=None, mode="register", cri=False, namespace="migrt-e2e", env=None,
              version=None, **kw):
        base = tempfile.mkdtemp(prefix="migrt-ctrd-", dir="/run")
        if version is not None:
            kw["bin_dir"] = harness.containerd_builds()[version]
        c = harness.Containerd(base, binary or migrt_launcher, mode=mode,
                               namespace=namespace, env=env, **kw)
        started.append(c)
        c.start()
        c.import_image(images["busybox"])
        if cri:
            c.import_image(images["busybox"], namespace="k8s.io")
            c.import_image(images["pause"], namespace="k8s.io")
        return c
    yield start
    for c in started:
        c.stop()


@pytest.fixture
def checkpoint_dir():
    """A directory under /run/migrt, where migrt accepts markers by default."""
    d = os.path.join("/run/migrt", "e2e-" + uuid.uuid4().hex[:8])
    os.makedirs(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def traced(tmp_path, migrt_launcher):
    """A wrapper that records every argv it gets, then execs migrt: (path, read_calls)."""
    log = tmp_path / "calls.log"
    wrapper = tmp_path / "migrt-traced"
    wrapper.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {log}\nexec {migrt_launcher} \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)

    def calls():
        if not log.exists():
            return []
        out = []
        for line in log.read_text().splitlines():
            words = line.split()
            # the subcommand: first word that is not a global flag or its value
            i = 0
            while i < len(words) and words[i].startswith("-"):
                i += 1 if "=" in words[i] or words[i] in ("--debug", "--systemd-cgroup") else 2
            out.append(words[i] if i < len(words) else "")
        return out
    return str(wrapper), calls


@pytest.fixture
def front(tmp_path, migrt_launcher):
    """migrt/front/front.sh (the proposed shell front door) in front of migrt's launcher."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(repo, "migrt", "front", "front.sh")) as f:
        text = f.read().replace("@PY_LAUNCHER@", migrt_launcher)
    path = tmp_path / "migrt-front"
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.fixture(scope="session")
def pyz(workdir):
    """migrt as the single-file zipapp of packaging/build_zipapp.py, for /usr/bin/python3
    (or, where that is not the venv's version, as on Debian 12 whose 3.11 lacks TLS-PSK,
    for the Python 3.13 install.sh built); it unpacks its compiled dependencies into a
    cache dir of its own (MIGRT_PYZ_CACHE)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = str(workdir / "migrt.pyz")
    import subprocess
    target = "/usr/bin/python3"
    ver = subprocess.run([target, "-c", "import sys; print(*sys.version_info[:2])"],
                         capture_output=True, text=True).stdout.split()
    if ver != [str(x) for x in sys.version_info[:2]]:
        target = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([sys.executable, os.path.join(repo, "packaging", "build_zipapp.py"),
                    "-o", out, "--python", target], check=True,
                   capture_output=True, timeout=300)
    cache = str(workdir / "pyz-cache")
    return out, {"MIGRT_PYZ_CACHE": cache}
