"""dask-safe-worker as PID 1 in a real runc container, against a real scheduler on 127.0.0.1.

The container runs the image's own ENTRYPOINT (read from docker/Dockerfile) with the venv on
PATH. Schedulers and clients live on the host; the container has no network namespace.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from oci import Container, GiB, MiB, worker_entrypoint_argv

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

pytestmark = pytest.mark.container

RESERVE = 256 * MiB
# Guards against hangs only; no test asserts on how long anything took.
HANG_GUARD_S = 120.0


def worker_argv(scheduler: str, *ours: str, name: str = "w") -> list[str]:
    return worker_entrypoint_argv(
        [
            "--plan-file",
            "/tmp/plan.json",
            *ours,
            scheduler,
            "--host",
            "127.0.0.1",
            "--no-dashboard",
            "--nthreads",
            "1",
            "--name",
            name,
        ]
    )


def remote(source: str) -> Callable[..., Any]:
    """A function defined outside any importable module, so that cloudpickle sends it by
    value: the worker inside the container cannot import this test module."""
    namespace: dict[str, Any] = {"__name__": "remote_task"}
    exec(textwrap.dedent(source), namespace)
    fn = next(v for k, v in namespace.items() if callable(v) and not k.startswith("__"))
    return fn  # type: ignore[no-any-return]


def event(c: Container, name: str) -> dict[str, Any]:
    found = [e for e in c.events() if e.get("event") == name]
    assert len(found) == 1, f"expected one {name} event, got {found}\n{c.stderr()}"
    return found[0]


def wait_until(predicate: Callable[[], bool], what: str, c: Container | None = None) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not predicate():
        if c is not None and c.proc is not None and c.proc.poll() is not None:
            raise AssertionError(
                f"container exited ({c.proc.returncode}) while waiting for {what}:\n{c.stderr()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def start_worker(c: Container, client: Any) -> str:
    """Start the container and wait until its one worker registered; its address."""
    c.start()
    c.wait_running()
    wait_until(lambda: len(client.scheduler_info()["workers"]) == 1, "worker registered", c)
    return str(next(iter(client.scheduler_info()["workers"])))


def memory_limits(client: Any) -> dict[str, int]:
    limits: dict[str, int] = client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
    return limits


def stop_gracefully(c: Container) -> int:
    c.kill("TERM")
    return c.wait()


def host_limit(c: Container) -> int:
    return int((c.host_cgroup_dir / "memory.limit_in_bytes").read_text())


# 1 ----------------------------------------------------------------------------------------
def test_read_only_cgroupfs_plans_from_the_container_limit_and_falls_back_on_erofs(
    make_container: Callable[..., Container], scheduler_address: str, client: Any
) -> None:
    # The reserve puts the budget below the container's limit, so a write is attempted.
    c = make_container(worker_argv(scheduler_address, "--reserve", "256MiB"), memory_limit=GiB)
    start_worker(c, client)
    limits = memory_limits(client)

    measured = event(c, "measure.done")
    plan = event(c, "plan.made")
    # PID 1 sees its own cgroup as the root of the namespace, limited to 1 GiB.
    assert measured["cgroup_path"] == "/"
    assert measured["cgroup_levels"][0]["limit"] == GiB
    assert measured["limiting"] == "/"
    # The container limit, not the host's MemAvailable, decides.
    assert plan["available"] <= GiB < measured["mem_available"]
    assert plan["budget"] == plan["own_working_set"] + plan["available"] - RESERVE

    outcome = event(c, "cgroup.write.outcome")
    assert outcome["reason"] == "EROFS"
    assert outcome["enforced"] is False and outcome["written"] is False
    failed = [e for e in c.events() if e["event"] == "cgroup.write.failed"]
    assert failed and all(e["reason"] == "EROFS" for e in failed)
    assert host_limit(c) == GiB, "a read-only cgroupfs must leave the limit alone"

    assert list(limits.values()) == [plan["per_worker"]]
    assert plan["memory_limit_arg"] == plan["per_worker"]
    document = json.loads((c.shared / "plan.json").read_text())
    assert document["plan"]["per_worker"] == plan["per_worker"]
    assert document["cgroup_write"]["outcome"]["reason"] == "EROFS"

    assert stop_gracefully(c) == 0


def test_without_a_reserve_the_container_limit_already_is_the_budget(
    make_container: Callable[..., Container], scheduler_address: str, client: Any
) -> None:
    # Test 1 needs --reserve: with none, budget = working set + (limit - working set), the
    # container's own limit, so there is nothing to lower and no write is even attempted.
    c = make_container(worker_argv(scheduler_address), memory_limit=GiB)
    start_worker(c, client)
    limits = memory_limits(client)
    plan = event(c, "plan.made")
    outcome = event(c, "cgroup.write.outcome")
    assert plan["budget"] == GiB
    assert outcome["reason"] == "existing_lower" and outcome["enforced"] is True
    assert not [e for e in c.events() if e["event"] == "cgroup.write.failed"]
    assert list(limits.values()) == [plan["per_worker"]]
    assert stop_gracefully(c) == 0


# 2 ----------------------------------------------------------------------------------------
def test_rw_cgroupfs_gets_the_kernel_limit_at_the_namespace_root(
    make_container: Callable[..., Container], scheduler_address: str, client: Any
) -> None:
    c = make_container(
        worker_argv(scheduler_address, "--reserve", "256MiB"),
        memory_limit=GiB,
        cgroupfs_rw=True,
    )
    start_worker(c, client)
    limits = memory_limits(client)
    plan = event(c, "plan.made")
    outcome = event(c, "cgroup.write.outcome")
    assert outcome["enforced"] is True and outcome["written"] is True
    assert outcome["strategy"] == "own" and outcome["target"] == "/"
    assert outcome["requested"] == plan["budget"]
    # Read back from outside: the container's cgroup itself now carries the budget
    # (the kernel rounds down to whole pages).
    outside = host_limit(c)
    assert outside == outcome["read_back"]
    assert plan["budget"] - 4096 < outside <= plan["budget"] < GiB
    assert not [p for p in c.host_cgroup_dir.iterdir() if p.is_dir()], "no child cgroup"
    assert list(limits.values()) == [plan["per_worker"]]
    assert stop_gracefully(c) == 0


# 3 ----------------------------------------------------------------------------------------
def test_runc_kill_term_closes_the_worker_gracefully(
    make_container: Callable[..., Container], scheduler_address: str, client: Any
) -> None:
    c = make_container(worker_argv(scheduler_address), memory_limit=GiB)
    address = start_worker(c, client)

    c.kill("TERM")
    code = c.wait()

    # Documented in docs/init.md: a graceful close on SIGTERM exits 0.
    assert code == 0, c.stderr()
    forwarded = [e for e in c.events() if e["event"] == "init.signal.forwarded"]
    assert [(e["signal"], e["delivered"]) for e in forwarded] == [("SIGTERM", True)]
    assert event(c, "init.child.exited")["code"] == 0
    assert event(c, "init.exit")["code"] == 0
    assert "Reason: signal-15" in c.stderr()

    # The scheduler saw the worker announce its close, then leave.
    wait_until(lambda: not client.scheduler_info()["workers"], "worker gone from scheduler")
    actions = [msg.get("action") for _, msg in client.get_events(address)]
    assert "closing-worker" in actions and "remove-worker" in actions
    assert actions.index("closing-worker") < actions.index("remove-worker")
    closing = next(
        msg for _, msg in client.get_events(address) if msg["action"] == "closing-worker"
    )
    assert closing["reason"] == "signal-15"


def test_a_second_term_ends_a_slow_close_at_once(
    make_container: Callable[..., Container], scheduler_address: str, client: Any
) -> None:
    c = make_container(worker_argv(scheduler_address), memory_limit=GiB)
    start_worker(c, client)
    # A running task holds the close up: the nanny waits 8 s before killing the process.
    busy = client.submit(time.sleep, 3600, pure=False)
    wait_until(lambda: bool(client.processing()) and any(client.processing().values()), "task", c)

    c.kill("TERM")
    # distributed has handled the first TERM and restored the default handler.
    wait_until(lambda: "Stopping worker at" in c.stderr(), "graceful close begun", c)
    c.kill("TERM")
    code = c.wait()

    assert code == 128 + 15, c.stderr()
    forwarded = [e for e in c.events() if e["event"] == "init.signal.forwarded"]
    assert [(e["signal"], e["delivered"]) for e in forwarded] == [("SIGTERM", True)] * 2
    exited = event(c, "init.child.exited")
    assert exited["signal"] == "SIGTERM" and exited["code"] == 143
    assert "killing" not in c.stderr(), "ended by our second TERM, not the nanny's timeout"
    busy.cancel()


def test_bare_supervisor_as_pid1_forwards_term(make_container: Callable[..., Container]) -> None:
    # `sleep` has no TERM handler: exec'd as PID 1 it would ignore `runc kill TERM`.
    c = make_container(
        [sys.executable, "-m", "dask_safe_worker.supervise", "sleep", "3600"], memory_limit=None
    )
    c.start()
    c.wait_running()
    wait_until(lambda: any(e["event"] == "init.start" for e in c.events()), "supervisor up", c)
    c.kill("TERM")
    assert c.wait() == 128 + 15
    assert event(c, "init.start")["pid1"] is True
    assert (
        event(c, "init.signal.forwarded")["target_pid"]
        == event(c, "init.child.exited")["child_pid"]
    )


# 4 ----------------------------------------------------------------------------------------
DOUBLE_FORK = """
def double_fork(go):
    import subprocess
    # task -> sh -> backgrounded subshell; sh exits at once, orphaning the sleeper.
    script = f"(while [ ! -e {go} ]; do sleep 0.05; done) </dev/null >/dev/null 2>&1 & echo $!"
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    return int(out.stdout)
"""

PROC_STAT = """
def proc_stat(pid):
    try:
        raw = open(f"/proc/{pid}/stat").read()
    except FileNotFoundError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1])
"""

ZOMBIES = """
def zombies():
    import os
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                raw = open(f"/proc/{name}/stat").read()
            except FileNotFoundError:
                continue
            fields = raw[raw.rindex(")") + 2:].split()
            if fields[0] == "Z":
                found.append((int(name), int(fields[1])))
    return found
"""


def test_an_orphan_of_a_task_is_reaped_by_pid1(
    make_container: Callable[..., Container], scheduler_address: str, client: Any
) -> None:
    c = make_container(worker_argv(scheduler_address), memory_limit=GiB)
    start_worker(c, client)
    proc_stat, zombies = remote(PROC_STAT), remote(ZOMBIES)

    orphan = client.submit(remote(DOUBLE_FORK), "/tmp/orphan-go", pure=False).result()
    stat = client.submit(proc_stat, orphan, pure=False).result()
    assert stat is not None and stat[1] == 1, "the orphan was reparented to our PID 1"

    (c.shared / "orphan-go").touch()
    # Unreaped, it would stay a zombie of PID 1 for as long as the container lives.
    wait_until(
        lambda: client.submit(proc_stat, orphan, pure=False).result() is None,
        "orphan reaped",
        c,
    )
    assert client.submit(zombies, pure=False).result() == []
    reaped = [e for e in c.events() if e["event"] == "init.orphan.reaped"]
    assert orphan in [e["child_pid"] for e in reaped]
    assert stop_gracefully(c) == 0


# 5 ----------------------------------------------------------------------------------------
def test_worker_exit_code_becomes_the_container_exit_code(
    make_container: Callable[..., Container], closed_port: int
) -> None:
    argv = worker_argv(f"tcp://127.0.0.1:{closed_port}")
    c = make_container([*argv, "--death-timeout", "5"], memory_limit=GiB)
    code = c.run()
    exited = event(c, "init.child.exited")
    # distributed's CLI exits 1 when it times out reaching the scheduler.
    assert exited["code"] == 1
    assert code == exited["code"] == event(c, "init.exit")["code"]
    assert "signal" not in exited


# 6 ----------------------------------------------------------------------------------------
def test_non_root_user_gets_eacces_then_a_clean_fallback(
    make_container: Callable[..., Container], scheduler_address: str, client: Any
) -> None:
    # rw cgroupfs: only the file permissions stand in the way, as with `docker run --user`
    # in a runtime that would otherwise let root write.
    c = make_container(
        worker_argv(scheduler_address, "--reserve", "256MiB"),
        memory_limit=GiB,
        cgroupfs_rw=True,
        uid=1000,
        gid=1000,
    )
    start_worker(c, client)
    limits = memory_limits(client)
    plan = event(c, "plan.made")
    outcome = event(c, "cgroup.write.outcome")
    assert outcome["reason"] == "EACCES"
    assert outcome["enforced"] is False and outcome["written"] is False
    assert "Traceback" not in c.stderr()
    assert host_limit(c) == GiB
    assert not [p for p in c.host_cgroup_dir.iterdir() if p.is_dir()], "no child cgroup"
    assert list(limits.values()) == [plan["per_worker"]]
    assert stop_gracefully(c) == 0


# 7 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        ["--reserve", "lots"],
        ["--cgroup-write", "sometimes"],
        ["--nworkers", "many"],
    ],
    ids=["reserve", "cgroup-write", "worker-arg"],
)
def test_bad_options_exit_2_and_touch_nothing(
    make_container: Callable[..., Container],
    scheduler_address: str,
    client: Any,
    bad: list[str],
) -> None:
    c = make_container(worker_argv(scheduler_address, *bad), memory_limit=GiB, cgroupfs_rw=True)
    # --keep: the stopped container's cgroup stays for inspection until the finalizer.
    code = c.run(keep=True)
    assert code == 2, c.stderr()
    names = [e.get("event") for e in c.events()]
    # worker.args.checked is the check that refused, before any action.
    assert not [
        n
        for n in names
        if n is not None
        and n != "worker.args.checked"
        and n.startswith(("cgroup.", "init.", "worker.", "plan.file"))
    ]
    assert not (c.shared / "plan.json").exists()
    assert host_limit(c) == GiB
    assert not [p for p in c.host_cgroup_dir.iterdir() if p.is_dir()]
    assert client.scheduler_info()["workers"] == {}
    assert not [m for _, m in client.get_events("all") if m.get("action") == "add-worker"]
