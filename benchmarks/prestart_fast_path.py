"""Start-up of entrypoints/host-prestart.sh's call beside a bare `--print-limit`.

host-prestart.sh runs `dask-safe-worker --print-limit --cgroup-write never` before every
container start, configured through `DASK_SAFE_WORKER_*` variables. Both it and the bare
call take the click-free fast path (entry.py). The commands run round-robin in one
run, so a busy moment on a shared machine costs each of them alike. Neither call writes a
cgroup file: `--print-limit` only measures.

Python here may run with PYTHONDONTWRITEBYTECODE=1, which would time compiling every
module on every start; the site-packages and src are compiled first, as an installed
wheel would be.

Besides wall time, each command's CPU time (user + system, from the kernel's accounting
of the child) is reported: other jobs on a shared machine stretch wall time by waiting,
CPU time much less. `python -c 'import pathlib'` is a reference: every reader that takes
its root as a `Path` pays it.

`--tree LABEL=SRC` adds host-prestart.sh's call with another source tree first on
PYTHONPATH (the console script imports the package from there), so that two versions of
the code are timed side by side in one run, e.g. the code before a change:

    git archive <commit> src | tar -x -C /tmp/before
    uv run python benchmarks/prestart_fast_path.py 60 --tree before=/tmp/before/src

    uv run python benchmarks/prestart_fast_path.py [RUNS] [--tree LABEL=SRC ...]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

from dswbench.common import compile_bytecode

DSW = shutil.which("dask-safe-worker") or "dask-safe-worker"
PRESTART_ENV = {"DASK_SAFE_WORKER_RESERVE": "512MiB", "DASK_SAFE_WORKER_NANNY_ALLOWANCE": "96MiB"}
CLICK = [sys.executable, "-c", "from dask_safe_worker.cli import main; main()"]
COMMANDS: dict[str, tuple[list[str], dict[str, str]]] = {
    "python -c pass": ([sys.executable, "-c", "pass"], {}),
    "python -c 'import pathlib'": ([sys.executable, "-c", "import pathlib"], {}),
    "--print-limit (bare)": ([DSW, "--print-limit"], {}),
    "host-prestart.sh's call": ([DSW, "--print-limit", "--cgroup-write", "never"], PRESTART_ENV),
    # What the same call cost before it took the fast path: the click command.
    "the same through click": (
        [*CLICK, "--print-limit", "--cgroup-write", "never"],
        PRESTART_ENV,
    ),
}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("runs", nargs="?", type=int, default=60)
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=SRC")
    args = parser.parse_args()
    trees = dict(t.partition("=")[::2] for t in args.tree)
    for label, src in trees.items():
        COMMANDS[f"host-prestart.sh's call ({label})"] = (
            COMMANDS["host-prestart.sh's call"][0],
            {**PRESTART_ENV, "PYTHONPATH": src},
        )
    compile_bytecode(list(trees.values()))
    runs = args.runs
    times: dict[str, list[float]] = {label: [] for label in COMMANDS}
    cpu: dict[str, list[float]] = {label: [] for label in COMMANDS}
    for i in range(runs + 1):  # the first round warms the page cache and is discarded
        for label, (argv, extra) in COMMANDS.items():
            cpu_start, start = children_cpu(), time.perf_counter()
            subprocess.run(argv, capture_output=True, check=True, env={**os.environ, **extra})
            if i:
                times[label].append(1e3 * (time.perf_counter() - start))
                cpu[label].append(1e3 * (children_cpu() - cpu_start))
    medians = {label: statistics.median(values) for label, values in times.items()}
    cpu_medians = {label: statistics.median(values) for label, values in cpu.items()}
    base, bare = medians["python -c pass"], medians["--print-limit (bare)"]
    cpu_base = cpu_medians["python -c pass"]
    load = os.getloadavg()[0]
    print(f"{runs} rounds, round-robin; load average {load:.1f} at the end")
    print(
        "| command | median | min | vs bare `--print-limit` | vs `python -c pass` "
        "| CPU median | CPU vs `python -c pass` |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, values in times.items():
        med, cpu_med = medians[label], cpu_medians[label]
        print(
            f"| {label} | {med:.0f} ms | {min(values):.0f} ms | "
            f"{med / bare:.2f} | {med / base:.2f} | {cpu_med:.1f} ms | {cpu_med / cpu_base:.2f} |"
        )


if __name__ == "__main__":
    main()
