"""Verdicts: which worker is safe, at risk, unmanaged or unknown, and what to do (pure)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..sizes import format_bytes
from .remote import DASK_TERMINATE_DEFAULT

# 2: `action` per worker; a cgroup that only inherits a limit (v1) is no constraint.
AUDIT_SCHEMA = 2

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
    constraints: tuple[Constraint, ...] = ()
    error: str | None = None
    notes: tuple[str, ...] = ()
    # The cgroups (as the worker sees them) with memory.oom.group=1: one kernel OOM
    # kill there takes every worker below, nanny and PID 1 included.
    oom_group: tuple[str, ...] = ()


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


def _action(
    w: WorkerFacts, kinds: set[str], unmanaged_neighbours: Sequence[WorkerFacts]
) -> str | None:
    """The one thing to do first, for the problems found (kinds), in order of cause."""
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
            action = (
                "install dask-safe-worker in that worker's environment to audit it"
                if "is not installed" in w.error
                else None
            )
            verdicts.append(Verdict(w.address, UNKNOWN, None, (w.error, *w.notes), action))
            continue
        problems: list[str] = []
        kinds: set[str] = set()
        # Unmanaged workers that share a constraint this worker has a problem with.
        unmanaged: list[WorkerFacts] = []
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
            if c.limit is not None:
                need = sum(_threshold(g) + g.nanny_room for g in group)
                if need > c.limit:
                    found = True
                    kinds.add("kernel")
                    problems.append(
                        f"{len(group)} worker(s) at Dask's restart threshold plus nanny room "
                        f"need {_size(need)}, above the kernel limit {_size(c.limit)} of "
                        f"{where}: the kernel kills before Dask restarts{sharing}"
                    )
            if c.headroom is not None:
                growth = sum(max(0.0, _reach(g) - g.rss) for g in group)
                if growth > c.headroom:
                    found = True
                    kinds.add("headroom")
                    problems.append(
                        f"{len(group)} worker(s) may still grow by {_size(growth)} before "
                        f"Dask acts, but only {_size(c.headroom)} is available now in "
                        f"{where}{sharing}"
                    )
            if found:
                unmanaged += [g for g in group if not g.managed and g is not w]
        unique = list({id(g): g for g in unmanaged}.values())
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
