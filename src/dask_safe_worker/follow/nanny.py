"""`--preload-nanny dask_safe_worker.follow.nanny`: the nanny follows the live limit.

The nanny restarts its worker when the worker's RSS passes 95 % of
`memory_manager.memory_limit`, and passes that same value to every worker it (re)starts
(distributed/nanny.py, `instantiate`). Following it keeps the restart threshold in step
with the worker's own, and makes a restarted worker start with the current limit.

It also notes how its worker ends, and sends the supervisor's explanation of every
death to the scheduler (nanny_deaths.py).
"""

from __future__ import annotations

from typing import Any

from . import nanny_deaths
from . import preload as follow_dask
from .live_limit import LiveLimit, read_live_limit
from .metrics import NANNY_SLOT_ENV


async def dask_setup(nanny: Any) -> None:
    await follow_dask.start_configured(nanny, "nanny")
    path = follow_dask.live_file()
    first = read_live_limit(path) if path else None
    if path is None or first is None:
        follow_dask.logger.warning("dask-safe-worker: no live limit to follow (%s)", path)
        return
    nanny.memory_manager.memory_limit = first.per_worker

    async def apply(record: LiveLimit) -> None:
        nanny.memory_manager.memory_limit = record.per_worker

    follower = follow_dask.Follower(path, "nanny", apply)
    follower.hold(first)
    follow_dask.start(nanny, follower, first.interval)
    # Its worker's /metrics counts this nanny's deaths (follow/prometheus.py).
    nanny.env[NANNY_SLOT_ENV] = str(follower.slot)
    # Before the worker starts: its process object takes the exit hook when it is made.
    nanny_deaths.start(nanny, path, follower.slot, first.interval)


async def dask_teardown(nanny: Any) -> None:
    follow_dask.stop(nanny)
    await follow_dask.teardown_configured(nanny)
