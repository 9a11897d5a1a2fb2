"""The tests' helpers the benchmarks share: cgroups below our own (tests/cgroup_util.py)
and free loopback ports (tests/scheduler_util.py).

tests/ is no package; pytest puts it on the path (pyproject's `pythonpath`), and this is
the one place that does so for the benchmarks.
"""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[2] / "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)

from cgroup_util import KernelCgroup, kernel_cgroups_usable, make_test_cgroup  # noqa: E402
from scheduler_util import free_port  # noqa: E402

__all__ = ["KernelCgroup", "free_port", "kernel_cgroups_usable", "make_test_cgroup"]
