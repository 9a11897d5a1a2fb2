"""Hand the process over to `dask worker` (the exec edge)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NoReturn

from .events import StartAudit
from .exits import EXIT_EXEC_FAILED

if TYPE_CHECKING:
    from .cgroup.write import WriteOutcome


def supervisor_argv(
    argv: Sequence[str],
    outcome: WriteOutcome,
    log_format: str,
    process_group: bool,
    follow_spec: str | None = None,
) -> list[str]:
    """`python -m dask_safe_worker.supervise ... -- <worker argv>`."""
    from .dask_compat import dask_worker
    from .event_line import worker_name
    from .events import start_id

    cmd = [sys.executable, "-m", "dask_safe_worker.supervise"]
    # Same format and start id as our lines, so that one start reads as one log.
    cmd += ["--log-format", log_format, "--start-id", start_id()]
    name = worker_name(argv, dask_worker.WORKER_VALUE_OPTIONS)
    if name is not None:
        cmd += ["--worker-name", name]
    if process_group:
        cmd.append("-g")
    if outcome.created_child and outcome.parent_dir:
        cmd += ["--remove-cgroup", outcome.created_child, "--parent-cgroup", outcome.parent_dir]
    if follow_spec:
        cmd += ["--follow", follow_spec]
    return [*cmd, "--", *argv]


def exec_worker(
    argv: Sequence[str],
    env: Mapping[str, str],
    audit: StartAudit,
    child: tuple[str, str] | None = None,
) -> NoReturn:
    """Replace this process with the worker itself; exit 127 if impossible. `child`:
    the child cgroup we made and moved into, and its parent, to leave and remove when
    a stop cancels the start."""
    from .supervise import release_signals_for_exec, remove_child_cgroup, signal_name

    # The signals were deferred (as PID 1 from the first line, else before the kernel
    # limit was written); a stop that arrived since means the worker must not start, and
    # nothing of the start may stay behind.
    stop = release_signals_for_exec()
    if stop is not None:
        if child is not None:
            remove_child_cgroup(child[0], child[1], audit)
        audit("worker.exec.cancelled", signal=signal_name(stop), code=128 + stop)
        audit.flush()
        sys.exit(128 + stop)
    _exec(argv, env, audit, event="worker.exec")


def exec_supervisor(
    argv: Sequence[str],
    env: Mapping[str, str],
    audit: StartAudit,
    worker: Sequence[str] | None = None,
    process_group: bool = False,
) -> NoReturn:
    """Replace this process with the supervisor, the deferred signals still blocked for
    it; exit 127 if impossible. With `worker` (the worker's argv, the last of `argv`),
    the worker is started first and the supervisor adopts it: the supervisor's own start
    is then off the way to a registered worker. A stop already pending leaves the start
    to the supervisor, which cancels it and cleans up."""
    from .supervise import STOPPING_SIGNALS, start_worker

    if worker is not None and not signal.sigpending() & STOPPING_SIGNALS:
        child = start_worker(worker, env, process_group)
        cut = len(argv) - len(worker) - 1  # the supervisor's options end at its `--`
        argv = [*argv[:cut], "--adopt", str(child), *argv[cut:]]
    _exec(argv, env, audit, event="init.exec")


def _exec(argv: Sequence[str], env: Mapping[str, str], audit: StartAudit, event: str) -> NoReturn:
    audit(event, argv=list(argv))
    # The start's held lines: after the worker's fork (exec_supervisor), before the exec.
    audit.flush()
    # execvpe discards Python's buffers; what we printed must reach the pipe first.
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(argv[0], list(argv), dict(env))
    except OSError as exc:
        audit("worker.exec.failed", argv0=argv[0], reason=exc.strerror or str(exc))
        audit.flush()
        print(f"dask-safe-worker: cannot run {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        sys.exit(EXIT_EXEC_FAILED)
