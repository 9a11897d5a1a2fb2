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

__all__ = ["LOG_FORMATS", "SCHEMA_VERSION", "Audit", "make_audit", "no_audit", "start_id"]

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
    out = stream if stream is not None else sys.stderr
    if fmt == "none":
        return no_audit
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    stamp = Stamp.here(start_id(), worker_name)
    colors = fmt == "console" and out.isatty()

    # structlog is the audit log's writer (a dependency the design names); imported only
    # when something is logged, since it costs ~26 ms at start-up (asyncio, ssl,
    # logging): `--log-format none` never loads it. The line itself is built by
    # `event_line`, shared with the bare supervisor, so both write the same bytes.
    import structlog

    def render(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> str:
        rec = record(str(event_dict.pop("event")), event_dict, stamp)
        return json_line(rec) if fmt == "json" else console_line(rec, colors)

    logger = structlog.wrap_logger(structlog.PrintLogger(file=out), processors=[render])

    def audit(event: str, **fields: object) -> None:
        # The level is part of the line (event_line.level_of); structlog only writes it.
        logger.info(event, **fields)

    return audit
