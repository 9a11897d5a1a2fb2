"""Mirrors `distributed/deploy/local.py`: how `LocalCluster` splits workers and threads.

`LocalCluster(n_workers, threads_per_worker, processes)` resolves its counts differently
from `dask worker`: without either count, processes get `nprocesses_nthreads` and threads
one worker with every core; a thread count alone divides the cores; a worker count alone
overcommits threads (`ceil`, where `dask worker` floors). Identical from 2022.9.2 through
2026.8.0 (tests/test_notebook.py compares it with the installed release's cluster).
"""

from __future__ import annotations

import math

from .dask_worker import nprocesses_nthreads


def local_cluster_counts(
    n_workers: int | None, threads_per_worker: int | None, processes: bool, cpu_count: int
) -> tuple[int, int]:
    """(workers, threads per worker) as `LocalCluster.__init__` resolves them."""
    if n_workers is None and threads_per_worker is None:
        if processes:
            return nprocesses_nthreads(cpu_count)
        return 1, cpu_count
    if n_workers is None:
        assert threads_per_worker is not None
        return (max(1, cpu_count // threads_per_worker) if processes else 1), threads_per_worker
    if threads_per_worker is None:
        # n_workers=0 is a cluster that scales up later: dask leaves threads unset.
        return n_workers, max(1, math.ceil(cpu_count / n_workers)) if n_workers else cpu_count
    return n_workers, threads_per_worker
