"""Which program runs the worker, and whether its arguments are `dask worker`'s own.

Worker commands that charts, operator specs and compose files put first in the
container's arguments (the official images run `tini -g -- prepare.sh "$@"`) arrive here
with `ENTRYPOINT ["dask-safe-worker"]`; distributed's own worker is run as this Python's
`-m distributed.cli.dask_worker` (the `dask-worker` script is gone since 2026.6),
dask-cuda's as given.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from .dask_compat import dask_worker
from .events import Audit
from .exits import EXIT_USAGE, Refused

LEADING_WORKER_COMMANDS: dict[tuple[str, ...], str | None] = {
    ("dask", "worker"): None,
    ("dask-worker",): None,
    ("dask", "cuda", "worker"): "dask cuda worker",
    ("dask-cuda-worker",): "dask-cuda-worker",
}


def split_leading_command(args: Sequence[str]) -> tuple[tuple[str, ...] | None, list[str]]:
    """(the leading worker command, the worker arguments after it)."""
    for leading in sorted(LEADING_WORKER_COMMANDS, key=len, reverse=True):
        if tuple(args[: len(leading)]) == leading:
            return leading, list(args[len(leading) :])
    return None, list(args)


def take_leading_command(
    args: Sequence[str], worker_command: str | None, audit: Audit
) -> tuple[str | None, list[str]]:
    """(the worker command, the worker's arguments) once a leading `dask worker` (or
    dask-cuda's) is taken off; Refused when --worker-command names one too."""
    leading, rest = split_leading_command(args)
    if leading is None:
        return worker_command, rest
    if worker_command is not None:
        raise Refused(
            EXIT_USAGE,
            f"both --worker-command and a leading {' '.join(leading)!r} name the worker "
            "command; give one",
        )
    worker_command = LEADING_WORKER_COMMANDS[leading]
    audit("worker.command.leading", given=list(leading), worker_command=worker_command or "default")
    return worker_command, rest


def worker_prefix(worker_command: str | None) -> list[str]:
    """The worker command as an argv prefix; ValueError for one that is not a command."""
    if worker_command is None:
        return dask_worker.worker_command(sys.executable)
    import shlex  # only here: every import counts against --print-limit's start-up

    try:
        prefix = shlex.split(worker_command)
    except ValueError as exc:
        raise ValueError(f"--worker-command {worker_command!r}: {exc}") from None
    if not prefix:
        raise ValueError("--worker-command is empty")
    return prefix


def program_exists(program: str) -> bool:
    """Whether execvp would find `program` as an executable file (its PATH search)."""
    if "/" in program:
        return os.path.isfile(program) and os.access(program, os.X_OK)
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return True
    return False


def runs_dask_worker(worker_command: str | None, prefix: Sequence[str]) -> bool:
    """Whether the worker is distributed's own `dask worker` (whose options we know)."""
    if worker_command is None:
        return True
    tail = [os.path.basename(prefix[0]), *prefix[1:]]
    return tail in (["dask", "worker"], ["dask-worker"]) or (
        len(tail) >= 3 and tail[-2:] == ["-m", "distributed.cli.dask_worker"]
    )


def check_worker_args(
    args: Sequence[str], worker_command: str | None, prefix: Sequence[str], audit: Audit
) -> None:
    """Refuse what `dask worker` would refuse, from the installed release's own click
    command (worker_cli explains how it is read without importing distributed);
    WorkerArgsError names the first problem."""
    if not runs_dask_worker(worker_command, prefix):
        audit("worker.args.checked", checked=False, reason="custom worker command")
        return
    from . import worker_cli

    try:
        table = worker_cli.option_table()
    except Exception as exc:  # a broken install: dask worker itself will say more
        audit("worker.args.checked", checked=False, reason=f"{type(exc).__name__}: {exc}")
        return
    worker_cli.check_argv(args, table)
    audit("worker.args.checked", checked=True, source=table.source)
