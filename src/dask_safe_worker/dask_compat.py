"""What depends on the installed distributed release, kept in one place.

The entrypoint must not import dask or distributed before it execs (about 0.5 s), so
everything here replicates their rules from data and reads files under injectable roots.
The release is read from package metadata. Parity tests import the real thing and compare;
docs/compatibility.md has the table of what differs per release and how it was verified.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, order=True)
class Version:
    major: int
    minor: int
    patch: int = 0

    @classmethod
    def parse(cls, text: str) -> Version:
        """The first three numeric components; "2023.3.2.1" is 2023.3.2 and a pre-release
        such as "2024.1.0rc1" counts as its release (only the leading digits of a piece)."""
        parts: list[int] = []
        for piece in text.strip().split(".")[:3]:
            digits = ""
            for ch in piece:
                if ch not in "0123456789":
                    break
                digits += ch
            parts.append(int(digits) if digits else 0)
        while len(parts) < 3:
            parts.append(0)
        return cls(parts[0], parts[1], parts[2])

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


# 2022.9.0 and 2022.9.1 read only the v1 `memory.limit_in_bytes` at the cgroup root; v2
# detection (`memory.max`, `memory.high`) arrived in 2022.9.2, verified from the released
# `distributed/system.py`. Below it a v2 container's limit is invisible to dask.
OLDEST_SUPPORTED = Version(2022, 9, 2)
# The newest release the matrix runs against. Newer releases are accepted (the CLI may
# warn): the rules replicated here have been stable since 2023.10.
NEWEST_TESTED = Version(2026, 8, 0)

# Releases where behaviour we replicate changed (see docs/compatibility.md).
_V2_MEMORY_DETECTION = Version(2022, 9, 2)
_NPROCS_REMOVED = Version(2022, 10, 0)  # also: `dask worker` subcommand, --scheduler-sni
_CPU_QUOTA_V2 = Version(2022, 10, 0)  # dask.system reads cpu.max from here on
_MEMORY_LOW = Version(2023, 10, 0)
_SCRIPT_AND_ALIAS_REMOVED = Version(2026, 6, 0)  # dask-worker script, Worker.memory_limit


class UnsupportedDistributedError(RuntimeError):
    """The installed distributed is missing or older than the supported range."""


def supported_range() -> str:
    return f"distributed>={OLDEST_SUPPORTED} (tested up to {NEWEST_TESTED})"


def check_supported(version: Version | None) -> None:
    """Raise UnsupportedDistributedError, naming the supported range, unless `version`
    is one whose `dask worker` behaviour this module knows."""
    if version is None:
        raise UnsupportedDistributedError(
            f"distributed is not installed in this Python; dask-safe-worker needs "
            f"{supported_range()}"
        )
    if version < OLDEST_SUPPORTED:
        raise UnsupportedDistributedError(
            f"distributed {version} is not supported: dask-safe-worker needs "
            f"{supported_range()}, because older releases do not read cgroup v2 memory "
            f"limits. Upgrade with: pip install 'distributed>={OLDEST_SUPPORTED}'"
        )


def is_tested(version: Version) -> bool:
    """False for releases newer than the matrix covers (worth a warning, not an error)."""
    return version <= NEWEST_TESTED


@functools.cache
def _installed(distribution: str) -> Version | None:
    """The version of the first `<name>-<version>.dist-info` on sys.path.

    importlib.metadata would cost ~12 ms of imports (zipfile, email, csv) on every start,
    and --print-limit's start-up time is a goal; the directory name says the same thing.
    """
    prefix = distribution.lower().replace("-", "_") + "-"
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.endswith(".dist-info") and name.lower().startswith(prefix):
                return Version.parse(name[len(prefix) : -len(".dist-info")])
    from importlib import metadata  # eggs, zip imports: the slow, general way

    try:
        return Version.parse(metadata.version(distribution))
    except metadata.PackageNotFoundError:
        return None


def installed_distributed_version() -> Version | None:
    """The installed release, read from package metadata (no import of distributed)."""
    return _installed("distributed")


def installed_dask_version() -> Version | None:
    """The installed dask, whose `dask.system` computes CPU_COUNT (distributed pins it)."""
    return _installed("dask")


# --- `dask worker` options -------------------------------------------------------------

# The option table of `distributed.cli.dask_worker.main`, identical from 2022.10.0 through
# 2026.8.0 (parity-tested against `main.params` in every matrix cell).
_VALUES_2022_10: frozenset[str] = frozenset(
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
_FLAGS_2022_10: frozenset[str] = frozenset(
    {
        "--dashboard",
        "--no-dashboard",
        "--nanny",
        "--no-nanny",
        "--lifetime-restart",
        "--no-lifetime-restart",
        "--version",
    }
)
# 2022.9.x still had the deprecated aliases, and not yet --scheduler-sni.
_VALUES_2022_9: frozenset[str] = (_VALUES_2022_10 - {"--scheduler-sni"}) | {
    "--nprocs",
    "--bokeh-port",
}
_FLAGS_2022_9: frozenset[str] = _FLAGS_2022_10 | {
    "--bokeh",
    "--no-bokeh",
    "--reconnect",
    "--no-reconnect",
}
_MULTIPLE: frozenset[str] = frozenset({"--preload", "--preload-nanny"})
# click adds --help itself; it is not in `main.params`.
_HELP = "--help"


@dataclass(frozen=True)
class WorkerOptions:
    """The long options one release's `dask worker` accepts.

    Anything else is not an error for `dask worker`: it runs click with
    `ignore_unknown_options`, so an unknown `--x` lands in the positional SCHEDULER /
    PRELOAD_ARGV arguments. Hence an option of ours must never be in `all`.
    """

    values: frozenset[str]
    flags: frozenset[str]
    multiple: frozenset[str] = _MULTIPLE

    @property
    def all(self) -> frozenset[str]:
        return self.values | self.flags

    def takes_value(self, name: str) -> bool:
        return name in self.values


_OPTIONS_2022_9 = WorkerOptions(_VALUES_2022_9, _FLAGS_2022_9 | {_HELP})
_OPTIONS_2022_10 = WorkerOptions(_VALUES_2022_10, _FLAGS_2022_10 | {_HELP})

# The union over the supported releases, so that an argument scanner that does not know
# the release never mistakes a value for one of our own options.
WORKER_VALUE_OPTIONS: frozenset[str] = _VALUES_2022_9 | _VALUES_2022_10
WORKER_FLAG_OPTIONS: frozenset[str] = _FLAGS_2022_9 | _FLAGS_2022_10 | {_HELP}


def worker_options(version: Version | None = None) -> WorkerOptions:
    """The option table of `dask worker` for `version` (default: the installed release;
    the union over all supported releases when that is unknown)."""
    if version is None:
        version = installed_distributed_version()
    if version is None:
        return WorkerOptions(WORKER_VALUE_OPTIONS, WORKER_FLAG_OPTIONS)
    return _OPTIONS_2022_9 if version < _NPROCS_REMOVED else _OPTIONS_2022_10


def nworkers_options(version: Version | None = None) -> tuple[str, ...]:
    """The options that set the number of worker processes. `--nprocs` is only an alias
    before 2022.10; later, click's `ignore_unknown_options` turns a stray `--nprocs 2`
    into positional arguments, so it must not count."""
    return tuple(o for o in ("--nworkers", "--nprocs") if o in worker_options(version).values)


# --- per-release facts -------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseFeatures:
    """What this module replicates differently per release, for the audit log."""

    distributed: Version | None
    dask: Version | None
    memory_limit_paths: tuple[str, ...]
    cpu_quota_reads_v2: bool
    nprocs_alias: bool
    dask_worker_script: bool
    worker_memory_limit_alias: bool
    dask_cli_worker: bool
    options: WorkerOptions = field(repr=False, compare=False)

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


def release_features(
    distributed: Version | None = None, dask: Version | None = None
) -> ReleaseFeatures:
    """The facts for a release pair (default: installed; unknown means the newest rules)."""
    if distributed is None:
        distributed = installed_distributed_version()
    if dask is None:
        dask = installed_dask_version()
    d = distributed if distributed is not None else NEWEST_TESTED
    k = dask if dask is not None else d
    return ReleaseFeatures(
        distributed=distributed,
        dask=dask,
        memory_limit_paths=memory_limit_paths(d),
        cpu_quota_reads_v2=k >= _CPU_QUOTA_V2,
        nprocs_alias=d < _NPROCS_REMOVED,
        dask_worker_script=d < _SCRIPT_AND_ALIAS_REMOVED,
        worker_memory_limit_alias=d < _SCRIPT_AND_ALIAS_REMOVED,
        dask_cli_worker=d >= _NPROCS_REMOVED,
        options=worker_options(d),
    )


def worker_command(python: str) -> list[str]:
    """The argv prefix that starts `dask worker` with this interpreter.

    `python -m distributed.cli.dask_worker` works on every supported release (its
    `__main__` guard is there from 2022.9.2 to 2026.8.0), and unlike the `dask-worker`
    script (removed in 2026.6) or `dask worker` (from 2022.10) it needs nothing on PATH.
    """
    return [python, "-m", "distributed.cli.dask_worker"]


# --- nworkers / nthreads -----------------------------------------------------------------


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
    nworkers: str | None,
    nthreads: int | None,
    cpu_count: int,
) -> tuple[int, int]:
    """How `dask worker` turns `--nworkers` and `--nthreads` into processes and threads.

    Returns the threads each worker process really runs: `dask worker` may pass 0
    (CPU_COUNT // nworkers when nworkers > CPU_COUNT), and Nanny/Worker then fall back to
    CPU_COUNT threads. `--nworkers auto` ignores `--nthreads`, as dask does. (The
    pre-2022.10 alias `--nprocs` arrives here as `nworkers`: parse_worker_args reads it.)
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


# --- CPU_COUNT -----------------------------------------------------------------------------


def _read_int_pair(path: Path) -> tuple[int, int] | None:
    try:
        a, b = path.read_text().split(" ")
        return int(a), int(b)
    except (OSError, ValueError):
        return None


def _cgroup_cpu_quota(
    proc_root: Path, sys_root: Path, reads_v2: bool = True
) -> tuple[int, int] | None:
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
    dask_version: Version | None = None,
) -> int:
    """dask.system.cpu_count: the affinity set, capped by a cgroup CPU quota.

    dask before 2022.10 reads only the v1 quota files, so a v2 `cpu.max` counts only from
    2022.10 on (`dask_version`, default: the installed dask).
    """
    if affinity is None:
        affinity = len(os.sched_getaffinity(0))
    if dask_version is None:
        dask_version = installed_dask_version()
    reads_v2 = dask_version is None or dask_version >= _CPU_QUOTA_V2
    count = affinity
    quota = _cgroup_cpu_quota(proc_root, sys_root, reads_v2)
    if quota is not None and quota[1] != 0:
        cgroups_count = math.ceil(quota[0] / quota[1])
        if cgroups_count > 0:
            count = min(count, cgroups_count)
    return count


# --- MEMORY_LIMIT --------------------------------------------------------------------------

# Every file distributed.system.memory_limit may read, relative to sys_root, in its order.
DASK_MEMORY_LIMIT_PATHS: tuple[str, ...] = (
    "fs/cgroup/memory/memory.limit_in_bytes",
    "fs/cgroup/memory/memory.soft_limit_in_bytes",
    "fs/cgroup/memory.max",
    "fs/cgroup/memory.high",
    "fs/cgroup/memory.low",
)


def memory_limit_paths(version: Version | None = None) -> tuple[str, ...]:
    """The cgroup files `distributed.system.memory_limit` reads in `version`.

    Always at the root of /sys/fs/cgroup, never the process's own cgroup: that blind spot
    is why this project exists. `memory.low` (a protection, not a limit) counts from
    2023.10.0 on.
    """
    if version is None:
        version = installed_distributed_version()
    if version is None or version >= _MEMORY_LOW:
        return DASK_MEMORY_LIMIT_PATHS
    if version >= _V2_MEMORY_DETECTION:
        return DASK_MEMORY_LIMIT_PATHS[:4]
    return DASK_MEMORY_LIMIT_PATHS[:1]


def dask_system_memory_limit(
    mem_total: int,
    sys_root: Path = Path("/sys"),
    rlimit_rss: int | None = None,
    version: Version | None = None,
) -> int:
    """distributed.system.memory_limit: what dask believes the machine has.

    dask caps any explicit `--memory-limit` at this value, so the plan must too.
    `mem_total` is psutil's total, i.e. MemTotal from /proc/meminfo in bytes.
    """
    limit = mem_total
    for rel in memory_limit_paths(version):
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
