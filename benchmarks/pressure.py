"""Memory-pressure benchmark: plain `dask worker` against dask-safe-worker.

    uv run python benchmarks/pressure.py            # full run, writes docs/benchmarks.md
    uv run python benchmarks/pressure.py --quick    # one spill pair, for a smoke run

The code lives in the `dswbench` package beside this file (harness, workloads, start-up,
plots, report); this file keeps the documented command and the smoke test's import.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# The benchmark shares the tests' cgroup helpers, and runs as a script from any directory.
for _path in (_HERE, _HERE.parent / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from dswbench.common import M_LIMIT  # noqa: E402
from dswbench.harness import RunResult, run_pressure  # noqa: E402
from dswbench.main import main  # noqa: E402

__all__ = ["M_LIMIT", "RunResult", "main", "run_pressure"]

if __name__ == "__main__":
    sys.exit(main())
