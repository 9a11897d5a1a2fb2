"""Mirrors `distributed/system.py`, 2022.9.2 through 2026.8.0: `memory_limit()`, the
MEMORY_LIMIT that every worker's "auto" limit is a share of and every explicit
`--memory-limit` is capped at. Parity-tested against the real function over seven cgroup
trees in every matrix cell (tests/test_parity.py).
"""

from __future__ import annotations

from pathlib import Path

from .release import Version

# 2022.9.2 added the v2 files (`memory.max`, `memory.high`); 2023.10.0 `memory.low`.
V2_MEMORY_DETECTION = Version(2022, 9, 2)
MEMORY_LOW = Version(2023, 10, 0)

# Every file distributed.system.memory_limit may read, relative to sys_root, in its order.
DASK_MEMORY_LIMIT_PATHS: tuple[str, ...] = (
    "fs/cgroup/memory/memory.limit_in_bytes",
    "fs/cgroup/memory/memory.soft_limit_in_bytes",
    "fs/cgroup/memory.max",
    "fs/cgroup/memory.high",
    "fs/cgroup/memory.low",
)


def memory_limit_paths(distributed: Version | None) -> tuple[str, ...]:
    """The cgroup files `distributed.system.memory_limit` reads in the `distributed`
    release (unknown: the newest rules).

    Always at the root of /sys/fs/cgroup, never the process's own cgroup: that blind spot
    is why this project exists. `memory.low` (a protection, not a limit) counts from
    2023.10.0 on.
    """
    if distributed is None or distributed >= MEMORY_LOW:
        return DASK_MEMORY_LIMIT_PATHS
    if distributed >= V2_MEMORY_DETECTION:
        return DASK_MEMORY_LIMIT_PATHS[:4]
    return DASK_MEMORY_LIMIT_PATHS[:1]


def memory_limit(
    mem_total: int,
    sys_root: Path = Path("/sys"),
    rlimit_rss: int | None = None,
    *,
    distributed: Version | None,
) -> int:
    """distributed.system.memory_limit: what dask believes the machine has.

    dask caps any explicit `--memory-limit` at this value, so the plan must too.
    `mem_total` is psutil's total, i.e. MemTotal from /proc/meminfo in bytes.
    """
    limit = mem_total
    for rel in memory_limit_paths(distributed):
        try:
            value = int((sys_root / rel).read_text())
        except (OSError, ValueError):
            continue
        if value > 0:
            limit = min(limit, value)
    if rlimit_rss is None:
        import resource

        rlimit_rss = resource.getrlimit(resource.RLIMIT_RSS)[1]
    # RLIM_INFINITY is -1; every release ignores non-positive values.
    if 0 < rlimit_rss < limit:
        limit = rlimit_rss
    return limit
