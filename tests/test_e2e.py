"""End to end: a real scheduler on loopback and dask-safe-worker in a 1 GiB test cgroup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest

from cgroup_util import KernelCgroup
from dask_safe_worker.events import SCHEMA_VERSION
from scheduler_util import audit_events, scheduler, wait_for_workers

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]

GiB, MiB = 2**30, 2**20
DSW = [sys.executable, "-m", "dask_safe_worker"]


def start_safe_worker(
    cg: KernelCgroup, started: set[int], address: str, plan_file: Path, *args: str
) -> subprocess.Popen[str]:
    argv = [
        *DSW,
        "--log-format",
        "json",
        "--plan-file",
        str(plan_file),
        address,
        "--no-dashboard",
        *args,
    ]
    proc = subprocess.Popen(
        cg.enter_command(argv), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    started.add(proc.pid)
    return proc


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


@pytest.mark.parametrize("nworkers", [1, 2])
def test_worker_limit_equals_plan(
    kernel_cgroup: KernelCgroup, started_pids: set[int], tmp_path: Path, nworkers: int
) -> None:
    kernel_cgroup.set_limit(GiB)
    plan_file = tmp_path / "plan.json"
    with scheduler() as address:
        proc = start_safe_worker(
            kernel_cgroup,
            started_pids,
            address,
            plan_file,
            "--reserve",
            "64MiB",
            "--nworkers",
            str(nworkers),
            "--nthreads",
            "1",
        )
        try:
            limits = wait_for_workers(address, nworkers)
        finally:
            stderr = stop(proc)
    doc = json.loads(plan_file.read_text())
    plan = doc["plan"]
    assert len(limits) == nworkers
    assert set(limits.values()) == {plan["effective_per_worker"]}
    assert plan["budget"] == GiB - 64 * MiB
    assert plan["limiting"] == kernel_cgroup.relative()
    # Sole occupant of a cgroup the test made, and the reserve puts the budget below the
    # cgroup's own limit: the lower kernel limit went there.
    outcome = doc["cgroup_write"]["outcome"]
    assert outcome["strategy"] == "own" and outcome["written"]
    assert outcome["read_back"] == kernel_cgroup.limit() <= plan["budget"]

    events = audit_events(stderr)
    names = [e["event"] for e in events]
    for required in (
        "cli.started",
        "measure.done",
        "plan.made",
        "cgroup.write.attempt",
        "cgroup.write.result",
        "cgroup.write.outcome",
        "plan.file.written",
        "worker.argv",
    ):
        assert required in names, required
    # Supervised by default (following); exec'd with --no-follow.
    assert "init.exec" in names
    assert all(e["schema"] == SCHEMA_VERSION for e in events)
    argv = cast(list[str], next(e for e in events if e["event"] == "worker.argv")["argv"])
    # Before the preloads that following adds at the end.
    assert argv[argv.index("--memory-limit") + 1] == str(plan["memory_limit_arg"])


def test_user_memory_limit_arrives_unchanged(
    kernel_cgroup: KernelCgroup, started_pids: set[int], tmp_path: Path
) -> None:
    kernel_cgroup.set_limit(GiB)
    plan_file = tmp_path / "plan.json"
    with scheduler() as address:
        proc = start_safe_worker(
            kernel_cgroup, started_pids, address, plan_file, "--memory-limit", "300MiB"
        )
        try:
            limits = wait_for_workers(address, 1)
        finally:
            stderr = stop(proc)
    assert list(limits.values()) == [300 * MiB]
    plan = json.loads(plan_file.read_text())["plan"]
    assert plan["memory_limit_arg"] is None and plan["user_fits"] is True
    argv = cast(
        list[str], next(e for e in audit_events(stderr) if e["event"] == "worker.argv")["argv"]
    )
    assert argv.count("--memory-limit") == 1 and "300MiB" in argv


def test_own_limit_already_at_budget_is_left_alone(
    kernel_cgroup: KernelCgroup, started_pids: set[int], tmp_path: Path
) -> None:
    kernel_cgroup.set_limit(GiB)
    plan_file = tmp_path / "plan.json"
    with scheduler() as address:
        proc = start_safe_worker(kernel_cgroup, started_pids, address, plan_file)
        try:
            limits = wait_for_workers(address, 1)
        finally:
            stop(proc)
    doc = json.loads(plan_file.read_text())
    assert list(limits.values()) == [doc["plan"]["effective_per_worker"]]
    assert doc["plan"]["budget"] == GiB
    assert doc["cgroup_write"]["outcome"]["reason"] == "existing_lower"
    assert kernel_cgroup.limit() == GiB
