"""Issue 24 row 6: `--follow` sees a lowered ancestor that lies above the mount root.

On the real v1 kernel: a test cgroup `pod` (2 GiB) with a child `ctr`; the tool runs in a
private mount namespace where the memory controller's mount is `ctr` itself (a bind mount
of the test cgroup's directory over the controller's mount point, as a container without
a cgroup namespace sees its own cgroup). Only `ctr` is a level it can read; `pod` shows
only through v1's `hierarchical_memory_limit`. As ctr's sole occupant it writes ctr's
limit, and once that is there the hierarchical limit of ctr is ours until `pod` comes
below it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cgroup_util import V1_ROOT, KernelCgroup
from scheduler_util import audit_events

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare"),
]

GiB, MiB = 2**30, 2**20
RESERVE = 256 * MiB


def wait_for(log: Path, check: Any, what: str) -> list[dict[str, Any]]:
    """The audit events once `check(events)` holds; a failure after a generous bound
    (the watch ticks every 0.2 s)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        events = audit_events(log.read_text())
        if check(events):
            return events
        time.sleep(0.1)
    raise AssertionError(f"no {what}: {[e['event'] for e in audit_events(log.read_text())]}")


def test_follow_sees_a_lowered_pod_above_the_mount_root(
    kernel_cgroup: KernelCgroup, started_pids: set[int], tmp_path: Path
) -> None:
    pod = kernel_cgroup
    pod.set_limit(2 * GiB)
    ctr = pod.child("ctr")
    # Over the controller's mount point, the test cgroup's directory: the mount root is
    # then pod/ctr, and ctr's directory is the mount point itself.
    script = f'mount --bind {ctr.path} {V1_ROOT} && echo $$ > {V1_ROOT}/cgroup.procs && exec "$@"'
    argv = [
        "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
        sys.executable, "-m", "dask_safe_worker",
        "--log-format", "json",
        "--reserve", "256MiB",
        "--follow", "--follow-interval", "0.2",
        "--plan-file", str(tmp_path / "plan.json"),
        # A worker that stays and takes any argument: the watch's decisions, not
        # Dask's, are what this test reads.
        "--worker-command", "sh -c 'exec sleep 600' sh",
        "--min-worker-memory", "1MiB",
    ]  # fmt: skip
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, stderr=err, stdout=subprocess.DEVNULL)
    started_pids.add(proc.pid)
    try:
        events = wait_for(log, lambda ev: any(e["event"] == "follow.started" for e in ev), "start")
        (done,) = [e for e in events if e["event"] == "measure.done"]
        # The levels it reads: ctr alone, pod only through the hierarchical limit.
        assert [lvl["hierarchical_limit"] for lvl in done["cgroup_levels"]] == [2 * GiB]
        (outcome,) = [e for e in events if e["event"] == "cgroup.write.outcome"]
        assert outcome["strategy"] == "own" and outcome["written"]
        first = outcome["read_back"]
        assert first <= 2 * GiB - RESERVE
        time.sleep(1)  # a few ticks with nothing changed
        # Following never raised ctr above what pod allows (it did: to the host's RAM).
        assert ctr.limit() <= 2 * GiB - RESERVE
        pod.set_limit(GiB)

        def lowered(ev: list[dict[str, Any]]) -> bool:
            return any(
                e["event"] == "follow.applied"
                and e["action"] == "lower"
                and e["kernel"].get("action") == "lowered"
                for e in ev
            )

        events = wait_for(log, lowered, "lowered limit")
        changed = [e for e in events if e["event"] == "follow.changed" and e["action"] == "lower"]
        assert changed, [e["event"] for e in events]
        (replanned,) = [e for e in events if e["event"] == "follow.replanned"][-1:]
        assert replanned["new_budget"] <= GiB - RESERVE
        assert ctr.limit() <= GiB - RESERVE
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
