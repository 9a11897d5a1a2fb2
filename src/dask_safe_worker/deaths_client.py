"""`dask_safe_worker.deaths(client)`: why workers died, from the scheduler's events.

The nanny preload of every following worker sends the supervisor's explanation of each
worker death to the scheduler (follow/nanny_deaths.py); this reads them back.
"""

from __future__ import annotations

from typing import Any

from .follow.death import TOPIC, is_record, sentence


def death_records(client: Any) -> list[dict[str, Any]]:
    """Every death record the scheduler keeps, oldest first (`follow.death.attribute`)."""
    events = client.get_events(TOPIC)
    return [dict(msg) for _, msg in events if is_record(msg)]


def deaths(client: Any) -> list[str]:
    """One sentence per worker death, oldest first: who, what killed it, at how much
    memory, the limits in force and the largest other users."""
    return [sentence(r) for r in death_records(client)]
