"""Run the real `dask-safe-worker` inside a test cgroup and see what it changed.

Every run starts inside a cgroup the test created below its own (tests/cgroup_util.py),
so a write, if one happens, lands only there.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from cgroup_util import KernelCgroup

DSW = [sys.executable, "-m", "dask_safe_worker"]
# A worker command that does nothing and takes any arguments: a run that gets this far
# ends at once with exit 0.
NOOP_WORKER = f"{sys.executable} -c pass"


def cgroup_state(root: Path) -> dict[str, int]:
    """Every cgroup at or below `root` with its memory limit."""
    state: dict[str, int] = {}
    for directory in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        limit = directory / "memory.limit_in_bytes"
        if limit.exists():
            state[str(directory.relative_to(root))] = int(limit.read_text())
    return state


def run_in(
    cg: KernelCgroup,
    args: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """`dask-safe-worker ARGS` started inside `cg`, with only DASK_SAFE_WORKER_* from
    `env` (none inherited from the test's own environment)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DASK_SAFE_WORKER")}
    return subprocess.run(
        cg.enter_command([*DSW, *args]),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **(env or {})},
        check=False,
    )


@contextlib.contextmanager
def other_process(cg: KernelCgroup, started: set[int]) -> Iterator[int]:
    """A process that is not ours in `cg`, so that the cgroup is shared."""
    proc = subprocess.Popen(cg.enter_command(["sleep", "300"]))
    started.add(proc.pid)
    try:
        for _ in range(100):
            if proc.pid in cg.pids():
                break
            time.sleep(0.02)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def run_script(script: str, cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """A shell script (namespaces, bind mounts, then the tool), its output captured."""
    return subprocess.run(
        ["sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


def dsw_command(*args: str) -> str:
    """The tool with JSON audit lines, quoted for a shell script."""
    return shlex.join([*DSW, "--log-format", "json", *args])
