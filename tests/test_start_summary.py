"""The start's one line for people, from the plan and the kernel write's outcome."""

from __future__ import annotations

from dask_safe_worker.cgroup.write import WriteOutcome
from dask_safe_worker.plan import Settings, make_plan
from dask_safe_worker.sizes import Amount
from dask_safe_worker.start_summary import start_summary
from dask_safe_worker.worker_args import WorkerArgs
from test_plan import GiB, MiB, level, measurement

# The design doc's worked example: a 3 GiB cgroup /vm holding a 600 MiB agent.
M = measurement(
    total=24 * GiB,
    available=20 * GiB,
    levels=(level(None, 30 * MiB, 0, "/vm/worker"), level(3 * GiB, 630 * MiB, 0, "/vm")),
)


def test_written_kernel_limit_and_the_limiting_cgroup() -> None:
    plan = make_plan(M, WorkerArgs(nworkers="2", nthreads=1), Settings())
    outcome = WriteOutcome(
        enforced=True,
        written=True,
        reason="written",
        strategy="own",
        target="/vm/worker",
        requested=plan.budget,
        read_back=plan.budget - 4096,
    )
    assert start_summary(plan, outcome) == (
        "2 workers of 1.17 GiB each, from a budget of 2.41 GiB: the headroom of cgroup /vm, "
        "less a reserve of 0 B; kernel limit 2.41 GiB written on /vm/worker"
    )


def test_why_no_kernel_limit_and_the_users_own_limit() -> None:
    settings = Settings(reserve=Amount(bytes=256 * MiB))
    plan = make_plan(M, WorkerArgs(nworkers="1", memory_limit="1GiB"), settings)
    left = WriteOutcome(enforced=True, written=False, reason="existing_lower", target="/vm")
    text = start_summary(plan, left)
    assert text.startswith("1 worker of 1.00 GiB each (your --memory-limit), from a budget of ")
    assert "less a reserve of 256.00 MiB" in text
    assert text.endswith(
        "kernel limit on /vm left as it is (a limit at or below the budget is in force)"
    )
    refused = WriteOutcome(enforced=False, written=False, reason="EROFS")
    assert start_summary(plan, refused).endswith("; no kernel limit written (EROFS)")
