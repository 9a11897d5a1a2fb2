"""End to end on cgroup v2 (issue 4, tests 6 and 7): a real scheduler on 127.0.0.1 in the
VM, and dask-safe-worker starting a real nanny and worker in a limited cgroup.

The layout is the "VM with agents" one of the benchmark: a cgroup M plays the machine
(memory.max 640 MiB); inside it an agent process holds memory in its own cgroup, and
the worker's cgroup W has no limit of its own until dask-safe-worker writes one. The
scheduler runs outside M. One cluster serves both tests, because starting it costs about
a minute in this software-emulated guest.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from guest_cgroups import (
    Cgroup,
    MiB,
    Processes,
    make_cgroup_tree,
    memory_hog,
    page_floor,
    start_safe_worker,
    start_scheduler,
)

MACHINE_LIMIT = 640 * MiB
AGENT_MEMORY = 64 * MiB
# Waits for processes in a software-emulated guest; passing them is a failure, not a
# measurement.
START_TIMEOUT = 300.0


@dataclass
class Cluster:
    machine: Cgroup
    agent_cg: Cgroup
    worker_cg: Cgroup
    agent: subprocess.Popen[str]
    scheduler: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]
    client: Any
    plan_file: Path
    logs: Path

    def plan(self) -> dict[str, Any]:
        import json

        document: dict[str, Any] = json.loads(self.plan_file.read_text())
        return document

    def run(self, fn: Callable[..., Any]) -> list[Any]:
        return list(self.client.run(fn).values())


def _cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text().strip().removeprefix("0::")


@pytest.fixture(scope="module")
def cluster(cgroup2_root: Cgroup) -> Iterator[Cluster]:
    logs = Path(os.environ["DSW_VM_RESULTS"])
    procs = Processes()
    with make_cgroup_tree(procs, "e2e") as base:
        machine = base.child("machine")
        machine.write("memory.max", MACHINE_LIMIT)
        machine.enable_memory()
        agent_cg = machine.child("agent")
        agent = memory_hog(procs, agent_cg, AGENT_MEMORY)
        worker_cg = machine.child("worker")

        scheduler, address = start_scheduler(procs, logs / "scheduler.log")
        plan_file = logs / "e2e-plan.json"
        worker = start_safe_worker(procs, worker_cg, address, plan_file, logs / "worker.log")

        from distributed import Client

        client = Client(address, timeout=START_TIMEOUT)  # type: ignore[no-untyped-call,unused-ignore]
        try:
            client.wait_for_workers(1, timeout=START_TIMEOUT)
            yield Cluster(
                machine, agent_cg, worker_cg, agent, scheduler, worker, client, plan_file, logs
            )
        finally:
            client.close()  # type: ignore[no-untyped-call,unused-ignore]


# 6. The worker's dask limit is the plan's


def test_worker_memory_limit_equals_the_plan(cluster: Cluster) -> None:
    document = cluster.plan()
    plan = document["plan"]
    outcome = document["cgroup_write"]["outcome"]
    # M's headroom (its limit less the agent's memory) sets the budget, not MemAvailable.
    assert plan["limiting"] == cluster.machine.cgroup_path
    assert plan["budget"] <= MACHINE_LIMIT - AGENT_MEMORY
    # W was ours alone: the budget became its memory.max.
    assert (outcome["strategy"], outcome["target"]) == ("own", cluster.worker_cg.cgroup_path)
    assert int(cluster.worker_cg.limit()) == page_floor(plan["budget"])

    argv = document["argv"]
    assert int(argv[argv.index("--memory-limit") + 1]) == plan["per_worker"]
    limits = cluster.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
    assert limits == [plan["effective_per_worker"]] == [plan["per_worker"]]
    # The nanny (the exec'd dask-safe-worker) and the worker both run in W.
    worker_pids = cluster.run(os.getpid)
    assert set(worker_pids) | {cluster.worker.pid} <= set(cluster.worker_cg.pids())


# 7. Containment: an allocation past the limit is killed inside W, and only there


def test_allocation_past_the_limit_is_contained(cluster: Cluster) -> None:
    from distributed.scheduler import KilledWorker

    (old_pid,) = cluster.run(os.getpid)
    kills_before = cluster.worker_cg.events()["oom_kill"]
    too_much = int(cluster.worker_cg.limit()) + 64 * MiB

    def allocate(n: int) -> int:
        return len(b"\x01" * n)

    future = cluster.client.submit(allocate, too_much, pure=False)
    with pytest.raises(KilledWorker):
        future.result(timeout=START_TIMEOUT)

    # The kernel killed inside W; M's hierarchical count shows no kill anywhere else.
    kills = cluster.worker_cg.events()["oom_kill"]
    assert kills > kills_before
    assert cluster.machine.events()["oom_kill"] == kills
    assert cluster.agent_cg.events()["oom_kill"] == 0
    # The agent, the scheduler and the nanny all survive.
    assert cluster.agent.poll() is None
    assert cluster.scheduler.poll() is None
    assert cluster.worker.poll() is None

    # The nanny restarts the worker, again inside W.
    new_pids: list[int] = []
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            new_pids = [p for p in cluster.run(os.getpid) if p != old_pid]
        except OSError:
            new_pids = []
        if new_pids:
            break
        time.sleep(1)
    assert new_pids, f"the nanny did not restart the worker (logs: {cluster.logs})"
    assert _cgroup_of(new_pids[0]) == cluster.worker_cg.cgroup_path
    assert cluster.run(lambda dask_worker: dask_worker.memory_manager.memory_limit) == [
        cluster.plan()["plan"]["per_worker"]
    ]
