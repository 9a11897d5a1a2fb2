# ruff: noqa: RUF001
"""Constants and formatting shared by the benchmark's harness, report and plots."""

from __future__ import annotations

import compileall
import statistics
import sys
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent

KiB = 2**10
MiB = 2**20
GiB = 2**30

M_LIMIT = 3 * GiB
AGENT_BYTES = 600 * MiB
NTHREADS = 2
CHUNK_BYTES = 64 * MiB
# The fast burst's rate probe: small enough to fit every contender's limit.
PROBE_BYTES = 512 * MiB
# The efficiency frontier: the same scenario with M shrunk to the small VM's headroom.
SMALL_M_LIMIT = 1536 * MiB
FRONTIER_ALLOWANCES = (40, 64, 96)

PY = sys.executable
SAFE = str(Path(PY).parent / "dask-safe-worker")
AUDIT = str(Path(PY).parent / "dask-safe-audit")
CONTENDERS = ("plain", "safe", "seed")
WORKLOADS = ("spill", "burst", "fastburst", "steady")
# Per-workload bound after which a run counts as hung.
TIMEOUTS = {"spill": 180.0, "burst": 120.0, "fastburst": 120.0, "steady": 90.0}
# Workload size as a share of M's headroom.
SHARES = {"spill": 1.5, "burst": 1.2, "fastburst": 1.2, "steady": 0.3}


def compile_bytecode(trees: Sequence[str] = ()) -> None:
    """Start-up is measured as pip installs: with bytecode. This machine sets
    PYTHONDONTWRITEBYTECODE=1 and uv does not compile, so nothing would be cached."""
    for directory in (sysconfig.get_paths()["purelib"], str(REPO / "src"), *trees):
        compileall.compile_dir(directory, quiet=1, workers=0)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB"


def fmt_med_range(measured: Sequence[float | None], fmt: Callable[[float], str]) -> str:
    values = [v for v in measured if v is not None]
    if not values:
        return "–"
    med = statistics.median(values)
    if len(values) == 1 or min(values) == max(values):
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(values))}–{fmt(max(values))})"
