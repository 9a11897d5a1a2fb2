"""The one line a person reads at start (pure): what Dask got, from where, and the kernel.

Every term is in `plan.made` and `cgroup.write.outcome`; this says what matters of them
in words, for the console (event `start.summary`).
"""

from __future__ import annotations

from .cgroup.write import WriteOutcome
from .plan import Plan
from .sizes import format_bytes

_KERNEL_REASONS = {
    "disabled": "--cgroup-write never",
    "no_memory_cgroup": "no memory cgroup",
    "below_usage": "the budget is below what the cgroup uses now",
    "existing_lower": "a limit at or below the budget is in force",
}


def _source(plan: Plan) -> str:
    where = (
        "the host's available memory"
        if plan.limiting == "host"
        else f"the headroom of cgroup {plan.limiting}"
    )
    if plan.pool_key is not None and plan.members:
        n = len(plan.members)
        where += f", shared with {n} other instance{'s' if n != 1 else ''}"
    return f"{where}, less a reserve of {format_bytes(plan.reserve)}"


def _kernel(outcome: WriteOutcome) -> str:
    reason = _KERNEL_REASONS.get(str(outcome.reason), str(outcome.reason))
    if outcome.written:
        value = outcome.read_back if outcome.read_back is not None else outcome.requested
        size = "" if value is None else f" {format_bytes(value)}"
        return f"kernel limit{size} written on {outcome.target}"
    if outcome.enforced:
        return f"kernel limit on {outcome.target} left as it is ({reason})"
    return f"no kernel limit written ({reason})"


def start_summary(plan: Plan, outcome: WriteOutcome) -> str:
    per_worker = plan.effective_per_worker
    workers = f"{plan.n_workers} worker{'s' if plan.n_workers != 1 else ''}"
    if per_worker is None:
        dask = f"{workers} without a Dask memory limit (--memory-limit {plan.user_memory_limit})"
    else:
        given = " (your --memory-limit)" if plan.user_memory_limit is not None else ""
        dask = f"{workers} of {format_bytes(per_worker)} each{given}"
    return (
        f"{dask}, from a budget of {format_bytes(plan.budget)}: {_source(plan)}; {_kernel(outcome)}"
    )
