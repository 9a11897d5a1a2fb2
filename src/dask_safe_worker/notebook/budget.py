"""`dask_safe_worker.memory_limit()`: the per-worker limit the CLI would pass, from Python.

The imperative shell around the pure core: measure (`measure.py`), the other instances
of the pool (`cgroup/pool.py`, read only for a query), the plan (`plan.make_plan` on the
measurement with the caller as a neighbour, `notebook/plan.py`). No dask or distributed
import: a notebook may ask before it imports them.
"""

from __future__ import annotations

import os
import time

from ..cgroup.pool import Member, Pool, find_pool, plan_inputs
from ..dask_compat.release import Release, check_supported, installed_release
from ..measure import Measurement, measure, unreadable_problem
from ..plan import (
    DEFAULT_MIN_WORKER_MEMORY,
    DEFAULT_NANNY_ALLOWANCE,
    Plan,
    PlanError,
    PoolBusy,
    Settings,
    make_plan,
)
from ..records import replace
from ..worker_args import WorkerArgs
from .plan import NOTEBOOK_RESERVE, ReserveValue, as_neighbour, notebook_args, notebook_settings

# As long as a `dask-safe-worker` start waits for its pool's other instances to make
# room (cli.ARRIVAL_WAIT): they move on their next tick.
ARRIVAL_WAIT = 30.0
ARRIVAL_POLL = 0.25


def readable(m: Measurement, memory_limit_given: bool) -> Measurement:
    """`m`, or PlanError where a cgroup level we are in exists but cannot be read: fail
    closed as the CLI does (issue 24 row 4), unless a `memory_limit` was given."""
    if unreadable_problem(m, memory_limit_given, allowed=False) is not None:
        raise PlanError(
            "cannot read every memory cgroup level this process is in, so the free "
            "memory is not known: " + "; ".join(m.unreadable) + " (pass an explicit "
            "memory_limit= to the cluster to go on with it)"
        )
    return m


def supported_release() -> Release:
    release = installed_release()
    check_supported(release.distributed)
    return release


def memory_limit(
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    processes: bool = True,
    *,
    reserve: ReserveValue = NOTEBOOK_RESERVE,
    min_worker_memory: int = DEFAULT_MIN_WORKER_MEMORY,
    nanny_allowance: int = DEFAULT_NANNY_ALLOWANCE,
) -> int:
    """The per-worker memory limit in bytes for `LocalCluster(n_workers,
    threads_per_worker, processes)` in this process, as `dask-safe-worker` plans it: what
    this machine and its cgroups have free, this process counted as a neighbour that
    keeps `reserve` (bytes, or a fraction: 25 % by default) for its own growth, and the
    claims of other instances on this host. Reads only. `plan.PlanError` (a ValueError's
    sibling: an Exception) when no worker would get `min_worker_memory`."""
    release = supported_release()
    m = readable(measure(release=release), memory_limit_given=False)
    args = notebook_args(n_workers, threads_per_worker, processes, m.cpu_count)
    settings = notebook_settings(reserve, min_worker_memory, nanny_allowance)
    pool = find_pool(m, os.environ, create=False)
    _, plan = plan_once(m, args, replace(settings, settled=True), pool)
    return plan.per_worker


def plan_once(
    m: Measurement, args: WorkerArgs, settings: Settings, pool: Pool | None
) -> tuple[Measurement, Plan]:
    """The plan now: the measurement as planned (the caller a neighbour, other
    instances' children as occupants) and the plan. PoolBusy when what the pool's other
    instances leave free is too small for now."""
    with_others, siblings, view = plan_inputs(m, "dask-safe-worker", pool, os.getpid())
    planned = as_neighbour(with_others, 0)
    return planned, make_plan(planned, args, settings, siblings, view)


def plan_and_claim(
    release: Release,
    args: WorkerArgs,
    settings: Settings,
    pool: Pool | None,
) -> tuple[Measurement, Plan, int | None]:
    """Plan under the pool's lock and write our claim before it is released, as a
    `dask-safe-worker` start does; (measurement, plan, the claim's descriptor). Waits up
    to ARRIVAL_WAIT for the others to make room; PlanError after that."""
    deadline = time.monotonic() + ARRIVAL_WAIT
    claim: int | None = None
    while True:
        m = readable(measure(release=release), args.memory_limit is not None)
        lock = pool.acquire() if pool is not None else None
        try:
            try:
                planned, plan = plan_once(m, args, settings, pool)
            except PoolBusy:
                if time.monotonic() >= deadline:
                    raise
            else:
                if pool is not None:
                    # As a start's claim: a budget that cannot follow is a fixed one.
                    fixed = plan.commitment if plan.fixed else None
                    if fixed is None and not settings.follows:
                        fixed = plan.budget
                    member = Member(os.getpid(), plan.n_workers, fixed, plan.budget, 0)
                    claim = pool.claim(member)
                    # Held by this process alone, not by whatever the kernel spawns.
                    os.set_inheritable(claim, False)
                return planned, plan, claim
        finally:
            if lock is not None:
                os.close(lock)
        time.sleep(ARRIVAL_POLL)
