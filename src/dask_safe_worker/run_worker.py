"""Hand the process over to `dask worker` (the exec edge)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

from .events import Audit

EXIT_EXEC_FAILED = 127


def exec_worker(
    argv: Sequence[str], env: Mapping[str, str], audit: Audit, event: str = "worker.exec"
) -> NoReturn:
    """Replace this process with the worker, or with its supervisor (`event`
    "init.exec"); exit 127 if impossible."""
    if event != "init.exec":
        from .supervise import release_signals_for_exec, signal_name

        # As PID 1 the signals were deferred from the first line (entry.main); a stop
        # that arrived since means the worker must not start.
        stop = release_signals_for_exec()
        if stop is not None:
            audit("worker.exec.cancelled", signal=signal_name(stop), code=128 + stop)
            sys.exit(128 + stop)
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
