"""Why a worker process ended: a pure function over what the nanny and the kernel said.

The nanny knows how its worker ended (the exit code; whether its own memory monitor
terminated it past Dask's terminate threshold, the `worker-restart-memory` event), the
kernel knows whether it OOM-killed somebody (a cgroup's `oom_kill` counter, /proc/vmstat's
`oom_kill`) and where a limit was hit (v2 `memory.events.local` `oom`, v1 `memory.failcnt`).
The supervisor's watch gathers both (`follow/death_watch.py`) and asks `attribute` which
of five causes it was; `sentence` says it in one line for people.

A kernel OOM kill counts in the victim's cgroup whatever made the kernel kill (a global
OOM counts there too, mm/oom_kill.c), so the cgroup's `oom_kill` alone cannot tell a kill
at our limit from a global one: a limit hit in one of our cgroups can. Stdlib only: the
supervisor imports this, and the nanny and the client helper render with it.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence

from ..records import record

TYPE_CHECKING = False  # typing costs ~2 ms (and `re`) in the supervisor; mypy knows this name
if TYPE_CHECKING:
    from typing import Any, TypeGuard

# Where the nanny preload sends every record: `client.get_events(TOPIC)`.
TOPIC = "dask-safe-worker-death"

KERNEL_OOM_LIMIT = "kernel_oom_limit"
KERNEL_OOM_GLOBAL = "kernel_oom_global"
NANNY_MEMORY_RESTART = "nanny_memory_restart"
SIGNAL = "signal"
EXIT = "exit"
CAUSES = (KERNEL_OOM_LIMIT, KERNEL_OOM_GLOBAL, NANNY_MEMORY_RESTART, SIGNAL, EXIT)

# A record's keys, for readers that check what they got (the client helper, the audit).
RECORD_KEYS = frozenset(
    {
        "cause",
        "worker_pid",
        "worker",
        "nanny",
        "dask_name",
        "at",
        "exitcode",
        "signal",
        "rss",
        "rss_samples",
        "cgroup",
        "cgroup_limit",
        "limit_hits",
        "kernel_limit",
        "dask_limit",
        "terminate_at",
        "oom_kills",
        "global_oom_kills",
        "top_users",
    }
)


@record
class ExitNote:
    """What the nanny saw when its worker process ended."""

    pid: int
    # multiprocessing's: -N when signal N ended the process.
    exitcode: int
    # time.time() when the nanny noticed.
    at: float
    worker: str | None = None
    name: str | None = None
    # The nanny's address: it stays when the restarted worker comes back on a new one.
    nanny: str | None = None
    # The nanny's memory monitor terminated this process at this RSS (bytes).
    restart_rss: int | None = None
    # The nanny's Dask memory limit and terminate fraction when the worker ended.
    dask_limit: int | None = None
    terminate_fraction: float | None = None


@record
class Readings:
    """Everything `attribute` weighs, gathered by the supervisor after the note."""

    note: ExitNote
    # Per cgroup directory of ours: how far `oom_kill` moved since the last attribution.
    oom_kills: Mapping[str, int]
    # Per cgroup directory of ours: how often its own limit was hit (v2 `oom` of
    # memory.events.local, v1 failcnt): not its descendants' hits.
    limit_hits: Mapping[str, int]
    # How far /proc/vmstat's oom_kill moved (None: unreadable).
    global_oom_kills: int | None
    # The victim's last RSS samples, oldest first: (time.time(), bytes).
    rss_samples: Sequence[tuple[float, int]] = ()
    kernel_limit: int | None = None
    # The cgroup the worker ran in (the limit we wrote, else our own).
    cgroup: str | None = None
    # The largest other users of the pool at that moment: (who, bytes), largest first.
    top_users: Sequence[tuple[str, int]] = ()
    # (cgroup directory, its limit in bytes) when the worker died, for those that hit it.
    cgroup_limits: Sequence[tuple[str, int]] = ()


def signal_of(exitcode: int) -> int | None:
    return -exitcode if exitcode < 0 else None


def own_kills(oom_kills: Mapping[str, int]) -> int:
    """The kills counted in the deepest of our cgroups, the one the worker ran in. The
    kernel counts a kill in the victim's cgroup (and, v2, in every ancestor): an
    ancestor's count also holds kills of others below it (an agent beside the worker
    killed at its own limit), which say nothing about ours."""
    return oom_kills[max(oom_kills, key=len)] if oom_kills else 0


def cause_of(r: Readings) -> str:
    """One of CAUSES.

    The nanny's own restart wins: it may SIGKILL a worker slow to stop. A SIGKILL with an
    OOM kill counted (in our cgroup, or on the host when the cgroup does not count them,
    v1 before Linux 4.13) is the kernel's: at our limit when one of our cgroups hit its
    limit meanwhile, else a global OOM kill (or one at a limit above ours).
    """
    sig = signal_of(r.note.exitcode)
    if r.note.restart_rss is not None:
        return NANNY_MEMORY_RESTART
    if sig == signal.SIGKILL:
        counted = own_kills(r.oom_kills) > 0
        if counted or (not r.oom_kills and (r.global_oom_kills or 0) > 0):
            at_limit = any(n > 0 for n in r.limit_hits.values())
            return KERNEL_OOM_LIMIT if at_limit else KERNEL_OOM_GLOBAL
        if (r.global_oom_kills or 0) > 0 and not counted:
            # The host killed somebody, our cgroup did not count it: not ours.
            return SIGNAL
    if sig is not None:
        return SIGNAL
    return EXIT


def attribute(r: Readings) -> dict[str, Any]:
    """The death record (JSON-ready; RECORD_KEYS), as the scheduler's event carries it."""
    cause = cause_of(r)
    n = r.note
    sig = signal_of(n.exitcode)
    samples = [[round(t, 3), rss] for t, rss in r.rss_samples]
    # The highest of the last samples: a sample taken while the kernel was already
    # tearing the victim down (the OOM reaper frees its memory) reads low.
    peak = max((rss for _, rss in r.rss_samples), default=None)
    rss = n.restart_rss if n.restart_rss is not None else peak
    terminate_at = (
        int(n.dask_limit * n.terminate_fraction) if n.dask_limit and n.terminate_fraction else None
    )
    cgroup = r.cgroup
    cgroup_limit = r.kernel_limit
    hit = {d: k for d, k in r.limit_hits.items() if k > 0}
    if cause == KERNEL_OOM_LIMIT:
        # The deepest cgroup whose own limit was hit: the one whose limit stopped the
        # worker. Not always the one we wrote: where our limit leaves no room below a
        # parent's (reserve 0), the parent's may be reached first, and naming ours would
        # put the kill at a limit it never reached.
        cgroup = max(hit, key=len)
        cgroup_limit = dict(r.cgroup_limits).get(cgroup)
    kills = own_kills(r.oom_kills)
    return {
        "cause": cause,
        "worker_pid": n.pid,
        "worker": n.worker,
        "nanny": n.nanny,
        "dask_name": n.name,
        "at": n.at,
        "exitcode": n.exitcode,
        "signal": None if sig is None else _signal_name(sig),
        "rss": rss,
        "rss_samples": samples,
        "cgroup": cgroup,
        "cgroup_limit": cgroup_limit,
        "limit_hits": hit,
        "kernel_limit": r.kernel_limit,
        "dask_limit": n.dask_limit,
        "terminate_at": terminate_at,
        "oom_kills": kills,
        "global_oom_kills": r.global_oom_kills,
        "top_users": [[who, size] for who, size in r.top_users],
    }


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _size(n: object) -> str:
    if not isinstance(n, int) or isinstance(n, bool):
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _limits(rec: Mapping[str, Any]) -> str:
    kernel = rec.get("kernel_limit")
    parts = [f"kernel limit {_size(kernel)}" if kernel else "no kernel limit"]
    parts.append(f"Dask limit {_size(rec.get('dask_limit'))}" if rec.get("dask_limit") else "")
    return ", ".join(p for p in parts if p)


def sentence(rec: Mapping[str, Any]) -> str:
    """One line for people, from a record `attribute` made (or one read back)."""
    who = f"worker {rec.get('worker') or 'pid ' + str(rec.get('worker_pid'))}"
    if rec.get("dask_name") not in (None, "", rec.get("worker")):
        who += f" ({rec.get('dask_name')})"
    at = f" at {_size(rec['rss'])}" if rec.get("rss") is not None else ""
    cause = rec.get("cause")
    if cause == KERNEL_OOM_LIMIT:
        own = rec.get("cgroup_limit")
        # A parent's limit reached before the one we wrote: say how large it was.
        its = f"its limit {_size(own)}; " if own and own != rec.get("kernel_limit") else ""
        text = (
            f"{who} was killed by the kernel OOM killer{at} at the limit of cgroup "
            f"{rec.get('cgroup')} ({its}{_limits(rec)})"
        )
    elif cause == KERNEL_OOM_GLOBAL:
        text = (
            f"{who} was killed by the kernel OOM killer{at}, with the host (or a cgroup "
            f"above its own) out of memory, not at its cgroup's limit ({_limits(rec)})"
        )
    elif cause == NANNY_MEMORY_RESTART:
        threshold = rec.get("terminate_at")
        past = f", past Dask's terminate threshold {_size(threshold)}" if threshold else ""
        text = f"{who} was restarted by its nanny{at}{past} ({_limits(rec)})"
    elif cause == SIGNAL:
        text = (
            f"{who} was killed by {rec.get('signal')} from outside (not the kernel OOM "
            f"killer, not its nanny){at} ({_limits(rec)})"
        )
    else:
        text = f"{who} exited with status {rec.get('exitcode')}{at} ({_limits(rec)})"
    top = rec.get("top_users") or []
    if top and cause in (KERNEL_OOM_LIMIT, KERNEL_OOM_GLOBAL, NANNY_MEMORY_RESTART):
        users = ", ".join(f"{u[0]} {_size(u[1])}" for u in top[:3])
        text += f"; largest other users: {users}"
    return text


def is_record(doc: object) -> TypeGuard[dict[str, Any]]:
    """A record this version of `attribute` could have made (readers get events from a
    scheduler that anybody may have written to)."""
    return (
        isinstance(doc, dict)
        and doc.keys() >= RECORD_KEYS
        and doc.get("cause") in CAUSES
        and isinstance(doc.get("worker_pid"), int)
    )
