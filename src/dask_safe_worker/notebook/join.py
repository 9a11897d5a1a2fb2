"""`preload=["dask_safe_worker.notebook.join"]`: a LocalCluster worker joins its cgroup.

Every worker process of a safe LocalCluster runs this at set-up, before it registers
with the scheduler and so before it holds any task's data: the first start and every
restart by its nanny alike. Where the kernel limit could be written, it moves itself
into the workers' child cgroup (whose limit is the budget), so that a kernel OOM kill
at that limit stays with a worker. It also raises its own `oom_score_adj` (allowed
without privileges): if the pod's own limit is hit first, the kernel's OOM killer then
prefers a worker, which its nanny restarts, to the notebook kernel. The kernel's pid is
never moved: in a process with that pid this does nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger("dask_safe_worker.notebook")

CGROUP_ENV = "DASK_SAFE_WORKER_NOTEBOOK_CGROUP"
KERNEL_PID_ENV = "DASK_SAFE_WORKER_NOTEBOOK_KERNEL"
# Above a notebook kernel's 0: the kernel's OOM killer adds this to its badness (in
# thousandths of the memory it may use), so a worker of a fraction of the kernel's size
# is still chosen first. Below 1000, which would make a worker the only candidate even
# when something else is at fault.
WORKER_OOM_SCORE_ADJ = 500


def join(pid: int, environ: dict[str, str] | os._Environ[str]) -> str | None:
    """Move `pid` into the cgroup named by the environment; what went wrong, or None."""
    directory = environ.get(CGROUP_ENV)
    if not directory:
        return None
    if str(pid) == environ.get(KERNEL_PID_ENV):
        return "this is the notebook kernel's own process: not moved"
    try:
        with open(os.path.join(directory, "cgroup.procs"), "w") as f:
            f.write(str(pid))
    except OSError as exc:
        return f"cannot join {directory}: {exc.strerror or exc}"
    return None


def raise_oom_score(pid: int, value: int = WORKER_OOM_SCORE_ADJ) -> str | None:
    """Raise (never lower) `pid`'s oom_score_adj to `value`; what went wrong, or None."""
    path = f"/proc/{pid}/oom_score_adj"
    try:
        with open(path) as f:
            current = int(f.read().strip())
        if current < value:
            with open(path, "w") as f:
                f.write(str(value))
    except (OSError, ValueError) as exc:
        return f"cannot raise oom_score_adj: {exc}"
    return None


async def dask_setup(worker: Any) -> None:
    pid = os.getpid()
    if str(pid) == os.environ.get(KERNEL_PID_ENV):
        return  # a worker in the kernel's own process (processes=False): nothing to move
    for problem in (join(pid, os.environ), raise_oom_score(pid)):
        if problem is not None:
            logger.warning("dask-safe-worker: %s", problem)
