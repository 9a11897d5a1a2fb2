"""--follow's pure core: re-planning, the hysteresis decision and the kernel rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dask_safe_worker.cgroup.pool import Member
from dask_safe_worker.dask_compat.release import installed_release
from dask_safe_worker.follow.decide import (
    HYSTERESIS_FLOOR,
    SETTLE_STEP,
    Decision,
    FollowSpec,
    ManagedLimit,
    decide,
    hysteresis,
    kernel_target,
    plan_key,
    replan,
    seen_ancestors,
    share_ceiling,
    validate_interval,
    with_original_limit,
)
from dask_safe_worker.measure import LevelReading, Measurement, descendants_among, remeasure
from dask_safe_worker.plan import PlanError, PoolView, Settings, make_plan
from dask_safe_worker.proc_parse import HostMemory, ParseError, parse_stat_ppid
from dask_safe_worker.records import replace
from dask_safe_worker.sizes import Amount
from dask_safe_worker.worker_args import WorkerArgs

MiB, GiB = 2**20, 2**30
FIXTURES = Path(__file__).parent / "fixtures"

sizes = st.integers(min_value=1, max_value=64 * GiB)


def spec(**kw: object) -> FollowSpec:
    base = FollowSpec(
        settings=Settings(reserve=Amount(bytes=64 * MiB), supervised=True),
        args=WorkerArgs(nworkers="2", nthreads=1),
        first_budget=2 * GiB,
        first_per_worker=900 * MiB,
        interval=1.0,
        channel="/run/x/live.json",
    )
    return replace(base, **kw)


def measurement(levels: tuple[LevelReading, ...], available: int = 20 * GiB) -> Measurement:
    return Measurement(
        host=HostMemory(24 * GiB, available, False),
        location=None,
        levels=levels,
        own_procs=(10, 11, 12),
        pid=10,
        own_rss=40 * MiB,
        cpu_count=2,
        dask_memory_limit=24 * GiB,
        ours=frozenset({11, 12}),
    )


# --- the decision -------------------------------------------------------------------


@given(current=sizes, proposed=sizes, ceiling=sizes)
def test_decision_moves_only_outside_the_band(current: int, proposed: int, ceiling: int) -> None:
    d = decide(current, proposed, ceiling)
    wanted = min(proposed, ceiling)
    assert d.band == hysteresis(current) >= HYSTERESIS_FLOOR
    if abs(wanted - current) <= d.band:
        assert d.action == "keep" and d.target == current
    else:
        assert d.action == ("lower" if wanted < current else "raise")
        snapped = d.action == "raise" and ceiling - wanted <= hysteresis(ceiling)
        assert d.target == (ceiling if snapped else wanted)
    assert d.action == "keep" or d.target <= ceiling


@given(current=sizes, proposed=sizes, ceiling=sizes)
def test_decision_is_settled_after_acting(current: int, proposed: int, ceiling: int) -> None:
    # Applying a decision and seeing the same measurement again never moves twice.
    first = decide(current, proposed, ceiling)
    again = decide(first.target, proposed, ceiling)
    assert again.action == "keep"


@given(
    start=st.integers(min_value=256 * MiB, max_value=32 * GiB),
    noise=st.lists(st.floats(min_value=-1.0, max_value=1.0), min_size=1, max_size=50),
)
def test_noise_within_the_band_never_flaps(start: int, noise: list[float]) -> None:
    # Page-cache noise of up to ±HYSTERESIS_FLOOR around a steady level: the limit stays.
    current = start
    for x in noise:
        d = decide(current, start + int(x * HYSTERESIS_FLOOR), ceiling=64 * GiB)
        current = d.target
    assert current == start


@given(current=sizes, proposed=sizes)
def test_a_raise_never_passes_the_first_plan(current: int, proposed: int) -> None:
    d = decide(current, proposed, ceiling=current)
    assert d.action in ("keep", "lower")


@given(
    first=st.integers(min_value=256 * MiB, max_value=32 * GiB),
    squeeze=st.floats(min_value=0.1, max_value=0.9),
    shortfall=st.integers(min_value=0, max_value=HYSTERESIS_FLOOR),
)
def test_after_a_squeeze_the_start_plan_comes_back_exactly(
    first: int, squeeze: float, shortfall: int
) -> None:
    low = decide(first, int(first * squeeze), ceiling=first)
    assume(low.action == "lower")
    # A recovery that stays within the band of the lowered limit is noise by the band
    # rule (a squeeze just past the band, then a proposal a byte higher, must not flap);
    # every recovery that counts lands exactly on the start's plan.
    assume(first - shortfall > low.target + hysteresis(low.target))
    back = decide(low.target, first - shortfall, ceiling=first)
    assert back.action == "raise" and back.target == first


def test_a_squeeze_just_past_the_band_does_not_flap_back() -> None:
    # Found by hypothesis: the limit went down by one byte more than the band; a
    # proposal one byte below the start's plan is then within the band of the new limit.
    first = 320 * MiB + 1
    low = decide(first, first - HYSTERESIS_FLOOR - 1, ceiling=first)
    assert low.action == "lower"
    assert decide(low.target, first - 1, ceiling=first).action == "keep"
    assert decide(low.target, first, ceiling=first) == Decision(
        "raise", low.target, first, first, hysteresis(low.target)
    )


@given(
    share=st.integers(min_value=256 * MiB, max_value=32 * GiB),
    under=st.integers(min_value=SETTLE_STEP + 1, max_value=HYSTERESIS_FLOOR),
)
def test_settling_reaches_the_share_from_within_the_band(share: int, under: int) -> None:
    # Issue 25's flake: a newcomer 35 MB under a 667 MB share stayed there, inside the
    # band. Settling, the share is reached from either side, and nothing moves after.
    for current in (share - under, share + under):
        assert decide(current, share, share).action == "keep"
        d = decide(current, share, share, settling=True)
        assert d.target == share and d.action == ("raise" if current < share else "lower")
        assert decide(d.target, share, share, settling=True).action == "keep"


@given(current=sizes, proposed=sizes, ceiling=sizes)
def test_settling_moves_only_onto_the_share(current: int, proposed: int, ceiling: int) -> None:
    # Below the share (the memory is not free yet), the band rules as ever: no churn
    # while the siblings come down.
    plain = decide(current, proposed, ceiling)
    settling = decide(current, proposed, ceiling, settling=True)
    if settling != plain:
        assert settling.target == ceiling
        assert abs(ceiling - current) > SETTLE_STEP


@given(first=sizes, share=sizes)
def test_the_share_is_the_ceiling_while_settling(first: int, share: int) -> None:
    # Settling, a newcomer that started a few MiB under its share (within a band of its
    # start plan) may rise to the share; otherwise such a share is the start plan's noise.
    assert share_ceiling(first, share, settling=True) == share
    steady = share_ceiling(first, share, settling=False)
    assert steady == (first if abs(share - first) <= hysteresis(first) else share)


def test_a_newcomer_under_its_share_rises_to_it_only_settling() -> None:
    # Near the flake's numbers: started at 631.8 MB, its share some 28 MB above, inside
    # the band (max(32 MiB, 2 %)), where it stayed for good.
    first, share = 631_800_000, 660_000_000
    for settling in (False, True):
        ceiling = share_ceiling(first, share, settling)
        d = decide(first, share, ceiling, settling=settling)
        assert (d.action, d.target) == (("raise", share) if settling else ("keep", first))


# --- the kernel rules ---------------------------------------------------------------


@given(
    current=sizes,
    budget=sizes,
    original=st.one_of(st.none(), sizes),
    ancestor=st.one_of(st.none(), sizes),
    first=sizes,
    usage=sizes,
    lowered=st.booleans(),
)
def test_kernel_target_rules(
    current: int,
    budget: int,
    original: int | None,
    ancestor: int | None,
    first: int,
    usage: int,
    lowered: bool,
) -> None:
    t = kernel_target(
        current=current,
        budget=budget,
        original=original,
        ancestor=ancestor,
        first_budget=first,
        usage=usage,
        dask_lowered=lowered,
    )
    if t is None:
        return
    assert t != current
    if t > current:
        # raise: never above what was there, an ancestor, or the start's budget
        assert t <= first and t <= budget
        assert original is None or t <= original
        assert ancestor is None or t <= ancestor
    else:
        # lower: only after Dask, never below usage plus margin
        assert lowered
        assert t >= usage + 32 * MiB


def test_kernel_waits_for_dask_before_lowering() -> None:
    kw = dict(current=2 * GiB, budget=GiB, original=None, ancestor=None, first_budget=2 * GiB)
    assert kernel_target(**kw, usage=100 * MiB, dask_lowered=False) is None  # type: ignore[arg-type]
    assert kernel_target(**kw, usage=100 * MiB, dask_lowered=True) == GiB  # type: ignore[arg-type]
    # Usage above the new budget: lowered only down to usage plus the margin.
    assert kernel_target(**kw, usage=1200 * MiB, dask_lowered=True) == 1232 * MiB  # type: ignore[arg-type]


# --- re-planning ----------------------------------------------------------------------


def test_replan_is_make_plan() -> None:
    m = measurement((LevelReading("/m", 2 * GiB, None, 700 * MiB, 0),))
    s = spec()
    assert replan(s, m) == make_plan(m, s.args, s.settings)


def test_replan_below_the_minimum_still_follows_down() -> None:
    m = measurement((LevelReading("/m", 600 * MiB, None, 300 * MiB, 0),))
    plan = replan(spec(), m)
    assert 0 < plan.per_worker < Settings().min_worker_memory


def test_workers_memory_in_our_cgroup_is_ours() -> None:
    # The workers fill 1.5 GiB of a 2 GiB cgroup: the budget is still the 2 GiB.
    m = measurement((LevelReading("/m", 2 * GiB, None, 1536 * MiB, 0),))
    assert m.sole_occupant
    assert replan(spec(), m).budget == 2 * GiB - 64 * MiB
    stranger = replace(m, own_procs=(10, 11, 12, 99))
    assert not stranger.sole_occupant


def test_our_own_write_does_not_cap_the_next_budget() -> None:
    managed = ManagedLimit("/sys/fs/cgroup/memory/m/w", 1, original=None, written=GiB)
    m = measurement(
        (
            LevelReading("/m/w", GiB, GiB, 500 * MiB, 0),
            LevelReading("/m", 3 * GiB, 3 * GiB, 500 * MiB, 0),
        )
    )
    dirs = ["/sys/fs/cgroup/memory/m/w", "/sys/fs/cgroup/memory/m"]
    assert replan(spec(), m).budget == GiB - 64 * MiB
    freed = with_original_limit(m, managed, dirs)
    assert freed.levels[0].limit is None and freed.levels[1] == m.levels[1]
    assert replan(spec(), freed).budget == 3 * GiB - 64 * MiB


def test_an_ancestor_above_the_mount_root_still_caps_the_plan() -> None:
    # Issue 24 row 6: the mount root is our own cgroup; the pod above it shows only in
    # v1's hierarchical limit, the lowest of ours and the pod's.
    managed = ManagedLimit("/sys/fs/cgroup/memory", 1, original=None, written=1792 * MiB)
    dirs = ["/sys/fs/cgroup/memory"]
    hidden = measurement((LevelReading("/", 1792 * MiB, 1792 * MiB, 100 * MiB, 0),))
    # Ours hides the pod: its last seen value (the start's 2 GiB) stands in.
    known = seen_ancestors(hidden, managed, dirs, 2 * GiB)
    assert known == 2 * GiB
    assert replan(spec(), with_original_limit(hidden, managed, dirs, known)).budget == (
        2 * GiB - 64 * MiB
    )
    # The pod lowered below ours: exact, and the plan follows it down.
    lowered = measurement((LevelReading("/", 1792 * MiB, GiB, 100 * MiB, 0),))
    known = seen_ancestors(lowered, managed, dirs, known)
    assert known == GiB
    assert replan(spec(), with_original_limit(lowered, managed, dirs, known)).budget == (
        GiB - 64 * MiB
    )
    # Our limit follows below the pod, which hides it again: still the pod's 1 GiB.
    followed = measurement((LevelReading("/", 960 * MiB, 960 * MiB, 100 * MiB, 0),))
    assert seen_ancestors(followed, managed, dirs, known) == GiB


def test_our_own_memory_high_does_not_cap_the_next_budget() -> None:
    # v2, --memory-high-fraction 0.5 on our own cgroup: memory.high at half the budget
    # would make every re-plan half the last one. The high found before our write
    # (here an external 2.5 GiB) still counts.
    managed = ManagedLimit("/c/w", 2, original=None, written=GiB, original_high=2560 * MiB)
    m = measurement(
        (
            LevelReading("/w", GiB, None, 200 * MiB, 0, high=512 * MiB),
            LevelReading("/", 3 * GiB, None, 200 * MiB, 0),
        )
    )
    freed = with_original_limit(m, managed, ["/c/w", "/c"])
    assert freed.levels[0].high == 2560 * MiB and freed.levels[0].limit is None
    assert replan(spec(), freed).budget == 2560 * MiB - 64 * MiB


# --- the spec and the interval --------------------------------------------------------


@given(
    interval=st.floats(min_value=0.05, max_value=3600),
    original=st.one_of(st.none(), sizes),
    fraction=st.one_of(st.none(), st.floats(min_value=0, max_value=0.99)),
    gpus=st.one_of(st.none(), st.integers(1, 16)),
    high=st.one_of(st.none(), sizes),
)
def test_spec_round_trips_through_json(
    interval: float,
    original: int | None,
    fraction: float | None,
    gpus: int | None,
    high: int | None,
) -> None:
    s = spec(
        interval=interval,
        args=WorkerArgs(nthreads=1, gpu_workers=gpus, local_directory="/scratch"),
        managed=ManagedLimit("/a/b", 2, original, GiB, original_high=high, ancestors=high),
        settings=Settings(
            reserve=Amount(bytes=None if fraction is not None else 5, fraction=fraction)
        ),
    )
    assert FollowSpec.from_json(json.loads(json.dumps(s.to_json()))) == s


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), 0.01])
def test_bad_intervals(bad: float) -> None:
    with pytest.raises(ValueError):
        validate_interval(bad)


def test_garbage_spec_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        FollowSpec.from_json({"settings": {}})


# --- re-measuring ---------------------------------------------------------------------


@given(
    comm=st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=20),
    ppid=st.integers(min_value=0, max_value=2**22),
)
def test_stat_ppid_survives_any_comm(comm: str, ppid: int) -> None:
    text = f"123 ({comm}) S {ppid} 123 123 0 -1 4194560 100 0 0 0\n"
    assert parse_stat_ppid(text) == ppid


@pytest.mark.parametrize("text", ["", "123 (x)", "123 (x) S y"])
def test_stat_ppid_garbage(text: str) -> None:
    with pytest.raises(ParseError):
        parse_stat_ppid(text)


def _tree(tmp_path: Path, parents: dict[int, int], zombies: frozenset[int] = frozenset()) -> Path:
    proc = tmp_path / "proc"
    for pid, ppid in parents.items():
        (proc / str(pid)).mkdir(parents=True)
        state = "Z" if pid in zombies else "S"
        (proc / str(pid) / "stat").write_text(f"{pid} (w) {state} {ppid} 1 1 0\n")
    return proc


def test_descendants_among(tmp_path: Path) -> None:
    proc = _tree(tmp_path, {10: 1, 11: 10, 12: 11, 13: 12, 14: 11, 20: 1, 21: 20}, frozenset({14}))
    # 14 is a zombie (killed, not yet reaped): still ours, but gone.
    ours, zombies = descendants_among(proc, [10, 11, 12, 13, 14, 20, 21, 99], 10)
    assert ours == {11, 12, 13, 14} and zombies == {14}


def test_remeasure_does_not_read_mountinfo(tmp_path: Path) -> None:
    # Any fixture tree: locate with mountinfo once, then remove mountinfo and re-read.
    from dask_safe_worker.measure import locate, measure

    roots = sorted(p for p in FIXTURES.iterdir() if (p / "proc" / "self" / "mountinfo").exists())
    assert roots
    import shutil

    root = tmp_path / "t"
    shutil.copytree(roots[0], root, symlinks=True)
    proc = root / "proc"
    loc = locate(proc, root)
    release = installed_release()
    first = measure(proc, root, release=release, own_pid=1)
    (proc / "self" / "mountinfo").unlink()
    again = remeasure(loc, proc, root, release=release, own_pid=1)
    assert again.levels == first.levels and again.location == loc
    assert again.available == first.available


# --- the quiet tick's key ---------------------------------------------------------------

_few_sizes = st.sampled_from([None, 512 * MiB, GiB, 3 * GiB // 2, 2 * GiB, 3 * GiB])
_level_st = st.builds(
    LevelReading,
    path=st.sampled_from(["/a", "/a/b"]),
    limit=_few_sizes,
    hierarchical_limit=_few_sizes,
    usage=st.sampled_from([None, 256 * MiB, GiB]),
    inactive_file=st.sampled_from([None, 0, 128 * MiB]),
    high=_few_sizes,
)
_member_st = st.builds(
    Member,
    pid=st.sampled_from([101, 102]),
    weight=st.sampled_from([1, 2]),
    fixed=st.sampled_from([None, 600 * MiB]),
    committed=st.sampled_from([0, 512 * MiB, GiB]),
    working_set=st.sampled_from([0, 256 * MiB]),
    cgroup=st.sampled_from([None, "/a/b/c"]),
)


def _perturbed(data: st.DataObject, m: Measurement, v: PoolView | None) -> tuple[Any, Any]:
    """One field of the measurement or the pool view drawn again: many keep the key."""
    field = data.draw(
        st.sampled_from(
            [
                "mem_available",
                "mem_total",
                "level",
                "limit",
                "path",
                "own_rss",
                "own_procs",
                "cpu_count",
                "dask_limit",
                "member",
                "members",
                "pool_key",
            ]
        )
    )
    if field == "mem_available":
        m = replace(m, host=replace(m.host, available=data.draw(st.sampled_from([GiB, 8 * GiB]))))
    elif field == "mem_total":
        m = replace(m, host=replace(m.host, total=data.draw(st.sampled_from([16 * GiB, 32 * GiB]))))
    elif field == "level" and m.levels:
        i = data.draw(st.integers(0, len(m.levels) - 1))
        lvl = data.draw(_level_st)
        m = replace(m, levels=(*m.levels[:i], lvl, *m.levels[i + 1 :]))
    elif field in ("limit", "path") and m.levels:
        i = data.draw(st.integers(0, len(m.levels) - 1))
        if field == "limit":
            lvl = replace(m.levels[i], limit=data.draw(_few_sizes))
        else:
            lvl = replace(m.levels[i], path=data.draw(st.sampled_from(["/a", "/a/b"])))
        m = replace(m, levels=(*m.levels[:i], lvl, *m.levels[i + 1 :]))
    elif field == "own_rss":
        m = replace(m, own_rss=data.draw(st.sampled_from([40 * MiB, 300 * MiB])))
    elif field == "own_procs":
        m = replace(m, own_procs=data.draw(st.sampled_from([(10, 11, 12), (10, 11, 12, 99)])))
    elif field == "cpu_count":
        m = replace(m, cpu_count=data.draw(st.sampled_from([2, 4])))
    elif field == "dask_limit":
        m = replace(m, dask_memory_limit=data.draw(st.sampled_from([GiB, 24 * GiB])))
    elif field == "member" and v is not None and v.others:
        i = data.draw(st.integers(0, len(v.others) - 1))
        v = PoolView(v.key, (*v.others[:i], data.draw(_member_st), *v.others[i + 1 :]))
    elif field == "members":
        v = data.draw(st.one_of(st.none(), _view_st))
    elif field == "pool_key" and v is not None:
        v = PoolView(data.draw(st.sampled_from(["k", "other"])), v.others)
    return m, v


_view_st = st.builds(
    PoolView,
    key=st.sampled_from(["k", "other"]),
    others=st.lists(_member_st, max_size=2).map(tuple),
)


def _outcome(s: FollowSpec, m: Measurement, v: PoolView | None) -> object:
    try:
        return replan(s, m, v)
    except PlanError:
        return "no plan"


@settings(max_examples=400)
@given(
    data=st.data(),
    levels=st.lists(_level_st, min_size=0, max_size=2).map(tuple),
    view=st.one_of(st.none(), _view_st),
    mem_available=st.sampled_from([GiB, 2 * GiB, 8 * GiB]),
    reserve=st.sampled_from([Amount(bytes=64 * MiB), Amount(fraction=0.1)]),
)
def test_equal_plan_keys_give_equal_plans(
    data: st.DataObject,
    levels: tuple[LevelReading, ...],
    view: PoolView | None,
    mem_available: int,
    reserve: Amount,
) -> None:
    # The watch skips the decision on a tick whose inputs equal a quiet tick's
    # (watch.Watch._quiet_key): that is right only if `plan_key` holds everything the
    # plan reads. Each drawn change of one input either moves the key or not the plan.
    s = spec(settings=Settings(reserve=reserve, supervised=True))
    m = measurement(levels, available=mem_available)
    m2, view2 = _perturbed(data, m, view)
    if plan_key(m, view) == plan_key(m2, view2):
        assert _outcome(s, m, view) == _outcome(s, m2, view2)


def test_a_ceiling_that_caps_the_plan_is_in_the_key_though_available_stays() -> None:
    # MemAvailable sets `available` under both limits; only the ceiling caps the budget.
    view = PoolView("k", tuple(Member(p, 1, None, 0, 256 * MiB, None) for p in (101, 102)))
    low, high = (
        replace(measurement((LevelReading("/a", limit, None, None, None),), GiB), own_rss=300 * MiB)
        for limit in (3 * GiB // 2, 3 * GiB)
    )  # fmt: skip
    assert low.available == high.available
    assert replan(spec(), low, view) != replan(spec(), high, view)
    assert plan_key(low, view) != plan_key(high, view)
