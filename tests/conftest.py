from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from cgroup_util import KernelCgroup, kernel_cgroups_usable, make_test_cgroup

# The machine is shared with other suites; timing deadlines would only make tests flaky.
settings.register_profile("dsw", deadline=None)
settings.load_profile("dsw")


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
