"""One audit line: the fields every line carries, and its JSON and console renderings.

Both writers of the audit log use this module: `audit.make_audit` (the planning process,
through structlog) and `supervise` (the bare supervisor, which must stay stdlib-only and
small, so it cannot import structlog). Keep it stdlib-only and cheap to import.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence

# Version 2 added `host`, `start_id` and `worker_name`, and dropped empty `error` fields.
SCHEMA_VERSION = 3

_FAILURE_SUFFIXES = (".failed", ".refused", ".error", ".warning")

# Fields that are stamped on every line, in this order, after the event's own.
STAMP_FIELDS = ("event", "schema", "pid", "host", "start_id", "worker_name", "level", "timestamp")


def errno_name(number: int | None) -> str:
    """An errno as events show it: its name (EBUSY), else the number as text."""
    import errno

    return errno.errorcode.get(number or 0, str(number))


def level_of(event: str) -> str:
    """`warning` for refusals and failures, `info` for everything else."""
    return "warning" if event.endswith(_FAILURE_SUFFIXES) else "info"


def new_start_id() -> str:
    """An id for one start of dask-safe-worker, shared by the planning process and the
    supervisor it execs: 16 hex digits, random (no clock, pid or host in it)."""
    return os.urandom(8).hex()


def worker_name(args: Sequence[str], value_options: Iterable[str] = ()) -> str | None:
    """The worker's `--name` in `dask worker` arguments (the last one, as click takes it).

    `value_options` are the worker's options that take a value, so that a value that
    happens to be "--name" is not read as the option.
    """
    takes_value = frozenset(value_options)
    name: str | None = None
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            break
        if token == "--name" and i + 1 < len(args):
            name = args[i + 1]
            i += 2
            continue
        if token.startswith("--name="):
            name = token.split("=", 1)[1]
        elif token in takes_value:
            i += 1
        i += 1
    return name or None


class Stamp:
    """What identifies the lines of one start: where, which start, which worker.

    A plain class, not a dataclass: `dataclasses` imports `inspect` and `ast`, about
    1.5 MiB of RSS that the supervisor would carry for the container's lifetime.
    """

    __slots__ = ("host", "start_id", "worker_name")

    def __init__(self, start_id: str, host: str, worker_name: str | None = None) -> None:
        self.start_id = start_id
        self.host = host
        self.worker_name = worker_name

    @classmethod
    def here(cls, start_id: str | None = None, worker_name: str | None = None) -> Stamp:
        return cls(start_id or new_start_id(), os.uname().nodename, worker_name)


def _timestamp() -> str:
    now = time.time()
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
    return f"{whole}.{int(now % 1 * 1_000_000):06d}Z"


def record(event: str, fields: Mapping[str, object], stamp: Stamp) -> dict[str, object]:
    """The line as a dict: the event's fields, then the stamp (which wins over a field of
    the same name: `pid` is always the writer's)."""
    out: dict[str, object] = {k: v for k, v in fields.items() if k not in STAMP_FIELDS}
    out["event"] = event
    out["schema"] = SCHEMA_VERSION
    out["pid"] = os.getpid()
    out["host"] = stamp.host
    out["start_id"] = stamp.start_id
    if stamp.worker_name is not None:
        out["worker_name"] = stamp.worker_name
    out["level"] = level_of(event)
    out["timestamp"] = _timestamp()
    return out


def json_line(rec: Mapping[str, object]) -> str:
    # Imported on first use: json pulls in `re`, which a supervisor logging nothing
    # (--log-format none, or supervise() as a library) need not carry.
    import json

    return json.dumps(rec, default=str)


# --- console ---------------------------------------------------------------------------

# Integer fields that count bytes, shown as GiB/MiB on the console.
BYTE_FIELDS = frozenset(
    {
        "mem_total",
        "mem_available",
        "limit",
        "hierarchical_limit",
        "usage",
        "inactive_file",
        "working_set",
        "headroom",
        "own_rss",
        "own_working_set",
        "available",
        "dask_memory_limit",
        "dask_default_limit",
        "budget",
        "reserve",
        "overhead",
        "pool",
        "per_worker",
        "user_memory_limit_bytes",
        "memory_limit_arg",
        "effective_per_worker",
        "kernel_limit",
        "rss",
        "dask_limit",
        "resolved",
        "value",
        "previous",
        "current",
        "requested",
        "read_back",
        "min_worker_memory",
        "nanny_allowance",
        "swap_max",
    }
)
# Stamped on every line: the console leaves them out, they say nothing about the event.
# So do internals that only a bug report needs (they stay in the JSON log).
_CONSOLE_HIDDEN = frozenset(STAMP_FIELDS) | frozenset(
    {
        "memory_limit_paths",
        "cpu_quota_reads_v2",
        "nprocs_alias",
        "dask_worker_script",
        "worker_memory_limit_alias",
        "dask_cli_worker",
        "own_procs_count",
    }
)

_KiB, _MiB, _GiB = 2**10, 2**20, 2**30


def format_size(n: int) -> str:
    """1.50 GiB, 96.0 MiB, 12.0 KiB, 512 B."""
    sign, n = ("-", -n) if n < 0 else ("", n)
    if n >= _GiB:
        return f"{sign}{n / _GiB:.2f} GiB"
    if n >= _MiB:
        return f"{sign}{n / _MiB:.1f} MiB"
    if n >= _KiB:
        return f"{sign}{n / _KiB:.1f} KiB"
    return f"{sign}{n} B"


def _value(key: str, value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and key in BYTE_FIELDS:
        return format_size(value)
    if isinstance(value, Mapping):
        return ", ".join(_pair(k, v) for k, v in value.items() if v is not None)
    if isinstance(value, list) and not any(isinstance(v, Mapping) for v in value):
        return " ".join(str(v) for v in value) if value else "-"
    return str(value)


def _pair(key: str, value: object) -> str:
    return f"{key}={_value(key, value)}"


def _item(value: object) -> str:
    if not isinstance(value, Mapping):
        return str(value)
    head = value.get("path", value.get("target"))
    rest = [_pair(k, v) for k, v in value.items() if k not in ("path", "target") and v is not None]
    return " ".join([str(head), *rest] if head is not None else rest)


def console_line(rec: Mapping[str, object], colors: bool = False) -> str:
    """A short rendering for people: time, level, event, then key=value with sizes in
    GiB/MiB; a list of records (the cgroup levels) gets one indented line per item. A
    line with a `summary` (start.summary, worker.died's `sentence`) is that sentence: its
    fields are for the JSON log."""
    timestamp = str(rec.get("timestamp", ""))
    clock = timestamp[11:19] if len(timestamp) >= 19 else timestamp
    level = str(rec.get("level", "info"))
    event = str(rec.get("event", ""))
    if colors:
        tint = "\x1b[33m" if level == "warning" else "\x1b[36m"
        event = f"{tint}{event}\x1b[0m"
    said = rec.get("summary", rec.get("sentence"))
    if isinstance(said, str):
        return f"{clock} {level:<7} {event} {said}"
    pairs: list[str] = []
    nested: list[str] = []
    for key, value in rec.items():
        if key in _CONSOLE_HIDDEN or value is None or value == [] or value == {}:
            continue
        if isinstance(value, list) and any(isinstance(v, Mapping) for v in value):
            nested += [f"    {key}: {_item(v)}" for v in value]
        elif isinstance(value, str) and " " in value and key in ("message", "reason"):
            pairs.append(f"{key}: {value}")
        else:
            pairs.append(_pair(key, value))
    head = f"{clock} {level:<7} {event}"
    return "\n".join([" ".join([head, *pairs]), *nested])
