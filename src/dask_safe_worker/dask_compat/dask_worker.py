"""Mirrors `distributed/cli/dask_worker.py`, 2022.9.2 through 2026.8.0: `dask worker`.

Its click option table per release, how its `main` turns `--nworkers`/`--nthreads` into
processes and threads (with `nprocesses_nthreads` from `distributed/deploy/utils.py`), and
the command that runs it. Parity-tested against `main.params` and a real `dask worker` in
every matrix cell (tests/test_parity.py).
"""

from __future__ import annotations

import math

from ..records import record
from .release import Version

# Removed `--nprocs` (and `--bokeh*`, `--reconnect`); added the `dask worker` subcommand
# and --scheduler-sni.
NPROCS_REMOVED = Version(2022, 10, 0)

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


@record
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


def worker_options(distributed: Version | None) -> WorkerOptions:
    """The option table of `dask worker` in the `distributed` release (the union over all
    supported releases when the release is unknown)."""
    if distributed is None:
        return WorkerOptions(WORKER_VALUE_OPTIONS, WORKER_FLAG_OPTIONS)
    return _OPTIONS_2022_9 if distributed < NPROCS_REMOVED else _OPTIONS_2022_10


def nworkers_options(distributed: Version | None) -> tuple[str, ...]:
    """The options that set the number of worker processes. `--nprocs` is only an alias
    before 2022.10; later, click's `ignore_unknown_options` turns a stray `--nprocs 2`
    into positional arguments, so it must not count."""
    table = worker_options(distributed)
    return tuple(o for o in ("--nworkers", "--nprocs") if o in table.values)


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
