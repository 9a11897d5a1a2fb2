"""The workers' child cgroup, made from the notebook kernel without moving the kernel.

The CLI moves itself into the child it makes, and the worker inherits it at exec. A
notebook kernel must stay where it is: the child holds only the worker processes, each
of which moves itself in at set-up (`join.py`). So the child is made, claimed and
limited here while still empty, with the CLI's writer (`cgroup/write.py`): the same
names, the same claim, the same rules (never a limit of a cgroup that holds others, read
back, every refusal a logged reason and a fallback to Dask's limits alone).

v2's no-internal-process rule forbids enabling the memory controller for a child while
the kernel sits in the parent: there the attempt fails with EBUSY, is logged, and the
workers keep Dask's limits (and the live budget) only.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from ..cgroup.write import WriteOptions, WriteOutcome, _Writer, errno_reason
from ..events import Audit
from ..measure import Measurement
from ..proc_parse import ParseError


class _KernelStaysWriter(_Writer):
    def empty_child(self) -> WriteOutcome:
        """A new child of our cgroup with the budget as its limit; we stay outside."""
        self._remove_stale_children()
        path = self._child_path(self.opts.child_name)
        child_dir: Path | None = None
        try:
            name = self._make_child()
            child_dir = self.own_dir / name
            path = self._child_path(name)
            self.audit("cgroup.child.created", target=path)
            if self.version == 2:
                self._enable_memory_controller()
            outcome = self._write_limit(child_dir, path, "child")
            if self.version == 2:
                self._oom_group_off(child_dir, path)
        except (OSError, ParseError) as exc:
            # The kernel's process never moves: nothing to move back.
            return self._child_failed(exc, path, child_dir, moved=False)
        outcome.created_child = str(child_dir)
        outcome.parent_dir = str(self.own_dir)
        return outcome


class WorkerCgroup:
    """The child the workers join: its directory, and the claim this process holds."""

    def __init__(self, directory: str, path: str, claim: int | None) -> None:
        # The directory, and the cgroup path the audit log names it by.
        self.directory = directory
        self.path = path
        self.claim = claim

    def pids(self) -> list[int]:
        with open(os.path.join(self.directory, "cgroup.procs")) as f:
            return [int(p) for p in f.read().split()]

    def join(self, pid: int) -> None:
        with open(os.path.join(self.directory, "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def remove(self, audit: Audit, wait: float = 10.0) -> str | None:
        """rmdir once the last worker has gone (the kernel refuses it before), and the
        claim released; None, or why the child stays (workers still running after `wait`
        seconds: unclaimed, the next start removes it once it is empty)."""
        deadline = time.monotonic() + wait
        kept: str | None = None
        while True:
            try:
                os.rmdir(self.directory)
                audit("cgroup.child.removed", target=self.path)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if time.monotonic() >= deadline:
                    kept = errno_reason(exc)
                    break
                time.sleep(0.1)
        if self.claim is not None:
            with contextlib.suppress(OSError):
                os.close(self.claim)
            self.claim = None
        return kept


def make_worker_cgroup(
    m: Measurement, budget: int, opts: WriteOptions, audit: Audit
) -> tuple[WorkerCgroup | None, WriteOutcome]:
    """The workers' child with `budget` as its kernel limit, or None and why not."""
    if opts.mode == "never":
        audit("cgroup.write.skipped", reason="disabled")
        return None, WriteOutcome(enforced=False, written=False, reason="disabled")
    if m.location is None:
        audit("cgroup.write.skipped", reason="no_memory_cgroup")
        return None, WriteOutcome(enforced=False, written=False, reason="no_memory_cgroup")
    writer = _KernelStaysWriter(m, budget, Path("/"), opts, audit)
    outcome = writer.empty_child()
    audit("cgroup.write.outcome", **outcome.as_dict())
    if outcome.created_child is None:
        return None, outcome
    if not outcome.enforced:
        # Never a limit in force (below_usage cannot happen on an empty child): undone.
        with contextlib.suppress(OSError):
            os.rmdir(outcome.created_child)
        if writer.claim is not None:
            os.close(writer.claim)
        return None, outcome
    # Not inherited by the kernel's other children: only this process holds the claim.
    if writer.claim is not None:
        os.set_inheritable(writer.claim, False)
    path = outcome.target or outcome.created_child
    return WorkerCgroup(outcome.created_child, path, writer.claim), outcome
