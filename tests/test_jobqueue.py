"""dask-jobqueue as a real launcher: its local job runner starts dask-safe-worker.

dask-jobqueue's `LocalCluster` (from `dask_jobqueue.local`) runs `python -m <worker_command>`
and reads the worker's stderr until "Registered to:"; any earlier line that contains
"error" fails the job ("Worker failed"). So routine audit lines must carry no failure
words (issue 15, item 11). The scheduler is jobqueue's own, bound to 127.0.0.1; nothing is
written to a cgroup (`DASK_SAFE_WORKER_CGROUP_WRITE=never`).
"""

from __future__ import annotations

import pytest
from dask_jobqueue.local import LocalCluster
from distributed import Client

pytestmark = pytest.mark.e2e

GiB = 2**30


def test_jobqueue_local_cluster_starts_safe_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASK_SAFE_WORKER_CGROUP_WRITE", "never")
    monkeypatch.setenv("DASK_SAFE_WORKER_LOG_FORMAT", "json")
    with (
        LocalCluster(
            cores=1,
            processes=1,
            memory="1GiB",
            worker_command="dask_safe_worker",
            worker_extra_args=["--no-dashboard"],
            scheduler_options={"host": "127.0.0.1", "dashboard": False},
            death_timeout=30,
        ) as cluster,
        Client(cluster, timeout=30) as client,
    ):
        assert "-m dask_safe_worker tcp://127.0.0.1:" in cluster.job_script()
        cluster.scale(jobs=2)
        client.wait_for_workers(2, timeout=120)
        limits = client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
        # jobqueue's --memory-limit fits the budget here and passes through unchanged.
        assert list(limits.values()) == [GiB, GiB]
        assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
