"""The notebook's plan, on the CLI's: the kernel is a neighbour that can grow (pure).

`make_plan` adds back the caller's own working set (a `dask-safe-worker` start may keep
using what it holds). A notebook kernel is not a worker: what it holds and what it will
pull to the client is not the workers' to take. So the measurement the plan sees counts
only the workers' own memory as ours (none before they start, their child cgroup's
working set afterwards), and the reserve is kept for the kernel's growth.
"""

from __future__ import annotations

from ..dask_compat.local_cluster import local_cluster_counts
from ..measure import Measurement
from ..plan import DEFAULT_MIN_WORKER_MEMORY, DEFAULT_NANNY_ALLOWANCE, Settings
from ..records import replace
from ..sizes import Amount, parse_amount
from ..worker_args import WorkerArgs

# A quarter of what is free for kernel and workers together stays with the kernel: in a
# 2 GiB pod that is ~470 MiB above its start (a kernel with distributed imported holds
# ~150 MiB), enough for a result of a few hundred MiB pulled to the client; the budget
# follows it down live when it grows further (docs/notebooks.md).
NOTEBOOK_RESERVE = Amount(fraction=0.25)

ReserveValue = int | float | str | Amount


def reserve_amount(value: ReserveValue) -> Amount:
    """The reserve as the plan takes it: bytes (an int, or a size such as "1GiB"), or a
    fraction in [0, 1) (a float, or "25%"); ValueError otherwise."""
    if isinstance(value, Amount):
        return value
    if isinstance(value, bool):
        raise ValueError(f"reserve {value!r} is not a size or a fraction")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"reserve {value!r} is negative")
        return Amount(bytes=value)
    if isinstance(value, float):
        if not 0 <= value < 1:
            raise ValueError(f"reserve {value!r}: a fraction is at least 0 and below 1")
        return Amount(fraction=value)
    if isinstance(value, str):
        return parse_amount(value)
    raise ValueError(f"reserve {value!r} is not a size or a fraction")


def notebook_args(
    n_workers: int | None,
    threads_per_worker: int | None,
    processes: bool,
    cpu_count: int,
) -> WorkerArgs:
    """The `dask worker` arguments that plan like this LocalCluster: its own counts, a
    nanny per worker with processes, none with threads. A cluster of no workers (one
    that scales later) is planned for one."""
    workers, threads = local_cluster_counts(n_workers, threads_per_worker, processes, cpu_count)
    return WorkerArgs(nworkers=str(max(1, workers)), nthreads=threads, nanny=processes)


def notebook_settings(
    reserve: ReserveValue = NOTEBOOK_RESERVE,
    min_worker_memory: int = DEFAULT_MIN_WORKER_MEMORY,
    nanny_allowance: int = DEFAULT_NANNY_ALLOWANCE,
    follows: bool = True,
) -> Settings:
    return Settings(
        reserve=reserve_amount(reserve),
        min_worker_memory=min_worker_memory,
        nanny_allowance=nanny_allowance,
        supervised=False,
        follows=follows,
    )


def as_neighbour(
    m: Measurement, workers_working_set: int, workers: frozenset[int] = frozenset()
) -> Measurement:
    """The measurement with the caller counted as a neighbour: ours is only what the
    workers hold (`workers_working_set`, their pids `workers`). Without the list of the
    cgroup's processes, the cgroup's working set is never taken as ours."""
    return replace(m, own_procs=None, own_rss=workers_working_set, ours=workers)
