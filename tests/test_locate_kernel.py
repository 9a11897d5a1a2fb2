"""Issue 24 rows 1 and 3 on this host's real v1 memory hierarchy, in test cgroups below our own,
with mount and cgroup namespaces made by `unshare`: a sibling bound over the memory
controller's mount point, or a move out of our cgroup namespace (`/../R`), must never make
us plan from another cgroup, write there, or move out of our own; a nested namespace path
(`/../../B` under `/../..`) is located. What cannot be located also stops the start
unless the user says to go on (row 4, tests/test_fail_closed.py). Row 3: in a PID
namespace (`unshare -p -f --mount-proc`) a host process sharing our cgroup is invisible;
the cgroup is never claimed as ours alone.

Every `mount` happens inside a private mount namespace (`unshare -m`, propagation
private): nothing is mounted on the host.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cgroup_util import KernelCgroup
from scheduler_util import audit_events, closed_port
from start_util import DSW, NOOP_WORKER, cgroup_state, dsw_command, other_process, run_script

MiB, GiB = 2**20, 2**30
MEMORY = Path("/sys/fs/cgroup/memory")

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare"),
]

SCHEDULER = f"tcp://127.0.0.1:{closed_port()}"


def _outcome(stderr: str) -> dict[str, Any]:
    found = [e for e in audit_events(stderr) if e.get("event") == "cgroup.write.outcome"]
    assert len(found) == 1, stderr
    return found[0]


@pytest.fixture
def siblings(kernel_cgroup: KernelCgroup) -> tuple[KernelCgroup, KernelCgroup]:
    """B limited to 512 MiB, its sibling R without a limit: both below the test cgroup."""
    b = kernel_cgroup.child("B")
    b.set_limit(512 * MiB)
    return b, kernel_cgroup.child("R")


def test_a_sibling_bound_over_the_controller_is_never_planned_from_or_written(
    kernel_cgroup: KernelCgroup, siblings: tuple[KernelCgroup, KernelCgroup], tmp_path: Path
) -> None:
    # Issue 24 row 1: in a cgroup namespace at B, the sibling R bound over the memory
    # controller's mount point. /proc/self/cgroup reads `/`, the covered host mount's
    # root `/../..`, R's `/../R`: no mount holds our cgroup. The mount root used to be
    # taken instead: R's unlimited levels planned from, R/dask-safe-worker made, limited,
    # and moved into (out of B's 512 MiB).
    b, r = siblings
    before = cgroup_state(kernel_cgroup.path)
    enter = f"echo $$ > {shlex.quote(str(b.path))}/cgroup.procs"
    bind = f"mount --bind {shlex.quote(str(r.path))} {MEMORY}"
    inner = "; ".join(
        [
            bind,
            # Row 4: our level exists and cannot be read: the start stops.
            f"{dsw_command('--dry-run', SCHEDULER)} >/dev/null 2>dry.err; echo $? > dry.rc",
            # Told to go on: it plans from what is certain and writes nothing anywhere.
            dsw_command("--no-init", "--allow-unreadable-cgroup", "--worker-command", NOOP_WORKER)
            + f" {SCHEDULER} 2>start.err; echo $? > start.rc",
            "cat /proc/self/cgroup > after.cgroup",
        ]
    )
    proc = run_script(f"{enter} && exec unshare -m -C sh -c {shlex.quote(inner)}", tmp_path)
    assert proc.returncode == 0, proc.stderr
    dry = (tmp_path / "dry.err").read_text()
    assert (tmp_path / "dry.rc").read_text().strip() == "1", dry
    assert "cannot be located" in dry and "--allow-unreadable-cgroup" in dry
    start = (tmp_path / "start.err").read_text()
    assert (tmp_path / "start.rc").read_text().strip() == "0", start
    outcome = _outcome(start)
    assert outcome["reason"] == "no_memory_cgroup" and not outcome["written"]
    assert not any(e.get("event") == "cgroup.moved" for e in audit_events(start))
    # No child in R or anywhere, no limit changed, and the shell stayed in B.
    assert cgroup_state(kernel_cgroup.path) == before
    assert (tmp_path / "after.cgroup").read_text().count(":memory:/\n") == 1
    assert b.pids() == [] and r.pids() == []


def test_a_move_out_of_our_cgroup_namespace_writes_nothing(
    kernel_cgroup: KernelCgroup, siblings: tuple[KernelCgroup, KernelCgroup], tmp_path: Path
) -> None:
    # `unshare -C` in B, then a move to the sibling R: /proc/self/cgroup reads `/../R`,
    # the host's mount root `/../../..`: our cgroup is below the mount, but where is
    # not known from inside the namespace.
    b, r = siblings
    before = cgroup_state(kernel_cgroup.path)
    enter = f"echo $$ > {shlex.quote(str(b.path))}/cgroup.procs"
    inner = "; ".join(
        [
            f"echo $$ > {shlex.quote(str(r.path))}/cgroup.procs",
            "grep :memory: /proc/self/cgroup > ns.cgroup",
            f"{dsw_command('--dry-run', SCHEDULER)} >/dev/null 2>dry.err; echo $? > dry.rc",
            dsw_command("--no-init", "--memory-limit", "300MiB", "--worker-command", NOOP_WORKER)
            + f" {SCHEDULER} 2>start.err; echo $? > start.rc",
        ]
    )
    proc = run_script(f"{enter} && exec unshare -C sh -c {shlex.quote(inner)}", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ns.cgroup").read_text().strip().endswith(":/../R")
    assert (tmp_path / "dry.rc").read_text().strip() == "1"
    assert "outside our cgroup namespace" in (tmp_path / "dry.err").read_text()
    # An explicit --memory-limit goes on; nothing is written or moved.
    start = (tmp_path / "start.err").read_text()
    assert (tmp_path / "start.rc").read_text().strip() == "0", start
    assert _outcome(start)["reason"] == "no_memory_cgroup"
    done = next(e for e in audit_events(start) if e.get("event") == "measure.done")
    assert done["cgroup_located"] is False and done["unreadable"]
    assert cgroup_state(kernel_cgroup.path) == before


def test_a_nested_namespace_path_is_located_and_limited(
    kernel_cgroup: KernelCgroup, siblings: tuple[KernelCgroup, KernelCgroup], tmp_path: Path
) -> None:
    # The hierarchy mounted inside a cgroup namespace rooted at the test cgroup T (on a
    # fresh tmpfs over /sys/fs/cgroup, as a container does; it hides the host's mounts);
    # then a namespace at T/A/N and a move to T/B: `/../../B` under the mount root `/../..`.
    b, _ = siblings
    kernel_cgroup.child("A").child("N")
    enter = f"echo $$ > {shlex.quote(str(kernel_cgroup.path))}/cgroup.procs"
    deepest = "; ".join(
        [
            f"echo $$ > {MEMORY}/B/cgroup.procs",
            "grep :memory: /proc/self/cgroup > ns.cgroup",
            f"grep ' {MEMORY} ' /proc/self/mountinfo > ns.mountinfo",
            f"{dsw_command('--dry-run', '--reserve', '64MiB', SCHEDULER)} > dry.out 2>dry.err",
            "echo $? > dry.rc",
        ]
    )
    middle = "; ".join(
        [
            f"mount -t tmpfs none {MEMORY.parent}",
            f"mkdir {MEMORY}",
            f"mount -t cgroup -o memory none {MEMORY}",
            f"echo $$ > {MEMORY}/A/N/cgroup.procs",
            f"unshare -C sh -c {shlex.quote(deepest)}",
        ]
    )
    proc = run_script(f"{enter} && exec unshare -m -C sh -c {shlex.quote(middle)}", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ns.cgroup").read_text().strip().endswith(":/../../B")
    assert " /../.. " in (tmp_path / "ns.mountinfo").read_text()
    assert (tmp_path / "dry.rc").read_text().strip() == "0", (tmp_path / "dry.err").read_text()
    dry = json.loads((tmp_path / "dry.out").read_text())
    levels = dry["measurement"]["cgroup_levels"]
    assert levels[0]["path"] == "/B" and levels[0]["limit"] == 512 * MiB
    assert dry["plan"]["budget"] < 512 * MiB
    assert "unreadable" not in dry["measurement"]
    assert b.limit() == 512 * MiB


def test_a_pid_namespace_never_claims_a_cgroup_shared_with_a_host_process(
    kernel_cgroup: KernelCgroup, started_pids: set[int], tmp_path: Path
) -> None:
    # Issue 24 row 3: cgroup T holds a host `sleep`; inside `unshare -p -f --mount-proc`
    # cgroup.procs shows only our own processes.
    kernel_cgroup.set_limit(1536 * MiB)
    argv = [
        "unshare",
        "-p",
        "-f",
        "--mount-proc",
        *DSW,
        "--log-format",
        "json",
        "--no-init",
        "--reserve",
        "100MiB",
        "--worker-command",
        NOOP_WORKER,
        SCHEDULER,
    ]
    with other_process(kernel_cgroup, started_pids) as neighbour:
        proc = subprocess.run(
            kernel_cgroup.enter_command(argv),
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
            cwd=tmp_path,
        )
        assert neighbour in kernel_cgroup.pids()
    assert proc.returncode == 0, proc.stderr
    done = next(e for e in audit_events(proc.stderr) if e.get("event") == "measure.done")
    assert done["sole_occupant"] is False and "PID namespace" in done["hidden_neighbours"]
    outcome = _outcome(proc.stderr)
    assert outcome["strategy"] == "child" and outcome["written"]
    # The neighbour's cgroup keeps its limit; ours is on a child of it.
    assert kernel_cgroup.limit() == 1536 * MiB
    child = Path(str(outcome["created_child"]))
    assert child.parent == kernel_cgroup.path
