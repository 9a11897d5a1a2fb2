"""What depends on the installed distributed release, kept in one place.

The entrypoint must not import dask or distributed before it execs (about 0.5 s), so
everything here replicates their rules from data and reads files under injectable roots.
Parity tests import the real thing and compare.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

# Options of `dask worker` that take a value. The union over the supported releases, so
# that an argument scanner never mistakes a value for one of our own options.
WORKER_VALUE_OPTIONS: frozenset[str] = frozenset(
    {
        "--tls-ca-file",
        "--tls-cert",
        "--tls-key",
        "--worker-port",
        "--nanny-port",
        "--dashboard-address",
        "--listen-address",
        "--contact-address",
        "--host",
        "--interface",
        "--protocol",
        "--nthreads",
        "--nworkers",
        "--nprocs",
        "--name",
        "--memory-limit",
        "--pid-file",
        "--local-directory",
        "--resources",
        "--scheduler-file",
        "--death-timeout",
        "--dashboard-prefix",
        "--lifetime",
        "--lifetime-stagger",
        "--worker-class",
        "--preload",
        "--preload-nanny",
        "--scheduler-sni",
    }
)

WORKER_FLAG_OPTIONS: frozenset[str] = frozenset(
    {
        "--dashboard",
        "--no-dashboard",
        "--nanny",
        "--no-nanny",
        "--lifetime-restart",
        "--no-lifetime-restart",
        "--version",
        "--help",
    }
)

WORKER_OPTIONS: frozenset[str] = WORKER_VALUE_OPTIONS | WORKER_FLAG_OPTIONS


@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    patch: int = 0

    @classmethod
    def parse(cls, text: str) -> Version:
        parts: list[int] = []
        for piece in text.split(".")[:3]:
            digits = "".join(ch for ch in piece if ch.isdigit())
            parts.append(int(digits) if digits else 0)
        while len(parts) < 3:
            parts.append(0)
        return cls(parts[0], parts[1], parts[2])

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    def key(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)


OLDEST_SUPPORTED = Version(2022, 9, 0)


def installed_distributed_version() -> Version | None:
    """The installed release, read from package metadata (no import of distributed)."""
    try:
        return Version.parse(metadata.version("distributed"))
    except metadata.PackageNotFoundError:
        return None


def worker_command(python: str) -> list[str]:
    """The argv prefix that starts `dask worker` with this interpreter.

    `python -m distributed.cli.dask_worker` works on every supported release, and unlike
    the `dask-worker` script (removed in 2026.6) it needs nothing on PATH.
    """
    return [python, "-m", "distributed.cli.dask_worker"]


def nprocesses_nthreads(n: int) -> tuple[int, int]:
    """distributed.deploy.utils.nprocesses_nthreads, the `--nworkers auto` split."""
    processes = n if n <= 4 else min(f for f in _factors(n) if f >= math.sqrt(n))
    return processes, n // processes


def _factors(n: int) -> set[int]:
    seq = [i for i in range(1, int(n**0.5) + 1) if n % i == 0]
    return {j for i in seq for j in (i, n // i)}


class WorkerArgsError(ValueError):
    """Arguments that `dask worker` itself would reject."""


def resolve_nworkers_nthreads(
    nworkers: str | None, nthreads: int | None, cpu_count: int
) -> tuple[int, int]:
    """How `dask worker` turns `--nworkers` and `--nthreads` into processes and threads.

    Returns the threads each worker process really runs: `dask worker` may pass 0
    (CPU_COUNT // nworkers when nworkers > CPU_COUNT), and Worker then falls back to
    CPU_COUNT threads.
    """
    if nworkers == "auto":
        n_workers, n_threads = nprocesses_nthreads(cpu_count)
    else:
        if nworkers is None:
            n_workers = 1
        else:
            try:
                n_workers = int(nworkers)
            except ValueError as exc:
                raise WorkerArgsError(
                    f"--nworkers must be an integer or 'auto', not {nworkers!r}"
                ) from exc
        n_threads = nthreads or 0
    if n_workers < 0:
        n_workers = cpu_count + 1 + n_workers
    if n_workers <= 0:
        raise WorkerArgsError(
            f"--nworkers resolves to no worker process ({nworkers!r} with CPU_COUNT={cpu_count})"
        )
    if not n_threads:
        n_threads = cpu_count // n_workers
    if not n_threads:
        n_threads = cpu_count
    return n_workers, n_threads


def _read_int_pair(path: Path) -> tuple[int, int] | None:
    try:
        a, b = path.read_text().split(" ")
        return int(a), int(b)
    except (OSError, ValueError):
        return None


def _cgroup_cpu_quota(proc_root: Path, sys_root: Path) -> tuple[int, int] | None:
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
    try:
        group_path = (proc_root / "self/cgroup").read_text().strip().split(":")[-1]
        if not group_path.endswith("/"):
            group_path = f"{group_path}/"
        return _read_int_pair(Path(f"{sys_root}/fs/cgroup{group_path}cpu.max"))
    except OSError:
        return None


def cpu_count(
    proc_root: Path = Path("/proc"),
    sys_root: Path = Path("/sys"),
    affinity: int | None = None,
) -> int:
    """dask.system.cpu_count: the affinity set, capped by a cgroup CPU quota."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0))
    count = affinity
    quota = _cgroup_cpu_quota(proc_root, sys_root)
    if quota is not None:
        cgroups_count = math.ceil(quota[0] / quota[1])
        if cgroups_count > 0:
            count = min(count, cgroups_count)
    return count


DASK_MEMORY_LIMIT_PATHS: tuple[str, ...] = (
    "fs/cgroup/memory/memory.limit_in_bytes",
    "fs/cgroup/memory/memory.soft_limit_in_bytes",
    "fs/cgroup/memory.max",
    "fs/cgroup/memory.high",
    "fs/cgroup/memory.low",
)


def dask_system_memory_limit(
    mem_total: int, sys_root: Path = Path("/sys"), rlimit_rss: int | None = None
) -> int:
    """distributed.system.memory_limit: what dask believes the machine has.

    dask caps any explicit `--memory-limit` at this value, so the plan must too.
    """
    limit = mem_total
    for rel in DASK_MEMORY_LIMIT_PATHS:
        try:
            value = int((sys_root / rel).read_text())
        except (OSError, ValueError):
            continue
        if value > 0:
            limit = min(limit, value)
    if rlimit_rss is None:
        import resource

        rlimit_rss = resource.getrlimit(resource.RLIMIT_RSS)[1]
    if 0 < rlimit_rss < limit:
        limit = rlimit_rss
    return limit
