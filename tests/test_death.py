"""Worker deaths: the attribution over readings, its sentences, the notes' round trip
between the nanny and the supervisor, and the supervisor's part over a fake /proc and
cgroup tree (a directory of files, as the kernel would present them)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_safe_worker.follow.death import (
    CAUSES,
    EXIT,
    KERNEL_OOM_GLOBAL,
    KERNEL_OOM_LIMIT,
    NANNY_MEMORY_RESTART,
    RECORD_KEYS,
    SIGNAL,
    ExitNote,
    Readings,
    attribute,
    cause_of,
    is_record,
    sentence,
)
from dask_safe_worker.follow.death_watch import (
    DeathWatch,
    note_exit,
    note_started,
    parse_note,
    pending_records,
    remove_record,
)
from dask_safe_worker.records import replace

GiB, MiB = 2**30, 2**20
KILL = -int(signal.SIGKILL)


def readings(
    exitcode: int = KILL,
    restart_rss: int | None = None,
    oom_kills: dict[str, int] | None = None,
    hits: dict[str, int] | None = None,
    global_kills: int | None = 0,
) -> Readings:
    note = ExitNote(
        pid=42,
        exitcode=exitcode,
        at=1.0,
        worker="tcp://127.0.0.1:4000",
        name="w-0",
        restart_rss=restart_rss,
        dask_limit=int(2.37 * GiB),
        terminate_fraction=0.95,
    )
    return Readings(
        note=note,
        oom_kills={"/c": 0} if oom_kills is None else oom_kills,
        limit_hits={"/c": 0} if hits is None else hits,
        global_oom_kills=global_kills,
        # The last sample was read while the kernel tore the victim down: not the peak.
        rss_samples=((0.5, int(2.30 * GiB)), (0.9, int(2.39 * GiB)), (1.0, 100 * MiB)),
        kernel_limit=int(2.41 * GiB),
        cgroup="/c",
        top_users=(("worker tcp://127.0.0.1:4001 (pid 43)", 300 * MiB),),
    )


def test_kill_at_our_limit() -> None:
    r = readings(oom_kills={"/c": 1}, hits={"/c": 3, "/c/child": 2}, global_kills=1)
    rec = attribute(r)
    assert rec["cause"] == KERNEL_OOM_LIMIT
    # The deepest cgroup that hit its limit is the one that stopped the worker.
    assert rec["cgroup"] == "/c/child"
    assert sentence(rec) == (
        "worker tcp://127.0.0.1:4000 (w-0) was killed by the kernel OOM killer at 2.39 GiB "
        "at the limit of cgroup /c/child (kernel limit 2.41 GiB, Dask limit 2.37 GiB); "
        "largest other users: worker tcp://127.0.0.1:4001 (pid 43) 300.00 MiB"
    )


def test_global_kill_is_not_a_kill_at_our_limit() -> None:
    rec = attribute(readings(oom_kills={"/c": 1}, hits={"/c": 0}, global_kills=1))
    assert rec["cause"] == KERNEL_OOM_GLOBAL
    assert "not at its cgroup's limit" in sentence(rec)


def test_kernel_without_a_cgroup_kill_count_falls_back_to_the_host_count() -> None:
    # v1 before Linux 4.13: memory.oom_control has no oom_kill line.
    assert cause_of(readings(oom_kills={}, hits={"/c": 1}, global_kills=1)) == KERNEL_OOM_LIMIT
    assert cause_of(readings(oom_kills={}, hits={"/c": 0}, global_kills=1)) == KERNEL_OOM_GLOBAL
    assert cause_of(readings(oom_kills={}, hits={}, global_kills=None)) == SIGNAL


def test_a_host_kill_of_somebody_else_leaves_ours_a_signal() -> None:
    r = readings(oom_kills={"/c": 0}, hits={"/c": 1}, global_kills=1)
    assert cause_of(r) == SIGNAL
    assert "killed by SIGKILL from outside" in sentence(attribute(r))


def test_nanny_restart_wins_over_its_own_sigkill() -> None:
    for code in (-int(signal.SIGTERM), KILL):
        rec = attribute(readings(exitcode=code, restart_rss=int(2.3 * GiB), oom_kills={"/c": 1}))
        assert rec["cause"] == NANNY_MEMORY_RESTART
        assert rec["rss"] == int(2.3 * GiB)
        assert rec["terminate_at"] == int(int(2.37 * GiB) * 0.95)
        assert "restarted by its nanny at 2.30 GiB, past Dask's terminate threshold 2.25 GiB" in (
            sentence(rec)
        )


def test_plain_exit_and_other_signals() -> None:
    assert cause_of(readings(exitcode=1)) == EXIT
    assert cause_of(readings(exitcode=0)) == EXIT
    assert "exited with status 3" in sentence(attribute(readings(exitcode=3)))
    rec = attribute(readings(exitcode=-int(signal.SIGTERM)))
    assert rec["cause"] == SIGNAL and rec["signal"] == "SIGTERM"


counts = st.dictionaries(st.sampled_from(["/a", "/a/b", "/c"]), st.integers(0, 5), max_size=3)


@given(
    exitcode=st.integers(-64, 255),
    restart=st.none() | st.integers(0, 2**40),
    kills=counts,
    hits=counts,
    global_kills=st.none() | st.integers(0, 5),
)
def test_every_reading_has_one_cause_and_a_sentence(
    exitcode: int,
    restart: int | None,
    kills: dict[str, int],
    hits: dict[str, int],
    global_kills: int | None,
) -> None:
    r = readings(exitcode, restart, kills, hits, global_kills)
    rec = attribute(r)
    assert rec["cause"] in CAUSES and is_record(rec)
    assert set(rec) == RECORD_KEYS
    # A kernel kill needs a SIGKILL and a counted kill; a kill at our limit a limit hit.
    if rec["cause"] in (KERNEL_OOM_LIMIT, KERNEL_OOM_GLOBAL):
        assert exitcode == KILL and restart is None
        assert any(kills.values()) or (not kills and (global_kills or 0) > 0)
    if rec["cause"] == KERNEL_OOM_LIMIT:
        assert hits[rec["cgroup"]] > 0
    if exitcode >= 0 and restart is None:
        assert rec["cause"] == EXIT
    # The record survives the trip to the scheduler and back as JSON.
    back = json.loads(json.dumps(rec))
    assert is_record(back) and sentence(back) == sentence(rec)
    assert sentence(rec).startswith("worker tcp://127.0.0.1:4000 (w-0) ")


@given(doc=st.dictionaries(st.sampled_from([*sorted(RECORD_KEYS), "x"]), st.integers()))
def test_is_record_refuses_what_attribute_did_not_make(doc: dict[str, Any]) -> None:
    assert not is_record(doc)


notes = st.builds(
    ExitNote,
    pid=st.integers(1, 2**22),
    exitcode=st.integers(-64, 255),
    at=st.floats(0, 2e9),
    worker=st.none() | st.text(max_size=30),
    name=st.none() | st.text(max_size=30),
    nanny=st.none() | st.text(max_size=30),
    restart_rss=st.none() | st.integers(0, 2**50),
    dask_limit=st.none() | st.integers(1, 2**50),
    terminate_fraction=st.none() | st.floats(0.01, 1),
)


@given(note=notes, slot=st.integers(0, 64))
def test_exit_note_round_trip(note: ExitNote, slot: int) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        live = os.path.join(d, "live.json")
        note_exit(live, note, slot)
        with open(os.path.join(d, "deaths", f"{note.pid}.exit")) as f:
            assert parse_note(json.load(f)) == (note, slot)


@pytest.mark.parametrize("doc", [{}, {"pid": "x", "exitcode": 1, "at": 0}, {"pid": 1}])
def test_bad_note_is_a_value_error(doc: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="not an exit note"):
        parse_note(doc)


def _v1_cgroup(d: Path, oom_kill: int, failcnt: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.oom_control").write_text(f"oom_kill_disable 0\nunder_oom 0\noom_kill {oom_kill}\n")
    (d / "memory.failcnt").write_text(f"{failcnt}\n")


def test_supervisor_side_explains_a_note_and_hands_the_record_to_its_nanny(
    tmp_path: Path,
) -> None:
    proc = tmp_path / "proc"
    (proc / "43").mkdir(parents=True)
    (proc / "42").mkdir(parents=True)
    (proc / "vmstat").write_text("nr_free_pages 1\noom_kill 7\n")
    (proc / "42" / "statm").write_text(f"1000 {2 * GiB // os.sysconf('SC_PAGE_SIZE')} 0\n")
    (proc / "43" / "statm").write_text(f"1000 {300 * MiB // os.sysconf('SC_PAGE_SIZE')} 0\n")
    cg = tmp_path / "cg"
    _v1_cgroup(cg, 0, 10)
    live = str(tmp_path / "chan" / "live.json")
    logged: list[tuple[str, dict[str, Any]]] = []
    watch = DeathWatch(live, lambda e, **f: logged.append((e, f)), 1, [str(cg)], proc)
    note_started(live, 42, "tcp://127.0.0.1:4000", "w-0", 1)
    note_started(live, 43, "tcp://127.0.0.1:4001", "w-1", 0)

    def limit() -> tuple[int | None, str | None]:
        return 3 * GiB, str(cg)

    watch.tick(limit, lambda: [("instance pid 9", 100 * MiB)])
    # The kernel kills 42 at the limit: the counters move, then the nanny notes it.
    _v1_cgroup(cg, 1, 12)
    (proc / "vmstat").write_text("oom_kill 8\n")
    (proc / "42" / "statm").unlink()
    note_exit(live, ExitNote(pid=42, exitcode=KILL, at=5.0, worker="tcp://127.0.0.1:4000"), 1)
    watch.tick(limit, lambda: [("instance pid 9", 100 * MiB)])
    assert [e for e, _ in logged] == ["worker.died"]
    rec = logged[0][1]
    assert rec["cause"] == KERNEL_OOM_LIMIT and rec["cgroup"] == str(cg)
    assert rec["rss"] == 2 * GiB and rec["kernel_limit"] == 3 * GiB
    assert rec["top_users"] == [
        ["worker tcp://127.0.0.1:4001 (pid 43)", 300 * MiB],
        ["instance pid 9", 100 * MiB],
    ]
    assert pending_records(live, 0) == []
    [(path, sent)] = pending_records(live, 1)
    assert sent == {k: v for k, v in rec.items() if k != "sentence"}
    remove_record(path)
    # The kill explained one death: SIGKILL to 43 now is a signal from outside.
    note_exit(live, ExitNote(pid=43, exitcode=KILL, at=6.0), 0)
    watch.tick(limit, list)
    assert logged[-1][1]["cause"] == SIGNAL
    watch.close()
    assert not (tmp_path / "chan" / "deaths").exists()


def test_audit_matches_deaths_to_todays_workers_by_nanny() -> None:
    from dask_safe_worker.cluster_audit.deaths import death_lines, death_rows

    def record(pid: int, worker: str, nanny: str | None, at: float) -> dict[str, Any]:
        r = readings(exitcode=1)
        note = ExitNote(pid=pid, exitcode=1, at=at, worker=worker, nanny=nanny)
        return attribute(Readings(note, {}, {}, 0, r.rss_samples))

    events = [
        (1.0, record(1, "tcp://h:1", "tcp://h:9", 1.0)),
        (2.0, {"cause": "made up"}),
        (3.0, record(2, "tcp://h:2", "tcp://h:9", 3.0)),
        (4.0, record(3, "tcp://h:3", "tcp://h:8", 4.0)),
        (5.0, record(4, "tcp://h:4", None, 5.0)),
    ]
    rows: list[dict[str, Any]] = [
        {"worker": "tcp://h:5", "name": "a"},
        {"worker": "tcp://h:4", "name": None},
    ]
    out, gone = death_rows(rows, {"tcp://h:5": "tcp://h:9", "tcp://h:4": None}, events)
    assert [d["worker_pid"] for d in out[0]["deaths"]] == [1, 2]
    assert [d["worker_pid"] for d in out[1]["deaths"]] == [4]
    assert [d["worker_pid"] for d in gone] == [3]
    lines = death_lines(out, gone)
    assert "a (tcp://h:5): 2 worker deaths" in lines
    assert "  - worker tcp://h:3 exited with status 1 at 2.39 GiB (no kernel limit)" in lines


def test_two_kills_between_two_ticks_explain_two_deaths(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "vmstat").write_text("oom_kill 0\n")
    cg = tmp_path / "cg"
    _v1_cgroup(cg, 0, 0)
    live = str(tmp_path / "chan" / "live.json")
    logged: list[dict[str, Any]] = []
    watch = DeathWatch(live, lambda e, **f: logged.append(f), 1, [str(cg)], proc)

    def limit() -> tuple[int | None, str | None]:
        return GiB, str(cg)

    _v1_cgroup(cg, 2, 5)
    (proc / "vmstat").write_text("oom_kill 2\n")
    for pid in (42, 43):
        note_exit(live, ExitNote(pid=pid, exitcode=KILL, at=float(pid)), 0)
    # And a SIGKILL from outside after both kills were explained.
    note_exit(live, ExitNote(pid=44, exitcode=KILL, at=44.0), 0)
    watch.tick(limit, list)
    assert [(r["worker_pid"], r["cause"]) for r in logged] == [
        (42, KERNEL_OOM_LIMIT),
        (43, KERNEL_OOM_LIMIT),
        (44, SIGNAL),
    ]
    watch.close()


def test_a_parent_limit_reached_first_is_named_with_its_own_size() -> None:
    # Our limit on /c/w leaves no room below /c's: /c's limit was hit, /c/w's was not.
    r = readings(oom_kills={"/c": 1, "/c/w": 1}, hits={"/c": 1, "/c/w": 0}, global_kills=1)
    rec = attribute(replace(r, cgroup_limits=(("/c", 3 * GiB),)))
    assert rec["cause"] == KERNEL_OOM_LIMIT and rec["cgroup"] == "/c"
    assert rec["cgroup_limit"] == 3 * GiB and rec["limit_hits"] == {"/c": 1}
    # One kill, counted at both levels: one kill.
    assert rec["oom_kills"] == 1
    assert "at the limit of cgroup /c (its limit 3.00 GiB; kernel limit 2.41 GiB, " in sentence(rec)


def _v2_cgroup(d: Path, events: dict[str, int], local: dict[str, int] | None) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.max").write_text(f"{GiB}\n")
    (d / "memory.events").write_text("".join(f"{k} {v}\n" for k, v in events.items()))
    if local is not None:
        (d / "memory.events.local").write_text("".join(f"{k} {v}\n" for k, v in local.items()))


@pytest.mark.parametrize("has_local", [True, False])
def test_v2_hits_are_the_cgroups_own(tmp_path: Path, has_local: bool) -> None:
    """memory.events counts a child's limit hit in every ancestor: a sibling (the agent
    beside our worker) hitting its own limit is not a hit of the parent's. Without
    memory.events.local (before Linux 5.2) only the hierarchical count exists."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "vmstat").write_text("oom_kill 0\n")
    parent, ours = tmp_path / "m", tmp_path / "m" / "w"
    zero = {"max": 0, "oom": 0, "oom_kill": 0}
    _v2_cgroup(parent, zero, zero if has_local else None)
    _v2_cgroup(ours, zero, zero if has_local else None)
    live = str(tmp_path / "chan" / "live.json")
    logged: list[dict[str, Any]] = []
    watch = DeathWatch(live, lambda e, **f: logged.append(f), 2, [str(ours), str(parent)], proc)
    # The agent hit its limit below m (counted in m's memory.events only); then a global
    # OOM kill took our worker (counted in w and m).
    _v2_cgroup(parent, {"max": 1, "oom": 1, "oom_kill": 1}, zero if has_local else None)
    local_w = {"max": 0, "oom": 0, "oom_kill": 1}
    _v2_cgroup(ours, {"max": 0, "oom": 0, "oom_kill": 1}, local_w if has_local else None)
    (proc / "vmstat").write_text("oom_kill 1\n")
    note_exit(live, ExitNote(pid=42, exitcode=KILL, at=1.0), 0)
    watch.tick(lambda: (GiB, str(ours)), list)
    (rec,) = logged
    if has_local:
        assert rec["cause"] == KERNEL_OOM_GLOBAL, rec
    else:
        assert rec["cause"] == KERNEL_OOM_LIMIT and rec["cgroup"] == str(parent)
        assert rec["cgroup_limit"] == GiB
    assert rec["oom_kills"] == 1
    watch.close()


def test_v2_a_kill_at_our_limit_names_our_cgroup(tmp_path: Path) -> None:
    """The kernel counts our limit's hit in w and (memory.events) in every ancestor: the
    record names w, whose limit it was, and its size."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "vmstat").write_text("oom_kill 0\n")
    parent, ours = tmp_path / "m", tmp_path / "m" / "w"
    zero = {"max": 0, "oom": 0, "oom_kill": 0}
    for d in (parent, ours):
        _v2_cgroup(d, zero, zero)
    live = str(tmp_path / "chan" / "live.json")
    logged: list[dict[str, Any]] = []
    watch = DeathWatch(live, lambda e, **f: logged.append(f), 2, [str(parent), str(ours)], proc)
    hit = {"max": 3, "oom": 1, "oom_kill": 1}
    _v2_cgroup(parent, hit, zero)
    _v2_cgroup(ours, hit, hit)
    (proc / "vmstat").write_text("oom_kill 1\n")
    note_exit(live, ExitNote(pid=42, exitcode=KILL, at=1.0), 0)
    watch.tick(lambda: (GiB, str(ours)), list)
    (rec,) = logged
    assert rec["cause"] == KERNEL_OOM_LIMIT and rec["cgroup"] == str(ours)
    assert rec["limit_hits"] == {str(ours): 1} and rec["cgroup_limit"] == GiB
    assert f"at the limit of cgroup {ours} (kernel limit 1.00 GiB" in rec["sentence"]
    watch.close()


def test_v2_a_kill_elsewhere_below_an_ancestor_is_not_ours(tmp_path: Path) -> None:
    """memory.events counts every kill below a cgroup: the agent beside our worker,
    OOM-killed at its own limit, counts in the parent m too. Only w's count says whether
    our worker was the kernel's victim, and a kill that was not ours never holds back
    the next measurement (a later kill at w's limit, then a global kill, each named)."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "vmstat").write_text("oom_kill 0\n")
    parent, ours = tmp_path / "m", tmp_path / "m" / "w"
    for d in (parent, ours):
        _v2_cgroup(d, {"oom": 0, "oom_kill": 0}, {"oom": 0, "oom_kill": 0})
    live = str(tmp_path / "chan" / "live.json")
    logged: list[dict[str, Any]] = []
    watch = DeathWatch(live, lambda e, **f: logged.append(f), 2, [str(parent), str(ours)], proc)

    def kernel(vmstat: int, m: tuple[int, int], w: tuple[int, int], w_hits: int) -> None:
        """(oom, oom_kill) of memory.events; w's own limit hits (memory.events.local)."""
        (proc / "vmstat").write_text(f"oom_kill {vmstat}\n")
        _v2_cgroup(parent, {"oom": m[0], "oom_kill": m[1]}, {"oom": 0, "oom_kill": 0})
        _v2_cgroup(ours, {"oom": w[0], "oom_kill": w[1]}, {"oom": w_hits, "oom_kill": w[1]})

    def died(pid: int) -> dict[str, Any]:
        note_exit(live, ExitNote(pid=pid, exitcode=KILL, at=float(pid)), 0)
        watch.tick(lambda: (GiB, str(ours)), list)
        return logged[-1]

    # The agent, below m, is killed at its own limit; then somebody SIGKILLs our worker.
    kernel(vmstat=1, m=(1, 1), w=(0, 0), w_hits=0)
    outside = died(42)
    assert outside["cause"] == SIGNAL and outside["oom_kills"] == 0, outside
    # A kill at w's limit, then a global OOM kill: each its own cause.
    kernel(vmstat=2, m=(2, 2), w=(1, 1), w_hits=1)
    assert died(43)["cause"] == KERNEL_OOM_LIMIT
    kernel(vmstat=3, m=(2, 3), w=(1, 2), w_hits=1)
    assert died(44)["cause"] == KERNEL_OOM_GLOBAL, logged[-1]
    watch.close()


@pytest.mark.parametrize("settled", [True, False])
def test_a_note_is_seen_though_the_listing_is_reused_between_changes(
    tmp_path: Path, settled: bool
) -> None:
    # The notes' directory is listed again only when its (inode, mtime) moved; a listing
    # taken less than a second after a change is never reused, since a change within the
    # file system's clock step could keep the mtime (here: utime puts it back).
    import time

    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    (proc / "vmstat").write_text("oom_kill 0\n")
    (proc / "42" / "statm").write_text(f"1000 {GiB // os.sysconf('SC_PAGE_SIZE')} 0\n")
    cg = tmp_path / "cg"
    _v1_cgroup(cg, 0, 0)
    live = str(tmp_path / "chan" / "live.json")
    logged: list[dict[str, Any]] = []
    watch = DeathWatch(live, lambda e, **f: logged.append(f), 1, [str(cg)], proc)
    note_started(live, 42, "tcp://127.0.0.1:4000", "w-0", 0)
    notes = tmp_path / "chan" / "deaths"
    if settled:
        os.utime(notes, ns=(0, time.time_ns() - 5 * 10**9))

    def limit() -> tuple[int | None, str | None]:
        return 3 * GiB, str(cg)

    for _ in range(3):  # the worker is sampled on every tick, listed or not
        watch.tick(limit, list)
    seen = os.stat(notes)
    (proc / "42" / "statm").unlink()  # gone
    note_exit(live, ExitNote(pid=42, exitcode=1, at=5.0), 0)
    if not settled:
        os.utime(notes, ns=(seen.st_atime_ns, seen.st_mtime_ns))
    watch.tick(limit, list)
    assert [(r["worker_pid"], len(r["rss_samples"])) for r in logged] == [(42, 3)]
    watch.close()
