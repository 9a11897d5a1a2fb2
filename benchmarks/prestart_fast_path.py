"""Start-up of entrypoints/host-prestart.sh's call beside a bare `--print-limit`.

host-prestart.sh runs `dask-safe-worker --print-limit --cgroup-write never` before every
container start, configured through `DASK_SAFE_WORKER_*` variables. Both it and the bare
call take the click-free fast path (entry.py). The three commands run round-robin in one
run, so a busy moment on a shared machine costs each of them alike. Neither call writes a
cgroup file: `--print-limit` only measures.

Python here may run with PYTHONDONTWRITEBYTECODE=1, which would time compiling every
module on every start; the site-packages and src are compiled first, as an installed
wheel would be.

    uv run python benchmarks/prestart_fast_path.py [RUNS]
"""

from __future__ import annotations

import compileall
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 40
DSW = shutil.which("dask-safe-worker") or "dask-safe-worker"
PRESTART_ENV = {"DASK_SAFE_WORKER_RESERVE": "512MiB", "DASK_SAFE_WORKER_NANNY_ALLOWANCE": "96MiB"}
CLICK = [sys.executable, "-c", "from dask_safe_worker.cli import main; main()"]
COMMANDS: dict[str, tuple[list[str], dict[str, str]]] = {
    "python -c pass": ([sys.executable, "-c", "pass"], {}),
    "--print-limit (bare)": ([DSW, "--print-limit"], {}),
    "host-prestart.sh's call": ([DSW, "--print-limit", "--cgroup-write", "never"], PRESTART_ENV),
    # What the same call cost before it took the fast path: the click command.
    "the same through click": (
        [*CLICK, "--print-limit", "--cgroup-write", "never"],
        PRESTART_ENV,
    ),
}


def compile_bytecode() -> None:
    src = Path(__file__).resolve().parent.parent / "src"
    for directory in (sysconfig.get_paths()["purelib"], str(src)):
        compileall.compile_dir(directory, quiet=1, workers=0)


def main() -> None:
    compile_bytecode()
    times: dict[str, list[float]] = {label: [] for label in COMMANDS}
    for i in range(RUNS + 1):  # the first round warms the page cache and is discarded
        for label, (argv, extra) in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(argv, capture_output=True, check=True, env={**os.environ, **extra})
            if i:
                times[label].append(1e3 * (time.perf_counter() - start))
    medians = {label: statistics.median(values) for label, values in times.items()}
    base, bare = medians["python -c pass"], medians["--print-limit (bare)"]
    print(f"{RUNS} rounds, round-robin")
    print("| command | median | min | vs bare `--print-limit` | vs `python -c pass` |")
    print("|---|---|---|---|---|")
    for label, values in times.items():
        med = medians[label]
        print(
            f"| {label} | {med:.0f} ms | {min(values):.0f} ms | "
            f"{med / bare:.2f} | {med / base:.2f} |"
        )


if __name__ == "__main__":
    main()
