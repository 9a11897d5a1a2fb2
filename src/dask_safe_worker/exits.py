"""The exit codes of `dask-safe-worker`, and the refusal that carries one to the shell.

A step that finds bad input raises `Refused`; the command catches it once, writes the
audit event and the one line, and exits with its code. Steps stay free of `sys.exit`.
"""

from __future__ import annotations

EXIT_MEASURE_FAILED = 1
EXIT_USAGE = 2
EXIT_PLAN_REFUSED = 3
EXIT_WRITE_REQUIRED = 4
EXIT_UNSUPPORTED = 5
EXIT_EXEC_FAILED = 127


class Refused(Exception):
    """A start refused before (or instead of) the next write: exit `code`, say `message`."""

    def __init__(self, code: int, message: str, event: str = "cli.usage.error") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.event = event
