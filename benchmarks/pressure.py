"""Memory-pressure benchmark: plain `dask worker` against dask-safe-worker.

    uv run python benchmarks/pressure.py            # full run, writes docs/benchmarks.md
    uv run python benchmarks/pressure.py --quick    # one spill pair, for a smoke run

The code lives in the `dswbench` package beside this file (harness, workloads, start-up,
plots, report); this file keeps the documented command and the smoke test's import.
"""

from __future__ import annotations

import sys

# dswbench is found beside this file (a script's directory leads sys.path); it reaches
# the tests' helpers itself (dswbench.support).
from dswbench.common import M_LIMIT
from dswbench.harness import RunResult, run_pressure
from dswbench.main import main

__all__ = ["M_LIMIT", "RunResult", "main", "run_pressure"]

if __name__ == "__main__":
    sys.exit(main())
