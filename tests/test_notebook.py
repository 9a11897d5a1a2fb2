"""Notebooks and LocalCluster (issue 23): the safe budget from Python, live.

The pure part (counts, reserve, the kernel as a neighbour) is checked against the plan
and the installed distributed; the rest on the real kernel: a process playing the
notebook kernel (tests/notebook_kernel.py) runs inside a test cgroup with a 2 GiB limit,
so that the cgroup it calls its own is a test cgroup, never this session's.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cgroup_util import kernel_cgroups_usable, make_test_cgroup
from dask_safe_worker.dask_compat.local_cluster import local_cluster_counts
from dask_safe_worker.notebook.plan import (
    NOTEBOOK_RESERVE,
    as_neighbour,
    notebook_args,
    notebook_settings,
    reserve_amount,
)
from dask_safe_worker.plan import make_plan
from dask_safe_worker.sizes import Amount
from release_util import require_distributed_at_least
from test_plan import level, measurement

MiB, GiB = 2**20, 2**30
KERNEL = Path(__file__).parent / "notebook_kernel.py"


# -- pure -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_workers", "threads", "processes"),
    [
        (None, None, True),
        (None, None, False),
        (3, None, True),
        (3, None, False),
        (None, 3, True),
        (None, 1, False),
        (2, 1, True),
    ],
)
def test_counts_are_local_clusters_own(
    n_workers: int | None, threads: int | None, processes: bool
) -> None:
    from dask.system import CPU_COUNT
    from distributed import LocalCluster

    async def spec() -> tuple[int, int]:
        # Asynchronous and never awaited: the spec is built, nothing is started.
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads,
            processes=processes,
            asynchronous=True,
            dashboard_address=None,
        )
        workers = cluster.worker_spec
        counts = (len(workers), next(iter(workers.values()))["options"]["nthreads"])
        closing = cluster.close()
        assert closing is not None
        await closing
        return counts

    assert local_cluster_counts(n_workers, threads, processes, CPU_COUNT) == asyncio.run(spec())


@given(
    kernel=st.integers(0, 3 * GiB),
    workers=st.integers(0, 2 * GiB),
    limit=st.integers(1 * GiB, 8 * GiB),
    fraction=st.floats(0, 0.9),
)
def test_the_kernel_is_a_neighbour_with_a_reserve(
    kernel: int, workers: int, limit: int, fraction: float
) -> None:
    """budget = (workers' own + what is free) - reserve: whatever the kernel holds is
    never the workers', and the reserve stays free for the kernel to grow into."""
    m = measurement(levels=(level(limit, kernel + workers),), own_rss=kernel, cpu_count=2)
    args = notebook_args(2, 1, True, 2)
    settings = notebook_settings(Amount(fraction=fraction), min_worker_memory=1)
    seen = as_neighbour(m, workers)
    # No budget is ever above a limit that applies (the workers' usage may be above it).
    gross = min(workers + max(0, limit - kernel - workers), limit)
    try:
        plan = make_plan(seen, args, settings)
    except Exception:
        assert gross - int(gross * fraction) - 2 * 40 * MiB < 2
        return
    assert plan.own_working_set == workers
    assert plan.budget == gross - int(gross * fraction)
    assert plan.budget + plan.reserve + kernel <= max(limit, kernel + workers)


def test_the_kernels_growth_lowers_the_budget_by_as_much() -> None:
    settings = notebook_settings(NOTEBOOK_RESERVE)
    args = notebook_args(2, 1, True, 2)

    def budget(kernel: int) -> int:
        m = measurement(levels=(level(2 * GiB, kernel + 100 * MiB),), own_rss=kernel)
        return make_plan(as_neighbour(m, 100 * MiB), args, settings).budget

    # As the CLI's own plan would not: there the caller's RSS is added back as its own.
    assert budget(150 * MiB) - budget(850 * MiB) == pytest.approx(0.75 * 700 * MiB, abs=2)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.25, Amount(fraction=0.25)),
        (0, Amount(bytes=0)),
        (512 * MiB, Amount(bytes=512 * MiB)),
        ("1GiB", Amount(bytes=GiB)),
        ("10%", Amount(fraction=0.1)),
    ],
)
def test_reserve_values(value: Any, expected: Amount) -> None:
    assert reserve_amount(value) == expected


@pytest.mark.parametrize("value", [-1, 1.5, float("nan"), True, None, "lots"])
def test_reserve_values_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        reserve_amount(value)


def test_import_stays_free_of_distributed() -> None:
    code = (
        "import sys, dask_safe_worker as d\n"
        "assert 'distributed' not in sys.modules and 'dask' not in sys.modules\n"
        "assert 'dask_safe_worker.plan' not in sys.modules\n"
        "import distributed\n"
        "assert issubclass(d.LocalCluster, distributed.LocalCluster)\n"
        "assert callable(d.memory_limit)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the real kernel --------------------------------------------------------------------

needs_kernel = pytest.mark.skipif(
    kernel_cgroups_usable() is not None, reason=str(kernel_cgroups_usable())
)
# Without these the kernel's root cannot create a cgroup in a directory of mode 0555.
NO_OVERRIDE = "-dac_override,-dac_read_search,-fowner"


def run_kernel(mode: str, *extra: str, writable: bool = True) -> tuple[dict[str, Any], list[Any]]:
    """notebook_kernel.py as the only process of a fresh 2 GiB test cgroup: its report
    and its audit events. Without `writable` the cgroup's directory is read-only to it."""
    require_distributed_at_least(2025, 12, "LocalCluster is tested from 2025.12 on")
    started: set[int] = set()
    with make_test_cgroup(started) as cg:
        cg.set_limit(2 * GiB)
        argv = [sys.executable, str(KERNEL), mode, *extra]
        if not writable:
            cg.path.chmod(0o555)
            argv = ["setpriv", "--bounding-set", NO_OVERRIDE, "--inh-caps", NO_OVERRIDE, *argv]
        proc = subprocess.Popen(
            cg.enter_command(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        started.add(proc.pid)
        try:
            out, err = proc.communicate(timeout=300)
        finally:
            cg.path.chmod(0o755)
        assert proc.returncode == 0, err[-4000:]
        assert cg.oom_kills() == 0
        left = [p.name for p in cg.path.iterdir() if p.is_dir()]
    events = [json.loads(line) for line in err.splitlines() if line.startswith('{"')]
    assert left == []
    # The live-limit channel (and the spec beside it) went with the cluster.
    for started_event in named(events, "follow.started"):
        assert not Path(started_event["channel"]).parent.exists()
    return json.loads(out.strip().splitlines()[-1]), events


def named(events: list[Any], name: str) -> list[Any]:
    return [e for e in events if e.get("event") == name]


@needs_kernel
def test_processes_in_a_child_cgroup_follow_the_kernels_growth() -> None:
    report, events = run_kernel("processes", "grow", "700", "beside")
    kernel = report["kernel_cgroup"]
    # The workers are in the limited child; the kernel stays where it was.
    assert {Path(c).parent.as_posix() for c in report["worker_cgroups"]} == {kernel}
    assert all(Path(c).name.startswith("dask-safe-worker") for c in report["worker_cgroups"])
    assert report["kernel_cgroup_after_close"] == kernel
    assert report["worker_oom_score_adj"] == [500, 500]
    (plan,) = named(events, "plan.made")
    assert plan["n_workers"] == 2 and plan["own_working_set"] == 0
    (outcome,) = named(events, "cgroup.write.outcome")
    assert outcome["enforced"] and outcome["requested"] == plan["budget"]
    # dask-safe-audit sees managed, safe workers with the child's limit.
    assert [row["managed"] for row in report["audit"]] == [True, True]
    assert {row["verdict"] for row in report["audit"]} == {"safe"}
    # (The first ticks may lower the child's limit while the audit runs.)
    assert all(row["kernel_limit"] <= report["child_limits"][0] for row in report["audit"])
    assert {Path(row["kernel_limit_path"]).parent.as_posix() for row in report["audit"]} == {kernel}
    # A dask-safe-worker start beside it sees the cluster in its pool, with the child
    # the workers run in, and not also as a foreign instance's child.
    beside = report["beside"]
    assert [m["pid"] for m in beside["members"]] == [report["kernel_pid"]]
    assert Path(beside["members"][0]["cgroup"]).name.startswith("dask-safe-worker")
    assert beside["siblings"] == 0 and beside["siblings_committed"] == 0
    # The kernel grew by 700 MiB: Dask's side, the scheduler's view and the kernel limit
    # came down, by the workers' share of 0.75 x 700 MiB at least.
    before, after = report["limits"], report["limits_after_growth"]
    assert all(after[k] < before[k] - 200 * MiB for k in before)
    assert report["scheduler_limits_after_growth"] == sorted(after.values())
    assert report["child_limits_after_growth"][0] < report["child_limits"][0] - 400 * MiB
    grew = [e for e in named(events, "follow.changed") if e["reason"] == "neighbours grew"]
    assert grew and grew[0]["action"] == "lower"
    assert any(e["kernel"]["action"] == "lowered" for e in named(events, "follow.applied"))
    # Closed: no child, no plan file, no claim left.
    assert report["after_close_children"] == [] and report["after_close_plan_files"] == []
    assert len(named(events, "cgroup.child.removed")) == 1


@needs_kernel
def test_threads_follow_the_kernels_growth_with_dask_limits() -> None:
    report, events = run_kernel("threads", "grow", "700")
    assert set(report["worker_pids"]) == {report["kernel_pid"]}
    assert report["child_limits"] == []
    (skipped,) = named(events, "cgroup.write.skipped")
    assert skipped["reason"] == "threads"
    (plan,) = named(events, "plan.made")
    assert set(report["limits"].values()) == {plan["per_worker"]}
    assert [row["managed"] for row in report["audit"]] == [True, True]
    # The plan file's path is in the kernel's environment under a name no option reads
    # (issue 24 row 11): a dask-safe-worker started from the notebook writes its own.
    assert report["plan_files"] != [""] and report["kernel_plan_file_option"] is None
    before, after = report["limits"], report["limits_after_growth"]
    assert all(after[k] < before[k] - 200 * MiB for k in before)
    assert report["scheduler_limits_after_growth"] == sorted(after.values())
    assert report["after_close_plan_files"] == []


@needs_kernel
@pytest.mark.parametrize("mode", ["processes", "threads"])
def test_without_write_permission_dask_limits_only(mode: str) -> None:
    report, events = run_kernel(mode, writable=False)
    kernel = report["kernel_cgroup"]
    assert set(report["worker_cgroups"]) == {kernel}
    assert report["child_limits"] == []
    (plan,) = named(events, "plan.made")
    (outcome,) = named(events, "cgroup.write.outcome") or [{"enforced": False}]
    assert outcome["enforced"] is False
    if mode == "processes":
        (failed,) = named(events, "cgroup.write.failed")
        assert failed["reason"] == "EACCES"
    # Dask's limits are the plan's (or what following made of it since).
    assert all(0 < v <= plan["per_worker"] for v in report["limits"].values())
    assert [row["managed"] for row in report["audit"]] == [True, True]
