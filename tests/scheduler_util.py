"""A real `dask scheduler` on 127.0.0.1 for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening: an unreachable scheduler."""
    return free_port()


def scheduler_argv(port: int, *extra: str) -> list[str]:
    """`dask scheduler` bound to 127.0.0.1 only, without a dashboard."""
    return [
        sys.executable,
        "-m",
        "distributed.cli.dask_scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-dashboard",
        *extra,
    ]


def wait_listening(port: int, proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    """Until something accepts on 127.0.0.1:port; fails early if `proc` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"scheduler exited with {proc.returncode}")
        time.sleep(0.2)
    raise TimeoutError("scheduler did not start listening")


@contextlib.contextmanager
def scheduler(timeout: float = 60) -> Iterator[str]:
    """Start a scheduler bound to 127.0.0.1; yields its address; ends it by PID."""
    port = free_port()
    proc = subprocess.Popen(
        scheduler_argv(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_listening(port, proc, timeout)
        yield f"tcp://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_workers(address: str, n: int, timeout: float = 90) -> dict[str, int | None]:
    """Wait until `n` workers are registered; return each one's Dask memory limit."""
    from distributed import Client

    with Client(address, timeout=30) as client:
        client.wait_for_workers(n, timeout=timeout)
        limits: dict[str, int | None] = client.run(
            lambda dask_worker: dask_worker.memory_manager.memory_limit
        )
        return limits


def audit_events(stderr: str) -> list[dict[str, Any]]:
    """The JSON audit lines in a stderr capture (other lines are the worker's logs)."""
    events = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    return events


def dask_views(client: Any) -> set[tuple[str, int]]:
    """Every place a running cluster keeps a worker's memory limit: the workers' and the
    nannies' memory managers and the scheduler's WorkerState, as (where, limit) pairs."""
    workers = client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
    nannies = client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit, nanny=True)
    info = client.scheduler_info()["workers"]
    return (
        {("worker", v) for v in workers.values()}
        | {("nanny", v) for v in nannies.values()}
        | {("scheduler", w["memory_limit"]) for w in info.values()}
    )


def agreed_views(value: int) -> set[tuple[str, int]]:
    """`dask_views` of a cluster in which every place holds `value`."""
    return {("worker", value), ("nanny", value), ("scheduler", value)}
