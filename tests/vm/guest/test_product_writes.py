"""The product's cgroup v2 write policy against the real kernel (issue 4, tests 1-5).

Each test runs the real `dask-safe-worker` CLI inside cgroups it created, with a
stand-in worker command that records where it ran and with which arguments, and then
reads what the kernel holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from guest_cgroups import (
    CGROUP2,
    Cgroup,
    MiB,
    Processes,
    memory_hog,
    page_floor,
    remove_tree,
    run_safe_worker,
)


def _memory_limit_arg(args: list[str]) -> int:
    assert "--memory-limit" in args, args
    return int(args[args.index("--memory-limit") + 1])


# 1. Sole occupant


def test_sole_occupant_writes_memory_max(base: Cgroup, procs: Processes, tmp_path: Path) -> None:
    sole = base.child("sole")
    assert sole.limit() == "max"
    run = run_safe_worker(procs, sole, [], tmp_path)
    assert run.returncode == 0, run.explain()

    budget = run.plan["budget"]
    outcome = run.outcome
    assert (outcome["strategy"], outcome["written"], outcome["enforced"]) == ("own", True, True)
    assert outcome["target"] == sole.cgroup_path
    # Read back: the kernel holds the budget rounded down to whole pages.
    assert int(sole.limit()) == outcome["read_back"] == page_floor(budget)
    results = [e for e in run.named("cgroup.write.result") if "file" not in e]
    assert [(e["requested"], e["read_back"]) for e in results] == [(budget, page_floor(budget))]
    # The worker ran in the limited cgroup, with the planned per-worker limit.
    assert run.worker_cgroup == sole.cgroup_path
    assert _memory_limit_arg(run.worker_args) == run.plan["per_worker"]


def test_existing_lower_limit_is_never_raised(
    base: Cgroup, procs: Processes, tmp_path: Path
) -> None:
    lower = base.child("lower")
    lower.write("memory.max", 512 * MiB)
    run = run_safe_worker(procs, lower, [], tmp_path)
    assert run.returncode == 0, run.explain()
    assert run.plan["budget"] <= 512 * MiB
    assert run.outcome["written"] is False
    assert run.outcome["reason"] == "existing_lower"
    assert lower.limit() == str(512 * MiB)


def test_existing_limit_on_parent_is_never_raised(
    base: Cgroup, procs: Processes, tmp_path: Path
) -> None:
    parent = base.child("parent")
    parent.write("memory.max", 512 * MiB)
    parent.enable_memory()
    leaf = parent.child("leaf")
    run = run_safe_worker(procs, leaf, [], tmp_path)
    assert run.returncode == 0, run.explain()
    assert run.plan["limiting"] == parent.cgroup_path
    assert run.outcome["target"] == leaf.cgroup_path
    assert int(leaf.limit()) <= 512 * MiB
    assert parent.limit() == str(512 * MiB)


def test_reserve_lowers_an_existing_limit(base: Cgroup, procs: Processes, tmp_path: Path) -> None:
    limited = base.child("limited")
    limited.write("memory.max", 512 * MiB)
    run = run_safe_worker(procs, limited, ["--reserve", "64MiB"], tmp_path)
    assert run.returncode == 0, run.explain()
    budget = run.plan["budget"]
    assert budget <= 512 * MiB - 64 * MiB
    assert run.outcome["written"] is True
    assert int(limited.limit()) == page_floor(budget)


# 2. Nested slice/scope with a lower limit on the slice


def test_nested_scope_takes_the_slices_headroom(
    base: Cgroup, procs: Processes, tmp_path: Path
) -> None:
    slice_ = base.child("system.slice")
    slice_.write("memory.max", 600 * MiB)
    slice_.enable_memory()
    scope = slice_.child("x.scope")
    scope.write("memory.max", 1024 * MiB)
    # Another service in the same slice holds 100 MiB of anonymous memory (its file
    # cache is reclaimable, so the plan may count on that part).
    neighbour = slice_.child("neighbour.scope")
    held = 100 * MiB
    memory_hog(procs, neighbour, held)

    dry = run_safe_worker(procs, scope, [], tmp_path, dry_run=True)
    assert dry.returncode == 0, dry.explain()
    assert dry.document is not None
    levels = {lvl["path"]: lvl for lvl in dry.document["measurement"]["cgroup_levels"]}
    assert levels[scope.cgroup_path]["limit"] == 1024 * MiB
    assert levels[slice_.cgroup_path]["limit"] == 600 * MiB
    assert dry.plan["limiting"] == slice_.cgroup_path
    assert dry.plan["budget"] <= 600 * MiB - held
    # --dry-run changes nothing.
    assert scope.limit() == str(1024 * MiB)
    assert dry.report == []

    run = run_safe_worker(procs, scope, [], tmp_path)
    assert run.returncode == 0, run.explain()
    assert run.plan["limiting"] == slice_.cgroup_path
    assert run.outcome["target"] == scope.cgroup_path
    # The leaf's own, higher limit is lowered to what the slice really leaves.
    assert int(scope.limit()) == page_floor(run.plan["budget"]) <= 600 * MiB - held
    assert slice_.limit() == str(600 * MiB)


# 3. Container-like cgroup namespace under nsdelegate


def test_container_root_gets_the_limit_on_a_child(
    base: Cgroup, procs: Processes, tmp_path: Path
) -> None:
    container = base.child("container")
    container.write("memory.max", 700 * MiB)
    # A reserve makes the budget lower than the container's limit, so a write is needed.
    run = run_safe_worker(procs, container, ["--reserve", "64MiB"], tmp_path, container=True)
    assert run.returncode == 0, run.explain()

    # Our own cgroup is the namespace root: the kernel refuses, and the child strategy
    # takes over.
    refused = [e for e in run.named("cgroup.write.failed") if e.get("strategy") == "own"]
    assert [e["reason"] for e in refused] == ["EPERM"], run.events
    outcome = run.outcome
    assert (outcome["strategy"], outcome["written"], outcome["enforced"]) == ("child", True, True)
    assert outcome["target"] == "/dask-safe-worker"
    leaf = Cgroup(container.path / "dask-safe-worker")
    assert int(leaf.limit()) == outcome["read_back"] == page_floor(run.plan["budget"])
    assert run.plan["budget"] <= 700 * MiB - 64 * MiB
    # The worker runs in that leaf; the container's own limit is untouched.
    assert run.worker_cgroup == "/dask-safe-worker"
    assert container.limit() == str(700 * MiB)
    assert "memory" in container.read("cgroup.subtree_control").split()


def test_a_leftover_child_is_removed_and_made_again(
    base: Cgroup, procs: Processes, tmp_path: Path
) -> None:
    # An exec'd worker cannot remove its child when it ends. The next start removes a
    # child that no running instance claims (an flock on its directory, which cgroup2
    # takes like any directory) and that holds no process, then makes its own.
    container = base.child("container")
    container.write("memory.max", 700 * MiB)
    container.child("dask-safe-worker")
    run = run_safe_worker(procs, container, ["--reserve", "64MiB"], tmp_path, container=True)
    assert run.returncode == 0, run.explain()
    moves = [
        (e["event"], e["target"])
        for e in run.events
        if e["event"] in ("cgroup.child.removed", "cgroup.child.created")
    ]
    assert moves[:2] == [
        ("cgroup.child.removed", "/dask-safe-worker"),
        ("cgroup.child.created", "/dask-safe-worker"),
    ], run.events
    assert run.worker_cgroup == "/dask-safe-worker"


# 3b. A plain VM without systemd: everything in the root cgroup


def test_root_cgroup_gets_the_limit_on_a_child(
    cgroup2_root: Cgroup, procs: Processes, tmp_path: Path
) -> None:
    # The root has no memory.max and holds every process, but it is exempt from the
    # no-internal-process rule: +memory is allowed there, so the child strategy works.
    child = Cgroup(CGROUP2 / "dask-safe-worker")
    assert not child.path.exists()
    try:
        run = run_safe_worker(procs, cgroup2_root, [], tmp_path)
        assert run.returncode == 0, run.explain()
        assert run.plan["limiting"] == "host"
        outcome = run.outcome
        assert (outcome["strategy"], outcome["written"]) == ("child", True)
        assert outcome["target"] == "/dask-safe-worker"
        assert int(child.limit()) == page_floor(run.plan["budget"])
        assert run.worker_cgroup == "/dask-safe-worker"
    finally:
        procs.end_all()
        remove_tree(child.path)


# 4. A cgroup shared with another process


@pytest.mark.parametrize("layout", ["plain", "container"])
def test_shared_cgroup_writes_nothing_and_passes_the_flag(
    base: Cgroup, procs: Processes, tmp_path: Path, layout: str
) -> None:
    shared = base.child("shared")
    shared.write("memory.max", 700 * MiB)
    other = procs.popen(["sh", "-c", f"echo $$ > {shared.path}/cgroup.procs && exec sleep 3600"])
    while other.pid not in shared.pids():
        assert other.poll() is None, "the other process did not start"

    run = run_safe_worker(
        procs, shared, ["--reserve", "64MiB"], tmp_path, container=layout == "container"
    )
    assert run.returncode == 0, run.explain()
    outcome = run.outcome
    # v2's no-internal-process rule: +memory cannot be enabled for a child while the
    # other process stays in our cgroup.
    assert (outcome["written"], outcome["enforced"], outcome["reason"]) == (False, False, "EBUSY")
    skipped = [e for e in run.named("cgroup.write.skipped") if e.get("reason") == "shared_cgroup"]
    assert skipped, run.events
    # Nothing written, nothing left behind, and the worker ran where it started ...
    assert shared.limit() == str(700 * MiB)
    assert "memory" not in shared.read("cgroup.subtree_control").split()
    assert not (shared.path / "dask-safe-worker").exists()
    expected_cgroup = "/" if layout == "container" else shared.cgroup_path
    assert run.worker_cgroup == expected_cgroup
    # ... with the flag fallback: dask's own limit is still the planned one.
    assert _memory_limit_arg(run.worker_args) == run.plan["per_worker"]
    assert other.poll() is None


def test_shared_cgroup_with_write_required_exits_4(
    base: Cgroup, procs: Processes, tmp_path: Path
) -> None:
    shared = base.child("shared")
    other = procs.popen(["sh", "-c", f"echo $$ > {shared.path}/cgroup.procs && exec sleep 3600"])
    while other.pid not in shared.pids():
        assert other.poll() is None, "the other process did not start"
    run = run_safe_worker(procs, shared, ["--cgroup-write", "required"], tmp_path)
    assert run.returncode == 4, run.explain()
    assert run.report == [], "the worker must not start"
    assert shared.limit() == "max"


# 5. memory.high and memory.swap.max


def test_memory_high_and_swap_max(base: Cgroup, procs: Processes, tmp_path: Path) -> None:
    sole = base.child("sole")
    options = ["--memory-high-fraction", "0.9", "--swap-max", "64MiB"]
    run = run_safe_worker(procs, sole, options, tmp_path)
    assert run.returncode == 0, run.explain()
    budget = run.plan["budget"]
    assert int(sole.limit()) == page_floor(budget)
    assert int(sole.read("memory.high")) == page_floor(int(budget * 0.9))
    assert sole.read("memory.swap.max") == str(64 * MiB)
    extras = {e["file"]: e for e in run.named("cgroup.write.result") if "file" in e}
    assert extras["memory.high"]["read_back"] == sole.read("memory.high")
    assert extras["memory.swap.max"]["read_back"] == str(64 * MiB)


def test_swap_keep_and_high_off_leave_both_alone(
    base: Cgroup, procs: Processes, tmp_path: Path
) -> None:
    sole = base.child("sole")
    options = ["--memory-high-fraction", "0", "--swap-max", "keep"]
    run = run_safe_worker(procs, sole, options, tmp_path)
    assert run.returncode == 0, run.explain()
    assert run.outcome["written"] is True
    assert sole.read("memory.high") == "max"
    assert sole.read("memory.swap.max") == "max"


# 6. Issue 24: restarts in one cgroup (row 5); a refused child leaves nothing (row 8)


def test_restarts_plan_from_the_operators_limit(
    base: Cgroup, procs: Processes, tmp_path: Path
) -> None:
    # As sole occupant each start writes memory.max (and memory.high) on its own cgroup;
    # the next start there plans from the operator's 600 MiB, not from ours.
    sole = base.child("sole")
    sole.write("memory.max", 600 * MiB)
    options = ["--reserve", "10%", "--memory-high-fraction", "0.9"]
    seen = []
    for _ in range(3):
        run = run_safe_worker(procs, sole, options, tmp_path)
        assert run.returncode == 0, run.explain()
        assert run.outcome["strategy"] == "own", run.explain()
        seen.append((sole.limit(), sole.read("memory.high")))
    assert seen == [seen[0]] * 3
    assert abs(int(seen[0][0]) - 0.9 * 600 * MiB) <= 4096
    # Someone else's value since is the operator's, and planned from.
    sole.write("memory.max", 500 * MiB)
    run = run_safe_worker(procs, sole, options, tmp_path)
    assert run.returncode == 0, run.explain()
    assert abs(int(sole.limit()) - 0.9 * 500 * MiB) <= 4096


def test_write_required_below_the_margin_leaves_no_child(
    cgroup2_root: Cgroup, procs: Processes, tmp_path: Path
) -> None:
    # The root cgroup: no memory.max of its own (ENOENT), so the child strategy takes
    # over and, +memory being allowed there, gets as far as the child's own check. A
    # budget below the write margin is refused before the child is made, so
    # --cgroup-write required exits 4 with nothing made or entered. (A container root
    # never gets there: its own usage is checked first.)
    child = Cgroup(CGROUP2 / "dask-safe-worker")
    assert not child.path.exists()
    options = [
        *("--cgroup-write", "required", "--reserve", "0.99"),
        *("--min-worker-memory", "1MiB", "--nanny-allowance", "0"),
    ]
    try:
        run = run_safe_worker(procs, cgroup2_root, options, tmp_path)
        assert run.returncode == 4, run.explain()
        assert "below_usage" in run.stderr
        assert run.report == [], "the worker must not start"
        assert not child.path.exists()
        assert not run.named("cgroup.moved") and not run.named("cgroup.child.created")
    finally:
        procs.end_all()
        remove_tree(child.path)
