"""The watch's rules on a cgroup v2 file tree (a copy of a fixture, so every step is
deterministic): a neighbour grows, the kernel limit waits for Dask's acknowledgements, a
limit someone else sets is theirs, an OOM kill is tied to the process that vanished.

The same rules run against the real v1 kernel in tests/test_follow_e2e.py and the real v2
kernel in tests/vm/guest/test_follow_v2.py; this file pins each step without timing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from dask_safe_worker.dask_compat.release import installed_release
from dask_safe_worker.follow.decide import FollowSpec, ManagedLimit, replan, with_original_limit
from dask_safe_worker.follow.live_limit import (
    LiveLimit,
    prepare_channel,
    read_live_limit,
    write_ack,
    write_live_limit,
)
from dask_safe_worker.follow.watch import Watch
from dask_safe_worker.measure import locate, remeasure
from dask_safe_worker.plan import Settings
from dask_safe_worker.worker_args import WorkerArgs

MiB = 2**20
FIXTURE = Path(__file__).parent / "fixtures" / "systemd-v2-nest"
SCOPE = "sys/fs/cgroup/system.slice/dask.slice/worker.scope"
SLICE = "sys/fs/cgroup/system.slice/dask.slice"
NANNY, WORKER = 900001, 900002
RELEASE = installed_release()


class Tree:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc = root / "proc"

    def write(self, rel: str, text: str | int) -> None:
        (self.root / rel).write_text(f"{text}\n")

    def read(self, rel: str) -> str:
        return (self.root / rel).read_text().strip()

    def add(self, rel: str, n: int) -> None:
        self.write(rel, int(self.read(rel)) + n)


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    t = Tree(tmp_path / "root")
    shutil.copytree(FIXTURE, t.root)
    me = os.getpid()
    # Our process tree: this process (the supervisor), a nanny and its worker.
    for pid, ppid in ((me, 1), (NANNY, me), (WORKER, NANNY)):
        (t.proc / str(pid)).mkdir(parents=True, exist_ok=True)
        t.write(f"proc/{pid}/stat", f"{pid} (python) S {ppid} 1 1 0")
        t.write(f"proc/{pid}/status", "VmRSS:\t  102400 kB")
    t.write(f"{SCOPE}/cgroup.procs", f"{me}\n{NANNY}\n{WORKER}")
    t.write(f"{SCOPE}/memory.events", "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0")
    return t


def start(
    tree: Tree, tmp_path: Path, started: bool = True
) -> tuple[Watch, list[tuple[str, dict[str, Any]]]]:
    """What the start did: plan, write the budget as the scope's memory.max, the channel."""
    settings = Settings(supervised=True)
    args = WorkerArgs(nworkers="1", nthreads=2)
    scope_dir = str(tree.root / SCOPE)
    managed = ManagedLimit(scope_dir, 2, original=int(tree.read(f"{SCOPE}/memory.max")), written=0)
    loc = locate(tree.proc, tree.root)
    dirs = [str(d) for _, d in loc.level_paths(tree.root)] if loc else []
    m = remeasure(
        loc, tree.proc, tree.root, release=RELEASE, own_pid=os.getpid(), tree_root=os.getpid()
    )
    plan = replan(
        FollowSpec(settings, args, 0, 0, 1.0, "", managed), with_original_limit(m, managed, dirs)
    )
    assert plan.effective_per_worker is not None
    tree.write(f"{SCOPE}/memory.max", plan.budget)
    live = prepare_channel(str(tmp_path / "channel"))
    write_live_limit(live, LiveLimit(0, plan.effective_per_worker, plan.budget, 1.0, 0.0))
    if started:
        # The worker's and the nanny's preloads took the first record at their set-up.
        write_ack(live, "worker", WORKER, 0)
        write_ack(live, "nanny", NANNY, 0)
    spec = FollowSpec(
        settings,
        args,
        first_budget=plan.budget,
        first_per_worker=plan.effective_per_worker,
        interval=1.0,
        channel=live,
        managed=ManagedLimit(scope_dir, 2, managed.original, plan.budget),
    )
    log: list[tuple[str, dict[str, Any]]] = []
    # A file tree, not the kernel: nothing to register wake-ups on (follow/wake.py).
    watch = Watch(
        spec,
        lambda event, **f: log.append((event, f)),
        tree.proc,
        tree.root,
        release=RELEASE,
        wake=False,
    )
    return watch, log


def names(log: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [e for e, _ in log]


def test_steady_state_changes_nothing(tree: Tree, tmp_path: Path) -> None:
    watch, log = start(tree, tmp_path)
    before = tree.read(f"{SCOPE}/memory.max")
    # The workers grow inside our own scope: their memory is the budget's own.
    tree.add(f"{SCOPE}/memory.current", 300 * MiB)
    tree.add(f"{SLICE}/memory.current", 300 * MiB)
    for _ in range(3):
        watch.tick()
    assert log == []
    assert tree.read(f"{SCOPE}/memory.max") == before
    assert read_live_limit(watch.spec.channel) == watch.record
    assert watch.record.generation == 0
    # Nothing moved: the third found the second's inputs and state (the first learnt the
    # worker count) and skipped deciding.
    assert watch.skipped == 1


def test_neighbour_grows_kernel_waits_for_dask_then_follows(tree: Tree, tmp_path: Path) -> None:
    watch, log = start(tree, tmp_path)
    first = watch.record
    written = int(tree.read(f"{SCOPE}/memory.max"))
    for _ in range(3):
        watch.tick()
    assert watch.skipped == 1 and log == []  # quiet: the third skipped deciding
    # A neighbour in the slice, outside our scope, takes 512 MiB.
    tree.add(f"{SLICE}/memory.current", 512 * MiB)
    watch.tick()
    assert names(log) == ["follow.changed", "follow.replanned"]
    record = read_live_limit(watch.spec.channel)
    assert record is not None and record.generation == 1
    assert record.budget == first.budget - 512 * MiB
    assert record.per_worker == first.per_worker - 512 * MiB
    # Nobody acknowledged yet: the kernel limit stays.
    watch.tick()
    assert int(tree.read(f"{SCOPE}/memory.max")) == written
    write_ack(watch.spec.channel, "nanny", NANNY, 1)
    watch.tick()
    assert int(tree.read(f"{SCOPE}/memory.max")) == written
    # The worker holds it now: the kernel limit follows, and the change is reported.
    write_ack(watch.spec.channel, "worker", WORKER, 1)
    watch.tick()
    event, applied = log[-1]
    assert event == "follow.applied"
    assert applied["dask"] == {"workers": 1, "nannies": 1}
    assert applied["kernel"]["action"] == "lowered"
    assert int(tree.read(f"{SCOPE}/memory.max")) == record.budget

    # The neighbour leaves: the kernel goes up first, to the start's value and no further.
    # A raise that only the measurement asks for waits one tick for its confirmation.
    tree.add(f"{SLICE}/memory.current", -512 * MiB - 100 * MiB)
    log.clear()
    watch.tick()
    assert names(log) == [] and int(tree.read(f"{SCOPE}/memory.max")) == record.budget
    watch.tick()
    assert names(log) == ["follow.changed", "follow.replanned"]
    assert int(tree.read(f"{SCOPE}/memory.max")) == written
    assert watch.record.per_worker == first.per_worker
    write_ack(watch.spec.channel, "worker", WORKER, 2)
    watch.tick()
    assert log[-1][1]["kernel"]["action"] == "raised" and log[-1][1]["action"] == "raise"


def test_quiet_ticks_skip_deciding_until_an_input_moves(tree: Tree, tmp_path: Path) -> None:
    watch, log = start(tree, tmp_path)
    tree.add(f"{SLICE}/memory.current", 512 * MiB)
    watch.tick()
    write_ack(watch.spec.channel, "nanny", NANNY, 1)
    write_ack(watch.spec.channel, "worker", WORKER, 1)
    watch.tick()
    assert names(log)[-1] == "follow.applied" and watch.skipped == 0
    for _ in range(3):
        watch.tick()
    assert watch.skipped == 2  # the first after the change learnt that nothing moved
    # Our workers grow: an input moved (our working set, the slice's headroom), so the
    # tick decides again, and finds nothing to change (their memory is the budget's own).
    tree.add(f"{SCOPE}/memory.current", 64 * MiB)
    tree.add(f"{SLICE}/memory.current", 64 * MiB)
    log.clear()
    watch.tick()
    assert log == [] and watch.skipped == 2
    watch.tick()
    assert watch.skipped == 3
    # A neighbour grows: deciding again sees it.
    tree.add(f"{SLICE}/memory.current", 512 * MiB)
    log.clear()
    watch.tick()
    assert names(log) == ["follow.changed", "follow.replanned"]
    assert watch.record.generation == 2 and watch.skipped == 3


def test_follow_changed_names_a_lowered_limit_and_grown_neighbours_apart(
    tree: Tree, tmp_path: Path
) -> None:
    watch, log = start(tree, tmp_path)
    watch.tick()  # the first reading, which the next is compared with
    tree.add(f"{SLICE}/memory.current", 512 * MiB)
    watch.tick()
    assert [f["reason"] for e, f in log if e == "follow.changed"] == ["neighbours grew"]
    log.clear()
    # The slice's limit lowered (an in-place resize): less is available too, but it is the
    # limit that moved (podman's kube play test saw "neighbours grew" for this).
    tree.write(f"{SLICE}/memory.max", int(tree.read(f"{SLICE}/memory.max")) - 512 * MiB)
    watch.tick()
    assert [f["reason"] for e, f in log if e == "follow.changed"] == ["limit changed"]


def test_usage_above_the_new_budget_holds_the_kernel_limit_up(tree: Tree, tmp_path: Path) -> None:
    watch, log = start(tree, tmp_path)
    written = int(tree.read(f"{SCOPE}/memory.max"))
    # Our scope already uses 1.6 GiB when a neighbour takes 1.2 GiB of the slice.
    tree.add(f"{SCOPE}/memory.current", 1100 * MiB)
    tree.add(f"{SLICE}/memory.current", 1100 * MiB + 1200 * MiB)
    watch.tick()
    write_ack(watch.spec.channel, "worker", WORKER, watch.record.generation)
    watch.tick()
    kernel = log[-1][1]["kernel"]
    usage = int(tree.read(f"{SCOPE}/memory.current"))
    # Lowered, but not below usage plus the margin, although the budget is lower.
    assert kernel["action"] == "lowered"
    assert int(tree.read(f"{SCOPE}/memory.max")) == usage + 32 * MiB < written
    assert watch.record.budget < usage + 32 * MiB
    # Dask spills and restarts; usage falls; the kernel limit catches up on its own.
    tree.add(f"{SCOPE}/memory.current", -1000 * MiB)
    tree.add(f"{SLICE}/memory.current", -1000 * MiB)
    log.clear()
    watch.tick()
    assert ("follow.applied", "kernel") in [(e, f.get("action")) for e, f in log]


def test_a_limit_someone_else_sets_is_theirs(tree: Tree, tmp_path: Path) -> None:
    watch, log = start(tree, tmp_path)
    tree.write(f"{SCOPE}/memory.max", 1024 * MiB)
    watch.tick()
    released = [f for e, f in log if e == "follow.changed" and f["action"] == "released"]
    assert released and released[0]["new_limit"] == 1024 * MiB
    # Their limit now caps the plan, and it is never written again, down or up.
    assert watch.record.per_worker < 1024 * MiB
    write_ack(watch.spec.channel, "worker", WORKER, watch.record.generation)
    watch.tick()
    tree.write(f"{SCOPE}/memory.max", "max")
    watch.tick()
    watch.tick()
    assert tree.read(f"{SCOPE}/memory.max") == "max"
    assert all(f["kernel"]["action"] == "released" for e, f in log if e == "follow.applied")


def test_oom_kill_names_the_worker_that_vanished(tree: Tree, tmp_path: Path) -> None:
    watch, log = start(tree, tmp_path)
    tree.write(f"{SCOPE}/memory.events", "low 0\nhigh 4\nmax 9\noom 1\noom_kill 1")
    # The killed worker is still exiting when the counter moves...
    watch.tick()
    assert ("kernel.oom_kill" not in names(log)) and "kernel.memory_event" in names(log)
    # ...and gone (a zombie first, then reaped) by the next tick.
    tree.write(f"proc/{WORKER}/stat", f"{WORKER} (python) Z {NANNY} 1 1 0")
    watch.tick()
    kill = next(f for e, f in log if e == "kernel.oom_kill")
    assert kill["gone_pids"] == [WORKER] and kill["file"] == "memory.events"
    counters = {f["counter"]: f["increase"] for e, f in log if e == "kernel.memory_event"}
    assert counters == {"high": 4, "max": 9, "oom": 1}


def test_oom_kill_waits_ticks_for_a_slow_victim(tree: Tree, tmp_path: Path) -> None:
    # A victim freeing gigabytes under a tight limit can take seconds to exit: the
    # record waits for it (a bounded number of ticks) rather than blaming nobody.
    watch, log = start(tree, tmp_path)
    tree.write(f"{SCOPE}/memory.events", "low 0\nhigh 0\nmax 1\noom 1\noom_kill 1")
    for _ in range(3):
        watch.tick()
    assert "kernel.oom_kill" not in names(log)
    tree.write(f"proc/{WORKER}/stat", f"{WORKER} (python) Z {NANNY} 1 1 0")
    watch.tick()
    kill = next(f for e, f in log if e == "kernel.oom_kill")
    assert kill["gone_pids"] == [WORKER]


def test_oom_kill_without_a_victim_of_ours_is_reported_in_the_end(
    tree: Tree, tmp_path: Path
) -> None:
    watch, log = start(tree, tmp_path)
    tree.write(f"{SCOPE}/memory.events", "low 0\nhigh 0\nmax 1\noom 1\noom_kill 1")
    for _ in range(7):
        watch.tick()
    kills = [f for e, f in log if e == "kernel.oom_kill"]
    assert len(kills) == 1 and kills[0]["gone_pids"] == []


def test_a_removed_channel_stops_the_watch_once(tree: Tree, tmp_path: Path) -> None:
    watch, log = start(tree, tmp_path)
    shutil.rmtree(tmp_path / "channel")
    tree.add(f"{SLICE}/memory.current", 512 * MiB)
    watch.tick()
    failed = [f for e, f in log if e == "follow.failed"]
    assert failed == [{"stage": "channel", "reason": "ENOENT", "following": "stopped"}]
    assert watch() == 3600.0


def test_workers_not_started_yet_take_the_new_record_at_their_set_up(
    tree: Tree, tmp_path: Path
) -> None:
    # Issue 25: a sibling arriving while our workers still start must not wait for them;
    # their preloads read the current record before they register.
    watch, log = start(tree, tmp_path, started=False)
    tree.add(f"{SLICE}/memory.current", 512 * MiB)
    watch.tick()
    assert names(log) == ["follow.changed", "follow.replanned", "follow.applied"]
    assert log[-1][1]["kernel"]["action"] == "lowered"
    assert int(tree.read(f"{SCOPE}/memory.max")) == watch.record.budget
