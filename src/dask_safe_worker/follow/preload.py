"""Shared by the worker and nanny preloads of `--follow`: poll the live-limit channel.

A stat per poll: every rewrite is a rename, so a new inode means a new record; only then
is the file read. Runs inside the worker or nanny, where distributed is imported already.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from tornado.ioloop import PeriodicCallback

from .live_limit import (
    CONFIGURED_PRELOADS_ENV,
    LIVE_FILE_ENV,
    LiveLimit,
    read_live_limit,
    write_ack,
)

logger = logging.getLogger("dask_safe_worker.follow")

CALLBACK_NAME = "dask-safe-worker-follow"

# Servers of one role in this process: each acknowledges under its own slot.
_slots: dict[str, int] = {}


class Follower:
    """Applies every new generation of the live limit to one Dask server."""

    def __init__(
        self,
        live_file: str,
        role: str,
        apply: Callable[[LiveLimit], Awaitable[None]],
    ) -> None:
        self.live_file = live_file
        self.role = role
        self.apply = apply
        self.generation = -1
        self._seen: tuple[int, int] | None = None
        self.slot = _slots.get(role, 0)
        _slots[role] = self.slot + 1

    def changed(self) -> LiveLimit | None:
        """A record newer than the one held, or None (cheap when nothing changed)."""
        try:
            st = os.stat(self.live_file)
        except OSError:
            return None
        key = (st.st_ino, st.st_mtime_ns)
        if key == self._seen:
            return None
        record = read_live_limit(self.live_file)
        if record is None:
            return None
        self._seen = key
        return record if record.generation > self.generation else None

    def hold(self, record: LiveLimit) -> None:
        """`record` is in force (applied at set-up): acknowledge it."""
        self.generation = record.generation
        self._ack(record.generation)

    def _ack(self, generation: int) -> None:
        try:
            write_ack(self.live_file, self.role, os.getpid(), generation, self.slot)
        except OSError as exc:
            logger.warning("dask-safe-worker: cannot acknowledge the live limit: %s", exc)

    async def poll(self) -> None:
        record = self.changed()
        if record is None:
            return
        try:
            await self.apply(record)
        except Exception:
            logger.exception("dask-safe-worker: cannot apply the live memory limit")
            return
        self.generation = record.generation
        self._ack(record.generation)


def live_file() -> str | None:
    return os.environ.get(LIVE_FILE_ENV) or None


def start(server: Any, follower: Follower, interval: float) -> None:
    """Poll twice per supervisor interval, so a change lands within 1.5 intervals."""
    pc = PeriodicCallback(follower.poll, max(0.02, interval / 2) * 1000)
    server.periodic_callbacks[CALLBACK_NAME] = pc
    pc.start()


async def start_configured(server: Any, role: str) -> None:
    """Start the preloads dask's config names for `role`, as dask itself would have: a
    `--preload` on the command line (ours) makes dask skip `distributed.<role>.preload`,
    and the user's own preloads must still run."""
    if role not in os.environ.get(CONFIGURED_PRELOADS_ENV, "").split(","):
        return
    import dask
    from distributed.preloading import process_preloads

    names = dask.config.get(f"distributed.{role}.preload", default=[])
    if not names:
        return
    argv = dask.config.get(f"distributed.{role}.preload-argv", default=[])
    manager = process_preloads(
        server, names, argv, file_dir=getattr(server, "local_directory", None)
    )
    _configured[id(server)] = manager
    await manager.start()


async def teardown_configured(server: Any) -> None:
    manager = _configured.pop(id(server), None)
    if manager is not None:
        await manager.teardown()


_configured: dict[int, Any] = {}
