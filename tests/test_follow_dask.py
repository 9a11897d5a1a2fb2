"""The Dask side of --follow: the preloads, a real scheduler and real nannies/workers.

No cgroup is touched here: the live-limit file is written by the test, as the
supervisor's watch would write it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dask_safe_worker.follow.live_limit import (
    LIVE_FILE_ENV,
    LiveLimit,
    prepare_channel,
    read_acks,
    write_live_limit,
)
from scheduler_util import scheduler

pytestmark = [pytest.mark.e2e]

MiB = 2**20
PRELOADS = [
    "--preload",
    "dask_safe_worker.follow.worker",
    "--preload-nanny",
    "dask_safe_worker.follow.nanny",
]


def views(client: Any) -> dict[str, set[int]]:
    """Every place that holds a worker's memory limit, as a set of values each."""
    workers = client.run(
        lambda dask_worker: (
            dask_worker.memory_manager.memory_limit,
            dask_worker.memory_manager.data.n,
            dask_worker.state.transfer_incoming_bytes_limit,
        )
    )
    nannies = client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit, nanny=True)
    info = client.scheduler_info()["workers"]
    total = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.total_memory)
    return {
        "worker": {v[0] for v in workers.values()},
        "spill_target": {v[0] if v[1] == int(v[0] * 0.6) else -v[1] for v in workers.values()},
        "transfer": {v[0] if v[2] == int(v[0] * 0.1) else -v[2] for v in workers.values()},
        "nanny": set(nannies.values()),
        "scheduler": {w["memory_limit"] for w in info.values()},
        "total": {total // max(1, len(info))},
    }


def wait_until(check: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Any, str]]:
    from distributed import Client

    live = prepare_channel(str(tmp_path / "channel"))
    write_live_limit(live, LiveLimit(1, 800 * MiB, 2000 * MiB, 0.5, time.time()))
    with scheduler() as address:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                address,
                "--nworkers",
                "2",
                "--nthreads",
                "1",
                "--no-dashboard",
                "--memory-limit",
                str(1000 * MiB),
                *PRELOADS,
            ],
            env={**os.environ, LIVE_FILE_ENV: live},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            with Client(address, timeout=30) as client:
                client.wait_for_workers(2, timeout=60)
                yield client, live
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def test_start_change_and_restart_follow_the_live_limit(cluster: tuple[Any, str]) -> None:
    client, live = cluster

    def mib(n: int) -> set[int]:
        return {n * MiB}

    # The live record wins over --memory-limit from the start on, before registration.
    assert views(client) == {k: mib(800) for k in views(client)}

    write_live_limit(live, LiveLimit(2, 600 * MiB, 1500 * MiB, 0.5, time.time()))
    latency = wait_until(lambda: views(client) == {k: mib(600) for k in views(client)}, 3)
    assert latency < 3
    acks = read_acks(live)
    assert sorted(role for role, _, _ in acks) == ["nanny", "nanny", "worker", "worker"]
    assert {a.generation for a in acks.values()} == {2}

    # Back up again.
    write_live_limit(live, LiveLimit(3, 700 * MiB, 1700 * MiB, 0.5, time.time()))
    wait_until(lambda: views(client) == {k: mib(700) for k in views(client)}, 3)

    # A worker its nanny restarts comes back with the current limit, not the start's.
    old = set(client.run(os.getpid).values())
    client.restart(timeout=60)
    client.wait_for_workers(2, timeout=60)
    assert set(client.run(os.getpid).values()).isdisjoint(old)
    assert views(client) == {k: mib(700) for k in views(client)}


def test_garbage_in_the_channel_changes_nothing(cluster: tuple[Any, str]) -> None:
    client, live = cluster
    Path(live).write_text("{not json")
    time.sleep(1.5)
    assert views(client)["worker"] == {800 * MiB}
    write_live_limit(live, LiveLimit(5, 500 * MiB, 1200 * MiB, 0.5, time.time()))
    wait_until(lambda: views(client)["scheduler"] == {500 * MiB}, 3)


CONFIGURED_PRELOAD = """
def dask_setup(server):
    server.setups = getattr(server, "setups", 0) + 1

def dask_teardown(server):
    server.teardowns = getattr(server, "teardowns", 0) + 1
"""


@pytest.mark.parametrize("release_api", ["installed", "list of Preload (2022.12.1 and older)"])
def test_preloads_named_only_in_dask_config_run_with_either_api(
    release_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's `distributed.worker.preload` still runs beside our --preload: with
    the installed release's process_preloads, and with the plain list of Preload objects
    that distributed returned before PreloadManager (distributed's own
    test_preload_config on 2022.12.1 found 'list' object has no attribute 'start')."""
    import asyncio
    import types

    import dask
    import distributed.preloading

    from dask_safe_worker.follow import preload as follow_dask
    from dask_safe_worker.follow.live_limit import CONFIGURED_PRELOADS_ENV

    if release_api != "installed":
        real = distributed.preloading.process_preloads

        def as_list(*args: Any, **kwargs: Any) -> list[Any]:
            return list(real(*args, **kwargs))

        monkeypatch.setattr(distributed.preloading, "process_preloads", as_list)
    monkeypatch.setenv(CONFIGURED_PRELOADS_ENV, "worker")
    server = types.SimpleNamespace(local_directory=str(tmp_path))
    with dask.config.set({"distributed.worker.preload": [CONFIGURED_PRELOAD]}):
        asyncio.run(follow_dask.start_configured(server, "worker"))
        asyncio.run(follow_dask.teardown_configured(server))
    assert (server.setups, server.teardowns) == (1, 1)
