"""The one function the worker asks the scheduler to run when its limit moves.

The scheduler keeps `WorkerState.memory_limit` from the worker's registration and never
updates it: heartbeats carry metrics, not the limit (distributed/scheduler.py,
`heartbeat_worker`). Its `run_function` handler (what `Client.run_on_scheduler` calls)
is the existing way in. This module is pickled by value (cloudpickle), so the scheduler
needs nothing of this package installed; it must stay free of imports from it.
"""

from __future__ import annotations

from typing import Any


def set_worker_memory_limit(address: str, limit: int, dask_scheduler: Any = None) -> int | None:
    """Set the scheduler's view of one worker's limit; the old value, None if unknown."""
    ws = dask_scheduler.workers.get(address) if dask_scheduler is not None else None
    if ws is None:
        return None
    old = int(ws.memory_limit or 0)
    ws.memory_limit = int(limit)
    # The scheduler keeps the cluster total as a running sum of the workers' limits.
    dask_scheduler.total_memory += int(limit) - old
    return old


def report_death(topic: str, record: dict[str, Any], dask_scheduler: Any = None) -> None:
    """A worker's death, where users look: an event on `topic` and on the worker's
    address (Dask's own topic per worker), and a warning in the scheduler's log."""
    import logging

    if dask_scheduler is None:
        return
    logging.getLogger("distributed.scheduler").warning(
        "dask-safe-worker: %s", record.get("sentence")
    )
    worker = record.get("worker")
    dask_scheduler.log_event([topic, worker] if isinstance(worker, str) else topic, record)
