"""A worker's report (remote.collect's plain data) as WorkerFacts (pure)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..plan import DEFAULT_NANNY_ALLOWANCE
from ..sizes import format_bytes
from .verdicts import Constraint, PoolFacts, PoolMember, WorkerFacts


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _cgroup_constraints(host_key: str, raw_levels: Any) -> list[Constraint]:
    """One constraint per cgroup that sets a limit itself, own cgroup first.

    On v1 an unlimited cgroup below a limited one reports the ancestor's limit as its
    `hierarchical_memory_limit`; that limit belongs to the ancestor, which is listed with
    it, so the child adds nothing. A limit above the topmost visible cgroup (a container's
    parent on the host) is kept, named as such.
    """
    levels = [lvl for lvl in raw_levels or [] if isinstance(lvl, dict)]
    constraints: list[Constraint] = []
    for level in levels:
        # Reports without `own_limit` came from a collector that knew only the effective one.
        own = _int(level.get("own_limit") if "own_limit" in level else level.get("limit"))
        if own is None:
            continue
        path = str(level.get("path"))
        key = level.get("key") or f"{host_key}:cgroup:{path}"
        constraints.append(Constraint(str(key), path, own, _headroom(own, level)))
    if levels:
        top = levels[-1]
        inherited = _int(top.get("hierarchical_limit"))
        own_limits = [c.limit for c in constraints if c.limit is not None]
        if inherited is not None and (not own_limits or inherited < min(own_limits)):
            path = str(top.get("path"))
            key = f"{top.get('key') or f'{host_key}:cgroup:{path}'}:above"
            name = f"above {path} (not visible here)"
            constraints.append(Constraint(key, name, inherited, _headroom(inherited, top)))
    return constraints


def _headroom(limit: int, level: Mapping[str, Any]) -> int | None:
    working_set = _int(level.get("working_set"))
    if working_set is None:
        return _int(level.get("headroom"))
    return max(0, limit - working_set)


def _own_cgroup(report: Mapping[str, Any]) -> str | None:
    """The worker's own cgroup as "<dev>:<inode>", from its level's key (remote.collect
    keys levels "<boot id>:<dev>:<inode>")."""
    levels = report.get("levels")
    first = levels[0] if isinstance(levels, list) and levels else None
    key = first.get("key") if isinstance(first, dict) else None
    prefix = f"{report.get('boot_id')}:"
    return key[len(prefix) :] if isinstance(key, str) and key.startswith(prefix) else None


def _member(claim: Any) -> PoolMember | None:
    """A claim as `remote.read_pool` sends it; None for anything else."""
    if not isinstance(claim, dict):
        return None
    pid, weight = _int(claim.get("pid")), _int(claim.get("weight"))
    committed, working_set = _int(claim.get("committed")), _int(claim.get("working_set"))
    fixed = claim.get("fixed")
    if not pid or not weight or committed is None or working_set is None:
        return None
    if fixed is not None and _int(fixed) is None:
        return None
    return PoolMember(pid, weight, committed, fixed, working_set)


def _pool_facts(plan: Mapping[str, Any], raw: Any, own_cgroup: str | None) -> PoolFacts | None:
    """The pool from the plan file's key and the live claims the worker read (`remote.
    read_pool`); None for a plan file without a pool (older releases, no claim).

    The worker's instance is the claim of the nearest of its ancestors (itself, its
    nanny, the supervisor); or, when that process is gone (a killed supervisor, whose
    worker lives on), the claim whose child cgroup is the worker's own (`own_cgroup`,
    "<dev>:<inode>")."""
    location = plan.get("pool")
    if not isinstance(location, dict) or not isinstance(location.get("key"), str):
        return None
    share = _int(plan.get("commitment") if plan.get("fixed") is True else plan.get("share"))
    report = raw if isinstance(raw, dict) else {}
    error = report.get("error")
    claims: list[PoolMember] = []
    cgroups: dict[int, Any] = {}
    for claim in report.get("claims") or []:
        member = _member(claim)
        if member is not None:
            claims.append(member)
            cgroups[member.pid] = claim.get("cgroup")
    ancestors = [p for p in report.get("ancestors") or [] if _int(p) is not None]
    own = next((c for a in ancestors for c in claims if c.pid == a), None)
    if own is None and own_cgroup is not None:
        own = next((c for c in claims if cgroups[c.pid] == own_cgroup), None)
    others = tuple(c for c in claims if c is not own)
    if own is None and error is None and raw is not None:
        error = "no live claim in the pool is this worker's (its instance has none)"
    return PoolFacts(
        key=location["key"],
        instance=None if own is None else own.pid,
        weight=None if own is None else own.weight,
        committed=None if own is None else own.committed,
        fixed=None if own is None else own.fixed,
        share=share,
        members=others,
        error=None if error is None else str(error),
    )


TERMINATE_FIX = (
    "set distributed.worker.memory.terminate to a fraction such as 0.95 (for example "
    "DASK_DISTRIBUTED__WORKER__MEMORY__TERMINATE=0.95) and restart the worker"
)


# Above this, a terminate fraction is no threshold anyone meant (and times a limit it
# may overflow a float).
_MAX_TERMINATE = 1000.0


def terminate_fraction(value: Any) -> tuple[float | None, str | None]:
    """distributed.worker.memory.terminate as the worker holds it (`remote.
    _terminate_setting`): (the fraction, None), (None, None) when it is off (False or
    None), or (None, why it cannot be judged). The nanny restarts the worker when
    `rss / limit <= terminate` is false: with nan, 0 or less at every poll, with inf
    never, with a string (an environment value dask could not parse) the check fails
    at every poll."""
    if value is None or value is False:
        return None, None
    if isinstance(value, (int, float)) and 0 < value <= _MAX_TERMINATE:
        return float(value), None
    shown = repr(value) if isinstance(value, str) else str(value)
    return None, (
        f"distributed.worker.memory.terminate is {shown}, not a fraction of the memory "
        "limit above 0 (such as 0.95): when Dask's nanny restarts this worker cannot be "
        "judged"
    )


def facts_from_report(address: str, info: Mapping[str, Any], report: Any) -> WorkerFacts:
    """Turn what `collect` returned (or the exception it raised, or nothing) into facts.

    `info` is the scheduler's view of the worker (host, name, memory_limit), used when
    the worker itself could not answer. Whatever a worker sent, it becomes this
    worker's facts: a report that is not one, or one whose values break the reading,
    is an error of this worker alone (verdict "unknown" with the reason), never the
    end of the audit.
    """
    try:
        return _facts(address, info, report)
    except Exception as exc:
        return _unanswered(
            address, info, f"its report could not be read: {type(exc).__name__}: {exc}"
        )


def _unanswered(address: str, info: Mapping[str, Any], reason: str) -> WorkerFacts:
    limit = info.get("memory_limit")
    return WorkerFacts(
        address,
        str(info.get("host") or address),
        str(info.get("name") or ""),
        dask_limit=_int(limit) or None,
        error=reason,
    )


def _facts(address: str, info: Mapping[str, Any], report: Any) -> WorkerFacts:
    host = str(info.get("host") or address)
    name = str(info.get("name") or "")
    if report is None or isinstance(report, BaseException):
        reason = (
            "the worker did not answer"
            if report is None
            else f"the audit function failed: {type(report).__name__}: {report}"
        )
        return _unanswered(address, info, reason)
    if not isinstance(report, Mapping):
        # Another handler answered for the audit function (a replaced `run` handler, a
        # worker class of its own): nothing in it is the worker's measurement.
        return _unanswered(
            address,
            info,
            f"the worker answered with a {type(report).__name__}, not the audit's report "
            "(does it replace Dask's run handler?)",
        )

    plan = report.get("plan") if isinstance(report.get("plan"), dict) else None
    managed = bool(report.get("plan_file"))
    notes: list[str] = []
    if report.get("plan_error"):
        notes.append(str(report["plan_error"]))
    dask_limit = _int(report.get("dask_memory_limit")) or None
    fraction, terminate_problem = terminate_fraction(report.get("terminate_fraction"))

    nanny_room = 0
    pool_fields: dict[str, Any] = {}
    if plan is not None:
        overhead, n = _int(plan.get("overhead")), _int(plan.get("n_workers"))
        if overhead is not None and n:
            nanny_room = math.ceil(overhead / n)
        planned = _int(plan.get("effective_per_worker"))
        if planned is not None and dask_limit is not None and planned != dask_limit:
            notes.append(
                f"Dask's limit {format_bytes(dask_limit)} differs from the planned "
                f"{format_bytes(planned)}"
            )
        if plan.get("enforced") is False:
            notes.append(f"no kernel limit was set at start ({plan.get('write_reason')})")
        following = plan.get("following")
        pool_fields = {
            "following": following if isinstance(following, bool) else None,
            "memory_limit_fixed": plan.get("fixed") is True,
            "pool": _pool_facts(plan, report.get("pool"), _own_cgroup(report)),
        }
    elif report.get("has_nanny"):
        nanny_room = DEFAULT_NANNY_ALLOWANCE

    if report.get("error") or terminate_problem:
        return WorkerFacts(
            address,
            host,
            name,
            dask_limit=dask_limit,
            managed=managed,
            error=str(report.get("error") or terminate_problem),
            notes=tuple(notes),
            fix=None if report.get("error") else TERMINATE_FIX,
            **pool_fields,
        )

    hostname = str(report.get("hostname") or host)
    host_key = f"host:{report.get('boot_id') or hostname}"
    constraints = [Constraint(host_key, "host", None, _int(report.get("mem_available")))]
    constraints += _cgroup_constraints(host_key, report.get("levels"))
    # The smallest limit, and the cgroup that sets it (the innermost one on a tie).
    limited = [c for c in constraints if c.limit is not None]
    smallest = min(limited, key=lambda c: c.limit or 0, default=None)
    kernel_limit = smallest.limit if smallest is not None else None
    kernel_path = smallest.name if smallest is not None else None
    notes.extend(str(x) for x in report.get("warnings") or [])
    oom_group = tuple(
        str(lvl.get("path"))
        for lvl in report.get("levels") or []
        if isinstance(lvl, dict) and lvl.get("oom_group") is True
    )
    return WorkerFacts(
        address,
        host,
        name,
        dask_limit=dask_limit,
        rss=_int(report.get("rss")) or 0,
        terminate_fraction=fraction,
        nanny_room=nanny_room,
        managed=managed,
        available=_int(report.get("available")),
        kernel_limit=kernel_limit,
        kernel_limit_path=kernel_path,
        constraints=tuple(constraints),
        notes=tuple(notes),
        oom_group=oom_group,
        **pool_fields,
    )
