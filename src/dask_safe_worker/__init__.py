"""dask-safe-worker: two programs over one measuring and planning core.

`dask-safe-worker` measures, plans, enforces, runs and follows (cli, measure, plan,
cgroup/, run_worker, supervise, follow/); `dask-safe-audit` checks a running cluster
(cluster_audit/). The module map is in docs/design.md.
"""

__version__ = "0.1.0"

TYPE_CHECKING = False  # typing costs ~2 ms to import on the fast path; mypy knows this name
if TYPE_CHECKING:
    from .notebook.budget import memory_limit
    from .notebook.cluster import LocalCluster

    __all__ = ["LocalCluster", "memory_limit"]


def __getattr__(name: str) -> object:
    # Loaded on use: `import dask_safe_worker` stays free of distributed (~330 ms) and of
    # our own planning modules, for the CLI's fast path and for a notebook alike.
    if name == "LocalCluster":
        from .notebook.cluster import LocalCluster

        return LocalCluster
    if name == "memory_limit":
        from .notebook.budget import memory_limit

        return memory_limit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def deaths(client: object) -> list[str]:
    """One sentence per worker death the scheduler knows of, oldest first (a worker
    killed by the kernel OOM killer, restarted by its nanny, signalled or exited).
    Imported only when called: this package's import stays light."""
    from .deaths_client import deaths as _deaths

    return _deaths(client)
