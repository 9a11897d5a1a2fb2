"""What `apply_limit` would do, found by reading only: `--dry-run` reports the exit code
the start would have (`--cgroup-write required` exits 4 when no limit would be in force).

It follows `apply_limit`'s order (our own cgroup when we are its sole occupant, else or
then a child) and its rules (a lower limit is left alone; never below usage plus the
margin; a limit an earlier start of ours wrote is not the operator's), and stands in for
each write with what reading can tell of it: a read-only cgroup filesystem (EROFS, as
Docker and Kubernetes mount it) or a file we may not write (EACCES). What only a write
can find (EPERM at a delegated namespace root, EBUSY, EINVAL) predicts success: the
start then refuses where the dry run did not.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..proc_parse import ParseError
from .files import open_memory_cgroup
from .our_limit import load as load_our_limit
from .parse import parse_controllers
from .write import WriteOptions, WriteOutcome, errno_reason, intended_strategy

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..measure import Measurement
    from .write import Strategy


def _unwritable(path: Path) -> str | None:
    """The errno name a write to `path` would meet, as far as reading can tell."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "EROFS"
    except OSError as exc:
        return errno_reason(exc)
    return None if os.access(path, os.W_OK) else "EACCES"


def _outcome(enforced: bool, reason: str, strategy: Strategy, target: str) -> WriteOutcome:
    return WriteOutcome(
        enforced=enforced, written=False, reason=reason, strategy=strategy, target=target
    )


def _own(m: Measurement, budget: int, opts: WriteOptions, own_dir: Path) -> WriteOutcome:
    assert m.location is not None
    path = m.location.cgroup_path
    try:
        cg = open_memory_cgroup(m.location.version, own_dir)
        current = cg.limit(m.host.total)
        ours = load_our_limit(own_dir)
        if ours is not None and current != ours.written:
            ours = None
        if ours is None and current is not None and current <= budget:
            return _outcome(True, "existing_lower", "own", path)
        found = current if ours is None else ours.original
        value = budget if found is None else min(found, budget)
        if cg.usage() + opts.margin > value:
            return _outcome(False, "below_usage", "own", path)
    except (OSError, ParseError) as exc:
        return _outcome(False, errno_reason(exc), "own", path)
    limit_file = "memory.limit_in_bytes" if m.location.version == 1 else "memory.max"
    problem = _unwritable(own_dir / limit_file)
    return _outcome(problem is None, problem or "written", "own", path)


def _child(m: Measurement, budget: int, opts: WriteOptions, own_dir: Path) -> WriteOutcome:
    assert m.location is not None
    path = m.location.cgroup_path.rstrip("/") + "/" + opts.child_name
    problem = _unwritable(own_dir)
    if problem is None and m.location.version == 2:
        control = own_dir / "cgroup.subtree_control"
        try:
            enabled = "memory" in parse_controllers(control.read_text())
        except OSError as exc:
            return _outcome(False, errno_reason(exc), "child", path)
        if not enabled:
            problem = _unwritable(control)
    if problem is not None:
        return _outcome(False, problem, "child", path)
    # A fresh child holds nothing yet: only the margin can be above the budget.
    if opts.margin > budget:
        return _outcome(False, "below_usage", "child", path)
    return _outcome(True, "written", "child", path)


def predict_limit(
    m: Measurement, budget: int, opts: WriteOptions, root: Path = Path("/")
) -> WriteOutcome:
    """The outcome `apply_limit(m, budget, root, opts)` would have (`written` stays
    False: nothing is written), read only."""
    if opts.mode == "never":
        return WriteOutcome(enforced=False, written=False, reason="disabled")
    if m.location is None:
        return WriteOutcome(enforced=False, written=False, reason="no_memory_cgroup")
    own_dir = m.location.directory(root)
    notes: list[str] = []
    if intended_strategy(m, opts.mode) == "own":
        outcome = _own(m, budget, opts, own_dir)
        if outcome.enforced or outcome.reason == "below_usage":
            return outcome
        notes.append(f"own: {outcome.reason}")
    outcome = _child(m, budget, opts, own_dir)
    outcome.notes = notes
    return outcome
