"""The notebook's live budget: `--follow`'s watch, run by a thread in the kernel.

The watch is the supervisor's (`follow/watch.py`): the same re-plan (`follow.replan`), the
same band and decision (`follow.decide`), the same channel, kernel moves and events. Two
things differ. What counts as ours: the kernel is a neighbour that may grow, so only the
workers' memory is (their child cgroup's working set, or with threads the data the
workers hold). And who applies a new limit: worker processes read the channel with the
CLI's preload; what lives in the kernel's process (the nannies, or the workers
themselves with processes=False) is set by the cluster (`apply`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..follow.decide import FollowSpec
from ..follow.live_limit import LiveLimit
from ..follow.watch import Audit, Watch
from ..measure import Measurement
from .child import WorkerCgroup
from .plan import as_neighbour


class NotebookWatch(Watch):
    def __init__(
        self,
        spec: FollowSpec,
        audit: Audit,
        *,
        release: object,
        child: WorkerCgroup | None,
        worker_pids: Callable[[], list[int]],
        held_in_process: Callable[[], int],
    ) -> None:
        # Its thread sleeps between ticks: no kernel wake-ups (follow/wake.py) here.
        super().__init__(spec, audit, release=release, wake=False)  # type: ignore[arg-type]
        self.child = child
        self.worker_pids = worker_pids
        self.held_in_process = held_in_process

    def _measure(self) -> Measurement:
        m = super()._measure()
        if self.child is None:
            return as_neighbour(m, self.held_in_process())
        self._join_stragglers()
        directory = self.child.directory
        from pathlib import Path

        from ..cgroup.files import open_memory_cgroup
        from ..cgroup.parse import working_set

        version = self.location.version if self.location is not None else 1
        cg = open_memory_cgroup(version, Path(directory))
        pids = frozenset(cg.procs())
        return as_neighbour(m, working_set(cg.usage(), cg.inactive_file()), pids)

    def _join_stragglers(self) -> None:
        """A worker whose preload could not move it (or ran late) is moved now."""
        assert self.child is not None
        try:
            inside = set(self.child.pids())
        except OSError:
            return
        for pid in self.worker_pids():
            if pid and pid not in inside and pid != self.pid:
                try:
                    self.child.join(pid)
                except OSError as exc:
                    self._failed("join", pid=pid, reason=str(exc))
                else:
                    self.audit("cgroup.moved", target=self.child.directory, pid=pid)


class FollowThread(threading.Thread):
    """Ticks the watch and hands each record to `apply` (in the kernel's process)."""

    def __init__(self, watch: NotebookWatch, apply: Callable[[LiveLimit], None]) -> None:
        super().__init__(name="dask-safe-worker-follow", daemon=True)
        self.watch = watch
        self.apply = apply
        self.stop_event = threading.Event()

    def run(self) -> None:
        delay = 0.0
        while not self.stop_event.wait(delay):
            delay = self.watch()
            try:
                self.apply(self.watch.record)
            except Exception as exc:  # the kernel's thread must never die of a cluster
                self.watch._failed("apply", reason=repr(exc))

    def stop(self) -> None:
        self.stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=10)
