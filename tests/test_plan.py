"""Plan invariants (hypothesis) and worked examples."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_safe_worker.dask_compat.dask_worker import WorkerArgsError
from dask_safe_worker.measure import LevelReading, Measurement
from dask_safe_worker.plan import (
    DEFAULT_NANNY_ALLOWANCE,
    PlanError,
    Settings,
    make_plan,
    resolve_user_memory_limit,
)
from dask_safe_worker.proc_parse import HostMemory
from dask_safe_worker.sizes import Amount
from dask_safe_worker.worker_args import WorkerArgs

MiB, GiB = 2**20, 2**30


def measurement(
    total: int = 16 * GiB,
    available: int = 8 * GiB,
    levels: tuple[LevelReading, ...] = (),
    own_rss: int = 40 * MiB,
    cpu_count: int = 2,
    dask_limit: int | None = None,
    sole: bool = True,
) -> Measurement:
    return Measurement(
        host=HostMemory(total, available, False),
        location=None,
        levels=levels,
        own_procs=(1,) if sole else (1, 2),
        pid=1,
        own_rss=own_rss,
        cpu_count=cpu_count,
        dask_memory_limit=total if dask_limit is None else dask_limit,
    )


def level(limit: int | None, usage: int, inactive: int = 0, path: str = "/") -> LevelReading:
    return LevelReading(path, limit, None, usage, inactive)


def test_worked_example_from_design_doc() -> None:
    # 3 GiB cgroup holding a 600 MiB agent; the worker's own cgroup below it.
    m = measurement(
        total=24 * GiB,
        available=20 * GiB,
        levels=(level(None, 30 * MiB, 0, "/vm/worker"), level(3 * GiB, 630 * MiB, 0, "/vm")),
    )
    plan = make_plan(m, WorkerArgs(nworkers="2", nthreads=1), Settings())
    assert plan.available == 3 * GiB - 630 * MiB
    assert plan.budget == 30 * MiB + plan.available
    assert plan.overhead == 2 * DEFAULT_NANNY_ALLOWANCE
    assert plan.per_worker == (plan.budget - plan.overhead) // 2
    assert plan.memory_limit_arg == plan.per_worker
    assert plan.limiting == "/vm"


limits = st.one_of(st.none(), st.integers(min_value=0, max_value=64 * GiB))
level_st = st.builds(
    LevelReading,
    path=st.just("/x"),
    limit=limits,
    hierarchical_limit=limits,
    usage=st.one_of(st.none(), st.integers(0, 64 * GiB)),
    inactive_file=st.one_of(st.none(), st.integers(0, 8 * GiB)),
)
nworkers_st = st.one_of(st.none(), st.just("auto"), st.integers(-4, 8).map(str), st.just("lots"))


@given(
    total=st.integers(GiB, 256 * GiB),
    avail_frac=st.floats(0, 1),
    levels=st.lists(level_st, max_size=4),
    own_rss=st.integers(0, GiB),
    cpus=st.integers(1, 64),
    nworkers=nworkers_st,
    nthreads=st.one_of(st.none(), st.integers(0, 16)),
    nanny=st.booleans(),
    reserve=st.one_of(
        st.integers(0, 4 * GiB).map(lambda b: Amount(bytes=b)),
        st.floats(0, 0.9).map(lambda f: Amount(fraction=f)),
    ),
    supervised=st.booleans(),
    user_limit=st.one_of(st.none(), st.sampled_from(["auto", "0", "0.5", "300MiB", "4e9", "x"])),
    clamp=st.booleans(),
    sole=st.booleans(),
)
def test_plan_invariants(
    total: int,
    avail_frac: float,
    levels: list[LevelReading],
    own_rss: int,
    cpus: int,
    nworkers: str | None,
    nthreads: int | None,
    nanny: bool,
    reserve: Amount,
    supervised: bool,
    user_limit: str | None,
    clamp: bool,
    sole: bool,
) -> None:
    m = measurement(
        total=total,
        available=int(total * avail_frac),
        levels=tuple(levels),
        own_rss=own_rss,
        cpu_count=cpus,
        sole=sole,
    )
    args = WorkerArgs(nworkers=nworkers, nthreads=nthreads, nanny=nanny, memory_limit=user_limit)
    settings = Settings(reserve=reserve, supervised=supervised, clamp_memory_limit=clamp)
    try:
        plan = make_plan(m, args, settings)
    except (PlanError, WorkerArgsError):
        return
    # Never above any limit: the budget fits in what we use plus what is free.
    assert plan.budget <= m.own_working_set + m.available
    for lvl in levels:
        if lvl.effective_limit is not None:
            assert plan.budget <= lvl.effective_limit
    # Workers plus overhead fit in the budget, so Dask's terminate fires first.
    assert plan.n_workers * plan.per_worker + plan.overhead <= plan.budget
    assert plan.per_worker >= settings.min_worker_memory
    assert plan.per_worker <= m.dask_memory_limit
    if plan.memory_limit_arg is not None:
        assert plan.n_workers * plan.memory_limit_arg + plan.overhead <= plan.budget
    if user_limit is not None and not clamp:
        assert plan.memory_limit_arg is None


@pytest.mark.parametrize("sole", [True, False])
def test_usage_above_the_limit_never_gives_a_budget_above_it(sole: bool) -> None:
    # Issue 13 row 12: usage 1.2 GiB in a cgroup limited to 1 GiB (a limit lowered
    # under usage) gave a budget of 1.2 GiB.
    m = measurement(
        levels=(level(GiB, 1229 * MiB, 0, "/job"),),
        own_rss=1229 * MiB,
        sole=sole,
    )
    plan = make_plan(m, WorkerArgs(), Settings())
    assert plan.budget <= GiB


def test_own_rss_above_the_headroom_of_a_shared_cgroup_is_capped() -> None:
    # VmRSS counts shared pages the cgroup does not charge: own RSS + headroom can
    # exceed the limit of a shared cgroup (seen on the real kernel).
    m = measurement(levels=(level(2 * GiB, 30 * MiB, 0, "/shared"),), own_rss=60 * MiB, sole=False)
    assert make_plan(m, WorkerArgs(), Settings()).budget == 2 * GiB


def test_too_small_budget_is_refused() -> None:
    m = measurement(available=200 * MiB, own_rss=10 * MiB)
    with pytest.raises(PlanError, match="too small"):
        make_plan(m, WorkerArgs(), Settings())


def test_user_memory_limit_passes_through_and_is_judged() -> None:
    m = measurement(levels=(level(GiB, 100 * MiB),))
    fits = make_plan(m, WorkerArgs(memory_limit="300MiB", nthreads=2), Settings())
    assert fits.memory_limit_arg is None and fits.user_fits
    assert fits.effective_per_worker == 300 * MiB
    too_big = make_plan(m, WorkerArgs(memory_limit="4GiB"), Settings())
    assert too_big.memory_limit_arg is None and too_big.user_fits is False
    clamped = make_plan(m, WorkerArgs(memory_limit="4GiB"), Settings(clamp_memory_limit=True))
    assert clamped.memory_limit_arg == clamped.per_worker


def test_user_memory_limit_that_dask_rejects() -> None:
    with pytest.raises(WorkerArgsError):
        make_plan(measurement(), WorkerArgs(memory_limit="lots"), Settings())


def test_dask_cap_applies_to_the_plan() -> None:
    m = measurement(dask_limit=600 * MiB)
    plan = make_plan(m, WorkerArgs(nthreads=2), Settings())
    assert plan.per_worker == 600 * MiB


@given(
    value=st.one_of(
        st.sampled_from(["auto", "0", "1", "0.25", "1.0", "2", "100", "1e9", "300MiB", "5 GB"]),
        st.integers(0, 2**40).map(str),
        st.floats(0, 1).map(str),
    ),
    nthreads=st.integers(1, 16),
    cpus=st.integers(1, 64),
    dask_limit=st.integers(GiB, 64 * GiB),
)
def test_user_limit_parity_with_distributed(
    value: str, nthreads: int, cpus: int, dask_limit: int
) -> None:
    import logging
    from inspect import signature

    from distributed import system
    from distributed.worker_memory import parse_memory_limit

    saved = system.MEMORY_LIMIT
    system.MEMORY_LIMIT = dask_limit
    try:
        # distributed 2022.11 and older take no logger keyword.
        kwargs = (
            {"logger": logging.getLogger("t")}
            if "logger" in signature(parse_memory_limit).parameters
            else {}
        )
        expected = parse_memory_limit(value, nthreads, cpus, **kwargs)
    finally:
        system.MEMORY_LIMIT = saved
    assert resolve_user_memory_limit(value, nthreads, cpus, dask_limit) == expected


def test_memory_limit_decision_is_keep_set_or_clamped() -> None:
    from dask_safe_worker.worker_args import MemoryLimitDecision, apply_memory_limit

    m = measurement(levels=(level(GiB, 100 * MiB),))
    args = ["tcp://127.0.0.1:1", "--memory-limit", "4GiB", "--", "--memory-limit"]
    planned = make_plan(m, WorkerArgs(), Settings())
    assert planned.memory_limit == MemoryLimitDecision("set", planned.per_worker)
    assert apply_memory_limit(["x"], planned.memory_limit) == [
        "x",
        "--memory-limit",
        str(planned.per_worker),
    ]
    kept = make_plan(m, WorkerArgs(memory_limit="4GiB"), Settings())
    assert kept.memory_limit == MemoryLimitDecision("keep")
    assert apply_memory_limit(args, kept.memory_limit) == args
    clamped = make_plan(m, WorkerArgs(memory_limit="4GiB"), Settings(clamp_memory_limit=True))
    assert clamped.memory_limit == MemoryLimitDecision("clamped", clamped.per_worker)
    assert apply_memory_limit(args, clamped.memory_limit) == [
        "tcp://127.0.0.1:1",
        "--memory-limit",
        str(clamped.per_worker),
        "--",
        "--memory-limit",
    ]


@pytest.mark.parametrize(
    "args",
    [WorkerArgs(nworkers="many"), WorkerArgs(memory_limit="lots"), WorkerArgs(nworkers="-9")],
)
def test_worker_values_are_refused_before_planning(args: WorkerArgs) -> None:
    from dask_safe_worker.plan import resolve_worker_values

    with pytest.raises(WorkerArgsError):
        resolve_worker_values(args, measurement(cpu_count=2))
