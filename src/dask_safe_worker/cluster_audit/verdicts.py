"""Verdicts: which worker is safe, at risk, unmanaged or unknown, and what to do (pure)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..sizes import format_bytes
from .remote import DASK_TERMINATE_DEFAULT

# 2: `action` per worker; a cgroup that only inherits a limit (v1) is no constraint.
# 3: `following` and `pool` per worker (added keys only: a reader of 2 reads 3); what a
#    worker may need of a constraint is capped by the limited cgroups below it.
AUDIT_SCHEMA = 4

SAFE = "safe"
AT_RISK = "at risk"
UNMANAGED = "unmanaged"
UNKNOWN = "unknown"
FITS = "fits"

EXIT_SAFE = 0
EXIT_AT_RISK = 1
EXIT_USAGE = 2
EXIT_UNVERIFIED = 3

DEFAULT_TERMINATE_FRACTION = DASK_TERMINATE_DEFAULT


@dataclass(frozen=True)
class Constraint:
    """Something that bounds the memory of every worker below it: the host, or a
    cgroup level with a limit. `key` is the same for every worker below it."""

    key: str
    name: str
    limit: int | None
    headroom: int | None


@dataclass(frozen=True)
class PoolMember:
    """Another live instance in a worker's pool, as its claim says."""

    pid: int
    # Worker processes: the flexible part of the pool is shared by weight.
    weight: int
    # The budget it holds now (its kernel limit, or its Dask limits and overhead).
    committed: int
    # What it keeps whatever the others do; None when it follows its fair share.
    fixed: int | None
    working_set: int


@dataclass(frozen=True)
class PoolFacts:
    """The pool a managed worker's instance shares with the other instances on its host
    (docs/follow.md, "Several instances, one pool")."""

    key: str
    # The pid of the claim that is this worker's (its own, its nanny's or supervisor's);
    # None when no live claim is.
    instance: int | None = None
    weight: int | None = None
    # The budget its instance holds now (its claim), and its share of the pool (or fixed
    # commitment) when it started (its plan file).
    committed: int | None = None
    fixed: int | None = None
    share: int | None = None
    # The other live instances of the pool.
    members: tuple[PoolMember, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class WorkerFacts:
    address: str
    host: str
    name: str = ""
    dask_limit: int | None = None
    rss: int = 0
    # Dask's nanny restarts the worker at this fraction of its limit; None: never.
    terminate_fraction: float | None = DEFAULT_TERMINATE_FRACTION
    nanny_room: int = 0
    managed: bool = False
    available: int | None = None
    kernel_limit: int | None = None
    kernel_limit_path: str | None = None
    # The host first, then each limited cgroup from the worker's own outwards.
    constraints: tuple[Constraint, ...] = ()
    error: str | None = None
    # With an error: what the operator can do about it, when the report says.
    fix: str | None = None
    notes: tuple[str, ...] = ()
    # The cgroups (as the worker sees them) with memory.oom.group=1: one kernel OOM
    # kill there takes every worker below, nanny and PID 1 included.
    oom_group: tuple[str, ...] = ()
    # The plan file's `following`: a supervisor moves the limits live (True) or the
    # start plan stays (False); None when the plan file does not say (older releases).
    following: bool | None = None
    # An explicit --memory-limit that Dask keeps (the plan's `fixed`): following moves
    # only the kernel limit then.
    memory_limit_fixed: bool = False
    pool: PoolFacts | None = None

    @property
    def moves_live(self) -> bool:
        """Its supervisor moves Dask's limit to its share of the pool on every tick."""
        fixed_claim = self.pool is not None and self.pool.fixed is not None
        return self.following is True and not self.memory_limit_fixed and not fixed_claim


@dataclass(frozen=True)
class Verdict:
    address: str
    verdict: str
    # For unmanaged workers: the measured risk, FITS or AT_RISK.
    risk: str | None
    reasons: tuple[str, ...] = field(default=())
    # One line: what the operator can do about it (None when nothing needs doing).
    action: str | None = None

    @property
    def at_risk(self) -> bool:
        return self.verdict == AT_RISK or self.risk == AT_RISK


def _reach(w: WorkerFacts) -> float:
    """The most this worker can use before Dask acts, or the kernel stops it first."""
    if w.dask_limit is None:
        dask_reach = math.inf
    else:
        fraction = w.terminate_fraction if w.terminate_fraction is not None else 1.0
        dask_reach = math.ceil(fraction * w.dask_limit)
    kernel = w.kernel_limit if w.kernel_limit is not None else math.inf
    return min(dask_reach, kernel)


def _threshold(w: WorkerFacts) -> float:
    """Where Dask restarts this worker (its whole limit if terminate is off)."""
    if w.dask_limit is None:
        return math.inf
    fraction = w.terminate_fraction if w.terminate_fraction is not None else 1.0
    return math.ceil(fraction * w.dask_limit)


def _outer_to_inner(w: WorkerFacts) -> tuple[Constraint, ...]:
    return w.constraints[:1] + w.constraints[:0:-1]


def _inside(w: WorkerFacts, key: str) -> tuple[Constraint, ...]:
    """The worker's constraints below the one with `key`, outermost first."""
    chain = _outer_to_inner(w)
    keys = [c.key for c in chain]
    return chain[keys.index(key) + 1 :] if key in keys else ()


def _demand(
    entries: Sequence[tuple[WorkerFacts, tuple[Constraint, ...]]],
    value: Callable[[WorkerFacts], float],
    bound: Callable[[Constraint], int | None],
) -> float:
    """What the workers may ask of a constraint: each worker's `value`, but what the
    workers below one inner constraint ask together is capped by its `bound` (the
    kernel stops them there first). Each entry: a worker and its constraints below the
    one judged, outermost first."""
    total = 0.0
    nested: dict[str, tuple[Constraint, list[tuple[WorkerFacts, tuple[Constraint, ...]]]]] = {}
    for w, inner in entries:
        if inner:
            nested.setdefault(inner[0].key, (inner[0], []))[1].append((w, inner[1:]))
        else:
            total += value(w)
    for c, below in nested.values():
        part = _demand(below, value, bound)
        cap = bound(c)
        total += part if cap is None else min(part, cap)
    return total


def _size(value: float) -> str:
    return "unbounded" if math.isinf(value) else format_bytes(int(value))


_SHOWN_NEIGHBOURS = 4


def _label(w: WorkerFacts) -> str:
    return w.name or w.address


def _neighbours(w: WorkerFacts, group: Sequence[WorkerFacts]) -> str:
    """The other workers under one constraint, for a reason line."""
    others = [g for g in group if g is not w]
    shown = []
    for g in others[:_SHOWN_NEIGHBOURS]:
        limit = "no Dask limit" if g.dask_limit is None else f"Dask limit {_size(g.dask_limit)}"
        shown.append(f"{_label(g)} ({'' if g.managed else 'unmanaged, '}{limit})")
    if len(others) > _SHOWN_NEIGHBOURS:
        shown.append(f"{len(others) - _SHOWN_NEIGHBOURS} more")
    return ", ".join(shown)


def _names(workers: Sequence[WorkerFacts]) -> str:
    labels = [_label(w) for w in workers]
    if len(labels) > _SHOWN_NEIGHBOURS:
        return (
            ", ".join(labels[:_SHOWN_NEIGHBOURS]) + f" and {len(labels) - _SHOWN_NEIGHBOURS} more"
        )
    return ", ".join(labels)


FOLLOWS_LIVE = (
    "it follows live: its supervisor moves its Dask and kernel limits to its share of the "
    "pool on every tick, so a restart changes nothing"
)


def _follower_action(neighbours: Sequence[WorkerFacts]) -> str:
    """A worker whose supervisor re-plans live: what is left is what cannot move."""
    unmanaged = [g for g in neighbours if not g.managed]
    if unmanaged:
        return (
            f"fix the unmanaged worker(s) beside it ({_names(unmanaged)}): start them with "
            f"dask-safe-worker, or give them a --memory-limit that fits; {FOLLOWS_LIVE}"
        )
    static = [g for g in neighbours if not g.moves_live]
    if static:
        return (
            f"{FOLLOWS_LIVE}, but the worker(s) beside it ({_names(static)}) keep a fixed "
            "plan (--no-follow, an explicit --memory-limit or an older release): restart "
            "them following, or give them less"
        )
    return (
        f"{FOLLOWS_LIVE}; if this stays, the pool is too small for its instances: give the "
        "pool more memory, or start fewer instances (one with --nworkers N instead of "
        "several)"
    )


def _action(w: WorkerFacts, kinds: set[str], neighbours: Sequence[WorkerFacts]) -> str | None:
    """The one thing to do first, for the problems found (kinds), in order of cause.
    `neighbours`: the other workers under a constraint this worker has a problem with."""
    if not kinds:
        return None
    if "no_terminate" in kinds:
        return (
            "set distributed.worker.memory.terminate back to 0.95 (for example "
            "DASK_DISTRIBUTED__WORKER__MEMORY__TERMINATE=0.95) and restart the worker"
        )
    if not w.managed:
        return (
            "start this worker with dask-safe-worker instead of `dask worker`, so that it "
            "gets a --memory-limit that fits what is free, or give it such a --memory-limit"
        )
    if "no_limit" in kinds:
        return "restart it without --memory-limit 0, so that dask-safe-worker sets one"
    if w.moves_live:
        return _follower_action(neighbours)
    if w.following is True and w.memory_limit_fixed:
        return (
            "its explicit --memory-limit is a fixed commitment that following does not "
            "move (only the kernel limit follows): restart it with a --memory-limit that "
            "fits its share of the pool, or without one so that it follows its fair share"
        )
    unmanaged_neighbours = [g for g in neighbours if not g.managed]
    if unmanaged_neighbours:
        return (
            f"fix the unmanaged worker(s) beside it ({_names(unmanaged_neighbours)}): start "
            "them with dask-safe-worker, or give them a --memory-limit that fits; then "
            "restart this worker to re-plan"
        )
    if "kernel" in kinds:
        return (
            "the workers under that limit were planned separately: restart them one after "
            "another to re-plan, or give each less with --reserve"
        )
    return (
        "the plan is made once at start and other processes have grown since: restart the "
        "worker to re-plan from what is free now, and keep room for them with --reserve "
        "(e.g. --reserve 10%)"
    )


def judge(workers: Sequence[WorkerFacts]) -> list[Verdict]:
    """One verdict per worker, in order.

    For every constraint a worker is under (the host, each cgroup level with a limit),
    with all audited workers under the same constraint:
    - kernel limit: the sum of Dask's restart thresholds plus nanny room must fit, or
      the kernel kills before Dask restarts;
    - available now: what the workers may still grow before Dask acts (each capped by
      its own kernel limit) must fit in the level's current headroom.
    What the workers below a limited cgroup inside the constraint may ask of it is
    capped by that cgroup's limit (kernel check) or headroom (available now): the kernel
    stops them there first. So the instances of one pool, each in its own child cgroup
    with its share as kernel limit, are judged at the pool's level by those limits, and
    one of them whose Dask limit overshoots its own kernel limit is at risk itself
    without making the others so.
    A reason names the other workers under the same constraint; `action` says what to do.
    """
    members: dict[str, list[WorkerFacts]] = {}
    for w in workers:
        if w.error is None:
            for c in w.constraints:
                members.setdefault(c.key, []).append(w)

    verdicts: list[Verdict] = []
    for w in workers:
        if w.error is not None:
            action = w.fix or (
                "install dask-safe-worker in that worker's environment to audit it"
                if "is not installed" in w.error
                else None
            )
            verdicts.append(Verdict(w.address, UNKNOWN, None, (w.error, *w.notes), action))
            continue
        problems: list[str] = []
        kinds: set[str] = set()
        # The workers that share a constraint this worker has a problem with.
        neighbours: list[WorkerFacts] = []
        if w.dask_limit is None:
            problems.append("Dask has no memory limit: it never spills, pauses or restarts")
            kinds.add("no_limit")
        if w.terminate_fraction is None:
            problems.append(
                "distributed.worker.memory.terminate is off: Dask never restarts the worker"
            )
            kinds.add("no_terminate")
        for c in w.constraints:
            group = members[c.key]
            where = c.name if c.name == "host" else f"cgroup {c.name}"
            beside = _neighbours(w, group)
            sharing = f"; sharing it: {beside}" if beside else ""
            found = False
            entries = [(g, _inside(g, c.key)) for g in group]
            if c.limit is not None:
                need = _demand(entries, lambda g: _threshold(g) + g.nanny_room, lambda k: k.limit)
                if need > c.limit:
                    found = True
                    kinds.add("kernel")
                    problems.append(
                        f"{len(group)} worker(s) at Dask's restart threshold plus nanny room "
                        f"need {_size(need)}, above the kernel limit {_size(c.limit)} of "
                        f"{where}: the kernel kills before Dask restarts{sharing}"
                    )
            if c.headroom is not None:
                growth = _demand(
                    entries, lambda g: max(0.0, _reach(g) - g.rss), lambda k: k.headroom
                )
                if growth > c.headroom:
                    found = True
                    kinds.add("headroom")
                    problems.append(
                        f"{len(group)} worker(s) may still grow by {_size(growth)} before "
                        f"Dask acts, but only {_size(c.headroom)} is available now in "
                        f"{where}{sharing}"
                    )
            if found:
                neighbours += [g for g in group if g is not w]
        unique = list({id(g): g for g in neighbours}.values())
        reasons = tuple(problems) + w.notes
        action = _action(w, kinds, unique)
        if w.managed:
            verdict = AT_RISK if problems else SAFE
            verdicts.append(Verdict(w.address, verdict, None, reasons, action))
        else:
            risk = AT_RISK if problems else FITS
            why = "not started by dask-safe-worker (no plan file)"
            verdicts.append(Verdict(w.address, UNMANAGED, risk, (why, *reasons), action))
    return verdicts


def exit_code(verdicts: Sequence[Verdict]) -> int:
    """0 every worker safe; 1 any at risk (unmanaged ones included); 3 none at risk but
    some could not be verified (unmanaged that fit, unknown, or no workers at all)."""
    if any(v.at_risk for v in verdicts):
        return EXIT_AT_RISK
    if verdicts and all(v.verdict == SAFE for v in verdicts):
        return EXIT_SAFE
    return EXIT_UNVERIFIED
