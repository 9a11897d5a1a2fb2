"""Host side of the VM suite. The guest tests under guest/ run only inside the VM: they
remount the cgroup2 hierarchy and write its root, which must never happen on a host."""

from __future__ import annotations

import os

import background
import pytest
from vmrun import VM_TIMEOUT, default_workdir

collect_ignore = ["guest"]

SUITE_FILE = "tests/vm/test_v2_suite.py"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Boot the guest suite now, beside the host tests, when this session will run it."""
    if session.config.option.collectonly:
        return
    if any(item.nodeid.startswith(SUITE_FILE) for item in session.items):
        # Results come back through a directory shared with the guest (gitignored
        # .tmp/vm); it is kept after the run for the guest's logs.
        background.start(default_workdir() / f"results-{os.getpid()}", VM_TIMEOUT)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A session that ends before its VM tests (-x, Ctrl-C) leaves no VM running."""
    running = background.started()
    if running is not None:
        running.cancel()
