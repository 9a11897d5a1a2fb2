"""Issue 25: the pool that instances on one host share, its claims and its fair shares (pure).

The real-kernel behaviour (instances arriving, leaving and moving live) is in
tests/test_pool_kernel.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_safe_worker.cgroup.pool import (
    HOST_KEY,
    ClaimError,
    Member,
    Pool,
    claim_text,
    parse_claim,
    pool_dir_name,
    pool_key,
)
from dask_safe_worker.measure import LevelReading
from dask_safe_worker.plan import PlanError, PoolBusy, PoolView, Settings, make_plan
from dask_safe_worker.worker_args import WorkerArgs
from test_plan import level, measurement

MiB, GiB = 2**20, 2**30

members_st = st.builds(
    Member,
    pid=st.integers(min_value=1, max_value=2**22),
    weight=st.integers(min_value=1, max_value=64),
    fixed=st.one_of(st.none(), st.integers(min_value=0, max_value=2**40)),
    committed=st.integers(min_value=0, max_value=2**40),
    working_set=st.integers(min_value=0, max_value=2**40),
    cgroup=st.one_of(st.none(), st.text(min_size=1).map(lambda t: "/" + t)),
)


@given(members_st)
def test_a_claim_reads_back_as_written(member: Member) -> None:
    assert parse_claim(claim_text(member)) == member


@given(st.text())
def test_anything_else_is_a_claim_error_never_a_crash(text: str) -> None:
    try:
        member = parse_claim(text)
    except ClaimError:
        return
    # What parses is a claim: it renders and reads back as itself.
    assert parse_claim(claim_text(member)) == member


@pytest.mark.parametrize(
    "text",
    [
        "pid 0\nweight 1\nfixed -\ncommitted 1\nworking_set 0\ncgroup -\n",
        "pid 1\nweight 0\nfixed -\ncommitted 1\nworking_set 0\ncgroup -\n",
        "pid 1\nweight 1\nfixed -\ncommitted -1\nworking_set 0\ncgroup -\n",
        "pid 1\nweight 1\nfixed -\ncommitted \u0661\nworking_set 0\ncgroup -\n",
        "pid 1\nweight 1\nfixed -\ncommitted 1\nworking_set 0\ncgroup relative\n",
        "pid 1\nweight 1\nfixed -\ncommitted 1\nworking_set 0\n",
        "pid 1\nweight 1\nfixed -\ncommitted 1\nworking_set 0\ncgroup -",
        "weight 1\npid 1\nfixed -\ncommitted 1\nworking_set 0\ncgroup -\n",
        '{"pid": 1, "weight": 1, "committed": 1, "working_set": 0}',
    ],
)
def test_claims_this_version_did_not_write_are_refused(text: str) -> None:
    with pytest.raises(ClaimError):
        parse_claim(text)


def test_the_pool_is_the_nearest_limited_level_else_the_host() -> None:
    from dask_safe_worker.cgroup.locate import CgroupLocation
    from dask_safe_worker.records import replace

    location = CgroupLocation(1, "/a/b/c", "/sys/fs/cgroup/memory", "/", "a/b/c")
    levels = (
        level(None, 0, path="/a/b/c"),
        level(2 * GiB, 0, path="/a/b"),
        level(None, 0, path="/"),
    )
    m = replace(measurement(levels=levels), location=location)
    assert pool_key(m) == "v1:/a/b"
    # Our own child's limit (written by us) is not where the pool's budget comes from.
    own_limited = replace(m, levels=(level(GiB, 0, path="/a/b/c"), *levels[1:]))
    assert pool_key(own_limited) == "v1:/a/b/c"
    assert pool_key(own_limited, skip="/a/b/c") == "v1:/a/b"
    # v1: a limit set above shows on every level below as its hierarchical limit; the
    # pool is where it is set (seen: systemd template instances in a slice with MemoryMax=
    # each made a pool of their own and planned the whole slice).
    inherited = (
        LevelReading("/a/b/c", None, 2 * GiB, 0, 0),
        LevelReading("/a/b", 2 * GiB, 2 * GiB, 0, 0),
        LevelReading("/", None, None, 0, 0),
    )
    assert pool_key(replace(m, levels=inherited)) == "v1:/a/b"
    unlimited = replace(m, levels=(levels[0], level(None, 0, path="/a/b"), levels[2]))
    assert pool_key(unlimited) == HOST_KEY
    assert pool_key(replace(m, location=None)) == HOST_KEY
    # Any key makes one plain file name.
    name = pool_dir_name("v2:/" + "x/" * 400)
    assert "/" not in name and len(name) < 64


def member(pid: int, committed: int, working_set: int = 0, **kw: object) -> Member:
    fields: dict[str, object] = {"weight": 1, "fixed": None}
    fields.update(kw)
    return Member(pid=pid, committed=committed, working_set=working_set, **fields)  # type: ignore[arg-type]


POOL = 3 * GiB
ARGS = WorkerArgs(nworkers="1", nthreads=2)


def pool_plan(*others: Member, args: WorkerArgs = ARGS, **settings: object) -> tuple[int, int]:
    """(share, budget) of a newcomer in a 3 GiB cgroup whose others use what they hold."""
    used = sum(o.working_set for o in others)
    m = measurement(levels=(level(POOL, used + 40 * MiB),), sole=False)
    plan = make_plan(m, args, Settings(**settings), pool=PoolView("k", others))  # type: ignore[arg-type]
    assert plan.share is not None
    return plan.share, plan.budget


def test_a_question_is_answered_with_the_settled_share() -> None:
    # `--print-limit` beside a sibling that holds the whole pool: a start would wait for
    # it to come down; a question answers with the share the start settles at.
    sibling = member(7, committed=POOL, working_set=200 * MiB)
    share, budget = pool_plan(sibling, settled=True)
    assert budget == share == POOL // 2
    share, budget = pool_plan(member(7, committed=POOL * 3 // 4), settled=True)
    assert budget == share == POOL // 2


def test_alone_the_pool_changes_nothing() -> None:
    m = measurement(levels=(level(POOL, 40 * MiB),))
    alone = make_plan(m, ARGS, Settings(), pool=PoolView("k"))
    before = make_plan(m, ARGS, Settings())
    assert alone.budget == before.budget == alone.share
    assert alone.per_worker == before.per_worker


def test_the_share_is_by_weight_and_the_newcomer_starts_with_what_is_free() -> None:
    # One sibling holding the whole pool: our share is half, but nothing is free yet.
    with pytest.raises(PoolBusy):
        pool_plan(member(7, committed=POOL, working_set=200 * MiB))
    # It came down to its half: we start with ours.
    share, budget = pool_plan(member(7, committed=POOL // 2, working_set=200 * MiB))
    assert share == budget == POOL // 2
    # Half way down: we start with what is free, and rise later.
    share, budget = pool_plan(member(7, committed=POOL * 3 // 4, working_set=200 * MiB))
    assert share == POOL // 2 and budget == POOL // 4
    # Weight: a sibling with 3 workers beside our 1.
    share, _ = pool_plan(member(7, committed=0, weight=3))
    assert share == POOL // 4


def test_fixed_commitments_come_off_first() -> None:
    fixed = member(7, committed=GiB, working_set=100 * MiB, fixed=GiB)
    flexible = member(8, committed=0, working_set=100 * MiB)
    share, budget = pool_plan(fixed, flexible)
    assert share == (POOL - GiB) // 2 and budget == share
    # An explicit --memory-limit is ours: a fixed commitment of what it asks for.
    args = WorkerArgs(nworkers="1", nthreads=2, memory_limit="512MiB")
    share, _ = pool_plan(flexible, args=args)
    assert share == 512 * MiB + Settings().nanny_allowance


def test_a_share_below_the_minimum_refuses_with_the_siblings_and_the_fixes() -> None:
    others = [member(100 + i, committed=0) for i in range(15)]
    with pytest.raises(PlanError) as info:
        pool_plan(*others, min_worker_memory=256 * MiB)
    assert not isinstance(info.value, PoolBusy)
    text = str(info.value)
    assert "15 other instance(s)" in text and "pid 100" in text
    assert "--nworkers" in text and "--memory-limit" in text


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=4),
            st.one_of(st.none(), st.integers(min_value=0, max_value=GiB)),
        ),
        max_size=6,
    )
)
def test_shares_never_add_up_to_more_than_the_pool(spec: list[tuple[int, int | None]]) -> None:
    # Every instance plans with the others holding their own shares: the shares of a
    # settled pool add up to no more than the pool.
    others = [member(10 + i, committed=0, weight=w, fixed=f) for i, (w, f) in enumerate(spec)]
    try:
        share, _ = pool_plan(*others, min_worker_memory=1)
    except PlanError:
        return
    fixed = sum(f for _, f in spec if f is not None)
    flexible = sum(w for w, f in spec if f is None) + 1
    assert share * flexible + fixed <= POOL or fixed >= POOL


def test_dead_claims_are_removed_and_live_ones_read(tmp_path: Path) -> None:
    pool = Pool(tmp_path, "k")
    live = member(os_pid(), committed=GiB)
    fd = pool.claim(live)
    try:
        dead = member(2**22 + 1, committed=GiB)
        (tmp_path / f"{dead.pid}.lock").write_text("")
        (tmp_path / f"{dead.pid}.claim").write_text(claim_text(dead))
        assert pool.members() == (live,)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [f"{live.pid}.lock", f"{live.pid}.claim"]
        )
        assert pool.members(exclude=live.pid) == ()
    finally:
        import os

        os.close(fd)
    # Our own descriptor closed: the claim is dead now too.
    assert pool.members() == ()


def os_pid() -> int:
    import os

    return os.getpid()


def _settled(directory: Path) -> None:
    """The directory's mtime set back: a watch's Pool trusts a listing older than 1 s."""
    import os
    import time

    st = os.stat(directory)
    os.utime(directory, ns=(st.st_atime_ns, time.time_ns() - 5 * 10**9))


def _open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def test_a_watch_keeps_the_lock_files_open_and_still_sees_a_death(tmp_path: Path) -> None:
    import os

    watch_pool = Pool(tmp_path, "k", remember=True)
    other = member(2**22 + 3, committed=GiB)
    fd = Pool(tmp_path, "k").claim(other)
    _settled(tmp_path)
    before = _open_fds()
    assert watch_pool.members() == (other,)
    assert watch_pool.members() == (other,)
    # One descriptor kept across both readings: its lock file's.
    assert _open_fds() == before + 1
    os.close(fd)  # the other instance ends: its lock is free
    assert watch_pool.members() == ()
    assert sorted(os.listdir(tmp_path)) == []
    assert _open_fds() == before - 1  # the other's descriptor closed, and ours


def test_a_changed_pool_directory_drops_the_kept_lock_files(tmp_path: Path) -> None:
    import os

    watch_pool = Pool(tmp_path, "k", remember=True)
    fds = [Pool(tmp_path, "k").claim(member(2**22 + i, committed=GiB)) for i in (5, 6)]
    _settled(tmp_path)
    before = _open_fds()
    assert len(watch_pool.members()) == 2
    assert _open_fds() == before + 2
    Pool(tmp_path, "k").leave(2**22 + 6)  # a claim removed: the directory changed
    os.close(fds.pop())
    assert len(watch_pool.members()) == 1
    assert _open_fds() == before - 1  # listed afresh, not settled yet: none kept
    os.close(fds.pop())
    watch_pool.forget()


def test_a_lock_file_made_again_under_an_unchanged_mtime_is_not_removed(tmp_path: Path) -> None:
    # The pid of an instance that ended went to a new one, which claimed under the same
    # name, and the directory's mtime did not show it (a coarse clock): the descriptor
    # kept for the old lock file is of another inode, free now. The new claim stays.
    import os

    watch_pool = Pool(tmp_path, "k", remember=True)
    pid = 2**22 + 7
    fd = Pool(tmp_path, "k").claim(member(pid, committed=GiB))
    _settled(tmp_path)
    assert len(watch_pool.members()) == 1
    seen = os.stat(tmp_path)
    os.close(fd)
    Pool(tmp_path, "k").leave(pid)
    fd = Pool(tmp_path, "k").claim(member(pid, committed=2 * GiB))
    os.utime(tmp_path, ns=(seen.st_atime_ns, seen.st_mtime_ns))
    try:
        # Held this once, as last read; then read afresh.
        assert watch_pool.members() == (member(pid, committed=GiB),)
        assert sorted(os.listdir(tmp_path)) == [f"{pid}.claim", f"{pid}.lock"]
        assert watch_pool.members() == (member(pid, committed=2 * GiB),)
    finally:
        os.close(fd)
        watch_pool.forget()


def test_the_watch_keeps_the_pool_lock_open_and_it_still_excludes(tmp_path: Path) -> None:
    import os

    watch_pool = Pool(tmp_path, "k", remember=True)
    other = Pool(tmp_path, "k")
    fd = watch_pool.hold()
    assert other.acquire(wait=False) is None
    watch_pool.release(fd)
    _settled(tmp_path)
    before = _open_fds()
    for _ in range(3):
        fd = watch_pool.hold()
        assert other.acquire(wait=False) is None  # held, on the kept descriptor
        watch_pool.release(fd)
        theirs = other.acquire(wait=False)  # released between ticks
        assert theirs is not None
        os.close(theirs)
    assert _open_fds() == before  # the one kept descriptor, neither opened nor closed
    watch_pool.forget()
    assert _open_fds() == before - 1


@pytest.mark.parametrize("settled", [True, False])
def test_a_pool_lock_file_made_again_is_the_one_the_watch_holds(
    tmp_path: Path, settled: bool
) -> None:
    # The last instance to leave removes the pool's lock file (remove_if_empty) and a
    # newcomer makes it again: a lock on the kept, unlinked file would exclude nobody.
    # Unsettled: the sighting of a directory changed less than a second before is not
    # trusted, so a change under the same mtime (a coarse clock, here utime) is seen too.
    import os

    watch_pool = Pool(tmp_path, "k", remember=True)
    other = Pool(tmp_path, "k")
    if settled:
        fd = other.acquire()
        assert fd is not None
        os.close(fd)
        _settled(tmp_path)
    watch_pool.release(watch_pool.hold())
    seen = os.stat(tmp_path)
    os.unlink(tmp_path / "lock")
    fd = other.acquire()
    assert fd is not None
    os.close(fd)
    if not settled:
        os.utime(tmp_path, ns=(seen.st_atime_ns, seen.st_mtime_ns))
    fd = watch_pool.hold()
    try:
        assert other.acquire(wait=False) is None
    finally:
        watch_pool.release(fd)
        watch_pool.forget()
