"""`--follow`'s pure core: re-plan a fresh measurement and decide what to change.

Nothing here reads or writes a file. The supervisor's watch (`watch.py`) measures, calls
these functions and hands their answers to the edge modules that write. The plan comes
from `plan.make_plan`, the very function the start used: there is no second formula.
"""

from __future__ import annotations

import math

from ..cgroup.our_limit import visible_ancestors
from ..measure import LevelReading, Measurement
from ..plan import Plan, PlanError, PoolView, Settings, make_plan
from ..records import as_dict, record, replace
from ..sizes import Amount
from ..worker_args import WorkerArgs

TYPE_CHECKING = False  # typing costs ~2 ms (and `re`) in the supervisor; mypy knows this name
if TYPE_CHECKING:
    from typing import Any

MiB = 2**20

# The per-worker limit must move by more than max(HYSTERESIS_FLOOR, HYSTERESIS_FRACTION
# of the current limit) before anything is rewritten. docs/follow.md has the reasoning:
# page-cache churn moves MemAvailable and inactive_file by a few MiB to a few tens of MiB
# between ticks; Dask's own thresholds are 5 % apart (0.60/0.70/0.80/0.95 of the limit),
# so a move below 2 % of the limit changes no decision Dask makes.
HYSTERESIS_FLOOR = 32 * MiB
HYSTERESIS_FRACTION = 0.02

# After the pool's members change, a move onto our exact share counts from this far: the
# band is there to ignore measurement noise, and a share is computed, not measured. Left
# at the band, a newcomer that started below its share (what was free then) stayed up
# to 5 % under it for good (issue 25's fairness). Above a few pages of v1 rounding.
SETTLE_STEP = 4 * MiB

# The same margin the start keeps between a kernel limit and the cgroup's usage.
KERNEL_MARGIN = 32 * MiB


@record
class ManagedLimit:
    """A kernel limit that this process wrote at start, and may therefore move."""

    directory: str
    version: int
    # The limit found there before our first write; None when there was none.
    original: int | None
    # What the kernel held right after our write (v1 rounds to pages).
    written: int
    # v2 memory.high found there before our write: our own --memory-high-fraction is
    # not a ceiling to plan under, or every budget would shrink to that fraction.
    original_high: int | None = None
    # v1: the lowest limit above that level as the start saw it (its hierarchical
    # limit), for when our own limit hides the ancestors' (issue 24 row 6).
    ancestors: int | None = None


@record
class FollowSpec:
    """Everything the start knew that the watch needs; passed to the supervisor as JSON."""

    settings: Settings
    args: WorkerArgs
    first_budget: int
    # The start's per-worker limit: a ceiling that following never goes above.
    first_per_worker: int
    interval: float
    channel: str
    managed: ManagedLimit | None = None
    # Why there is no kernel limit to move (the start's write outcome), for the log.
    kernel_note: str | None = None
    # The pool shared with other instances (its directory and key), our weight in it,
    # our child cgroup, and a fixed commitment: the watch then moves nothing and only
    # tells the others what it uses.
    pool_dir: str | None = None
    pool_key: str | None = None
    weight: int = 1
    fixed: int | None = None
    member_cgroup: str | None = None
    # What our claim holds at start (the kernel limit, or Dask's side without one).
    committed: int | None = None

    def to_json(self) -> dict[str, Any]:
        return as_dict(self)

    @classmethod
    def from_json(cls, doc: Any) -> FollowSpec:
        """Raises ValueError for anything that is not a spec this version wrote."""
        try:
            s = doc["settings"]
            reserve = Amount(bytes=s["reserve"]["bytes"], fraction=s["reserve"]["fraction"])
            settings = Settings(
                reserve=reserve,
                min_worker_memory=int(s["min_worker_memory"]),
                nanny_allowance=int(s["nanny_allowance"]),
                supervised=bool(s["supervised"]),
                clamp_memory_limit=bool(s["clamp_memory_limit"]),
                follows=bool(s.get("follows", True)),
            )
            a = doc["args"]
            args = WorkerArgs(
                nworkers=a["nworkers"],
                nthreads=a["nthreads"],
                nanny=bool(a["nanny"]),
                memory_limit=a["memory_limit"],
                # dask-cuda's worker count, as counted at start.
                gpu_workers=None if a.get("gpu_workers") is None else int(a["gpu_workers"]),
                local_directory=a.get("local_directory"),
            )
            m = doc.get("managed")
            managed = (
                None
                if m is None
                else ManagedLimit(
                    directory=str(m["directory"]),
                    version=int(m["version"]),
                    original=None if m["original"] is None else int(m["original"]),
                    written=int(m["written"]),
                    original_high=(
                        None if m.get("original_high") is None else int(m["original_high"])
                    ),
                    ancestors=None if m.get("ancestors") is None else int(m["ancestors"]),
                )
            )
            spec = cls(
                settings=settings,
                args=args,
                first_budget=int(doc["first_budget"]),
                first_per_worker=int(doc["first_per_worker"]),
                interval=float(doc["interval"]),
                channel=str(doc["channel"]),
                managed=managed,
                kernel_note=None if doc.get("kernel_note") is None else str(doc["kernel_note"]),
                pool_dir=_optional_str(doc.get("pool_dir")),
                pool_key=_optional_str(doc.get("pool_key")),
                weight=int(doc.get("weight", 1)),
                fixed=None if doc.get("fixed") is None else int(doc["fixed"]),
                member_cgroup=_optional_str(doc.get("member_cgroup")),
                committed=None if doc.get("committed") is None else int(doc["committed"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a follow spec: {exc!r}") from exc
        validate_interval(spec.interval)
        return spec


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def validate_interval(seconds: float) -> float:
    """A usable --follow-interval; ValueError otherwise."""
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"the follow interval must be a positive number of seconds, not {seconds}")
    if seconds < 0.05:
        raise ValueError(f"the follow interval must be at least 0.05 s, not {seconds}")
    return seconds


def seen_ancestors(
    m: Measurement, managed: ManagedLimit, directories: list[str], known: int | None
) -> int | None:
    """The lowest limit above the level we manage, as far as v1's hierarchical limit
    shows it (the lowest of ours and every ancestor's, those above the mount root too):
    exact while it is below our own limit, else `known`, as last seen."""
    for i, directory in enumerate(directories[: len(m.levels)]):
        if directory == managed.directory:
            level = m.levels[i]
            return visible_ancestors(level.hierarchical_limit, level.limit, known)
    return known


def with_original_limit(
    m: Measurement, managed: ManagedLimit, directories: list[str], ancestors: int | None = None
) -> Measurement:
    """The measurement as if our own write were not there.

    The limit we wrote is the budget itself; left in, it would cap every later budget at
    the first one's level and following could never go up again. So the level we manage
    counts with the limit found there before our write, and with `ancestors`
    (`seen_ancestors`) as its hierarchical limit: an ancestor that no level of ours shows
    (above the mount root) still caps the plan once it comes below our limit. Dropped,
    a lowered pod went unseen and the pool's share raised our limit to the host's RAM
    (issue 24 row 6). The ancestors we do see count through their own levels.
    """
    levels = list(m.levels)
    for i, directory in enumerate(directories[: len(levels)]):
        if directory == managed.directory:
            levels[i] = replace(
                levels[i],
                limit=managed.original,
                hierarchical_limit=ancestors,
                high=managed.original_high,
            )
    return replace(m, levels=tuple(levels))


def plan_key(m: Measurement, pool: PoolView | None = None) -> tuple[object, ...]:
    """Everything of a measurement and a pool view that `make_plan` reads (through
    `replan`): two with equal keys have the same plan, or both none
    (tests/test_follow_core.py). The plan reads the levels only through their ceilings
    and `available` (which holds MemAvailable and every headroom), the other members
    whole (their working sets, commitments, weights)."""
    return (
        m.own_working_set,
        m.available,
        m.limiting,
        tuple(lvl.ceiling for lvl in m.levels),
        m.cpu_count,
        m.dask_memory_limit,
        None if pool is None else (pool.key, pool.others),
    )


def replan(spec: FollowSpec, m: Measurement, pool: PoolView | None = None) -> Plan:
    """The start's plan for a fresh measurement.

    `--min-worker-memory` refuses a start; once the workers run there is nobody to refuse
    to, and keeping a limit the memory no longer covers is what ends in a kernel OOM kill.
    So a budget below the minimum still yields its plan. Raises PlanError only when no
    positive per-worker limit exists at all.
    """
    try:
        return make_plan(m, spec.args, spec.settings, pool=pool)
    except PlanError:
        return make_plan(m, spec.args, replace(spec.settings, min_worker_memory=1), pool=pool)


def hysteresis(current: int) -> int:
    """How far the per-worker limit must move before it counts as a change."""
    return max(HYSTERESIS_FLOOR, int(current * HYSTERESIS_FRACTION))


def share_ceiling(first_per_worker: int, share_per_worker: int, settling: bool) -> int:
    """The per-worker limit never to go above, in a pool shared with other instances:
    our share as it is now. Back within a band of the start's plan is the start's plan
    (the same conditions measure a few MiB apart: the supervisor's own pages), except
    while settling after a member came or went: a newcomer that started under its share
    (what was free then) has no start plan to keep, and would stay under its share."""
    if settling or abs(share_per_worker - first_per_worker) > hysteresis(first_per_worker):
        return share_per_worker
    return first_per_worker


@record
class Decision:
    action: str  # "keep" | "lower" | "raise"
    current: int
    proposed: int
    # The new per-worker limit (== current for "keep").
    target: int
    band: int


def decide(current: int, proposed: int, ceiling: int, *, settling: bool = False) -> Decision:
    """Whether the per-worker limit moves, and to what.

    The target is the proposal capped at the start's plan (`ceiling`), and a raise that
    lands within the ceiling's band goes to the ceiling. It counts only when
    it leaves the band `current ± hysteresis(current)`; the band is centred on the limit
    in force, so after a move the next one needs another full band and noise around a
    level never flaps the limit back and forth.

    `settling`: the pool's members changed and our share (`ceiling`) is not reached
    yet. A target at the share then counts from `SETTLE_STEP` on, either way; the share
    is a fixed point, so this cannot flap either.
    """
    band = hysteresis(current)
    target = max(1, min(proposed, ceiling))
    if settling and target == ceiling and abs(target - current) > SETTLE_STEP:
        return Decision("raise" if target > current else "lower", current, proposed, target, band)
    if target < current - band:
        return Decision("lower", current, proposed, target, band)
    if target > current + band:
        # Back within a band of the start's plan is back at it: the same conditions
        # measure a few MiB apart (the supervisor's own pages), and a squeeze that has
        # passed should leave exactly the plan the operator saw.
        if ceiling - target <= hysteresis(ceiling):
            target = ceiling
        return Decision("raise", current, proposed, target, band)
    return Decision("keep", current, proposed, current, band)


def ancestor_limit(levels: tuple[LevelReading, ...], index: int) -> int | None:
    """The lowest limit above level `index` (v1's hierarchical limit counts too)."""
    limits = [lvl.effective_limit for lvl in levels[index + 1 :]]
    present = [v for v in limits if v is not None]
    return min(present) if present else None


def kernel_target(
    *,
    current: int,
    budget: int,
    original: int | None,
    ancestor: int | None,
    first_budget: int,
    usage: int,
    dask_lowered: bool,
    margin: int = KERNEL_MARGIN,
) -> int | None:
    """The value to write to a limit we manage now, or None to leave it as it is.

    Raise: never above the value found before our first write, an ancestor's limit, or
    the start's budget. Lower: only once Dask's side holds the lower limit, and never
    below the cgroup's usage plus the margin (above it, Dask spills, pauses and restarts
    first; the kernel limit follows on a later tick).
    """
    ceiling = min(v for v in (original, ancestor, first_budget) if v is not None)
    target = min(budget, ceiling)
    if target < current:
        if not dask_lowered:
            return None
        target = max(target, usage + margin)
        return target if target < current else None
    if target > current:
        return target
    return None


# A usage threshold never sits closer than this to the usage it was set from: the kernel
# counts usage in per-CPU batches, and a threshold at the current usage would fire on
# every page our own workers touch.
WAKE_STEP_FLOOR = 8 * MiB


@record
class WakePoints:
    """What the kernel should wake the watch on before its next tick (`follow/wake.py`).

    `thresholds`: (cgroup directory, usage in bytes) pairs; v1 signals when the level's
    usage crosses one in either direction. `pressure`: the directories whose memory
    pressure to watch (v1 `memory.pressure_level`, v2 PSI `memory.pressure` and
    `memory.events`).
    """

    thresholds: tuple[tuple[str, int], ...]
    pressure: tuple[str, ...]


def wake_points(
    m: Measurement, directories: list[str], current: int, proposed: int | None, ceiling: int
) -> WakePoints:
    """Where a change of the limiting level's usage could move the per-worker limit.

    The plan's per-worker limit moves by at most what the pool moves (a share, a
    fraction of the pool, a reserve that is a fraction: every factor is at most 1), and
    the pool by at most what a level's usage moves. So a limit that `decide` would
    lower needs the usage to rise by at least `band - (target - current)` first, and a
    raise to fall by `band + current - target`: thresholds there wake the watch no later
    than the change needs it. Our own workers' growth crosses them too; the watch then
    ticks, finds nothing to do, and the thresholds move with the usage.
    """
    by_path = {lvl.path: (lvl, d) for lvl, d in zip(m.levels, directories, strict=False)}
    own = [directories[0]] if directories else []
    found = by_path.get(m.limiting)
    if found is None or found[0].usage is None:
        # The host limits (or nothing readable does): the pressure of our own level.
        return WakePoints(thresholds=(), pressure=tuple(own))
    level, directory = found
    assert level.usage is not None
    band = hysteresis(current)
    target = max(1, min(ceiling, current if proposed is None else proposed))
    up = level.usage + max(WAKE_STEP_FLOOR, band - (current - target))
    thresholds = [(directory, up)]
    if current < ceiling:
        down = level.usage - max(WAKE_STEP_FLOOR, band + current - target)
        if down > 0:
            thresholds.append((directory, down))
    pressure = tuple(dict.fromkeys([directory, *own]))
    return WakePoints(thresholds=tuple(thresholds), pressure=pressure)
