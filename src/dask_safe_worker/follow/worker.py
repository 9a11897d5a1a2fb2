"""`--preload dask_safe_worker.follow.worker`: the worker follows the live memory limit.

Added to the worker's argv by `dask-safe-worker --follow`. On every new generation of
the live-limit file it sets, in this order:

- `memory_manager.memory_limit`, which the memory monitor reads every 100 ms for its
  spill (0.70), pause (0.80) thresholds and the spill target;
- the spill buffer's target: `memory_manager.data` is a SpillBuffer, a zict.Buffer whose
  `n` is `memory_limit * target fraction`, fixed when the worker was built;
- `state.transfer_incoming_bytes_limit`, also a fraction of the limit fixed at start;
- the scheduler's `WorkerState.memory_limit` (and its `total_memory`), through the
  scheduler's `run_function` handler: nothing else updates it after registration.

At set-up, before the worker registers, the current record is applied at once: a worker
that its nanny restarts comes back with the current limit and registers with it.
"""

from __future__ import annotations

import logging
from typing import Any

from . import preload as follow_dask
from . import prometheus
from . import scheduler as _scheduler_side
from .live_limit import LiveLimit, read_live_limit

logger = logging.getLogger("dask_safe_worker.follow")


def apply_local(worker: Any, limit: int) -> None:
    """Everything inside the worker process that derives from its memory limit."""
    import dask
    import zict

    mm = worker.memory_manager
    mm.memory_limit = limit
    fraction = mm.memory_target_fraction or mm.memory_spill_fraction
    if fraction and isinstance(mm.data, zict.Buffer):
        mm.data.n = int(limit * fraction)
    transfer = dask.config.get("distributed.worker.memory.transfer")
    if transfer is not False:
        worker.state.transfer_incoming_bytes_limit = int(limit * transfer)


async def tell_scheduler(worker: Any, limit: int) -> None:
    import cloudpickle
    from distributed.protocol import pickle

    dumps: Any = pickle.dumps
    cloudpickle.register_pickle_by_value(_scheduler_side)
    response = await worker.scheduler.run_function(
        function=dumps(_scheduler_side.set_worker_memory_limit),
        args=dumps((worker.address, limit)),
        kwargs=dumps({}),
        wait=True,
    )
    if response.get("status") != "OK":
        logger.warning("dask-safe-worker: the scheduler did not take the new limit: %r", response)


async def dask_setup(worker: Any) -> None:
    await follow_dask.start_configured(worker, "worker")
    path = follow_dask.live_file()
    first = read_live_limit(path) if path else None
    if path is None or first is None:
        logger.warning("dask-safe-worker: no live limit to follow (%s)", path)
        return
    # Registration has not happened yet: the local limit is enough.
    apply_local(worker, first.per_worker)

    async def apply(record: LiveLimit) -> None:
        apply_local(worker, record.per_worker)
        if worker.status.name in ("running", "paused") and worker.batched_stream is not None:
            await tell_scheduler(worker, record.per_worker)
        logger.info("dask-safe-worker: memory limit now %d bytes", record.per_worker)

    follower = follow_dask.Follower(path, "worker", apply)
    follower.hold(first)
    follow_dask.start(worker, follower, first.interval)
    # Beside Dask's own metrics, where distributed serves them (prometheus_client).
    prometheus.register(path)


async def dask_teardown(worker: Any) -> None:
    follow_dask.stop(worker)
    await follow_dask.teardown_configured(worker)
