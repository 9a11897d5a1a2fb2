"""Turn a measurement into one memory budget and a per-worker `--memory-limit` (pure).

The formulas, with a worked example, are in docs/design.md.
"""

from __future__ import annotations

import math

from .dask_compat.dask_worker import WorkerArgsError, resolve_nworkers_nthreads
from .measure import Measurement
from .records import as_dict, field, record
from .sizes import Amount, parse_bytes
from .worker_args import MemoryLimitDecision, WorkerArgs

TYPE_CHECKING = False  # typing costs ~2 ms to import on the fast path; mypy knows this name
if TYPE_CHECKING:
    from collections.abc import Sequence

    from .cgroup.pool import Member
    from .cgroup.siblings import Sibling

MiB = 2**20

# Defaults measured by benchmarks/pressure.py and justified in docs/design.md.
DEFAULT_MIN_WORKER_MEMORY = 256 * MiB
DEFAULT_NANNY_ALLOWANCE = 40 * MiB
SUPERVISOR_ALLOWANCE = 16 * MiB


class PlanError(Exception):
    """No safe plan exists; nothing has been touched yet."""


class PoolBusy(PlanError):
    """Our fair share fits, but the other instances of the pool still hold it: what is
    free now is too small to start with. They come down on their next tick."""


@record
class Settings:
    reserve: Amount = field(default_factory=lambda: Amount(bytes=0))
    min_worker_memory: int = DEFAULT_MIN_WORKER_MEMORY
    nanny_allowance: int = DEFAULT_NANNY_ALLOWANCE
    supervised: bool = False
    clamp_memory_limit: bool = False
    # Whether a supervisor follows the budget live: an instance that does not cannot
    # give back what it takes at start.
    follows: bool = True
    # A question (--print-limit, --dry-run, memory_limit()) answers with the share an
    # instance settles at once the others have come down: it waits for nobody, and no
    # one makes room for a question.
    settled: bool = False


@record
class WorkerValues:
    """What `dask worker` will make of the arguments the plan depends on."""

    n_workers: int
    nthreads: int
    # The user's --memory-limit per worker in bytes; None when not given or no limit ("0").
    user_memory_limit_bytes: int | None
    # What "auto" divides by: the CPUs for dask worker, the GPUs for dask cuda worker.
    cores: int


def resolve_worker_values(args: WorkerArgs, m: Measurement) -> WorkerValues:
    """Every worker argument the plan reads, resolved as dask would; WorkerArgsError for a
    value dask rejects. Called before planning, so that a plan never refuses an argument."""
    n_workers, nthreads = resolve_nworkers_nthreads(args.nworkers, args.nthreads, m.cpu_count)
    # dask-cuda starts one worker (1 thread by default) per GPU and reads "auto" as
    # MEMORY_LIMIT * min(1, nthreads / GPUs): its "cores" are the GPUs.
    cores = m.cpu_count
    if args.gpu_workers is not None:
        n_workers, nthreads, cores = args.gpu_workers, args.nthreads or 1, args.gpu_workers
    user_bytes: int | None = None
    if args.memory_limit is not None:
        try:
            user_bytes = resolve_user_memory_limit(
                args.memory_limit, nthreads, cores, m.dask_memory_limit
            )
        except ValueError as exc:
            raise WorkerArgsError(
                f"--memory-limit {args.memory_limit!r} is not a size dask understands: {exc}"
            ) from exc
    return WorkerValues(n_workers, nthreads, user_bytes, cores)


@record
class Plan:
    budget: int
    available: int
    own_working_set: int
    reserve: int
    limiting: str
    n_workers: int
    nthreads: int
    cpu_count: int
    nannies: int
    overhead: int
    pool: int
    per_worker: int
    # Plain Dask's own choice (distributed.system.MEMORY_LIMIT), not what Dask was given.
    dask_default_limit: int
    user_memory_limit: str | None
    user_memory_limit_bytes: int | None
    user_fits: bool | None
    # What goes on the command line: None keeps the user's value untouched.
    memory_limit_arg: int | None
    # The value dask's memory manager will end up with, per worker.
    effective_per_worker: int | None
    # Other instances' child cgroups beside ours (outside our pool) and the sum of their
    # kernel limits.
    siblings: int = 0
    siblings_committed: int = 0
    # The pool shared with other live instances: its key, its budget (everything the
    # instances may use together), our fair share of it (or our fixed commitment), and
    # what the others hold now, by pid.
    pool_key: str | None = None
    pool_budget: int | None = None
    share: int | None = None
    # An explicit --memory-limit's fixed commitment: what the others plan around.
    fixed: bool = False
    commitment: int | None = None
    members: tuple[dict[str, object], ...] = ()
    # The per-worker limit at our full share: following never goes above it.
    share_per_worker: int | None = None

    def as_dict(self) -> dict[str, object]:
        return as_dict(self)

    @property
    def memory_limit(self) -> MemoryLimitDecision:
        if self.memory_limit_arg is None:
            return MemoryLimitDecision("keep")
        if self.user_memory_limit is None:
            return MemoryLimitDecision("set", self.memory_limit_arg)
        return MemoryLimitDecision("clamped", self.memory_limit_arg)


def resolve_user_memory_limit(
    value: str, nthreads: int, cpu_count: int, dask_memory_limit: int
) -> int | None:
    """distributed.worker_memory.parse_memory_limit for a value from the command line.

    None means no limit at all (dask reads "0" that way). Raises ValueError for values
    dask rejects.
    """
    if not value.strip():
        # dask's parse_bytes would read "" as 1 byte: never what was meant.
        raise ValueError("the value is empty")
    if value == "auto":
        resolved = int(dask_memory_limit * min(1, nthreads / cpu_count))
    else:
        try:
            number = float(value)
        except ValueError:
            resolved = parse_bytes(value)
        else:
            if not math.isfinite(number):
                raise ValueError(f"memory limit {value!r} is not finite")
            resolved = int(number * dask_memory_limit) if number <= 1 else int(number)
    if resolved < 0:
        # dask computes a negative limit here and the worker then fails to start.
        raise ValueError(f"memory limit {value!r} is negative")
    if resolved == 0:
        return None
    return min(resolved, dask_memory_limit)


@record
class PoolView:
    """The other live instances of our pool, as their claims say."""

    key: str
    others: tuple[Member, ...] = ()


def _per_worker(budget: int, overhead: int, n_workers: int, share: float, cap: int) -> int:
    pool = max(0, budget - overhead)
    return min(int(pool * share), pool // n_workers, cap)


def _refusal(
    budget: int,
    n_workers: int,
    per_worker: int,
    overhead: int,
    settings: Settings,
    available: int,
    m: Measurement,
    reserve: int,
    siblings: Sequence[Sibling],
    committed: int,
    pool: PoolView | None,
    shares: Sequence[tuple[int, int]],
) -> PlanError:
    message = (
        f"the memory budget is too small: {budget} bytes for {n_workers} worker(s) "
        f"gives {per_worker} bytes each after {overhead} bytes of overhead, "
        f"below the minimum of {settings.min_worker_memory} bytes per worker "
        f"(available {available}, limited by {m.limiting}, reserve {reserve}"
        + (
            f", {committed} bytes committed to {len(siblings)} other instance(s) here)"
            if siblings
            else ")"
        )
    )
    if pool is None or not pool.others:
        return PlanError(message)
    from .sizes import format_bytes

    held = ", ".join(f"pid {pid} {format_bytes(share)}" for pid, share in shares)
    return PlanError(
        f"{message}; the pool is shared with {len(pool.others)} other instance(s) "
        f"({held}): start one instance with --nworkers N instead of several, give the "
        "pool more memory, or pass an explicit --memory-limit"
    )


def make_plan(
    m: Measurement,
    args: WorkerArgs,
    settings: Settings,
    siblings: Sequence[Sibling] = (),
    pool: PoolView | None = None,
) -> Plan:
    """budget = own working set + available - reserve; the pool = budget - overhead is
    shared out with dask's own "auto" rule, capped so that all workers fit.

    `siblings`, other instances' limited children of our cgroup outside our pool, hold
    memory promised to them: their unused part comes off `available`, their limits off
    every limit. `pool`, the other live instances that share our budget's source: what
    they use counts into the pool; their fixed commitments come off it first, and the
    rest is shared by weight (worker processes). We start with our share, or with what
    the others leave free now when that is less; PoolBusy when that is too small."""
    values = resolve_worker_values(args, m)
    n_workers, nthreads = values.n_workers, values.nthreads
    cores = values.cores
    others = pool.others if pool is not None else ()
    committed = sum(s.limit for s in siblings)
    available = max(0, m.available - sum(s.unused for s in siblings))
    # own working set + headroom can exceed a limit: a cgroup's usage may be above its
    # limit (a limit lowered under usage), and VmRSS counts shared pages the cgroup
    # does not charge to us. No budget is ever above a limit that applies. What the
    # other instances of the pool use is theirs out of the same pool.
    gross = m.own_working_set + available + sum(o.working_set for o in others)
    # A level's ceiling: its hard limit, or an external memory.high below it.
    limits = [lvl.ceiling for lvl in m.levels if lvl.ceiling is not None]
    if limits:
        gross = max(0, min(gross, min(limits) - committed))
    reserve = settings.reserve.of(gross)
    pool_budget = gross - reserve
    nannies = n_workers if args.nanny else 0
    overhead = nannies * settings.nanny_allowance + (
        SUPERVISOR_ALLOWANCE if settings.supervised else 0
    )
    thread_share = min(1.0, nthreads / cores)
    user_bytes = values.user_memory_limit_bytes
    others_fixed = sum(o.fixed for o in others if o.fixed is not None)
    flexible_weight = sum(o.weight for o in others if o.fixed is None)
    after_fixed = max(0, pool_budget - others_fixed)
    fixed = args.memory_limit is not None and not settings.clamp_memory_limit
    if fixed:
        # Our commitment is what we ask for; the flexible instances share the rest.
        # Alone, the kernel limit keeps the whole pool: above Dask's limit, the nanny
        # restarts a worker before the kernel kills it.
        commitment = after_fixed
        if user_bytes is not None:
            commitment = min(n_workers * user_bytes + overhead, after_fixed)
        share = commitment if flexible_weight or not settings.follows else after_fixed
    else:
        share = after_fixed * n_workers // (flexible_weight + n_workers)
        commitment = share
    free_now = max(0, pool_budget - sum(o.committed for o in others))
    budget = share if settings.settled else min(share, free_now)
    share_per_worker = _per_worker(share, overhead, n_workers, thread_share, m.dask_memory_limit)
    per_worker = _per_worker(budget, overhead, n_workers, thread_share, m.dask_memory_limit)
    shares = [(o.pid, o.committed) for o in others]
    if share <= 0 or share_per_worker < settings.min_worker_memory:
        raise _refusal(
            share,
            n_workers,
            share_per_worker,
            overhead,
            settings,
            available,
            m,
            reserve,
            siblings,
            committed,
            pool,
            shares,
        )
    if budget <= 0 or per_worker < settings.min_worker_memory:
        raise PoolBusy(
            f"{free_now} bytes are free in the pool now, {share} bytes are our share: "
            "waiting for the other instances to come down"
        )

    fits: bool | None = None
    arg: int | None = per_worker
    effective: int | None = per_worker
    if args.memory_limit is not None:
        fits = user_bytes is not None and n_workers * user_bytes + overhead <= budget
        if fits or not settings.clamp_memory_limit:
            arg, effective = None, user_bytes
    return Plan(
        budget=budget,
        available=available,
        own_working_set=m.own_working_set,
        reserve=reserve,
        limiting=m.limiting,
        n_workers=n_workers,
        nthreads=nthreads,
        cpu_count=m.cpu_count,
        nannies=nannies,
        overhead=overhead,
        pool=max(0, budget - overhead),
        per_worker=per_worker,
        dask_default_limit=m.dask_memory_limit,
        user_memory_limit=args.memory_limit,
        user_memory_limit_bytes=user_bytes,
        user_fits=fits,
        memory_limit_arg=arg,
        effective_per_worker=effective,
        siblings=len(siblings),
        siblings_committed=committed,
        pool_key=None if pool is None else pool.key,
        pool_budget=pool_budget,
        share=share,
        fixed=fixed,
        commitment=commitment,
        members=tuple(o.as_dict() for o in others),
        share_per_worker=share_per_worker,
    )


def user_limit_warning(plan: Plan) -> str:
    """A --memory-limit above the budget passes through (dask keeps it), so the kernel
    limit, not Dask's spilling, may be what stops the worker: the line that says so,
    with the way out."""
    from .sizes import format_bytes

    if plan.user_memory_limit_bytes is None:
        # dask reads 0 as no limit at all: it never spills, pauses or restarts.
        return (
            f"--memory-limit {plan.user_memory_limit} turns Dask's memory limit off: it "
            "never spills, pauses or restarts, and only the kernel limit stops the "
            f"worker; add --clamp-memory-limit to use {format_bytes(plan.per_worker)} "
            "per worker instead"
        )
    given = plan.user_memory_limit_bytes
    return (
        f"--memory-limit {plan.user_memory_limit} "
        f"({format_bytes(given)} per worker, {plan.n_workers} worker(s)) does not fit the "
        f"budget of {format_bytes(plan.budget)}; Dask may not spill before the kernel "
        f"limit; add --clamp-memory-limit to use {format_bytes(plan.per_worker)} instead"
    )
