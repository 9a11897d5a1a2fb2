"""Mirrors `dask/system.py`, dask 2022.9.2 through 2026.8.0: `cpu_count()`, the
CPU_COUNT that `dask worker` divides into processes and threads and that the "auto"
memory limit is a share of. Parity-tested against the real function on this machine and
over cgroup trees in every matrix cell (tests/test_parity.py).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .release import Version

# dask.system reads the v2 `cpu.max` from here on; before, only the v1 quota files.
CPU_QUOTA_V2 = Version(2022, 10, 0)


def _read_int_pair(path: Path) -> tuple[int, int] | None:
    try:
        a, b = path.read_text().split(" ")
        return int(a), int(b)
    except (OSError, ValueError):
        return None


def _cgroup_cpu_quota(proc_root: Path, sys_root: Path, reads_v2: bool) -> tuple[int, int] | None:
    # dask reads only these fixed paths; we replicate that, flaws included, because the
    # goal is to predict the CPU_COUNT dask will compute, not the true one.
    for dirname in ("cpuacct,cpu", "cpu,cpuacct"):
        base = sys_root / "fs/cgroup" / dirname
        try:
            quota = int((base / "cpu.cfs_quota_us").read_text())
            period = int((base / "cpu.cfs_period_us").read_text())
            return quota, period
        except (OSError, ValueError):
            pass
    if not reads_v2:
        return None
    try:
        # The last line's path, whatever its hierarchy: dask's own (hybrid-unaware) rule.
        group_path = (proc_root / "self/cgroup").read_text().strip().split(":")[-1]
        if not group_path.endswith("/"):
            group_path = f"{group_path}/"
        return _read_int_pair(Path(f"{sys_root}/fs/cgroup{group_path}cpu.max"))
    except (OSError, ValueError):
        return None


def cpu_count(
    proc_root: Path = Path("/proc"),
    sys_root: Path = Path("/sys"),
    affinity: int | None = None,
    *,
    dask: Version | None,
) -> int:
    """dask.system.cpu_count: the affinity set, capped by a cgroup CPU quota.

    dask before 2022.10 reads only the v1 quota files, so a v2 `cpu.max` counts only from
    2022.10 on (the `dask` release; unknown: the newest rules).
    """
    if affinity is None:
        affinity = len(os.sched_getaffinity(0))
    reads_v2 = dask is None or dask >= CPU_QUOTA_V2
    count = affinity
    quota = _cgroup_cpu_quota(proc_root, sys_root, reads_v2)
    if quota is not None and quota[1] != 0:
        cgroups_count = math.ceil(quota[0] / quota[1])
        if cgroups_count > 0:
            count = min(count, cgroups_count)
    return count
