"""The per-release facts of the other `dask_compat` modules in one record: the `dask.release`
audit event. Mirrors no upstream file; the two facts that have no module of their own
(the `dask-worker` console script in distributed's packaging, the `Worker.memory_limit`
alias in `distributed/worker.py`) are parity-tested against the installed release
(tests/test_parity.py).
"""

from __future__ import annotations

from ..records import record
from .dask_system import CPU_QUOTA_V2
from .dask_worker import NPROCS_REMOVED
from .distributed_system import memory_limit_paths
from .release import NEWEST_TESTED, Release, Version

TYPE_CHECKING = False  # typing costs ~2 ms to import; mypy knows this name
if TYPE_CHECKING:
    from typing import Any

# The `dask-worker` script and the `Worker.memory_limit` alias are gone from here on.
SCRIPT_AND_ALIAS_REMOVED = Version(2026, 6, 0)


@record
class ReleaseFeatures:
    """What the `dask_compat` modules replicate differently per release, for the audit log."""

    distributed: Version | None
    dask: Version | None
    memory_limit_paths: tuple[str, ...]
    cpu_quota_reads_v2: bool
    nprocs_alias: bool
    dask_worker_script: bool
    worker_memory_limit_alias: bool
    dask_cli_worker: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "distributed": None if self.distributed is None else str(self.distributed),
            "dask": None if self.dask is None else str(self.dask),
            "memory_limit_paths": list(self.memory_limit_paths),
            "cpu_quota_reads_v2": self.cpu_quota_reads_v2,
            "nprocs_alias": self.nprocs_alias,
            "dask_worker_script": self.dask_worker_script,
            "worker_memory_limit_alias": self.worker_memory_limit_alias,
            "dask_cli_worker": self.dask_cli_worker,
        }


def release_features(release: Release) -> ReleaseFeatures:
    """The facts for a release pair (an unknown release: the newest rules; an unknown dask:
    the distributed release's)."""
    d = release.distributed if release.distributed is not None else NEWEST_TESTED
    k = release.dask if release.dask is not None else d
    return ReleaseFeatures(
        distributed=release.distributed,
        dask=release.dask,
        memory_limit_paths=memory_limit_paths(d),
        cpu_quota_reads_v2=k >= CPU_QUOTA_V2,
        nprocs_alias=d < NPROCS_REMOVED,
        dask_worker_script=d < SCRIPT_AND_ALIAS_REMOVED,
        worker_memory_limit_alias=d < SCRIPT_AND_ALIAS_REMOVED,
        dask_cli_worker=d >= NPROCS_REMOVED,
    )
