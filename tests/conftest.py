import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ocitest  # noqa: E402

# Tests keep their checkpoints under the temp dir; the runtime only restores from
# allowed checkpoint locations.
os.environ.setdefault("MIGRT_CHECKPOINT_DIRS", "/tmp:/var/lib/migrt/checkpoints:/run/migrt")


def pytest_collection_modifyitems(config, items):
    """Tier marks by directory; root tiers skip with a reason when tools are missing."""
    for item in items:
        path = str(item.fspath)
        if any(f"{os.sep}{tier}{os.sep}" in path for tier in ("integration", "e2e", "workloads", "kube")):
            item.add_marker(pytest.mark.root)
            if not ocitest.have_root_tools():
                item.add_marker(pytest.mark.skip(reason="requires root, runc and criu"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (MIGRT_NO_SKIP=1) a skipped test is a failed test: nothing is skipped there."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and os.environ.get("MIGRT_NO_SKIP") and not hasattr(rep, "wasxfail"):
        rep.outcome = "failed"
        rep.longrepr = f"skipped in CI, which must run everything: {rep.longrepr}"


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("migrt")


@pytest.fixture(scope="session", autouse=True)
def _staging_mounts_cleaned(tmp_path_factory):
    """Agents mount a tmpfs on a staging dir that is on a disk (migrt.agent.stagefs); one
    killed with SIGKILL leaves it: detached at the end, so temp dirs can go."""
    yield
    ocitest.unmount_staging(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="session")
def migrt_bin(workdir):
    """The runtime under test: MIGRT_TEST_RUNTIME, or a launcher for this checkout."""
    rt = os.environ.get("MIGRT_TEST_RUNTIME")
    if rt:
        return shutil.which(rt) or rt
    return ocitest.build_launcher(str(workdir / "migrt"))


@pytest.fixture(scope="session")
def migrt_launcher(workdir):
    """Always migrt (for tests of migrt-only behaviour)."""
    return ocitest.build_launcher(str(workdir / "migrt-only"))


@pytest.fixture(scope="session")
def rootfs(workdir):
    return ocitest.bundlekit.make_rootfs(str(workdir / "busybox-rootfs"))


@pytest.fixture
def make_bundle(tmp_path, rootfs):
    """make_bundle(args, **kw) -> bundle dir with a copy of the busybox rootfs."""
    def make(args, name=None, **kw):
        name = name or ocitest.uid("b")
        kw.setdefault("cgroups_path", f"/migrt-test/{name}")
        return ocitest.bundlekit.make_bundle(str(tmp_path / name), args, rootfs=rootfs, **kw)
    return make


@pytest.fixture
def node(tmp_path, migrt_bin):
    """A simulated node: the runtime under test with a --root of its own."""
    rts = []

    def make(name="node", binary=None):
        rt = ocitest.Runtime(binary or migrt_bin, str(tmp_path / f"root-{name}"))
        rts.append(rt)
        return rt
    yield make
    for rt in rts:
        rt.cleanup()
