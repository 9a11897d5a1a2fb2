"""The audit log: one structured line per decision, JSON on stderr by default.

Event names are stable and dotted (docs/audit-log.md lists them all); every line carries
`schema`, so consumers can detect a change of shape. Values of environment variables
never go into an event.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

SCHEMA_VERSION = 1
LOG_FORMATS = ("auto", "json", "console", "none")

Audit = Callable[..., None]


def no_audit(event: str, **fields: object) -> None:
    """The audit callable that records nothing (--log-format none, library use)."""
    return None


def make_audit(fmt: str = "auto", stream: TextIO | None = None) -> Audit:
    """An `audit(event, **fields)` callable writing to `stream` (stderr)."""
    out = stream if stream is not None else sys.stderr
    if fmt == "none":
        return no_audit
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    # Imported only when something is logged: structlog costs ~70 ms at start-up.
    import structlog

    def add_schema(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> Any:
        event_dict["schema"] = SCHEMA_VERSION
        event_dict["pid"] = os.getpid()
        return event_dict

    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    logger = structlog.wrap_logger(
        structlog.PrintLogger(file=out),
        processors=[
            add_schema,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
    )

    def audit(event: str, **fields: object) -> None:
        warn = event.endswith((".failed", ".refused", ".error", ".warning"))
        level = "warning" if warn else "info"
        getattr(logger, level)(event, **fields)

    return audit
