"""Issue 24 row 5: a restart plans from the operator's limit, not from the one an
earlier start of ours wrote on the same cgroup (cgroup/our_limit.py).

The kernel tests start the real command, exec mode, as the sole occupant of a test
cgroup below our own, so that it writes that cgroup's limit, and start it again there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cgroup_util import KernelCgroup
from dask_safe_worker.cgroup.our_limit import (
    OurLimit,
    load,
    operators_level,
    parse,
    render,
    save,
    update_written,
    visible_ancestors,
)
from dask_safe_worker.measure import LevelReading
from dask_safe_worker.records import replace
from start_util import NOOP_WORKER, run_in

MiB, GiB = 2**20, 2**30
PAGE = 4096

START = ["--log-format", "json", "--no-follow", "--worker-command", NOOP_WORKER]


def start(cg: KernelCgroup, *args: str) -> list[dict[str, object]]:
    proc = run_in(cg, [*START, *args])
    assert proc.returncode == 0, proc.stderr
    assert cg.pids() == []
    return [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]


def planned_from(events: list[dict[str, object]]) -> object:
    (done,) = [e for e in events if e["event"] == "measure.done"]
    levels = done["cgroup_levels"]
    assert isinstance(levels, list)
    return levels[0]["limit"]


@pytest.mark.kernel
def test_restarts_plan_from_the_operators_limit(kernel_cgroup: KernelCgroup) -> None:
    kernel_cgroup.set_limit(GiB)
    limits = []
    for _ in range(4):
        events = start(kernel_cgroup, "--reserve", "10%")
        assert planned_from(events) == GiB
        limits.append(kernel_cgroup.limit())
    # The ratchet was 1073741824 -> 966365184 -> 869728256 -> 782753792 -> ...
    assert abs(limits[0] - 0.9 * GiB) <= PAGE
    assert limits == [limits[0]] * 4
    # --print-limit (its click-free path) answers what a start would plan.
    query = run_in(kernel_cgroup, ["--print-limit", "--reserve", "10%", "--cgroup-write", "never"])
    assert query.returncode == 0, query.stderr
    assert abs(int(query.stdout) - 0.9 * GiB) <= PAGE


@pytest.mark.kernel
def test_a_limit_someone_else_set_since_is_the_operators(kernel_cgroup: KernelCgroup) -> None:
    kernel_cgroup.set_limit(GiB)
    start(kernel_cgroup, "--reserve", "10%")
    # The operator changes it: that value is theirs, our record is stale.
    kernel_cgroup.set_limit(2 * GiB)
    events = start(kernel_cgroup, "--reserve", "10%")
    assert planned_from(events) == 2 * GiB
    assert not [e for e in events if e["event"] == "cgroup.limit.ours"]
    assert abs(kernel_cgroup.limit() - 0.9 * 2 * GiB) <= PAGE
    # And the next restart plans from the operator's 2 GiB again, not from ours.
    events = start(kernel_cgroup, "--reserve", "10%")
    assert planned_from(events) == 2 * GiB
    assert abs(kernel_cgroup.limit() - 0.9 * 2 * GiB) <= PAGE


@pytest.mark.kernel
def test_a_smaller_reserve_on_restart_raises_our_own_limit(kernel_cgroup: KernelCgroup) -> None:
    # Our own earlier limit is not the operator's: never-raise does not hold for it,
    # only for the one found before (and a budget above that one puts it back).
    kernel_cgroup.set_limit(GiB)
    start(kernel_cgroup, "--reserve", "20%")
    assert abs(kernel_cgroup.limit() - 0.8 * GiB) <= PAGE
    start(kernel_cgroup, "--reserve", "10%")
    assert abs(kernel_cgroup.limit() - 0.9 * GiB) <= PAGE
    start(kernel_cgroup)
    assert kernel_cgroup.limit() == GiB


# --- the pure part ------------------------------------------------------------------

values = st.one_of(st.none(), st.integers(0, 2**63 - 1))


@given(
    directory=st.text(
        st.characters(blacklist_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), min_size=1
    ),
    original=values,
    ancestors=values,
    high=values,
    written=st.integers(0, 2**63 - 1),
    written_high=values,
)
def test_a_record_round_trips(
    directory: str,
    original: int | None,
    ancestors: int | None,
    high: int | None,
    written: int,
    written_high: int | None,
) -> None:
    rec = OurLimit(directory, original, ancestors, high, written, written_high)
    assert parse(render(rec)) == rec


@given(st.text())
def test_any_text_is_a_record_or_a_value_error(text: str) -> None:
    try:
        rec = parse(text)
    except ValueError:
        return
    assert parse(render(rec)) == rec


def level(limit: int | None, hierarchical: int | None) -> LevelReading:
    return LevelReading("/c", limit, hierarchical, 100 * MiB, 0)


def test_the_level_as_the_operator_set_it() -> None:
    rec = OurLimit("/sys/fs/cgroup/memory/c", GiB, None, None, 900 * MiB)
    # Ours in force: planned from the original, the hierarchical limit only ours.
    assert operators_level(level(900 * MiB, 900 * MiB), rec) == level(GiB, None)
    # An ancestor below ours shows through v1's hierarchical limit.
    assert operators_level(level(900 * MiB, 700 * MiB), rec) == level(GiB, 700 * MiB)
    # Someone else's value: not ours to undo.
    assert operators_level(level(800 * MiB, 800 * MiB), rec) is None
    assert operators_level(level(900 * MiB, None), None) is None


def test_memory_high_is_ours_while_it_holds_what_we_wrote() -> None:
    # v2 with --memory-high-fraction: the operator changes memory.max and leaves our
    # memory.high, which must not become their ceiling (it cut a restart's budget).
    rec = OurLimit("/c", 600 * MiB, None, None, 540 * MiB, written_high=486 * MiB)
    theirs = replace(level(500 * MiB, None), high=486 * MiB)
    assert operators_level(theirs, rec) == level(500 * MiB, None)
    both = replace(level(540 * MiB, None), high=486 * MiB)
    assert operators_level(both, rec) == level(600 * MiB, None)
    # memory.high someone else set is theirs, ours in memory.max or not.
    other = replace(level(540 * MiB, None), high=400 * MiB)
    assert operators_level(other, rec) == replace(level(600 * MiB, None), high=400 * MiB)


@given(hierarchical=values, limit=values, known=values)
def test_ancestors_are_exact_below_our_limit_else_as_last_seen(
    hierarchical: int | None, limit: int | None, known: int | None
) -> None:
    seen = visible_ancestors(hierarchical, limit, known)
    if hierarchical is not None and (limit is None or hierarchical < limit):
        assert seen == hierarchical
    else:
        assert seen == known


def test_a_later_write_of_ours_moves_the_record(tmp_path: Path) -> None:
    # The --follow watch moves the limit it wrote: the record follows, else the next
    # start would take the moved value for the operator's.
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    save(cgroup, OurLimit(str(cgroup), GiB, None, None, 900 * MiB), env)
    assert not update_written(cgroup, 800 * MiB, 700 * MiB, None, env)
    # With the ancestors' limit the watch saw (a lowered pod above the mount root).
    assert update_written(cgroup, 900 * MiB, 700 * MiB, 950 * MiB, env)
    assert load(cgroup, env) == OurLimit(str(cgroup), GiB, 950 * MiB, None, 700 * MiB)
    # A record in another cgroup's name is never believed; nor one open to others.
    assert load(tmp_path, env) is None
    (record,) = (tmp_path / "dask-safe-worker" / "limits").iterdir()
    os.chmod(record, 0o644)
    assert load(cgroup, env) is None
