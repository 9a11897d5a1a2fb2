"""The nanny preload's part in explaining worker deaths (see follow/death_watch.py).

The nanny is where a worker's end is known first: it reaps the process (the exit code),
and its memory monitor is what terminates a worker past Dask's terminate threshold (the
`worker-restart-memory` event). This module notes both for the supervisor, and sends the
supervisor's records to the scheduler: an event on `death.TOPIC` (and on the worker's
address, Dask's own topic for a worker) and a line in the scheduler's log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tornado.ioloop import PeriodicCallback

from . import scheduler as _scheduler_side
from .death import TOPIC, ExitNote, sentence

logger = logging.getLogger("dask_safe_worker.follow")

CALLBACK_NAME = "dask-safe-worker-deaths"
# Nanny states in which a worker's end is asked for (a close), not a death.
_CLOSING = ("closing", "closed", "closing_gracefully", "failed")


class DeathNotes:
    """Hooks on one nanny: its worker's start, exit and memory restarts."""

    def __init__(self, nanny: Any, live_file: str, slot: int) -> None:
        self.nanny = nanny
        self.live_file = live_file
        self.slot = slot
        self.pid: int | None = None
        self.address: str | None = None
        # Pids the memory monitor terminated, with the RSS it saw.
        self.restarts: dict[int, int | None] = {}
        # The nanny is stopping its worker itself (Nanny.kill: restart, close).
        self.deliberate = 0

    def install(self) -> None:
        """Wrap the nanny's own methods on the instance. Before the first instantiate:
        the worker process object takes `_on_worker_exit_sync` when it is made."""
        nanny = self.nanny
        instantiate: Callable[..., Awaitable[Any]] = nanny.instantiate
        kill: Callable[..., Awaitable[Any]] = nanny.kill
        on_exit: Callable[[int], Any] = nanny._on_worker_exit_sync
        log_event: Callable[[Any, Any], Any] = nanny.log_event

        async def instantiate_noted(*args: Any, **kwargs: Any) -> Any:
            result = await instantiate(*args, **kwargs)
            self._started()
            return result

        async def kill_noted(*args: Any, **kwargs: Any) -> Any:
            self.deliberate += 1
            try:
                return await kill(*args, **kwargs)
            finally:
                self.deliberate -= 1

        def on_exit_noted(exitcode: int) -> Any:
            try:
                self._exited(exitcode)
            except Exception:
                logger.exception("dask-safe-worker: cannot note the worker's exit")
            return on_exit(exitcode)

        def log_event_noted(topic: Any, msg: Any) -> Any:
            if topic == "worker-restart-memory" and isinstance(msg, dict):
                pid = msg.get("pid")
                if isinstance(pid, int):
                    rss = msg.get("rss")
                    self.restarts[pid] = rss if isinstance(rss, int) else None
            return log_event(topic, msg)

        nanny.instantiate = instantiate_noted
        nanny.kill = kill_noted
        nanny._on_worker_exit_sync = on_exit_noted
        nanny.log_event = log_event_noted

    def _started(self) -> None:
        pid = self.nanny.pid
        if not isinstance(pid, int):
            return
        self.pid = pid
        self.address = self.nanny.worker_address
        name = self.nanny.name
        # death_watch is imported here, after the worker's process was started, not
        # when the preload is (~2 ms before the nanny starts its worker).
        from .death_watch import note_started

        try:
            note_started(
                self.live_file, pid, self.address, None if name is None else str(name), self.slot
            )
        except OSError as exc:
            logger.warning("dask-safe-worker: cannot note the worker's start: %s", exc)

    def _exited(self, exitcode: int) -> None:
        pid, self.pid = self.pid, None
        if pid is None:
            return
        from .death_watch import forget_started, note_exit

        restart_rss = self.restarts.pop(pid, None)
        asked = self.deliberate > 0 or self.nanny.status.name in _CLOSING
        if asked and restart_rss is None:
            forget_started(self.live_file, pid)
            return
        mm = self.nanny.memory_manager
        fraction = mm.memory_terminate_fraction
        name = self.nanny.name
        note = ExitNote(
            pid=pid,
            exitcode=int(exitcode),
            at=time.time(),
            worker=self.address,
            name=None if name is None else str(name),
            nanny=self.nanny.address,
            restart_rss=restart_rss,
            dask_limit=mm.memory_limit or None,
            terminate_fraction=float(fraction) if fraction else None,
        )
        note_exit(self.live_file, note, self.slot)

    async def send(self) -> None:
        """Every record the supervisor made for this nanny, to the scheduler."""
        from .death_watch import pending_records, remove_record

        for path, record in pending_records(self.live_file, self.slot):
            try:
                await report(self.nanny, record)
            except Exception as exc:
                # Kept for the next poll: the scheduler may be back by then.
                logger.warning("dask-safe-worker: cannot report a worker's death: %s", exc)
                return
            remove_record(path)


async def report(nanny: Any, record: dict[str, Any]) -> None:
    import cloudpickle
    from distributed.protocol import pickle

    dumps: Any = pickle.dumps
    text = sentence(record)
    logger.warning("dask-safe-worker: %s", text)
    cloudpickle.register_pickle_by_value(_scheduler_side)
    response = await nanny.scheduler.run_function(
        function=dumps(_scheduler_side.report_death),
        args=dumps((TOPIC, {**record, "sentence": text})),
        kwargs=dumps({}),
        wait=True,
    )
    if response.get("status") != "OK":
        raise RuntimeError(f"the scheduler did not take it: {response!r}")


def start(nanny: Any, live_file: str, slot: int, interval: float) -> DeathNotes:
    notes = DeathNotes(nanny, live_file, slot)
    notes.install()
    pc = PeriodicCallback(notes.send, max(0.05, interval / 2) * 1000)
    nanny.periodic_callbacks[CALLBACK_NAME] = pc
    pc.start()
    return notes
