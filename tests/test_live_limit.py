"""The live-limit channel: atomic rewrites with a generation, acks, bad content."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_safe_worker.follow.live_limit import (
    LiveLimit,
    parse_live_limit,
    prepare_channel,
    read_acks,
    read_live_limit,
    remove_ack,
    remove_channel,
    write_ack,
    write_live_limit,
)

records = st.builds(
    LiveLimit,
    generation=st.integers(min_value=0, max_value=2**40),
    per_worker=st.integers(min_value=1, max_value=2**50),
    budget=st.integers(min_value=0, max_value=2**50),
    interval=st.floats(min_value=0.05, max_value=3600),
    changed_at=st.floats(min_value=0, max_value=2e9),
)


@given(record=records)
def test_round_trip(record: LiveLimit) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        live = prepare_channel(d)
        write_live_limit(live, record)
        assert read_live_limit(live) == record
        assert set(os.listdir(d)) == {"acks", "live.json"}


@given(text=st.text(max_size=200))
def test_garbage_is_a_value_error_or_a_record(text: str) -> None:
    try:
        record = parse_live_limit(text)
    except ValueError:
        return
    assert record.per_worker > 0 and record.generation >= 0


@pytest.mark.parametrize(
    "doc",
    [
        {"generation": 1, "per_worker": 0, "budget": 1, "interval": 1, "changed_at": 0},
        {"generation": -1, "per_worker": 5, "budget": 1, "interval": 1, "changed_at": 0},
        {"generation": 1, "per_worker": 5, "budget": 1, "interval": 0, "changed_at": 0},
        {"generation": 1, "per_worker": 5},
        [1, 2],
    ],
)
def test_out_of_range_records_are_refused(doc: object) -> None:
    with pytest.raises(ValueError):
        parse_live_limit(json.dumps(doc))


def test_missing_file_reads_as_none(tmp_path: Path) -> None:
    assert read_live_limit(str(tmp_path / "nothing.json")) is None


def test_readers_never_see_half_a_record(tmp_path: Path) -> None:
    live = prepare_channel(str(tmp_path / "ch"))
    write_live_limit(live, LiveLimit(0, 1, 1, 1.0, 0.0))
    stop = threading.Event()
    seen: list[int] = []
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            record = read_live_limit(live)
            if record is None:
                bad.append("unreadable")
            else:
                seen.append(record.generation)

    t = threading.Thread(target=reader)
    t.start()
    for gen in range(1, 2000):
        write_live_limit(live, LiveLimit(gen, gen * 4096, gen, 1.0, 0.0))
    stop.set()
    t.join()
    assert not bad
    assert seen == sorted(seen) and seen


def test_a_planted_symlink_at_the_temporary_name_is_not_followed(tmp_path: Path) -> None:
    live = prepare_channel(str(tmp_path / "ch"))
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "ch" / f".live.json.{os.getpid()}.tmp").symlink_to(victim)
    write_live_limit(live, LiveLimit(3, 5, 5, 1.0, 0.0))
    assert victim.read_text() == "keep"
    assert read_live_limit(live) == LiveLimit(3, 5, 5, 1.0, 0.0)


def test_unwritable_channel_raises_oserror(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        prepare_channel(str(tmp_path / "file" / "ch"))
    with pytest.raises(OSError):
        write_live_limit(str(tmp_path / "file" / "live.json"), LiveLimit(1, 1, 1, 1.0, 0.0))


def test_acks(tmp_path: Path) -> None:
    live = prepare_channel(str(tmp_path / "ch"))
    write_ack(live, "worker", 42, 3)
    write_ack(live, "nanny", 41, 2)
    write_ack(live, "nanny", 41, 2, slot=1)
    write_ack(live, "worker", 42, 4)
    (tmp_path / "ch" / "acks" / "junk").write_text("x")
    (tmp_path / "ch" / "acks" / "worker-x-1").write_text("1")
    held = {k: a.generation for k, a in read_acks(live).items()}
    assert held == {("worker", 42, 0): 4, ("nanny", 41, 0): 2, ("nanny", 41, 1): 2}
    assert all(abs(a.at - time.time()) < 60 for a in read_acks(live).values())
    remove_ack(live, ("worker", 42, 0))
    assert set(read_acks(live)) == {("nanny", 41, 0), ("nanny", 41, 1)}
    remove_channel(live)
    assert not (tmp_path / "ch").exists()
