"""What the supervisor shows to Prometheus, through the workers' /metrics (an edge module).

distributed serves /metrics on each worker's HTTP server when `prometheus_client` is
installed. The worker is the process with that server, but the supervisor is the one
that knows the budget, the kernel limit it wrote, what is available and why workers died,
and a worker's own counts would start again at zero with every restart. So the supervisor
writes `metrics.json` in the channel's directory when something in it changes, and the
worker preload's collector (`follow/prometheus.py`) reads it at every scrape.

Stdlib only: the supervisor imports this.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping

from ..records import record
from .death import CAUSES
from .live_limit import _write_atomically

METRICS_FILE = "metrics.json"
# Set by the nanny preload in its worker's environment: the slot whose deaths it counts.
NANNY_SLOT_ENV = "DASK_SAFE_WORKER_NANNY_SLOT"
# `available` moves by a few pages every tick: written again only past this much.
AVAILABLE_STEP = 2**20


def metrics_path(live_file: str) -> str:
    return os.path.join(os.path.dirname(live_file), METRICS_FILE)


@record
class Metrics:
    """One snapshot, as `metrics.json` holds it."""

    # The per-worker Dask memory limit (the live limit), bytes.
    per_worker: int
    # The budget of the instance: every worker's limit together, bytes.
    budget: int
    # The kernel limit over the workers (the one we wrote, else the nearest level's).
    kernel_limit: int | None
    # What was available to the workers at the last measurement, bytes.
    available: int | None
    # Deaths explained so far, per nanny slot, per cause (follow/death.py's CAUSES).
    deaths: Mapping[int, Mapping[str, int]]


def to_json(m: Metrics) -> str:
    return json.dumps(
        {
            "per_worker": m.per_worker,
            "budget": m.budget,
            "kernel_limit": m.kernel_limit,
            "available": m.available,
            "deaths": {str(slot): dict(counts) for slot, counts in sorted(m.deaths.items())},
        }
    )


def _size(doc: Mapping[str, object], key: str, optional: bool) -> int | None:
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"not a metrics record: {key} = {value!r}")
    return value


def parse_metrics(text: str) -> Metrics:
    """A snapshot as `to_json` wrote it; ValueError for anything else."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not a metrics record: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError("not a metrics record: not an object")
    deaths_doc = doc.get("deaths")
    if not isinstance(deaths_doc, dict):
        raise ValueError("not a metrics record: deaths")
    deaths: dict[int, dict[str, int]] = {}
    for slot, counts in deaths_doc.items():
        if not (isinstance(slot, str) and slot.isdigit() and isinstance(counts, dict)):
            raise ValueError(f"not a metrics record: deaths of {slot!r}")
        per_cause = {}
        for cause, n in counts.items():
            if cause not in CAUSES or not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"not a metrics record: {cause!r} = {n!r}")
            per_cause[cause] = n
        deaths[int(slot)] = per_cause
    per_worker = _size(doc, "per_worker", False)
    budget = _size(doc, "budget", False)
    assert per_worker is not None and budget is not None
    return Metrics(
        per_worker=per_worker,
        budget=budget,
        kernel_limit=_size(doc, "kernel_limit", True),
        available=_size(doc, "available", True),
        deaths=deaths,
    )


def deaths_of(m: Metrics, slot: int | None) -> dict[str, int]:
    """Deaths by cause (every cause, zeros too: a counter that appears late hides its
    first increase from `increase()`), for one nanny's slot or, without one, all."""
    out = dict.fromkeys(CAUSES, 0)
    for s, counts in m.deaths.items():
        if slot is None or s == slot:
            for cause, n in counts.items():
                out[cause] += n
    return out


def same(a: Metrics | None, b: Metrics) -> bool:
    """Nothing a scrape would see differently, up to AVAILABLE_STEP of `available`."""
    if a is None:
        return False
    moved = (a.available is None) != (b.available is None) or (
        a.available is not None
        and b.available is not None
        and abs(a.available - b.available) >= AVAILABLE_STEP
    )
    return not moved and (a.per_worker, a.budget, a.kernel_limit, dict(a.deaths)) == (
        b.per_worker,
        b.budget,
        b.kernel_limit,
        dict(b.deaths),
    )


def write_metrics(live_file: str, m: Metrics) -> None:
    _write_atomically(metrics_path(live_file), (to_json(m) + "\n").encode())


def read_metrics(live_file: str) -> Metrics | None:
    try:
        with open(metrics_path(live_file), encoding="utf-8") as f:
            return parse_metrics(f.read())
    except (OSError, ValueError):
        return None


def remove_metrics(live_file: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(metrics_path(live_file))
