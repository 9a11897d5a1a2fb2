"""Each worker's recent deaths, from the scheduler's events (pure).

The nanny preload of every following worker sends the supervisor's explanation of each
death to the scheduler (follow/nanny_deaths.py). A worker that its nanny restarted comes
back on a new address, so a death is matched to today's worker by its nanny's address.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..follow.death import is_record, sentence

# Deaths shown per worker in the table (the JSON has them all).
SHOWN = 5


def death_rows(
    rows: Sequence[Mapping[str, Any]],
    nannies: Mapping[str, str | None],
    events: Iterable[Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows with their `deaths`, the deaths of nannies no longer connected).

    `nannies` maps each worker's address to its nanny's (the scheduler's view), `events`
    are `client.get_events(TOPIC)`'s (time, record) pairs, oldest first.
    """
    by_nanny: dict[str, list[dict[str, Any]]] = {}
    by_worker: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        record = event[1] if isinstance(event, tuple | list) and len(event) == 2 else None
        if not is_record(record):
            continue
        brief = {
            "at": record["at"],
            "cause": record["cause"],
            "worker": record["worker"],
            "worker_pid": record["worker_pid"],
            "rss": record["rss"],
            "sentence": sentence(record),
        }
        nanny = record.get("nanny")
        if isinstance(nanny, str):
            by_nanny.setdefault(nanny, []).append(brief)
        elif isinstance(record["worker"], str):
            by_worker.setdefault(record["worker"], []).append(brief)
    out = []
    for row in rows:
        address = str(row["worker"])
        nanny = nannies.get(address)
        deaths = by_worker.pop(address, [])
        if nanny is not None:
            deaths = by_nanny.pop(nanny, []) + deaths
        out.append({**row, "deaths": sorted(deaths, key=lambda d: float(d["at"] or 0))})
    gone = [d for ds in (*by_nanny.values(), *by_worker.values()) for d in ds]
    return out, sorted(gone, key=lambda d: float(d["at"] or 0))


def death_lines(rows: Sequence[Mapping[str, Any]], gone: Sequence[Mapping[str, Any]]) -> list[str]:
    """For the table: each worker's recent deaths, then those of workers gone since."""
    lines: list[str] = []
    for row in rows:
        deaths = list(row.get("deaths") or [])
        if not deaths:
            continue
        lines.append("")
        name = row.get("name") or row["worker"]
        more = f" (the last {SHOWN})" if len(deaths) > SHOWN else ""
        count = f"{len(deaths)} worker death{'s' if len(deaths) != 1 else ''}"
        lines.append(f"{name} ({row['worker']}): {count}{more}")
        lines.extend(f"  - {d['sentence']}" for d in deaths[-SHOWN:])
    if gone:
        lines.append("")
        more = f" (the last {SHOWN})" if len(gone) > SHOWN else ""
        lines.append(f"deaths of workers no longer connected: {len(gone)}{more}")
        lines.extend(f"  - {d['sentence']}" for d in gone[-SHOWN:])
    return lines
