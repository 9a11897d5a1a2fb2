"""As PID 1 no stopping signal is lost while the tool starts (planning takes 100+ ms).

The kernel drops a signal that PID 1 has no handler for, so `docker stop` during planning
used to be ignored until the runtime's SIGKILL. The tool runs as PID 1 of a new PID
namespace here (`unshare --pid --fork`), with `--cgroup-write never`: nothing is written.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from scheduler_util import audit_events

DEADLINE_S = 60.0
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def wait_for(check: Callable[[], bool], what: str, pause: float = 0.001) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE_S} s: {what}")
        time.sleep(pause)


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def blocked(pid: int) -> int:
    """The signal mask of `pid` (SigBlk), 0 when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    line = next(x for x in status.splitlines() if x.startswith("SigBlk:"))
    return int(line.split()[1], 16)


def state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def require_pid_namespaces() -> None:
    reason = "unshare is not installed"
    if shutil.which("unshare") is not None:
        probe = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, check=False
        )
        if probe.returncode == 0:
            return
        reason = f"unshare --pid failed (it needs root): {probe.stderr!r}"
    if os.environ.get("CI"):
        pytest.fail(f"no PID namespaces in CI: {reason}")
    pytest.skip(f"no PID namespaces here: {reason}")


def is_tool(pid: int) -> bool:
    """`pid` runs the tool: not unshare before its exec, nor the worker after it."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return argv[:3] == [sys.executable, "-m", "dask_safe_worker"]


def deferring(pid: int) -> bool:
    """The tool with SIGTERM blocked. unshare blocks SIGTERM around its fork too, which
    says nothing about the tool."""
    return is_tool(pid) and blocked(pid) & SIGTERM_BIT != 0


def still_planning(tool: int) -> bool:
    """Held by SIGSTOP, the tool has not yet passed its last check before the worker."""
    return deferring(tool) and children(tool) == []


ATTEMPTS = 10


def start_and_hold(argv: list[str], started_pids: set[int]) -> tuple[subprocess.Popen[bytes], int]:
    """Start the tool as PID 1 of a new namespace and SIGSTOP it once SIGTERM is blocked."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started_pids.add(proc.pid)
    wait_for(lambda: children(proc.pid) != [], "the tool, PID 1 of the new namespace")
    tool = children(proc.pid)[0]
    started_pids.add(tool)
    # Deferred from its first line: long before planning is done, let alone the exec.
    wait_for(lambda: deferring(tool) or state(tool) == "", "SIGTERM blocked by the tool")
    # Held still (SIGSTOP reaches a namespace's init from outside) while SIGTERM lands.
    os.kill(tool, signal.SIGSTOP)
    wait_for(lambda: state(tool) in ("T", ""), "the tool stopped")
    return proc, tool


@pytest.mark.parametrize(
    ("mode", "cancelled"),
    [("--no-init", "worker.exec.cancelled"), ("--init", "init.start.cancelled")],
)
def test_sigterm_while_pid1_plans_stops_it_before_the_worker(
    tmp_path: Path, started_pids: set[int], mode: str, cancelled: str
) -> None:
    require_pid_namespaces()
    ran = tmp_path / "worker-ran"
    argv = [
        *("unshare", "--pid", "--fork", "--mount-proc"),
        *(sys.executable, "-m", "dask_safe_worker", mode, "--cgroup-write", "never"),
        *("--log-format", "json", "--plan-file", str(tmp_path / "plan.json")),
        *("--worker-command", f"sh -c ': > {ran}' sh", "tcp://127.0.0.1:1"),
    ]
    # Planning is over in ~100 ms; on a loaded machine this process may not be scheduled
    # before the tool has run on to the worker. Only a tool caught still planning counts.
    for _ in range(ATTEMPTS):
        ran.unlink(missing_ok=True)
        proc, tool = start_and_hold(argv, started_pids)
        if still_planning(tool):
            os.kill(tool, signal.SIGTERM)
            os.kill(tool, signal.SIGCONT)
            break
        os.kill(tool, signal.SIGCONT)
        proc.communicate(timeout=DEADLINE_S)
    else:
        pytest.fail(f"the tool was never caught while planning in {ATTEMPTS} attempts")
    _, err = proc.communicate(timeout=DEADLINE_S)
    stderr = err.decode()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert not ran.exists(), "the worker ran"
    assert "Traceback" not in stderr
    events = audit_events(stderr)
    stop = next(e for e in events if e["event"] == cancelled)
    assert (stop["signal"], stop["code"]) == ("SIGTERM", 143)
    assert "worker.exec" not in {e["event"] for e in events}
