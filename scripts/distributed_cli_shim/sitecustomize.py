"""Puts dask-safe-worker where distributed's CLI tests start `dask worker`.

scripts/distributed_cli_suite.py puts this directory first on PYTHONPATH of the pytest
run that executes distributed's own tests; every Python process started from there
imports this module at start-up (`site` imports `sitecustomize`). distributed's popen()
starts workers as `<python> -m dask worker ARGS` (or the `dask` script beside it), so no
`dask` earlier on PATH would be found; the interpreter's command line in
`sys.orig_argv` is what says a process is one.

Every such start is recorded (one JSON line: the test from PYTEST_CURRENT_TEST and the
argv) in both runs. With DSW_SUITE_MODE=safe the process then becomes
`<python> -m dask_safe_worker ARGS` by exec, so it keeps its PID and the test's popen()
signals and waits for the tool as it would for the worker. The exec sets
DASK_SAFE_WORKER_CGROUP_WRITE to DSW_SUITE_CGROUP_WRITE, else `never`: in this machine's
session cgroup the tool must never write, and only a suite that started the tests in a
cgroup of its own says otherwise. A process without DSW_SUITE_LOG (a test that built its
environment from scratch) is left alone, and so is every other process, including the
`python -m distributed.cli.dask_worker` that the tool execs.
"""

from __future__ import annotations

import json
import os
import sys

DASK_WORKER = ["dask", "worker"]


def dask_worker_args(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """(interpreter options, worker args) when `argv` runs `dask worker`, else None."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in ("-X", "-W"):
            i += 2
        elif arg == "-m":
            return (argv[1:i], argv[i + 3 :]) if argv[i + 1 : i + 3] == DASK_WORKER else None
        elif arg.startswith("-c"):
            return None
        elif arg.startswith("-"):
            i += 1
        else:
            # A script: the `dask` console script beside the interpreter.
            is_dask = os.path.basename(arg) == "dask" and argv[i + 1 : i + 2] == ["worker"]
            return (argv[1:i], argv[i + 2 :]) if is_dask else None
    return None


def record(path: str, mode: str, argv: list[str]) -> None:
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    line = json.dumps({"mode": mode, "test": test, "argv": argv}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def interpose() -> None:
    found = dask_worker_args(sys.orig_argv)
    log = os.environ.get("DSW_SUITE_LOG")
    if found is None or not log:
        return
    mode = os.environ.get("DSW_SUITE_MODE", "plain")
    record(log, mode, sys.orig_argv)
    if mode != "safe":
        return
    options, args = found
    write = os.environ.get("DSW_SUITE_CGROUP_WRITE", "never")
    env = dict(os.environ, DASK_SAFE_WORKER_CGROUP_WRITE=write)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *options, "-m", "dask_safe_worker", *args], env)


interpose()
