"""The supervisor's metrics snapshot (follow/metrics.py) and the collector that shows it
on a worker's /metrics (follow/prometheus.py), rendered by prometheus_client itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_safe_worker.follow.death import CAUSES
from dask_safe_worker.follow.metrics import (
    AVAILABLE_STEP,
    Metrics,
    deaths_of,
    parse_metrics,
    read_metrics,
    remove_metrics,
    same,
    to_json,
    write_metrics,
)
from dask_safe_worker.records import replace

sizes = st.integers(0, 2**50)
snapshots = st.builds(
    Metrics,
    per_worker=sizes,
    budget=sizes,
    kernel_limit=st.none() | sizes,
    available=st.none() | sizes,
    deaths=st.dictionaries(
        st.integers(0, 64), st.dictionaries(st.sampled_from(CAUSES), st.integers(0, 10**6))
    ),
)


@given(m=snapshots)
def test_snapshot_round_trip(m: Metrics) -> None:
    back = parse_metrics(to_json(m))
    assert back == m and same(back, m)
    assert deaths_of(m, None) == {
        c: sum(counts.get(c, 0) for counts in m.deaths.values()) for c in CAUSES
    }


@given(text=st.text(max_size=80) | st.builds(json.dumps, st.dictionaries(st.text(), st.integers())))
def test_anything_else_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="not a metrics record"):
        parse_metrics(text)


@pytest.mark.parametrize(
    "doc",
    [
        {"per_worker": 1, "budget": 1, "deaths": {"0": {"made up": 1}}},
        {"per_worker": 1, "budget": 1, "deaths": {"x": {}}},
        {"per_worker": -1, "budget": 1, "deaths": {}},
        {"per_worker": True, "budget": 1, "deaths": {}},
        {"per_worker": 1, "budget": 1, "deaths": {"0": {"signal": -1}}},
    ],
)
def test_bad_values_are_refused(doc: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="not a metrics record"):
        parse_metrics(json.dumps(doc))


def test_available_is_written_again_only_past_a_step() -> None:
    m = Metrics(per_worker=1, budget=2, kernel_limit=3, available=10 * AVAILABLE_STEP, deaths={})
    assert same(m, replace(m, available=10 * AVAILABLE_STEP + AVAILABLE_STEP - 1))
    assert not same(m, replace(m, available=11 * AVAILABLE_STEP))
    assert not same(m, replace(m, available=None))
    assert not same(m, replace(m, deaths={0: {"signal": 1}}))
    assert not same(None, m)


def test_collector_shows_the_snapshot_for_its_nanny(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from dask_safe_worker.follow.prometheus import Collector

    live = str(tmp_path / "live.json")
    m = Metrics(
        per_worker=2 * 2**30,
        budget=4 * 2**30,
        kernel_limit=None,
        available=3 * 2**30,
        deaths={0: {"signal": 2}, 1: {"kernel_oom_limit": 1}},
    )
    registry = CollectorRegistry()
    collector = Collector(live, 1)
    registry.register(collector)
    # No snapshot (yet): nothing of ours, and the scrape still works.
    assert b"dask_safe_worker" not in generate_latest(registry)
    write_metrics(live, m)
    assert read_metrics(live) == m
    samples: dict[tuple[str, str | None], float] = {
        (s.name, s.labels.get("cause")): s.value
        for f in text_string_to_metric_families(generate_latest(registry).decode())
        for s in f.samples
    }
    expected: dict[tuple[str, str | None], float] = {
        ("dask_safe_worker_memory_limit_bytes", None): 2 * 2**30,
        ("dask_safe_worker_budget_bytes", None): 4 * 2**30,
        ("dask_safe_worker_available_bytes", None): 3 * 2**30,
    }
    for c in CAUSES:
        expected["dask_safe_worker_worker_deaths_total", c] = c == "kernel_oom_limit"
    assert samples == expected
    remove_metrics(live)
    assert read_metrics(live) is None
