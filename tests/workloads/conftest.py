"""Fixtures of the real-workload tier (see wl.py for the nodes, rootfs and network)."""
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import wl  # noqa: E402

PROGRAMS = {"redis": "redis-server", "nginx": "nginx", "postgres": "/usr/lib/postgresql",
            "sqlite": "sqlite3", "python": "python3", "ip": "ip"}


def _missing():
    out = []
    for what, prog in PROGRAMS.items():
        if not (os.path.exists(prog) if prog.startswith("/") else shutil.which(prog)):
            out.append(what)
    return out


@pytest.fixture
def cluster(tmp_path, migrt_launcher):
    """Node A, node B with its agent, and the test's own network namespaces."""
    missing = _missing()
    if missing:
        pytest.skip(f"workload programs missing: {', '.join(missing)} "
                    f"(packaging/install.sh installs them)")
    cl = wl.Cluster(migrt_launcher, tmp_path)
    try:
        cl.start_agent()
        yield cl
    finally:
        cl.cleanup()


@pytest.fixture(params=list(wl.MODES))
def mode(request):
    return request.param
