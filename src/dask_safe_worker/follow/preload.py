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
        # The periodic poll and the directory's wake-up may both ask: one poll at a time.
        self._polling = False
        self._again = False

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
        if self._polling:
            self._again = True
            return
        self._polling = True
        try:
            self._again = True
            while self._again:
                self._again = False
                await self._poll_once()
        finally:
            self._polling = False

    async def _poll_once(self) -> None:
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
    """Poll twice per supervisor interval, so a change lands within 1.5 intervals; and
    at once when the kernel says a record was renamed into the channel's directory."""
    pc = PeriodicCallback(follower.poll, max(0.02, interval / 2) * 1000)
    server.periodic_callbacks[CALLBACK_NAME] = pc
    pc.start()
    fd = _renames(os.path.dirname(follower.live_file))
    if fd is None:
        return
    from tornado.ioloop import IOLoop

    loop = IOLoop.current()

    def ready(_fd: int, _events: int) -> None:
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            pass
        loop.add_callback(follower.poll)

    loop.add_handler(fd, ready, IOLoop.READ)
    _renamed[id(server)] = fd


# inotify(7): a file renamed into the watched directory (the channel's every rewrite).
_IN_MOVED_TO = 0x80


def _renames(directory: str) -> int | None:
    """An inotify fd that becomes readable when a file is renamed into `directory`, or
    None where inotify is not available (the periodic poll then carries on alone)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
    except (OSError, AttributeError):
        return None
    if fd < 0:
        return None
    if libc.inotify_add_watch(fd, os.fsencode(directory), _IN_MOVED_TO) < 0:
        os.close(fd)
        return None
    return fd


def stop(server: Any) -> None:
    """Stop the wake-ups of `start` (the periodic callback stops with the server)."""
    fd = _renamed.pop(id(server), None)
    if fd is None:
        return
    from tornado.ioloop import IOLoop

    try:
        IOLoop.current().remove_handler(fd)
    finally:
        os.close(fd)


_renamed: dict[int, int] = {}


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
    preloads = process_preloads(
        server, names, argv, file_dir=getattr(server, "local_directory", None)
    )
    _configured[id(server)] = preloads
    # distributed before PreloadManager (2022.12.1 and older) returns a plain list of
    # Preload objects, which its servers start one by one.
    if hasattr(preloads, "start"):
        await preloads.start()
    else:
        for preload in preloads:
            await preload.start()


async def teardown_configured(server: Any) -> None:
    preloads = _configured.pop(id(server), None)
    if preloads is None:
        return
    if hasattr(preloads, "teardown"):
        await preloads.teardown()
    else:
        for preload in reversed(preloads):
            await preload.teardown()


_configured: dict[int, Any] = {}
