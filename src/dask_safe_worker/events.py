"""The event log of one start (the audit log): one structured line per decision, JSON on stderr.

Event names are stable and dotted (docs/audit-log.md lists them all); every line carries
`schema`, so consumers can detect a change of shape, and `host`, `start_id` and (when the
worker has a `--name`) `worker_name`, so a fleet's lines can be grouped. The line itself is
built by `event_line`, which the stdlib-only supervisor shares. Values of environment
variables never go into an event.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, MutableMapping

from .event_line import SCHEMA_VERSION, Stamp, console_line, json_line, new_start_id, record

TYPE_CHECKING = False  # typing costs ~2 ms to import on the fast path; mypy knows this name
if TYPE_CHECKING:
    from typing import Any, TextIO

__all__ = [
    "LOG_FORMATS",
    "SCHEMA_VERSION",
    "Audit",
    "StartAudit",
    "make_audit",
    "no_audit",
    "start_id",
]

LOG_FORMATS = ("auto", "json", "console", "none")

Audit = Callable[..., None]

_start_id: str | None = None


def start_id() -> str:
    """This process's start id; the supervisor it execs is given the same one."""
    global _start_id
    if _start_id is None:
        _start_id = new_start_id()
    return _start_id


def no_audit(event: str, **fields: object) -> None:
    """The audit callable that records nothing (--log-format none, library use)."""
    return None


def make_audit(
    fmt: str = "auto", stream: TextIO | None = None, *, worker_name: str | None = None
) -> Audit:
    """An `audit(event, **fields)` callable writing to `stream` (stderr)."""
    if fmt == "none":
        return no_audit
    return StartAudit(fmt, stream, worker_name=worker_name)


class StartAudit:
    """The audit log of the planning process: `audit(event, **fields)` builds the line at
    once (its timestamp is the decision's), and writes it through structlog, or keeps it
    while the log is held.

    A start holds its lines (`hold`) so that structlog, about a quarter of the start's
    CPU, is imported after the worker has been started rather than before (issue 25's
    cost line); `flush` writes what is held, in order, byte for byte as it would have
    been written at once. Whoever ends the start, waits or hands the process over calls
    `flush` first (cli.run, run_worker's execs, the pool's waits).
    """

    def __init__(
        self,
        fmt: str = "auto",
        stream: TextIO | None = None,
        *,
        worker_name: str | None = None,
    ) -> None:
        self._out = stream if stream is not None else sys.stderr
        if fmt == "auto":
            fmt = "console" if self._out.isatty() else "json"
        self._fmt = fmt
        self._stamp = Stamp.here(start_id(), worker_name)
        self._colors = fmt == "console" and self._out.isatty()
        self._held: list[str] = []
        self._holding = False
        self._write: Callable[[str], None] | None = None

    def __call__(self, event: str, **fields: object) -> None:
        if self._fmt == "none":
            return
        # The level is part of the line (event_line.level_of); structlog only writes it.
        rec = record(event, fields, self._stamp)
        json = self._fmt == "json"
        self._held.append(json_line(rec) if json else console_line(rec, self._colors))
        if not self._holding:
            self.flush()

    def hold(self) -> None:
        """Keep the lines from now on until `flush`."""
        self._holding = True

    def flush(self) -> None:
        """Write the lines held so far (the log stays held if it was)."""
        if not self._held:
            return
        lines, self._held = self._held, []
        if self._write is None:
            self._write = _structlog_writer(self._out)
        # One write for what was held: the same bytes as one line at a time.
        self._write("\n".join(lines))


def _structlog_writer(out: TextIO) -> Callable[[str], None]:
    # structlog is the audit log's writer (a dependency the design names); imported only
    # when a line is written, since it costs ~26 ms at start-up (asyncio, ssl, logging):
    # `--log-format none` never loads it, and a held start loads it after the worker's
    # fork. The line itself is built by `event_line`, shared with the bare supervisor,
    # so both write the same bytes.
    import structlog

    def render(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> str:
        return str(event_dict["event"])

    logger = structlog.wrap_logger(structlog.PrintLogger(file=out), processors=[render])

    def write(lines: str) -> None:
        logger.info(lines)

    return write
