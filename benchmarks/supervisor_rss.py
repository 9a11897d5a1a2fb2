"""Resident memory of the supervisor that stays alive as PID 1 next to the worker.

Measures VmRSS (and VmHWM, RssAnon, RssFile) of the supervising process while its child
sleeps, for:

- ``python``: a bare interpreter sleeping, the floor;
- ``supervise``: ``supervise()`` called from ``python -c`` (stdlib only);
- ``supervise-module``: ``python -m dask_safe_worker.supervise``;
- ``cli``: the full ``dask-safe-worker --init`` path, where the CLI process (click,
  structlog, the measuring and planning code already imported) is the supervisor.

The CLI runs with ``--cgroup-write never`` and a dummy worker command: this benchmark must
not write any cgroup limit, and the worker itself is not what is measured.

    uv run python benchmarks/supervisor_rss.py [--repeat N]

Prints one JSON document on stdout (MiB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
SLEEP = shutil.which("sleep") or "/bin/sleep"


def status_kib(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in FIELDS:
            values[key] = int(rest.split()[0])
    return values


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def exe_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def measure(argv: list[str], supervised: bool, plan_dir: str) -> dict[str, float]:
    """Start argv, wait until the supervisor's child is `sleep`, read the supervisor."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL if supervised else subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": plan_dir},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv!r} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv!r}: child never started")
            if not supervised:
                assert proc.stdout is not None
                proc.stdout.read(1)  # the bare interpreter says when it is up
                break
            else:
                kids = children(proc.pid)
                if kids and os.path.realpath(exe_of(kids[0])) == os.path.realpath(SLEEP):
                    break
            time.sleep(0.05)
        # Let start-up garbage settle; RSS only shrinks or stays after this point.
        time.sleep(0.3)
        kib = status_kib(proc.pid)
    finally:
        # Only what this benchmark started, by pid.
        for pid in [*(children(proc.pid) if proc.poll() is None else []), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    return {k: v / 1024 for k, v in kib.items()}


def cases(py: str) -> dict[str, tuple[list[str], bool]]:
    entry = str(Path(py).parent / "dask-safe-worker")
    return {
        "python": (
            [py, "-c", "import sys, time; print(flush=True); time.sleep(1000)"],
            False,
        ),
        "supervise": (
            [
                py,
                "-c",
                "import sys; from dask_safe_worker.supervise import supervise; "
                f"sys.exit(supervise([{SLEEP!r}, '1000']))",
            ],
            True,
        ),
        "supervise-module": ([py, "-m", "dask_safe_worker.supervise", SLEEP, "1000"], True),
        "cli": (
            [
                entry,
                "--init",
                "--cgroup-write",
                "never",
                "--log-format",
                "json",
                "--worker-command",
                # exec: the worker arguments appended by the CLI become the shell's $0...
                f"sh -c 'exec {SLEEP} 1000'",
                # Never contacted: the "worker" is sleep. A closed port on loopback anyway.
                "tcp://127.0.0.1:1",
            ],
            True,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    opts = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as plan_dir:
        for name, (argv, supervised) in cases(sys.executable).items():
            runs = [measure(argv, supervised, plan_dir) for _ in range(opts.repeat)]
            results[name] = {
                f"{field}_mib": round(statistics.median(r[field] for r in runs), 2)
                for field in FIELDS
            }
    print(
        json.dumps(
            {
                "benchmark": "supervisor_rss",
                "python": sys.version.split()[0],
                "repeat": opts.repeat,
                "unit": "MiB (median)",
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
