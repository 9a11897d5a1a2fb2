"""What runs inside the worker (sent by value with cloudpickle), and the workloads."""

from __future__ import annotations

import os
import sys
from typing import Any

from .common import CHUNK_BYTES

AGENT_CODE = """
import sys, time
n = int(sys.argv[1])
b = bytearray(n)
# bytearray(n) is calloc'd and stays untouched; write one byte per page so it is charged.
b[::4096] = b"\\x01" * len(range(0, n, 4096))
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def burst_task(nbytes: int) -> int:
    import numpy as np

    # np.ones writes every page, so the whole allocation is charged within about a second.
    block = np.ones(nbytes, dtype=np.uint8)
    return int(block[::4096].sum())


def worker_stats(dask_worker: Any) -> dict[str, Any]:
    written = 0
    for key, value in dask_worker.digests_total.items():
        if isinstance(key, tuple) and "disk-write" in key and key[-1] == "bytes":
            written += int(value)
    try:
        _, spilled_disk = dask_worker.data.spilled_total
    except AttributeError:
        spilled_disk = 0
    return {
        "memory_limit": dask_worker.memory_manager.memory_limit,
        "disk_write_bytes": written,
        "spilled_now_bytes": int(spilled_disk),
        "pid": os.getpid(),
    }


def pickle_by_value() -> None:
    # Pickled by reference, the functions above would need this package on the worker's
    # sys.path; the worker cannot import it.
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def run_workload(client: Any, workload: str, budget: int, timeout: float) -> tuple[str, Any]:
    import dask.array as da

    chunk = CHUNK_BYTES // 8
    if workload == "burst":
        fut = client.submit(burst_task, int(1.2 * budget), pure=False)
        return "burst", fut.result(timeout=timeout)
    share = 1.5 if workload == "spill" else 0.3
    n = int(share * budget) // 8 // chunk * chunk
    x = da.random.random(n, chunks=chunk)
    persisted = client.persist(x)
    total = client.compute(persisted.sum())
    try:
        return workload, total.result(timeout=timeout)
    finally:
        del persisted
