"""The one place that writes cgroup files: the budget as a kernel hard limit.

Policy (docs/design.md explains why):
- write into our own cgroup only when we are its sole occupant;
- otherwise, or when the kernel refuses (EPERM at a delegated namespace root), create a
  child below our own cgroup, move ourselves into it, and limit that;
- never raise an existing limit, never write below current usage plus a margin, and
  never write to a cgroup that holds processes other than ours.
Every kernel refusal becomes a logged reason and a fallback, never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
from pathlib import Path

from ..event_line import errno_name
from ..events import no_audit
from ..proc_parse import ParseError
from ..records import field, mutable_record, record
from .claim import claim_new, remove_if_unclaimed
from .files import V2MemoryCgroup, open_memory_cgroup
from .leave import leave_and_remove, move_pid
from .our_limit import OurLimit, visible_ancestors
from .our_limit import load as load_our_limit
from .our_limit import save as save_our_limit
from .parse import parse_controllers

TYPE_CHECKING = False  # typing costs ~2 ms to import on the fast path; mypy knows this name
if TYPE_CHECKING:
    from typing import Literal

    from ..events import Audit
    from ..measure import Measurement
    from .files import MemoryCgroupFiles

    WriteMode = Literal["auto", "never", "required"]
    # own: our own cgroup, where we are alone; child: one we create below it.
    Strategy = Literal["own", "child"]
    Reason = Literal["written", "existing_lower", "below_usage", "disabled", "no_memory_cgroup"]

MiB = 2**20
# The largest value the kernel keeps in a memory limit file (PAGE_COUNTER_MAX pages is
# lower still; anything above is "unlimited" to it).
MAX_LIMIT = 2**63 - 1
DEFAULT_MARGIN = 32 * MiB
DEFAULT_CHILD_NAME = "dask-safe-worker"


@mutable_record
class WriteOutcome:
    # True when a kernel limit at or below the budget is in force on our cgroup.
    enforced: bool
    written: bool
    # One of Reason, or the errno name of a refused write (errno_reason).
    reason: Reason | str
    strategy: Strategy | None = None
    target: str | None = None
    requested: int | None = None
    read_back: int | None = None
    created_child: str | None = None
    parent_dir: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


# NAME_MAX of every Linux filesystem, cgroupfs included.
_NAME_MAX = 255


def child_name_problem(name: str) -> str | None:
    """Why `name` cannot be the child cgroup's name, or None when it is one plain path
    component: anything else (`..`, `/x`, `a/b`) would name a cgroup that is not our
    own child, and a limit written there could cap processes that are not ours."""
    if not name:
        return "it is empty"
    if name in (".", ".."):
        return f"{name!r} is not a new directory"
    if "/" in name:
        return f"{name!r} contains '/'"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return f"{name!r} contains a control character"
    if len(name.encode("utf-8", "surrogateescape")) > _NAME_MAX - 24:
        # Room for the "-<pid>-<random>" suffix a name collision adds.
        return f"it is longer than {_NAME_MAX - 24} bytes"
    return None


@record
class WriteOptions:
    """Every value `apply_limit` may write, checked when built: nothing is written
    unless all of them are valid (no limit half applied)."""

    mode: WriteMode = "auto"
    child_name: str = DEFAULT_CHILD_NAME
    margin: int = DEFAULT_MARGIN
    memory_high_fraction: float | None = None
    swap_max: int | None = 0  # v2 memory.swap.max; None leaves it alone

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "never", "required"):
            raise ValueError(f"cgroup write mode {self.mode!r} is not auto, never or required")
        problem = child_name_problem(self.child_name)
        if problem is not None:
            raise ValueError(f"the child cgroup name must be one plain path component: {problem}")
        fraction = self.memory_high_fraction
        if fraction is not None and not (math.isfinite(fraction) and 0 <= fraction < 1):
            raise ValueError(f"memory.high fraction {fraction!r} is not in [0, 1)")
        if self.swap_max is not None and not (0 <= self.swap_max <= MAX_LIMIT):
            raise ValueError(f"memory.swap.max {self.swap_max!r} is out of range")

    def extra_values(self, budget: int) -> list[tuple[str, str]]:
        """The v2 files written after the hard limit, with their values, all computed
        before the first write."""
        extras: list[tuple[str, str]] = []
        if self.memory_high_fraction:
            extras.append(("memory.high", str(int(budget * self.memory_high_fraction))))
        if self.swap_max is not None:
            extras.append(("memory.swap.max", str(self.swap_max)))
        return extras


def errno_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno_name(exc.errno)
    if isinstance(exc, ParseError):
        return "EINVAL"
    return type(exc).__name__


class _Writer:
    def __init__(
        self, m: Measurement, budget: int, root: Path, opts: WriteOptions, audit: Audit
    ) -> None:
        assert m.location is not None
        self.m = m
        self.version = m.location.version
        self.budget = budget
        self.opts = opts
        self.audit = audit
        self.own_dir = m.location.directory(root)
        self.own_path = m.location.cgroup_path
        # Computed now, so that no value can fail between two writes.
        self.extras = opts.extra_values(budget)
        # The descriptor that claims the child we create, held until this process ends.
        self.claim: int | None = None

    def _write_limit(
        self, directory: Path, path: str, strategy: Strategy, rec: OurLimit | None = None
    ) -> WriteOutcome:
        cg = open_memory_cgroup(self.version, directory)
        current = cg.limit(self.m.host.total)
        # Changed since it was recorded: the operator's now.
        ours = rec if rec is not None and current == rec.written else None
        # A limit an earlier start of ours wrote is not the operator's: the never-raise
        # rule holds for the one found before our first write (issue 24 row 5), and
        # where that is the lower, it is put back.
        found = current if ours is None else ours.original
        before = self._before_write(cg) if strategy == "own" else None
        if ours is None and current is not None and current <= self.budget:
            self.audit(
                "cgroup.write.skipped", target=path, reason="existing_lower", current=current
            )
            return WriteOutcome(
                enforced=True,
                written=False,
                reason="existing_lower",
                strategy=strategy,
                target=path,
                read_back=current,
            )
        value = self.budget if found is None else min(found, self.budget)
        usage = cg.usage()
        if usage + self.opts.margin > value:
            self.audit("cgroup.write.skipped", target=path, reason="below_usage", usage=usage)
            return WriteOutcome(
                enforced=False, written=False, reason="below_usage", strategy=strategy, target=path
            )
        self.audit(
            "cgroup.write.attempt",
            target=path,
            strategy=strategy,
            file="memory.limit_in_bytes" if self.version == 1 else "memory.max",
            value=value,
            previous=current,
            **({} if ours is None else {"previous_ours": True, "original": ours.original}),
        )
        cg.write_limit(value)
        read_back = _read_back(cg)
        self.audit("cgroup.write.result", target=path, requested=value, read_back=read_back)
        if isinstance(cg, V2MemoryCgroup):
            self._v2_extras(cg, path)
        if before is not None and read_back is not None:
            self._remember(cg, path, current, rec, before, read_back)
        return WriteOutcome(
            enforced=True,
            written=True,
            reason="written",
            strategy=strategy,
            target=path,
            requested=value,
            read_back=read_back,
        )

    def _before_write(self, cg: MemoryCgroupFiles) -> tuple[int | None, int | None]:
        """(v1's hierarchical limit, v2's memory.high) as found, for the record."""
        hierarchical = high = None
        with contextlib.suppress(OSError, ParseError):
            hierarchical = cg.hierarchical_limit(self.m.host.total)
        if isinstance(cg, V2MemoryCgroup):
            with contextlib.suppress(OSError, ParseError):
                high = cg.high(self.m.host.total)
        return hierarchical, high

    def _remember(
        self,
        cg: MemoryCgroupFiles,
        path: str,
        current: int | None,
        rec: OurLimit | None,
        before: tuple[int | None, int | None],
        written: int,
    ) -> None:
        """Record what the operator had and what we wrote (cgroup/our_limit.py), so that
        the next start in this cgroup plans from the operator's limit. Each file is ours
        while it holds what we wrote: the operator may change memory.max and leave our
        memory.high. Best effort: without a record, the next start takes our limit for the
        operator's."""
        hierarchical, high = before
        limit_ours = rec is not None and current == rec.written
        high_ours = rec is not None and rec.written_high is not None and high == rec.written_high
        written_high = rec.written_high if rec is not None and high_ours else None
        if isinstance(cg, V2MemoryCgroup) and self.opts.memory_high_fraction:
            written_high = None
            with contextlib.suppress(OSError, ParseError):
                written_high = cg.high(self.m.host.total)
        new = OurLimit(
            directory=str(cg.directory),
            original=rec.original if rec is not None and limit_ours else current,
            ancestors=visible_ancestors(
                hierarchical, current, rec.ancestors if rec is not None and limit_ours else None
            ),
            original_high=rec.original_high if rec is not None and high_ours else high,
            written=written,
            written_high=written_high,
        )
        try:
            where = save_our_limit(cg.directory, new)
        except OSError as exc:
            self.audit("cgroup.limit.record.failed", target=path, reason=errno_reason(exc))
            return
        self.audit("cgroup.limit.recorded", target=path, file=str(where), original=new.original)

    def _v2_extras(self, cg: V2MemoryCgroup, path: str) -> None:
        for name, value in self.extras:
            try:
                cg.write(name, value)
                self.audit(
                    "cgroup.write.result",
                    target=path,
                    file=name,
                    requested=value,
                    read_back=cg.read(name).strip(),
                )
            except OSError as exc:
                self.audit("cgroup.write.failed", target=path, file=name, reason=errno_reason(exc))

    def own(self) -> WriteOutcome:
        try:
            ours = load_our_limit(self.own_dir)
            return self._write_limit(self.own_dir, self.own_path, "own", ours)
        except (OSError, ParseError) as exc:
            reason = errno_reason(exc)
            self.audit("cgroup.write.failed", target=self.own_path, strategy="own", reason=reason)
            return WriteOutcome(
                enforced=False, written=False, reason=reason, strategy="own", target=self.own_path
            )

    def _remove_stale_children(self) -> None:
        """Remove instance children that no running instance claims (cgroup_claim) and
        that hold no process: an exec'd worker cannot remove its child when it ends.
        `<name>-<pid>*` children whose pid still runs are kept even when unclaimed (an
        instance of an older release, between its mkdir and its move)."""
        base = self.opts.child_name
        try:
            names = os.listdir(self.own_dir)
        except OSError:
            return
        for name in names:
            if name != base:
                pid = name[len(base) + 1 :].split("-", 1)[0]
                if not (name.startswith(base + "-") and pid.isdigit()):
                    continue
                if int(pid) == self.m.pid or os.path.exists(f"/proc/{pid}"):
                    continue
            if remove_if_unclaimed(self.own_dir / name):
                self.audit("cgroup.child.removed", target=self._child_path(name))

    def _child_path(self, name: str) -> str:
        """The cgroup path of our child `name`, as the audit log names cgroups."""
        return self.own_path.rstrip("/") + "/" + name

    def _make_child(self) -> str:
        """Create and claim a child no other instance uses, atomically: mkdir fails when
        the name exists (another instance's child, or a leftover), then the next name:
        `<name>`, `<name>-<pid>`, then `<name>-<pid>-<random>`."""
        name = self.opts.child_name
        own = f"{name}-{self.m.pid}"
        candidates = [name, own, *(f"{own}-{os.urandom(4).hex()}" for _ in range(8))]
        for name in candidates:
            try:
                (self.own_dir / name).mkdir()
            except FileExistsError:
                continue
            self.claim = claim_new(self.own_dir / name)
            if self.claim is None:
                continue  # removed by another start's clean-up before we held it
            return name
        raise FileExistsError(errno.EEXIST, "every child cgroup name tried exists")

    def child(self) -> WriteOutcome:
        path = self._child_path(self.opts.child_name)
        if self.opts.margin > self.budget:
            # A fresh child starts empty, and still the budget is below the margin: it
            # would be refused there (below_usage), so nothing is made, entered or
            # enabled (v2's subtree_control): validate, then act (issue 24 row 8).
            self.audit(
                "cgroup.write.skipped", target=path, strategy="child", reason="below_usage", usage=0
            )
            return WriteOutcome(
                enforced=False, written=False, reason="below_usage", strategy="child", target=path
            )
        self._remove_stale_children()
        child_dir: Path | None = None
        moved = False
        try:
            name = self._make_child()
            child_dir = self.own_dir / name
            path = self._child_path(name)
            self.audit("cgroup.child.created", target=path)
            if self.version == 1:
                # Checked and written before the move: a child refused here (below_usage)
                # is removed without our process ever having been in it.
                outcome = self._write_limit(child_dir, path, "child")
                if outcome.enforced:
                    move_pid(child_dir, self.m.pid)
                    moved = True
            else:
                # v2's no-internal-process rule: our cgroup must be empty of us before
                # its subtree_control may enable memory for the child.
                move_pid(child_dir, self.m.pid)
                moved = True
                self._enable_memory_controller()
                outcome = self._write_limit(child_dir, path, "child")
                if outcome.enforced:
                    self._oom_group_off(child_dir, path)
            if not outcome.enforced:
                # A child without our limit holds nothing back, and a start that ends
                # here (--cgroup-write required, exit 4) must leave no trace: undone.
                undo_error = self._undo(child_dir, True, moved)
                failed = {} if undo_error is None else {"error": undo_error}
                self.audit("cgroup.child.removed", target=path, reason=outcome.reason, **failed)
                return outcome
            self.audit("cgroup.moved", target=path, pid=self.m.pid)
            outcome.created_child = str(child_dir)
            outcome.parent_dir = str(self.own_dir)
            return outcome
        except (OSError, ParseError) as exc:
            return self._child_failed(exc, path, child_dir, moved)

    def _child_failed(
        self, exc: BaseException, path: str, child_dir: Path | None, moved: bool
    ) -> WriteOutcome:
        """The child strategy failed: undo what was made (and the move), say why."""
        reason = errno_reason(exc)
        undo_error = None if child_dir is None else self._undo(child_dir, True, moved)
        self.audit(
            "cgroup.write.failed",
            target=path,
            strategy="child",
            reason=reason,
            undo_error=undo_error,
        )
        return WriteOutcome(
            enforced=False, written=False, reason=reason, strategy="child", target=path
        )

    def _oom_group_off(self, child_dir: Path, path: str) -> None:
        """memory.oom.group=0 on our child: an OOM inside our limit then kills one
        worker, which its nanny restarts, not every process up to a parent that the
        kubelet (1.28+) set to 1. The kernel takes the highest ancestor with the flag
        only up to the cgroup whose limit was hit, and our limit is the child's.
        Best effort: a kernel before 4.19 has no such file."""
        cg = V2MemoryCgroup(child_dir)
        try:
            cg.write("memory.oom.group", "0")
        except FileNotFoundError:
            self.audit("cgroup.oom_group", target=path, outcome="absent")
            return
        except OSError as exc:
            reason = errno_reason(exc)
            self.audit("cgroup.write.failed", target=path, file="memory.oom.group", reason=reason)
            return
        try:
            read_back: str | None = cg.read("memory.oom.group").strip()
        except OSError:
            read_back = None
        self.audit(
            "cgroup.oom_group", target=path, outcome="written", requested=0, read_back=read_back
        )

    def _enable_memory_controller(self) -> None:
        control = self.own_dir / "cgroup.subtree_control"
        if "memory" in parse_controllers(control.read_text()):
            return
        with open(control, "w") as f:
            f.write("+memory")
        self.audit("cgroup.subtree_control", target=self.own_path, enabled="memory")

    def _undo(self, child_dir: Path, created: bool, moved: bool) -> str | None:
        """Leave things as they were; an errno name if that, too, failed."""
        try:
            leave_and_remove(child_dir, self.own_dir, self.m.pid, moved=moved, created=created)
        except OSError as exc:
            return errno_reason(exc)
        if self.claim is not None:
            os.close(self.claim)
            self.claim = None
        return None


def _read_back(cg: MemoryCgroupFiles) -> int | None:
    try:
        return cg.raw_limit()
    except (OSError, ParseError):
        return None


def intended_strategy(m: Measurement, mode: WriteMode) -> Strategy | None:
    """The first target `apply_limit` tries: our own cgroup only when we are alone in it."""
    if mode == "never" or m.location is None:
        return None
    return "own" if m.sole_occupant else "child"


def apply_limit(
    m: Measurement,
    budget: int,
    root: Path = Path("/"),
    opts: WriteOptions | None = None,
    audit: Audit = no_audit,
) -> WriteOutcome:
    """Try to put `budget` in force as a kernel limit on the cgroup we run in."""
    opts = opts or WriteOptions()
    if not 0 < budget <= MAX_LIMIT:
        raise ValueError(f"budget {budget} is not a kernel memory limit")
    if opts.mode == "never":
        audit("cgroup.write.skipped", reason="disabled")
        return WriteOutcome(enforced=False, written=False, reason="disabled")
    if m.location is None:
        audit("cgroup.write.skipped", reason="no_memory_cgroup")
        return WriteOutcome(enforced=False, written=False, reason="no_memory_cgroup")
    writer = _Writer(m, budget, root, opts, audit)
    attempts: list[WriteOutcome] = []
    if intended_strategy(m, opts.mode) == "own":
        outcome = writer.own()
        if outcome.enforced or outcome.reason == "below_usage":
            return outcome
        attempts.append(outcome)
    else:
        audit(
            "cgroup.write.skipped",
            target=m.location.cgroup_path,
            reason="shared_cgroup",
            occupants=None if m.own_procs is None else len(m.own_procs),
        )
    outcome = writer.child()
    outcome.notes = [f"{a.strategy}: {a.reason}" for a in attempts]
    return outcome


def memory_high_kernel_problem(opts: WriteOptions, uname_release: str) -> str | None:
    """Why our own memory.high cannot be used on this kernel (older than 5.9), or None."""
    if not opts.memory_high_fraction or opts.mode == "never":
        return None
    from .parse import MEMORY_HIGH_MIN_KERNEL, parse_kernel_release

    try:
        release = parse_kernel_release(uname_release)
    except ParseError as exc:
        return f"--memory-high-fraction needs Linux 5.9 or later; cannot tell: {exc}"
    if release >= MEMORY_HIGH_MIN_KERNEL:
        return None
    return (
        f"--memory-high-fraction needs Linux 5.9 or later (older kernels can stall a "
        f"worker held at memory.high); this kernel is {release[0]}.{release[1]}: "
        "drop the option or use --memory-high-fraction 0"
    )


def enforce(m: Measurement, budget: int, opts: WriteOptions, audit: Audit) -> WriteOutcome:
    """The budget as a kernel limit where permitted (`apply_limit`), logged; Refused
    (exit 4) when --cgroup-write required could not set it."""
    outcome = apply_limit(m, budget, opts=opts, audit=audit)
    audit("cgroup.write.outcome", **outcome.as_dict())
    if opts.mode == "required" and not outcome.enforced:
        from ..exits import EXIT_WRITE_REQUIRED, Refused

        raise Refused(
            EXIT_WRITE_REQUIRED,
            f"--cgroup-write required, but the kernel limit could not be set ({outcome.reason})",
            event="cgroup.write.required.failed",
        )
    return outcome
