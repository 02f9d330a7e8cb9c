"""Reliability tier: faults, hostile input, secrets, load (issue 6).

Tests here that start containers need root, runc and CRIU (marked `root`, skipped with
that reason without them; CI's MIGRT_NO_SKIP turns such a skip into a failure). The
parser fuzzers need nothing.
"""
import os

import pytest

import ocitest

NEEDS_ROOT = ("test_load.py", "test_hostile_core.py", "test_secrets.py", "test_agent_hostile.py",
              "test_faults.py", "test_privilege.py", "test_staging_tmpfs.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability: issue 6 (faults, hostile input, load)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.fspath)
        if f"{os.sep}reliability{os.sep}" not in path:
            continue
        item.add_marker(pytest.mark.reliability)
        if os.path.basename(path) in NEEDS_ROOT:
            item.add_marker(pytest.mark.root)
            if not ocitest.have_root_tools():
                item.add_marker(pytest.mark.skip(reason="requires root, runc and criu"))
