"""--follow in a real runc container: `runc update --memory` on the running container (the
in-place resize path), with the container's cgroupfs read-only as Docker and Kubernetes
mount it. Dask's side follows; the kernel limit, not ours, is left alone."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from oci import Container, GiB, MiB, worker_entrypoint_argv

from scheduler_util import agreed_views, dask_views

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

pytestmark = pytest.mark.container


def wait_until(check: Callable[[], bool], timeout: float, c: Container) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if c.proc is not None and c.proc.poll() is not None:
            raise AssertionError(f"container exited:\n{c.stderr()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s:\n{c.stderr()[-3000:]}")
        time.sleep(0.1)


def test_runc_update_memory_is_followed_by_dask(
    make_container: Callable[..., Container], scheduler_address: str, client: Any
) -> None:
    argv = worker_entrypoint_argv(
        [
            "--plan-file",
            "/tmp/plan.json",
            "--follow",
            "--follow-interval",
            "1",
            # Below the container's limit: a write is attempted, and the read-only
            # cgroupfs refuses it.
            "--reserve",
            "64MiB",
            scheduler_address,
            "--host",
            "127.0.0.1",
            "--no-dashboard",
            "--nthreads",
            "1",
            "--nworkers",
            "2",
        ]
    )
    c = make_container(argv, memory_limit=2 * GiB)
    c.start()
    c.wait_running()
    wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, 120, c)
    plan = next(e for e in c.events() if e["event"] == "plan.made")
    first = plan["effective_per_worker"]
    assert dask_views(client) == agreed_views(first)

    # The in-place resize: the runtime rewrites the running container's limit.
    subprocess.run(c._runc("update", "--memory", str(1536 * MiB), c.id), check=True)
    lowered = (1536 * MiB - 64 * MiB - plan["overhead"]) // 2
    wait_until(
        lambda: dask_views(client) == agreed_views(lowered),
        5,
        c,
    )
    subprocess.run(c._runc("update", "--memory", str(2 * GiB), c.id), check=True)
    wait_until(
        lambda: dask_views(client) == agreed_views(first),
        5,
        c,
    )
    assert int((c.host_cgroup_dir / "memory.oom_control").read_text().split()[-1]) == 0
    # The container's limit is the runtime's: we never wrote it.
    assert int((c.host_cgroup_dir / "memory.limit_in_bytes").read_text()) == 2 * GiB
    # follow.applied is logged once every part has acknowledged, a tick after the views
    # moved: wait for it before stopping the container.
    wait_until(
        lambda: (
            [e["action"] for e in c.events() if e["event"] == "follow.applied"]
            == ["lower", "raise"]
        ),
        5,
        c,
    )
    c.kill("TERM")
    assert c.wait() == 0

    events = c.events()
    started = next(e for e in events if e["event"] == "follow.started")
    assert started["managed"] is None and "read-only" in started["kernel"]
    applied = [e for e in events if e["event"] == "follow.applied"]
    assert [e["action"] for e in applied] == ["lower", "raise"]
    assert all(e["kernel"]["action"] == "none" for e in applied)
    assert "read-only cgroupfs" in applied[0]["kernel"]["reason"]
