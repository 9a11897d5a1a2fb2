"""Cost of checking the worker's arguments against dask worker's click command.

The check reads `distributed/cli/dask_worker.py` with `ast` instead of importing it.
This compares the start path (`--dry-run`, no audit log) with the check (default
worker command) and without it (a custom worker command is not checked), and shows
what importing the command would cost instead.

    uv run python benchmarks/worker_args_check.py [RUNS]
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 25
DSW = shutil.which("dask-safe-worker") or "dask-safe-worker"
BASE = ["--dry-run", "--log-format", "none", "--cgroup-write", "never"]
BASE += ["tcp://127.0.0.1:1", "--nthreads", "2"]


def timed(argv: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs + 1):  # the first run warms the page cache and is discarded
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        out.append(time.perf_counter() - start)
    return sorted(out[1:])


def show(label: str, values: list[float]) -> None:
    median = 1e3 * statistics.median(values)
    print(f"{label:<44} median {median:6.0f} ms  min {1e3 * values[0]:6.0f} ms")


show("start path, worker arguments checked", timed([DSW, *BASE], RUNS))
show(
    "start path, not checked (custom command)",
    timed([DSW, *BASE, "--worker-command", "true"], RUNS),
)
show(
    "import distributed.cli.dask_worker instead",
    timed([sys.executable, "-c", "import distributed.cli.dask_worker"], max(3, RUNS // 5)),
)
