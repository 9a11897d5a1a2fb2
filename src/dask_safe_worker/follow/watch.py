"""`--follow`'s watch, run by the supervisor on every tick (the imperative shell).

Each tick re-reads what the plan depends on (`measure.remeasure`, with the cgroup
located once at start), re-plans with the start's function (`follow.replan`), and when
`follow.decide` says the per-worker limit moved: rewrites the live-limit channel that the
worker and nanny preloads follow, and moves the kernel limit this process wrote, under
`follow.kernel_target`'s rules. It also reports the kernel's own memory events.

Stdlib plus this package's measuring and planning modules: it runs in the supervisor,
whose RSS stays small (benchmarks/supervisor_rss.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from ..cgroup.files import KeptFiles, open_memory_cgroup, read_kernel_text
from ..cgroup.parse import parse_memory_stat
from ..cgroup.pool import Member, Pool, with_kernel_working_sets
from ..dask_compat.release import Release, installed_release
from ..measure import (
    Measurement,
    hierarchy_inherited,
    initial_pid_namespace,
    locate,
    remeasure,
)
from ..plan import PlanError, PoolView
from ..proc_parse import ParseError
from ..records import mutable_record, replace
from .death_watch import DeathWatch, read_limit
from .decide import (
    SETTLE_STEP,
    FollowSpec,
    ManagedLimit,
    ancestor_limit,
    decide,
    kernel_target,
    plan_key,
    replan,
    seen_ancestors,
    share_ceiling,
    wake_points,
    with_original_limit,
)
from .live_limit import (
    SPEC_FILE,
    LiveLimit,
    read_acks,
    read_live_limit,
    remove_ack,
    remove_channel,
    write_live_limit,
)
from .metrics import Metrics, remove_metrics, same, write_metrics
from .wake import Wake

TYPE_CHECKING = False  # typing costs ~2 ms (and `re`) in the supervisor; mypy knows this name
if TYPE_CHECKING:
    from typing import Any

Audit = Callable[..., None]


# Counters in memory.events (v2) and memory.oom_control (v1) that mean the kernel acted.
_EVENT_NAMES = ("oom_kill", "oom", "max", "high")
# "0" turns the kernel's wake-ups off: the tick alone, as before (for comparisons).
WAKE_ENV = "DASK_SAFE_WORKER_FOLLOW_WAKE"
# Ticks a kernel OOM kill's record waits for one of our processes to disappear.
_KILL_HOLD_TICKS = 5
# A kernel wake-up ticks at once, but never sooner than this after the last tick: our
# own workers' growth crosses the usage thresholds too, and each tick costs ~1 ms.
WAKE_GAP_S = 0.1


@mutable_record
class _Pending:
    """A generation written to the channel and not yet held by every worker."""

    generation: int
    action: str
    changed_at: float
    seen_at: float
    kernel: dict[str, Any]


# A working set told to the pool is rewritten when it moves by more than this: the
# siblings read a child cgroup's own from the kernel, and a stale one elsewhere is off
# by no more than the hysteresis that decides every limit anyway.
WORKING_SET_BAND = 8 * 2**20


def _moved(old: int, new: int) -> bool:
    return abs(new - old) > max(WORKING_SET_BAND, old // 50)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        from ..event_line import errno_name

        return errno_name(exc.errno)
    return str(exc)


class Watch:
    def __init__(
        self,
        spec: FollowSpec,
        audit: Audit,
        proc_root: Path = Path("/proc"),
        root: Path = Path("/"),
        clock: Callable[[], float] = time.monotonic,
        *,
        release: Release,
        wake: bool = True,
    ) -> None:
        self.spec = spec
        self.audit = audit
        self.release = release
        self.proc_root = proc_root
        self.root = root
        self.clock = clock
        self.pid = os.getpid()
        # Located once: mountinfo can be long (docs/follow.md, costs).
        self.location = locate(proc_root, root)
        self.directories = (
            [str(d) for _, d in self.location.level_paths(root)] if self.location else []
        )
        # v1: a level whose hierarchical limit is none ends each tick's reads (measure.py).
        self._inherited = self.location is not None and hierarchy_inherited(
            self.location.version, self.directories
        )
        self._initial_ns = initial_pid_namespace(proc_root)
        first = read_live_limit(spec.channel)
        if first is None:
            raise OSError(f"no live-limit record at {spec.channel}")
        self.record = first
        self.managed: ManagedLimit | None = spec.managed
        self.managed_value: int | None = spec.managed.written if spec.managed else None
        self.ancestors: int | None = spec.managed.ancestors if spec.managed else None
        self.kernel_goal: int | None = None
        self.pending: _Pending | None = None
        self.previous: Measurement | None = None
        self.n_workers = 0
        self.events: dict[str, dict[str, int]] = {}
        self.ours: frozenset[int] = frozenset()
        self.due = clock() + spec.interval
        self.ticks = 0
        self._gone_before: frozenset[int] = frozenset()
        # A counted kill waits for its victim: (fields, pids gone so far, ticks waited).
        self._held_kills: list[tuple[dict[str, Any], frozenset[int], int]] = []
        # Exit codes of the processes the supervisor reaped (multiprocessing's -N for a
        # signal), for the deaths no nanny lived to note.
        self._reaped: dict[int, int] = {}
        self.stopped = False
        self._last_failure: tuple[str, str] | None = None
        self.events = self._read_counters()
        # The pool: our claim (written at start, under the same pid), what we hold in
        # it now, and the budget our share allows (the ceiling of every raise).
        self.pool = (
            Pool(Path(spec.pool_dir), spec.pool_key or "", remember=True) if spec.pool_dir else None
        )
        self.member = Member(
            pid=self.pid,
            weight=spec.weight,
            fixed=spec.fixed,
            committed=spec.first_budget if spec.committed is None else spec.committed,
            working_set=0,
            cgroup=spec.member_cgroup,
        )
        self.share_budget = spec.first_budget
        # While another instance lives inside the cgroup whose limit we wrote as its sole
        # occupant, that limit holds the whole pool, never our share alone.
        self.kernel_floor: int | None = None
        # Why the next change happens, when it is about the pool's members (this tick).
        self.reason = "limit changed"
        self._others: tuple[int, ...] = ()
        self._raise_wanted = False
        # Until our share is reached after the pool's members changed (decide.SETTLE_STEP).
        self._settling = False
        # Worker deaths, explained (death_watch.py): every cgroup whose counters tell.
        self.deaths = DeathWatch(
            spec.channel,
            audit,
            self.location.version if self.location else None,
            [*self._event_dirs(), *self.directories],
            proc_root,
        )
        self._known: tuple[int, int] | None = None
        self._metrics: Metrics | None = None
        # The level, counter and /proc files every tick reads, kept open between ticks.
        self._files = KeptFiles()
        # Kernel signals that bring the next tick forward (wake.py); None: the tick alone.
        self.wake: Wake | None = None
        if wake and self.location is not None:
            self.wake = Wake(self.location.version, audit)
        self._wake_key: tuple[int, str] | None = None
        self.last_tick = clock()
        # The inputs of the last tick that decided to change nothing and changed nothing
        # (`_quiet_key`), and how many ticks since found the same and skipped the decision.
        self._quiet: tuple[object, ...] | None = None
        self.skipped = 0

    # -- the supervisor's hook -------------------------------------------------------

    def __call__(self) -> float:
        """Tick if due; seconds until the next tick (the supervisor's wait bound)."""
        now = self.clock()
        if self.stopped:
            return 3600.0
        if now >= self.due:
            try:
                self.tick()
            except Exception as exc:  # the watch must never take the supervisor down
                self._failed("tick", reason=repr(exc))
            self.last_tick = now
            self.due = max(now, self.due) + self.spec.interval
            now = self.clock()
        return max(0.0, self.due - now)

    def fds(self) -> list[tuple[int, int]]:
        """The kernel's fds that bring the next tick forward, with their poll events."""
        return [] if self.wake is None or self.stopped else self.wake.fds()

    def fired(self, fds: list[int]) -> None:
        """Some of `fds()` are ready: tick now (or once the gap since the last has passed)."""
        if self.wake is None or not self.wake.fired(fds):
            return
        self._wake_key = None  # the usage moved: the thresholds move with it
        self.due = min(self.due, self.last_tick + min(WAKE_GAP_S, self.spec.interval))

    def _failed(self, stage: str, **fields: Any) -> None:
        """Log a failure once: the same one on every tick would only bury the log."""
        key = (stage, repr(sorted(fields.items())))
        if key != self._last_failure:
            self._last_failure = key
            self.audit("follow.failed", stage=stage, **fields)

    def close(self) -> None:
        """The workers are gone: remove the channel (its directory is ours alone)."""
        import contextlib

        self._last_look()
        if self.wake is not None:
            self.wake.close()
        self.deaths.close()
        remove_metrics(self.spec.channel)
        self._files.close()
        if self.pool is not None:
            self.pool.forget()
            self.pool.leave(self.pid)
            self.pool.remove_if_empty()
        remove_channel(self.spec.channel)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(os.path.dirname(self.spec.channel), SPEC_FILE))
            os.rmdir(os.path.dirname(self.spec.channel))

    def reaped(self, pid: int, exitcode: int) -> None:
        """The supervisor reaped `pid` (the nanny, or a worker orphaned by its death)."""
        self._reaped[pid] = exitcode

    def _last_look(self) -> None:
        """The kernel's counters once more before the supervisor exits. A kill at the
        limit we write may take the nanny too (it lives in that cgroup, with its worker
        and us): the supervisor then exits before a tick reads the kill, and the death
        would go unreported."""
        gone = frozenset(self._reaped) | frozenset(
            p for p in self.ours if p != self.pid and not os.path.exists(self.proc_root / str(p))
        )
        try:
            with self._files:
                if self.location is not None:
                    self._report_events(self._read_counters(), self._gone_before | gone)
                self.deaths.last_look(self._kernel_limit, self._pool_users, self._reaped)
        except Exception as exc:  # the worker's exit code matters more
            self._failed("close", reason=repr(exc))
        self._flush_kills(gone, final=True)

    # -- one tick ----------------------------------------------------------------------

    def tick(self) -> None:
        with self._files:
            self._tick()

    def _tick(self) -> None:
        self.ticks += 1
        seen_at = time.time()
        self._explain_deaths()
        # Counters before processes: a kill counted now has its victim gone by the
        # process list read next, or by the one a tick ago.
        counters = self._read_counters()
        try:
            m = self._measure()
        except (OSError, ParseError) as exc:
            self._failed("measure", reason=_describe(exc))
            return
        # The workers' dask computed CPU_COUNT and MEMORY_LIMIT once, at import: read at
        # the first tick, they stay what the worker count and the limits were planned on.
        self._known = (m.cpu_count, m.dask_memory_limit)
        alive = m.ours - m.zombies
        vanished = self.ours - alive
        self.ours = alive
        self._flush_kills(vanished)
        self._report_events(counters, self._gone_before | vanished)
        self._gone_before = vanished
        self._check_managed(m)
        planned_m = m
        if self.managed is not None:
            self.ancestors = seen_ancestors(m, self.managed, self.directories, self.ancestors)
            planned_m = with_original_limit(m, self.managed, self.directories, self.ancestors)
        # The pool's lock from reading the others' claims until a raise is written: no
        # two instances hand out the same free memory.
        lock = self._lock_pool()
        try:
            view = self._pool_view()
            key = self._quiet_key(m, planned_m, view)
            if key is not None and key == self._quiet:
                self.skipped += 1
            else:
                if not self._decide(m, planned_m, view, seen_at):
                    return
                # Ticks with these inputs are quiet while this one changed nothing: its
                # inputs and our state read again after it are as they were before it.
                self._quiet = key if key == self._quiet_key(m, planned_m, view) else None
        finally:
            if lock is not None and self.pool is not None:
                self.pool.release(lock)
            # A membership change explains a change of this tick only.
            self.reason = "limit changed"
        self.previous = m
        self._write_metrics(m)

    def _quiet_key(
        self, m: Measurement, planned_m: Measurement, view: PoolView | None
    ) -> tuple[object, ...] | None:
        """What the decision below reads, inputs and state; None where it reads more.

        Why a tick whose key equals that of a quiet tick may skip the decision: the plan
        is a pure function of `plan_key` (make_plan), and what the decision does with it
        a pure function of the plan and of the state in this key (the record in force,
        what the claim says, the limit we manage and its goal, settling, the wake-up
        key and what it is set on). A quiet tick decided, with these very values,
        to write nothing (no channel record, no claim, no kernel limit), and left the
        state as it found it; deciding again would do the same, so nothing is skipped
        but the computing. The sum rule (the kernel limits of a pool never add up to
        more than the pool) holds across the skip: it rests on the order of the writes
        of a tick that changes something, and a skipped tick writes nothing, as its full
        decision would not have. Anything that can move the decision is in the key: a
        member that arrives, leaves or claims more (its claim, read under the pool's
        lock as before), its working set (read from its cgroup every tick), a limit or
        usage of ours (the measurement), a wake-up, a pending change or kernel goal.
        Not keyed, so never skipped: a change waiting for acknowledgements or for
        usage (`_settle` reads files), an instance inside the cgroup we limit whose
        cgroup is not known (`_shared_own_floor` reads cgroup.procs), a stopped watch,
        and any failure logged since the last change (a write that failed is tried again
        on every full tick)."""
        if self.pending is not None or self.kernel_goal is not None or self.stopped:
            return None
        if self._last_failure is not None:
            return None
        if (
            self.managed is not None
            and view is not None
            and any(o.cgroup is None for o in view.others)
        ):
            return None
        return (
            plan_key(planned_m, view),
            self.record,
            self.member,
            self.managed,
            self.managed_value,
            self.ancestors,
            self.kernel_floor,
            self.share_budget,
            self.n_workers,
            self._settling,
            self._raise_wanted,
            self.reason,
            self._wake_key,
            m.limiting,
        )

    def _decide(
        self, m: Measurement, planned_m: Measurement, view: PoolView | None, seen_at: float
    ) -> bool:
        """Re-plan, and change what the plan moved (under the pool's lock); False when
        there is no plan (logged)."""
        try:
            plan = replan(self.spec, planned_m, view)
        except PlanError as exc:
            self._failed("plan", reason=str(exc))
            return False
        self.n_workers = plan.n_workers
        self.kernel_floor = self._shared_own_floor(view, plan.pool_budget)
        # The last change first: if every worker holds it by now, it is reported
        # before a new one replaces it.
        self._settle(m)
        proposed = plan.effective_per_worker
        ceiling = self.spec.first_per_worker
        if view is not None and plan.share is not None and plan.share_per_worker:
            self.share_budget = plan.share
            ceiling = share_ceiling(ceiling, plan.share_per_worker, self._settling)
        else:
            self._settling = False
        if proposed is not None and self.spec.fixed is None:
            d = decide(self.record.per_worker, proposed, ceiling, settling=self._settling)
            confirmed = d.action != "raise" or self._raise_confirmed()
            if confirmed and abs(d.target - ceiling) <= SETTLE_STEP:
                self._settling = False
            if confirmed and d.action != "keep":
                if d.action == "raise":
                    # Claimed before any limit rises: the others plan around it.
                    self._publish(committed=max(self.member.committed, plan.budget))
                self._change(
                    m, plan.budget, d.action, d.target, d.band, seen_at, plan.as_dict(), ceiling
                )
        elif plan.fixed and self.managed is not None:
            self._follow_commitment(m, plan.budget)
        if proposed is None or self.spec.fixed is not None or d.action != "raise":
            self._raise_wanted = False
        if self.pending is not None:
            # Settled at once where no worker has started yet.
            self._settle(m)
        self._publish(working_set=m.own_working_set)
        self._arm(m, proposed, ceiling)
        return True

    def _arm(self, m: Measurement, proposed: int | None, ceiling: int) -> None:
        """Set the kernel's wake-ups around this tick's plan: anew only when a wake-up
        fired, the limit in force moved or another level limits; the rest of the time
        they stay registered and a tick costs no extra system call."""
        if self.wake is None:
            return
        key = (self.record.generation, m.limiting)
        if key == self._wake_key:
            return
        self._wake_key = key
        self.wake.arm(wake_points(m, self.directories, self.record.per_worker, proposed, ceiling))

    def _measure(self) -> Measurement:
        """This tick's measurement; the worker tree below us counts as ours. (A notebook's
        watch counts its kernel as a neighbour instead: notebook/watch.py.)"""
        return remeasure(
            self.location,
            self.proc_root,
            self.root,
            release=self.release,
            tree_root=self.pid,
            own_pid=self.pid,
            known=self._known,
            rss_when_alone=False,
            lean=True,
            inherited=self._inherited,
            initial_ns=self._initial_ns,
        )

    # -- metrics -----------------------------------------------------------------------

    def _write_metrics(self, m: Measurement) -> None:
        """The workers' /metrics read this (follow/metrics.py): written when it changed."""
        if self.stopped:  # the channel's directory is gone
            return
        snapshot = Metrics(
            per_worker=self.record.per_worker,
            budget=self.record.budget,
            kernel_limit=self._kernel_limit()[0],
            available=m.available,
            deaths={slot: dict(counts) for slot, counts in self.deaths.died.items()},
        )
        if same(self._metrics, snapshot):
            return
        try:
            write_metrics(self.spec.channel, snapshot)
        except OSError as exc:
            self._failed("metrics", reason=_describe(exc))
            return
        self._metrics = snapshot

    # -- worker deaths -----------------------------------------------------------------

    def _explain_deaths(self) -> None:
        try:
            self.deaths.tick(self._kernel_limit, self._pool_users)
        except Exception as exc:  # an unexplained death must not stop the following
            self._failed("deaths", reason=repr(exc))

    def _kernel_limit(self) -> tuple[int | None, str | None]:
        """The kernel limit over the workers now and its cgroup: the one we manage, else
        the nearest level's (as last measured)."""
        if self.managed is not None and self.managed_value is not None:
            return self.managed_value, self.managed.directory
        if self.previous is not None:
            for level, directory in zip(self.previous.levels, self.directories, strict=False):
                if level.effective_limit is not None:
                    return level.effective_limit, directory
        elif self.location is not None:
            # Never measured (a death before the first tick): as the kernel has it now.
            for directory in self.directories:
                if (value := read_limit(self.location.version, directory)) is not None:
                    return value, directory
        return None, self.directories[0] if self.directories else None

    def _pool_users(self) -> list[tuple[str, int]]:
        """The pool's other instances and what each uses (their claims)."""
        if self.pool is None:
            return []
        try:
            members = self.pool.members(exclude=self.pid)
        except OSError:
            return []
        return [(f"instance pid {o.pid}", o.working_set) for o in members]

    # -- the pool ----------------------------------------------------------------------

    def _lock_pool(self) -> int | None:
        if self.pool is None:
            return None
        try:
            return self.pool.hold()
        except OSError as exc:
            self._failed("pool", reason=_describe(exc))
            return None

    def _shared_own_floor(self, view: PoolView | None, pool_budget: int | None) -> int | None:
        """The pool's budget when the limit we manage is our own cgroup's (written as its
        sole occupant) and another instance of the pool now lives inside that cgroup:
        lowered to our share, it would cap the newcomer too, and the newcomer would plan
        from it and be refused. None otherwise."""
        managed = self.managed
        if managed is None or view is None or pool_budget is None or not view.others:
            return None
        if managed.directory == self.member.cgroup:
            return None  # our child: nobody else lives in it
        inside = managed.directory.rstrip("/") + "/"
        if any(o.cgroup is not None and o.cgroup.startswith(inside) for o in view.others):
            return pool_budget
        unplaced = {o.pid for o in view.others if o.cgroup is None}
        if unplaced:
            try:
                procs = Path(managed.directory, "cgroup.procs").read_text().split()
            except OSError:
                return None
            if unplaced & {int(p) for p in procs}:
                return pool_budget
        return None

    def _floored(self, goal: int) -> int:
        return goal if self.kernel_floor is None else max(goal, self.kernel_floor)

    def _raise_confirmed(self) -> bool:
        """A raise the pool's measurement alone asks for waits one tick for its
        confirmation: each instance measures the pool at its own moment, and during a
        spill the working sets move by hundreds of MiB a second, so one instance's high
        reading would take what the others still hold (and push them below their shares).
        A sibling that left is an event, not a reading: that raise goes at once."""
        if self.reason == "sibling left" or self._raise_wanted:
            self._raise_wanted = False
            return True
        self._raise_wanted = True
        return False

    def _pool_view(self) -> PoolView | None:
        """The pool's other members now; why the plan moves when they come and go."""
        if self.pool is None:
            return None
        members = self.pool.members(exclude=self.pid)
        if members and self.location is not None:
            members = with_kernel_working_sets(members, self.location.version)
        pids = tuple(sorted(o.pid for o in members))
        if pids != self._others:
            arrived = set(pids) - set(self._others)
            self.reason = "sibling arrived" if arrived else "sibling left"
            self._others = pids
            self._settling = True
        return PoolView(self.pool.key, members)

    def _publish(self, committed: int | None = None, working_set: int | None = None) -> None:
        """Tell the pool what we hold now (committed) and use (working set)."""
        if self.pool is None:
            return
        changes: dict[str, int] = {}
        if committed is not None and committed != self.member.committed:
            changes["committed"] = committed
        if working_set is not None and _moved(self.member.working_set, working_set):
            changes["working_set"] = working_set
        if not changes:
            return  # a rename a tick per instance for nothing: the claim stands
        member = replace(self.member, **changes)
        try:
            self.pool.update(member)
        except OSError as exc:
            self._failed("pool", reason=_describe(exc))
            return
        self.member = member

    def _follow_commitment(self, m: Measurement, goal: int) -> None:
        """An explicit --memory-limit: Dask's side stays as given; the kernel limit keeps
        the whole pool while no flexible instance shares it, and comes down to the
        commitment when one does."""
        if goal == self.managed_value:
            return
        if goal > self.member.committed:
            self._publish(committed=goal)
        self.kernel_goal = self._floored(goal)
        self._kernel_only(m, since=None)

    def _kernel_only(self, m: Measurement, since: float | None) -> None:
        """Move the kernel limit we manage towards its goal, Dask's side unchanged; what
        we hold is told to the pool, and the move reported."""
        kernel = self._move_kernel(m, dask_lowered=True)
        if kernel["action"] not in ("lowered", "raised"):
            return
        self._publish(committed=self._in_force())
        self.audit(
            "follow.applied",
            generation=self.record.generation,
            action="kernel",
            per_worker=self.record.per_worker,
            dask=None,
            kernel=kernel,
            latency_s=None,
            kernel_latency_s=0.0 if since is None else round(time.time() - since, 3),
        )

    def _in_force(self) -> int:
        """What we hold now: the kernel limit we manage, or Dask's side, whichever is
        higher (a kernel limit held up by usage, or one not yet raised to Dask's side)."""
        if self.managed is not None and self.managed_value is not None:
            if self.kernel_floor is not None:
                # The limit holds the newcomers inside it too: ours is Dask's side.
                return self.record.budget
            return max(self.managed_value, self.record.budget)
        return self.record.budget

    def _change(
        self,
        m: Measurement,
        budget: int,
        action: str,
        target: int,
        band: int,
        seen_at: float,
        plan: dict[str, Any],
        ceiling: int,
    ) -> None:
        reason, self.reason = self.reason, "limit changed"
        previous = self.previous
        diff = self._diff(m)
        # Less available while every limit but the one we write stayed is the neighbours'
        # doing; a limit moved from outside (an in-place resize, a new MemoryMax=) is named.
        ours = {
            level.path
            for level, directory in zip(m.levels, self.directories, strict=False)
            if self.managed is not None and directory == self.managed.directory
        }
        moved = any(
            lvl["old_limit"] != lvl["new_limit"] and lvl["level"] not in ours
            for lvl in diff["levels"]
        )
        if (
            reason == "limit changed"
            and not moved
            and previous is not None
            and m.available < previous.available
        ):
            reason = "neighbours grew"
        self.audit("follow.changed", action=action, reason=reason, **diff)
        self.audit(
            "follow.replanned",
            old_budget=self.record.budget,
            new_budget=budget,
            old_per_worker=self.record.per_worker,
            new_per_worker=target,
            hysteresis=band,
            ceiling=ceiling,
            plan=plan,
        )
        kernel: dict[str, Any] = {"action": "none"}
        if self.managed is not None and self.managed_value is not None:
            # Dask's side back at the start's plan: the kernel limit back at its budget.
            at_start = target == self.spec.first_per_worker
            self.kernel_goal = self._floored(self.spec.first_budget if at_start else budget)
            if action == "raise":
                # Room first, then the workers may use it.
                kernel = self._move_kernel(m, dask_lowered=True)
            else:
                kernel = {"action": "waiting_for_dask", "target": budget}
        elif self.spec.managed is not None:
            kernel = {"action": "released"}
        else:
            kernel = {"action": "none", "reason": self.spec.kernel_note or "no limit of ours"}
        record = LiveLimit(
            generation=self.record.generation + 1,
            per_worker=target,
            budget=budget,
            interval=self.spec.interval,
            changed_at=seen_at,
        )
        try:
            write_live_limit(self.spec.channel, record)
        except OSError as exc:
            # Without the channel no worker can follow; a removed or read-only directory
            # does not come back, so the watch stops rather than re-deciding every tick.
            self._failed("channel", reason=_describe(exc), following="stopped")
            self.stopped = True
            return
        self.record = record
        self._last_failure = None
        self.pending = _Pending(record.generation, action, seen_at, seen_at, kernel)

    def _settle(self, m: Measurement) -> None:
        """Finish a change once every worker holds it; then let the kernel follow down."""
        if self.pending is not None:
            workers, nannies, last, started = self._acks(self.pending.generation)
            # A worker not started yet takes the current record at its set-up (the
            # preload reads it before it registers): only the started ones must hold it.
            # So a newcomer need not wait for a sibling's workers to come up.
            if workers < min(started, self.n_workers):
                return
            pending, self.pending = self.pending, None
            kernel = pending.kernel
            if pending.action == "lower" and self.managed is not None:
                kernel = self._move_kernel(m, dask_lowered=True)
            if pending.action == "lower":
                # Released only once Dask's side and the kernel hold the lower limit.
                self._publish(committed=self._in_force())
            self.audit(
                "follow.applied",
                generation=pending.generation,
                action=pending.action,
                per_worker=self.record.per_worker,
                dask={"workers": workers, "nannies": nannies},
                kernel=kernel,
                # From the tick that saw the change to the last worker or nanny holding
                # it (its acknowledgement's mtime), and to this kernel step.
                latency_s=round(max(last, pending.changed_at) - pending.changed_at, 3),
                kernel_latency_s=round(time.time() - pending.changed_at, 3),
            )
            return
        if self.managed is not None and self.kernel_goal is not None:
            # Usage kept the kernel limit above its goal: try again now.
            self._kernel_only(m, since=self.record.changed_at)

    def _acks(self, generation: int) -> tuple[int, int, float, int]:
        """Workers and nannies holding `generation`, when the last of them took it, and
        the workers that have started (acknowledged any generation)."""
        counts = {"worker": 0, "nanny": 0}
        last = 0.0
        started = 0
        for key, ack in read_acks(self.spec.channel).items():
            role, pid, _ = key
            if not os.path.exists(self.proc_root / str(pid)):
                remove_ack(self.spec.channel, key)
                continue
            started += role == "worker"
            if ack.generation >= generation and role in counts:
                counts[role] += 1
                last = max(last, ack.at)
        return counts["worker"], counts["nanny"], last, started

    # -- the kernel limit we wrote -------------------------------------------------

    def _check_managed(self, m: Measurement | None = None) -> None:
        """Stop managing a limit that someone else has changed since our last write."""
        if self.managed is None:
            return
        if m is not None and self.managed_value is not None:
            # This tick's reading of that level holds the limit as the kernel has it
            # (a limit is reported as read unless it is none): the same, no read again.
            for level, directory in zip(m.levels, self.directories, strict=False):
                if directory == self.managed.directory and level.limit == self.managed_value:
                    return
        cg = open_memory_cgroup(self.managed.version, self.managed.directory)
        try:
            now = cg.raw_limit()
        except (OSError, ParseError) as exc:
            self.audit(
                "follow.failed",
                stage="kernel",
                target=self.managed.directory,
                reason=_describe(exc),
            )
            self.managed = None
            return
        if now != self.managed_value:
            self.audit(
                "follow.changed",
                action="released",
                cgroup=self.managed.directory,
                old_limit=self.managed_value,
                new_limit=now,
                reason="someone else changed the limit we wrote; it is theirs now",
            )
            self.managed = None
            self.kernel_goal = None

    def _move_kernel(self, m: Measurement, *, dask_lowered: bool) -> dict[str, Any]:
        assert self.managed is not None and self.managed_value is not None
        goal = self.kernel_goal
        if goal is None:
            return {"action": "none"}
        cg = open_memory_cgroup(self.managed.version, self.managed.directory)
        try:
            index = self.directories.index(self.managed.directory)
        except ValueError:
            index = -1
        ancestor = ancestor_limit(m.levels, index) if index >= 0 else None
        try:
            usage = cg.usage()
            value = kernel_target(
                current=self.managed_value,
                budget=goal,
                original=self.managed.original,
                ancestor=ancestor,
                first_budget=max(self.spec.first_budget, self.share_budget),
                usage=usage,
                dask_lowered=dask_lowered,
            )
            if value is None:
                # At the goal, or capped below it; above it only while usage blocks.
                if self.managed_value <= goal:
                    self.kernel_goal = None
                return {"action": "unchanged", "value": self.managed_value, "usage": usage}
            old = self.managed_value
            cg.write_limit(value)
            read_back = cg.raw_limit()
        except (OSError, ParseError) as exc:
            reason = _describe(exc)
            if reason in ("EROFS", "EACCES", "EPERM"):
                self.managed = None
                self.kernel_goal = None
                return {"action": "read_only", "reason": reason, "dask_side": "followed alone"}
            return {"action": "failed", "reason": reason}
        self.managed_value = read_back
        if read_back is not None:
            self._remember(old, read_back)
        # v1 rounds a written limit down to whole pages.
        if read_back is None or read_back <= goal:
            self.kernel_goal = None
        return {
            "action": "lowered" if value < old else "raised",
            "target": self.managed.directory,
            "old": old,
            "value": value,
            "read_back": read_back,
            "usage": usage,
        }

    def _remember(self, old: int, new: int) -> None:
        """Our own cgroup's record follows our write: else the next start would take the
        limit we moved to for the operator's (issue 24 row 5)."""
        assert self.managed is not None
        from ..cgroup.our_limit import update_written

        try:
            update_written(Path(self.managed.directory), old, new, self.ancestors)
        except OSError as exc:
            self._failed("record", reason=_describe(exc))

    # -- what moved ----------------------------------------------------------------

    def _diff(self, m: Measurement) -> dict[str, Any]:
        prev = self.previous
        moved: list[dict[str, Any]] = []
        if prev is not None:
            before = {lvl.path: lvl for lvl in prev.levels}
            for lvl in m.levels:
                old = before.get(lvl.path)
                if old is None:
                    continue
                if old.effective_limit != lvl.effective_limit or old.headroom != lvl.headroom:
                    moved.append(
                        {
                            "level": lvl.path,
                            "old_limit": old.effective_limit,
                            "new_limit": lvl.effective_limit,
                            "old_headroom": old.headroom,
                            "new_headroom": lvl.headroom,
                        }
                    )
        return {
            "limiting": m.limiting,
            "old_available": None if prev is None else prev.available,
            "new_available": m.available,
            "old_mem_available": None if prev is None else prev.host.available,
            "new_mem_available": m.host.available,
            "levels": moved,
        }

    # -- kernel events -------------------------------------------------------------

    def _event_dirs(self) -> list[str]:
        dirs = [self.directories[0]] if self.directories else []
        if self.spec.managed is not None and self.spec.managed.directory not in dirs:
            dirs.append(self.spec.managed.directory)
        return dirs

    def _counters(self, directory: str) -> dict[str, int] | None:
        """The kernel's memory event counters of one cgroup, v2 names for both versions.

        v1 has no memory.events: memory.oom_control counts `oom_kill` (Linux 4.13+), and
        memory.failcnt counts hits of the hard limit, which is what v2 calls `max`.
        """
        assert self.location is not None
        try:
            if self.location.version == 2:
                return parse_memory_stat(read_kernel_text(f"{directory}/memory.events"))
            counts = parse_memory_stat(read_kernel_text(f"{directory}/memory.oom_control"))
            failcnt = parse_memory_stat("max " + read_kernel_text(f"{directory}/memory.failcnt"))
            return {**counts, **failcnt}
        except OSError:
            return None

    def _read_counters(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        if self.location is None:
            return out
        for directory in self._event_dirs():
            counts = self._counters(directory)
            if counts is not None:
                out[directory] = counts
        return out

    def _flush_kills(self, vanished: frozenset[int], *, final: bool = False) -> None:
        held, self._held_kills = self._held_kills, []
        for fields, gone, waited in held:
            gone = gone | vanished
            # A victim that frees gigabytes under a tight limit can take seconds to
            # exit: a record without it would blame nobody. Wait a few ticks for it.
            if not gone and not final and waited < _KILL_HOLD_TICKS:
                self._held_kills.append((fields, gone, waited + 1))
                continue
            self.audit("kernel.oom_kill", **fields, gone_pids=sorted(gone))

    def _report_events(self, counters: dict[str, dict[str, int]], gone: frozenset[int]) -> None:
        assert self.location is not None or not counters
        v1 = self.location is not None and self.location.version == 1
        for directory, counts in counters.items():
            old = self.events.get(directory, {})
            self.events[directory] = counts
            for name in _EVENT_NAMES:
                if name not in counts or name not in old or counts[name] <= old[name]:
                    continue
                if v1:
                    file = "memory.failcnt" if name == "max" else "memory.oom_control"
                else:
                    file = "memory.events"
                fields: dict[str, Any] = {
                    "cgroup": directory,
                    "file": file,
                    "counter": name,
                    "count": counts[name],
                    "increase": counts[name] - old[name],
                }
                if name == "oom_kill":
                    # The counter moves when the kill is sent; the victim may still be
                    # freeing its memory now. Reported next tick, with our processes
                    # that disappeared over these three ticks: the victim is among them
                    # when it was one of ours.
                    self._held_kills.append((fields, gone, 0))
                else:
                    self.audit("kernel.memory_event", **fields)


def start_watch(spec_path: str, audit: Audit) -> Watch | None:
    """The watch for the supervisor, or None (logged) when following is impossible."""
    import json

    try:
        with open(spec_path, encoding="utf-8") as f:
            spec = FollowSpec.from_json(json.load(f))
        # The release the worker runs: the supervisor shares its Python.
        wake = os.environ.get(WAKE_ENV, "1") != "0"
        watch = Watch(spec, audit, release=installed_release(), wake=wake)
    except (OSError, ValueError) as exc:
        audit("follow.disabled", reason=_describe(exc), spec=spec_path)
        return None
    report_started(watch, audit)
    return watch


def report_started(watch: Watch, audit: Audit) -> None:
    """`follow.started`: what the watch follows, from the supervisor or a notebook."""
    spec = watch.spec
    audit(
        "follow.started",
        interval=spec.interval,
        channel=spec.channel,
        per_worker=watch.record.per_worker,
        budget=watch.record.budget,
        cgroup=watch.directories[0] if watch.directories else None,
        managed=None if spec.managed is None else spec.managed.directory,
        kernel=spec.kernel_note,
    )
