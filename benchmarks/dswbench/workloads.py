"""What runs inside the worker (sent by value with cloudpickle), and the workloads."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import Any

from .common import CHUNK_BYTES, PROBE_BYTES, SHARES

MADV_POPULATE_WRITE = 23  # linux/mman.h; not in Python's mmap module

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

# An agent that holds argv[1] bytes, then grows by the number of bytes on each line of its
# stdin (answering "grown" on stdout), every page touched: the neighbour that grows.
GROWING_AGENT_CODE = """
import sys
held = []
def grow(n):
    b = bytearray(n)
    b[::4096] = b"\\x01" * len(range(0, n, 4096))
    held.append(b)
grow(int(sys.argv[1]))
print("ready", flush=True)
for line in sys.stdin:
    grow(int(line))
    print("grown", flush=True)
"""


def burst_task(nbytes: int) -> int:
    import numpy as np

    # np.ones writes every page, so the whole allocation is charged within about a second.
    block = np.ones(nbytes, dtype=np.uint8)
    return int(block[::4096].sum())


def populate(nbytes: int) -> float:
    """Touch `nbytes` of anonymous memory as fast as the kernel can; seconds taken.

    Transparent huge pages (MADV_HUGEPAGE) and MADV_POPULATE_WRITE (Linux 5.14) fault the
    whole range in inside the kernel, 2 MiB at a time: the charge grows at the kernel's
    zeroing speed (GiB/s), far faster than the nanny's 100 ms RSS poll can follow.
    Older kernels fall back to MAP_POPULATE (4 KiB pages, still without user faults).
    """
    import mmap
    import time

    anon = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    t = time.perf_counter()
    block = mmap.mmap(-1, nbytes, flags=anon)
    try:
        block.madvise(mmap.MADV_HUGEPAGE)
        block.madvise(MADV_POPULATE_WRITE)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: the kernel has no MADV_POPULATE_WRITE
            raise
        block.close()
        t = time.perf_counter()
        block = mmap.mmap(-1, nbytes, flags=anon | mmap.MAP_POPULATE)
    elapsed = time.perf_counter() - t
    block.close()
    return elapsed


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


def run_workload(
    client: Any,
    workload: str,
    budget: int,
    timeout: float,
    info: dict[str, Any] | None = None,
    warm_huge_pages: bool = True,
) -> tuple[str, Any]:
    """Run one workload sized from `budget`; `info` receives measurements made on the way
    (the fast burst's probe time), kept even when the workload then fails.
    `warm_huge_pages`: False inside a small VM, whose RAM the warm-up alone would fill."""
    if workload == "fastburst":
        # First the achieved rate, on a size that fits (no kill); then the burst itself.
        # Huge pages come fast only when free ones exist; on a busy host the kernel first
        # compacts memory (hundreds of MiB/s). Populating and freeing the burst's size
        # here, outside M, leaves free huge pages behind for the worker to take.
        if warm_huge_pages:
            populate(int(1.5 * SHARES["fastburst"] * budget))
        client.submit(populate, PROBE_BYTES, pure=False).result(timeout=timeout)
        probe = client.submit(populate, PROBE_BYTES, pure=False).result(timeout=timeout)
        if info is not None:
            info["populate_probe_s"] = float(probe)
        fut = client.submit(populate, int(SHARES["fastburst"] * budget), pure=False)
        return "fastburst", fut.result(timeout=timeout)
    if workload == "burst":
        fut = client.submit(burst_task, int(SHARES["burst"] * budget), pure=False)
        return "burst", fut.result(timeout=timeout)
    nbytes = spill_bytes(budget, SHARES[workload], CHUNK_BYTES)
    return workload, persist_and_sum(client, nbytes, CHUNK_BYTES, timeout)


def spill_bytes(budget: int, share: float, chunk_bytes: int) -> int:
    """The spill workload's size: `share` times `budget`, in whole chunks of float64."""
    chunk = chunk_bytes // 8
    return int(share * budget) // 8 // chunk * chunk * 8


def persist_and_sum(
    client: Any,
    nbytes: int,
    chunk_bytes: int,
    timeout: float,
    while_held: Callable[[], None] | None = None,
) -> Any:
    """Random float64 arrays of `nbytes` persisted on the cluster, then summed: beyond the
    workers' memory they spill. `while_held` runs after the sum, before the data is let go."""
    import dask.array as da

    persisted = client.persist(da.random.random(nbytes // 8, chunks=chunk_bytes // 8))
    try:
        total = client.compute(persisted.sum()).result(timeout=timeout)
        if while_held is not None:
            while_held()
        return total
    finally:
        del persisted
