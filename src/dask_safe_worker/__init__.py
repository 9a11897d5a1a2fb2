"""dask-safe-worker: two programs over one measuring and planning core.

`dask-safe-worker` measures, plans, enforces, runs and follows (cli, measure, plan,
cgroup/, run_worker, supervise, follow/); `dask-safe-audit` checks a running cluster
(cluster_audit/). The module map is in docs/design.md.
"""

__version__ = "0.1.0"
