"""Hand the process over to `dask worker` (the exec edge)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

from .events import Audit

EXIT_EXEC_FAILED = 127


def exec_worker(argv: Sequence[str], env: Mapping[str, str], audit: Audit) -> NoReturn:
    """Replace this process with the worker itself; exit 127 if impossible."""
    from .supervise import release_signals_for_exec, signal_name

    # As PID 1 the signals were deferred from the first line (entry.main); a stop that
    # arrived since means the worker must not start.
    stop = release_signals_for_exec()
    if stop is not None:
        audit("worker.exec.cancelled", signal=signal_name(stop), code=128 + stop)
        sys.exit(128 + stop)
    _exec(argv, env, audit, event="worker.exec")


def exec_supervisor(argv: Sequence[str], env: Mapping[str, str], audit: Audit) -> NoReturn:
    """Replace this process with the supervisor, the deferred signals still blocked for
    it; exit 127 if impossible."""
    _exec(argv, env, audit, event="init.exec")


def _exec(argv: Sequence[str], env: Mapping[str, str], audit: Audit, event: str) -> NoReturn:
    audit(event, argv=list(argv))
    # execvpe discards Python's buffers; what we printed must reach the pipe first.
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(argv[0], list(argv), dict(env))
    except OSError as exc:
        audit("worker.exec.failed", argv0=argv[0], reason=exc.strerror or str(exc))
        print(f"dask-safe-worker: cannot run {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        sys.exit(EXIT_EXEC_FAILED)
