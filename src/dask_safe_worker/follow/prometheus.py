"""Our metrics beside Dask's own on the worker's /metrics (see follow/metrics.py).

Registered by the worker preload in prometheus_client's default registry, which
distributed's /metrics handler serves. Where prometheus_client is not installed,
distributed serves no metrics and neither do we.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from .metrics import NANNY_SLOT_ENV, deaths_of, read_metrics

PREFIX = "dask_safe_worker_"

_registered: list[Any] = []


class Collector:
    """Reads the supervisor's snapshot at every scrape: nothing to keep in step."""

    def __init__(self, live_file: str, slot: int | None) -> None:
        self.live_file = live_file
        self.slot = slot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = read_metrics(self.live_file)
        if m is None:
            return
        gauges = (
            ("memory_limit_bytes", "Per-worker Dask memory limit", m.per_worker),
            ("budget_bytes", "Memory budget of the dask-safe-worker instance", m.budget),
            ("kernel_limit_bytes", "Kernel memory limit over the workers", m.kernel_limit),
            ("available_bytes", "Memory available to the workers at the last tick", m.available),
        )
        for name, text, value in gauges:
            if value is not None:
                yield GaugeMetricFamily(PREFIX + name, text, value=value)
        deaths = CounterMetricFamily(
            PREFIX + "worker_deaths",
            "Worker process deaths explained by the supervisor, by cause",
            labels=["cause"],
        )
        for cause, n in deaths_of(m, self.slot).items():
            deaths.add_metric([cause], n)
        yield deaths


def _slot() -> int | None:
    text = os.environ.get(NANNY_SLOT_ENV, "")
    return int(text) if text.isdigit() else None


def register(live_file: str) -> bool:
    """Once per process (a restarted worker is a new process); False without
    prometheus_client."""
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return False
    if _registered:
        _registered[0].live_file = live_file
        return True
    collector = Collector(live_file, _slot())
    REGISTRY.register(collector)
    _registered.append(collector)
    return True
