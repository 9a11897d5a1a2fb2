"""Smoke version of the memory-pressure benchmark (benchmarks/pressure.py --quick).

One pair of the spill workload in the "VM with agents" scenario: a 3 GiB cgroup M below
ours, a 600 MiB agent inside it, the worker in M's unlimited child W, the scheduler on
127.0.0.1 outside M. It asserts only what the design promises, never a time:

- dask-safe-worker completes, and no process other than the worker is OOM-killed: the
  agent and the nanny are alive at the end, and M's own oom_kill count (v1 counts a kill
  in the victim's cgroup, and only the agent lives directly in M) stays 0;
- the plain worker's Dask memory limit is above M's limit (it sized itself from the host).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from cgroup_util import kernel_cgroups_usable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import pressure

pytestmark = [pytest.mark.benchmark_smoke, pytest.mark.kernel, pytest.mark.e2e]


@pytest.fixture(scope="module")
def spill_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pressure.RunResult]:
    reason = kernel_cgroups_usable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the benchmark smoke test cannot run in CI: {reason}")
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("pressure")
    runs = pressure.run_pressure(quick=True, repeats=1, work=work, log=print)
    return {r.contender: r for r in runs}


def test_safe_worker_completes_without_killing_anything_but_the_worker(
    spill_pair: dict[str, pressure.RunResult],
) -> None:
    safe = spill_pair["safe"]
    assert safe.outcome == "completed", safe.error
    assert safe.agent_alive
    assert safe.nanny_alive
    assert safe.oom_kills_m == 0
    assert safe.scheduler_alive


def test_plain_worker_believes_it_has_more_than_the_vm(
    spill_pair: dict[str, pressure.RunResult],
) -> None:
    plain = spill_pair["plain"]
    assert plain.dask_memory_limit is not None
    assert plain.dask_memory_limit > pressure.M_LIMIT
