from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from cgroup_util import KernelCgroup, kernel_cgroups_usable, make_test_cgroup
from scheduler_util import scheduler

# The machine is shared with other suites; timing deadlines would only make tests flaky.
settings.register_profile("dsw", deadline=None)
settings.load_profile("dsw")


HOST_RUN_DIR = "/run/dask-safe-worker"
_HOST_RUN_BEFORE = os.path.exists(HOST_RUN_DIR)


_HOST_RUN_MADE_BY: list[str] = []


@pytest.fixture(autouse=True)
def _host_run_dir_untouched(request: pytest.FixtureRequest) -> Iterator[None]:
    """Which test made the host's runtime directory, if one did (named in the summary)."""
    before = os.path.exists(HOST_RUN_DIR)
    yield
    if not before and os.path.exists(HOST_RUN_DIR) and not _HOST_RUN_MADE_BY:
        _HOST_RUN_MADE_BY.append(request.node.nodeid)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Name a leak into the host's runtime directory: every start in the suite has a
    runtime directory of the session's own, so one that appeared there is a test's bug."""
    if not _HOST_RUN_BEFORE and os.path.exists(HOST_RUN_DIR):
        found = sorted(str(p) for p in Path(HOST_RUN_DIR).rglob("*"))
        terminalreporter.write_line(f"WARNING: the suite left {HOST_RUN_DIR}: {found}")
    if _HOST_RUN_MADE_BY:
        terminalreporter.write_line(f"WARNING: {HOST_RUN_DIR} made during {_HOST_RUN_MADE_BY[0]}")


@pytest.fixture(scope="session", autouse=True)
def _private_runtime_dir() -> Iterator[None]:
    """Every tool the tests start writes its default plan file into a runtime directory
    of this session, removed at the end. As root the default would be
    /run/dask-safe-worker, where an exec'd worker's file stays until the next start."""
    runtime = tempfile.mkdtemp(prefix="dsw-test-run-")
    before = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = runtime
    yield
    if before is None:
        del os.environ["XDG_RUNTIME_DIR"]
    else:
        os.environ["XDG_RUNTIME_DIR"] = before
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def started_pids() -> set[int]:
    """Pids a test started; cgroup cleanup may end these, and only these."""
    return set()


@pytest.fixture
def kernel_cgroup(started_pids: set[int]) -> Iterator[KernelCgroup]:
    """A real v1 memory cgroup below the test's own, removed afterwards."""
    reason = kernel_cgroups_usable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"kernel cgroup tests cannot run in CI: {reason}")
        pytest.skip(reason)
    with make_test_cgroup(started_pids) as cg:
        yield cg


@pytest.fixture
def scheduler_address() -> Iterator[str]:
    """A fresh scheduler on 127.0.0.1 for the test (runc, podman and VM-free tests)."""
    with scheduler() as address:
        yield address


@pytest.fixture
def client(scheduler_address: str) -> Iterator[Any]:
    from distributed import Client

    with Client(scheduler_address, timeout=30) as c:
        yield c


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound, never listening, held by us
    for the whole test so that nothing else can take it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])
