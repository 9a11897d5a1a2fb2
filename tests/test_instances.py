"""Issue 13 rows 12b and 12c: several instances in one shared cgroup, on the real kernel.

Each instance is the real command, writing for real, started inside a test cgroup that
another process shares; its worker is a Python that sleeps, so the instance stays in the
child cgroup it made until the test ends it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cgroup_util import KernelCgroup, claimed, held_claim
from start_util import DSW, cgroup_state, other_process

MiB, GiB = 2**20, 2**30

pytestmark = pytest.mark.kernel

SLEEPER = f"{sys.executable} -c 'import time; time.sleep(120)'"


@pytest.fixture(autouse=True)
def _runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plan files go to the test's own directory, not to /run."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))


def start_instance(cg: KernelCgroup, started: set[int], *args: str) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DASK_SAFE_WORKER")}
    # Exec'd instances (--no-follow): their claims on their children are under test here;
    # following instances that share a pool are in test_pool_kernel.py.
    argv = [*DSW, "--no-follow", "--worker-command", SLEEPER, "--log-format", "none"]
    argv += ["--nanny-allowance", "0"]
    proc = subprocess.Popen(
        cg.enter_command([*argv, *args]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=base,
    )
    started.add(proc.pid)
    return proc


def memory_cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    raise AssertionError("no memory cgroup")


def wait_settled(proc: subprocess.Popen[str], cg: KernelCgroup) -> str | None:
    """The child cgroup name the instance sleeps in, or None when it exited."""
    for _ in range(600):
        if proc.poll() is not None:
            return None
        try:
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            where = memory_cgroup_of(proc.pid)
        except OSError:
            time.sleep(0.02)
            continue
        if b"time.sleep" in cmdline and b"dask_safe_worker" not in cmdline:
            assert where.startswith(cg.relative() + "/")
            return where.rsplit("/", 1)[1]
        time.sleep(0.02)
    raise AssertionError("the instance neither started its worker nor exited")


def stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_instances_started_at_once_each_get_their_own_child(
    kernel_cgroup: KernelCgroup, started_pids: set[int]
) -> None:
    kernel_cgroup.set_limit(2 * GiB)
    procs: list[subprocess.Popen[str]] = []
    with other_process(kernel_cgroup, started_pids):
        try:
            # Exec'd instances cannot give back what they take: each commits what its
            # --memory-limit asks for, so that all six fit however they race.
            procs = [
                start_instance(
                    kernel_cgroup, started_pids, "--memory-limit", "64MiB",
                    "--min-worker-memory", "1MiB",
                )
                for _ in range(6)
            ]  # fmt: skip
            children = [wait_settled(p, kernel_cgroup) for p in procs]
            assert None not in children, [p.stderr.read() for p in procs if p.poll() is not None]  # type: ignore[union-attr]
            assert len(set(children)) == 6, children
            state = cgroup_state(kernel_cgroup.path)
            for name in children:
                # Its commitment (v1 keeps whole pages), not the whole pool.
                assert state[str(name)] == 64 * MiB
                # Each child holds its own instance and nothing else.
                assert len(KernelCgroup(kernel_cgroup.path / str(name)).pids()) == 1
        finally:
            stop(procs)


def test_instances_started_one_after_another_share_what_the_parent_has(
    kernel_cgroup: KernelCgroup, started_pids: set[int]
) -> None:
    kernel_cgroup.set_limit(GiB)
    procs: list[subprocess.Popen[str]] = []
    with other_process(kernel_cgroup, started_pids):
        try:
            children: list[str] = []
            # Two fixed commitments, then one that takes the rest of the pool (exec'd,
            # it cannot give any of it back later).
            for args in (["--memory-limit", "300MiB"], ["--memory-limit", "300MiB"], []):
                proc = start_instance(
                    kernel_cgroup, started_pids, "--min-worker-memory", "96MiB", *args
                )
                procs.append(proc)
                name = wait_settled(proc, kernel_cgroup)
                assert name is not None, proc.stderr.read()  # type: ignore[union-attr]
                children.append(name)
            state = cgroup_state(kernel_cgroup.path)
            limits = [state[name] for name in children]
            # The siblings' limits never promise more than the parent has.
            assert sum(limits) <= GiB, limits
            assert limits[:2] == [300 * MiB, 300 * MiB]
            assert GiB - 600 * MiB - 64 * MiB < limits[2] <= GiB - 600 * MiB
            before = cgroup_state(kernel_cgroup.path)
            # A fourth finds nothing left to share: exit 3, the others named, nothing made.
            fourth = start_instance(kernel_cgroup, started_pids, "--min-worker-memory", "96MiB")
            procs.append(fourth)
            _, err = fourth.communicate(timeout=60)
            assert fourth.returncode == 3, err
            assert "3 other instance(s)" in err and f"pid {procs[2].pid}" in err
            assert "--nworkers N" in err and "Traceback" not in err
            assert cgroup_state(kernel_cgroup.path) == before
        finally:
            stop(procs)


def test_a_leftover_child_of_an_exited_instance_is_removed(
    kernel_cgroup: KernelCgroup, started_pids: set[int]
) -> None:
    # An exec'd worker cannot remove its child when it ends: the next start does, once
    # the pid in its name has exited and nothing is left in it.
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    leftover = kernel_cgroup.child(f"dask-safe-worker-{pid_max + 1}")
    leftover.set_limit(512 * MiB)
    live = kernel_cgroup.child(f"dask-safe-worker-{os.getpid()}")
    kernel_cgroup.set_limit(GiB)
    with other_process(kernel_cgroup, started_pids):
        proc = start_instance(kernel_cgroup, started_pids, "--min-worker-memory", "1MiB")
        try:
            name = wait_settled(proc, kernel_cgroup)
            assert name is not None, proc.stderr.read()  # type: ignore[union-attr]
            assert not leftover.path.exists()
            # A child whose pid still runs is not judged, even when it is empty.
            assert live.path.exists()
        finally:
            stop([proc])


def test_an_exec_d_instance_claims_its_plain_child_and_the_next_start_removes_it(
    kernel_cgroup: KernelCgroup, started_pids: set[int]
) -> None:
    # The plain `dask-safe-worker` child carries no pid to judge it by. The instance's
    # flock, held through the exec into the worker, tells a running instance's child
    # from a leftover; the kernel releases it when the worker ends.
    leftover = kernel_cgroup.child("dask-safe-worker")
    leftover.set_limit(512 * MiB)
    kernel_cgroup.set_limit(GiB)
    with other_process(kernel_cgroup, started_pids):
        for _ in range(2):
            assert leftover.path.exists() and not claimed(leftover.path)
            proc = start_instance(
                kernel_cgroup, started_pids, "--min-worker-memory", "1MiB", "--log-format", "json"
            )
            try:
                # Removed, then made again by this start under the same name.
                assert wait_settled(proc, kernel_cgroup) == "dask-safe-worker", proc.stderr
                assert claimed(leftover.path), "the worker does not hold the claim"
            finally:
                stop([proc])
            assert not claimed(leftover.path)
            events = [json.loads(line) for line in proc.stderr.read().splitlines()]  # type: ignore[union-attr]
            child = kernel_cgroup.relative() + "/dask-safe-worker"
            assert [
                (e["event"], e.get("target"), e.get("error"))
                for e in events
                if e["event"] in ("cgroup.child.removed", "cgroup.child.created")
            ] == [
                ("cgroup.child.removed", child, None),
                ("cgroup.child.created", child, None),
            ]
        assert [p.name for p in kernel_cgroup.path.iterdir() if p.is_dir()] == ["dask-safe-worker"]


def test_a_claimed_plain_child_is_kept_even_when_empty(
    kernel_cgroup: KernelCgroup, started_pids: set[int]
) -> None:
    # Between its mkdir and its move, a starting instance's child is empty but claimed.
    starting = kernel_cgroup.child("dask-safe-worker")
    kernel_cgroup.set_limit(GiB)
    with held_claim(starting.path), other_process(kernel_cgroup, started_pids):
        proc = start_instance(kernel_cgroup, started_pids, "--min-worker-memory", "1MiB")
        try:
            name = wait_settled(proc, kernel_cgroup)
            assert name == f"dask-safe-worker-{proc.pid}", proc.stderr
            assert starting.path.exists()
        finally:
            stop([proc])


def test_the_supervisor_removes_the_child_it_was_named(
    kernel_cgroup: KernelCgroup, started_pids: set[int]
) -> None:
    # The child's name is unique per instance, so the planning process must hand that
    # name to the supervisor (run_worker.supervisor_argv): with --init, the child is gone once
    # the worker has exited, and nothing else was removed.
    kernel_cgroup.set_limit(GiB)
    kept = kernel_cgroup.child("dask-safe-worker-keep")
    with other_process(kernel_cgroup, started_pids):
        base = {k: v for k, v in os.environ.items() if not k.startswith("DASK_SAFE_WORKER")}
        proc = subprocess.run(
            kernel_cgroup.enter_command(
                [*DSW, "--init", "--log-format", "json", "--min-worker-memory", "1MiB",
                 "--worker-command", f"{sys.executable} -c pass"]
            ),
            capture_output=True,
            text=True,
            timeout=60,
            env=base,
            check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        created = [line for line in proc.stderr.splitlines() if "cgroup.child.created" in line]
        removed = [line for line in proc.stderr.splitlines() if "cgroup.child.removed" in line]
        assert created and removed, proc.stderr
        name = json.loads(created[0])["target"].rsplit("/", 1)[1]
        assert name.startswith("dask-safe-worker") and name != "dask-safe-worker-keep"
        assert json.loads(removed[0])["target"].endswith("/" + name)
        assert "error" not in json.loads(removed[0])
        assert not (kernel_cgroup.path / name).exists()
        assert kept.path.exists()


def test_ctrl_c_between_the_limit_and_the_exec_leaves_nothing_behind(
    kernel_cgroup: KernelCgroup, started_pids: set[int], tmp_path: Path
) -> None:
    # Issue 24 row 12: exec'd (no supervisor), a SIGINT after the child was made and
    # limited gave "Aborted!", exit 1, and left the child. A full FIFO as the plan file
    # holds the tool in its plan-file write, after the kernel limit and before the exec.
    import signal

    kernel_cgroup.set_limit(GiB)
    fifo = tmp_path / "plan.fifo"
    os.mkfifo(fifo, 0o600)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(writer, b"x" * 4096)
        with other_process(kernel_cgroup, started_pids):
            before = cgroup_state(kernel_cgroup.path)
            proc = start_instance(
                kernel_cgroup, started_pids, "--plan-file", str(fifo), "--min-worker-memory", "1MiB"
            )
            try:
                for _ in range(500):
                    if memory_cgroup_of(proc.pid).startswith(kernel_cgroup.relative() + "/"):
                        break  # moved into its child: the limit is written
                    time.sleep(0.02)
                else:
                    raise AssertionError("the instance never moved into a child")
                time.sleep(0.2)  # now in its plan-file write
                proc.send_signal(signal.SIGINT)
                while proc.poll() is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(reader, 1 << 16)
                    time.sleep(0.02)
            finally:
                stop([proc])
            assert proc.returncode == 130, proc.stderr.read()  # type: ignore[union-attr]
            assert cgroup_state(kernel_cgroup.path) == before
            assert [p.name for p in kernel_cgroup.path.iterdir() if p.is_dir()] == []
    finally:
        os.close(reader)
        os.close(writer)
