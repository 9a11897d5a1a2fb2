"""Issue 13: bad input is refused with exit 2 before anything is written.

Each case runs the real command, writing for real (`--cgroup-write auto`), inside a test
cgroup shared with another process: the situation in which a write would create a child
cgroup. A refusal must leave the cgroup tree and every limit exactly as they were.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cgroup_util import KernelCgroup
from dask_safe_worker import cli
from dask_safe_worker.cgroup.write import WriteOptions, child_name_problem
from start_util import DSW, NOOP_WORKER, cgroup_state, other_process, run_in

GiB = 2**30

pytestmark = pytest.mark.kernel

REFUSED = [
    # row 1: --cgroup-child must be one plain path component
    pytest.param(["--cgroup-child", ".."], {}, id="child-dotdot"),
    pytest.param(["--cgroup-child", "."], {}, id="child-dot"),
    pytest.param(["--cgroup-child", "/"], {}, id="child-slash"),
    pytest.param(["--cgroup-child", "/absolute/child"], {}, id="child-absolute"),
    pytest.param(["--cgroup-child", "a/b"], {}, id="child-two-components"),
    pytest.param(["--cgroup-child="], {}, id="child-empty"),
    pytest.param(["--cgroup-child", "a\nb"], {}, id="child-newline"),
    pytest.param([], {"DASK_SAFE_WORKER_CGROUP_CHILD": ".."}, id="child-dotdot-env"),
    # row 5: NaN and infinity, also from the environment
    pytest.param(["--memory-high-fraction", "nan"], {}, id="high-nan"),
    pytest.param(["--memory-high-fraction", "inf"], {}, id="high-inf"),
    pytest.param([], {"DASK_SAFE_WORKER_MEMORY_HIGH_FRACTION": "nan"}, id="high-nan-env"),
    pytest.param([], {"DASK_SAFE_WORKER_MEMORY_HIGH_FRACTION": "-inf"}, id="high-inf-env"),
    # row 6: a worker command that is not a command
    pytest.param(["--worker-command", "dask 'worker"], {}, id="command-unbalanced"),
    pytest.param(["--worker-command", "   "], {}, id="command-blank"),
    pytest.param(["--worker-command="], {}, id="command-empty"),
    # row 7: memory limits dask would refuse
    pytest.param(["tcp://127.0.0.1:1", "--memory-limit", "-1"], {}, id="limit-minus-one"),
    pytest.param(["tcp://127.0.0.1:1", "--memory-limit", "-5GB"], {}, id="limit-negative"),
    pytest.param(["tcp://127.0.0.1:1", "--memory-limit="], {}, id="limit-empty"),
    pytest.param(["tcp://127.0.0.1:1", "--memory-limit", "nan"], {}, id="limit-nan"),
    # row 8: empty sizes
    pytest.param(["--min-worker-memory", ""], {}, id="min-empty"),
    pytest.param(["--nanny-allowance", ""], {}, id="nanny-empty"),
    pytest.param(["--swap-max", ""], {}, id="swap-empty"),
    pytest.param([], {"DASK_SAFE_WORKER_NANNY_ALLOWANCE": " "}, id="nanny-blank-env"),
    pytest.param(["--swap-max", "1e30"], {}, id="swap-huge"),
]


# Row 3: arguments `dask worker` refuses, judged by its own click command. They are
# checked for distributed's worker only, so these run with the default worker command.
WORKER_REFUSED = [
    pytest.param(["--dryrun"], {}, id="worker-dryrun"),
    pytest.param(["tcp://127.0.0.1:1", "--bogus-opt", "x"], {}, id="worker-bogus-opt"),
    pytest.param(["tcp://127.0.0.1:1", "--nprocs", "2"], {}, id="worker-nprocs"),
    pytest.param(["tcp://127.0.0.1:1", "--", "--dry-run"], {}, id="worker-after-separator"),
    pytest.param(["tcp://127.0.0.1:1", "--nthreads"], {}, id="worker-missing-value"),
    pytest.param(["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], {}, id="worker-two-schedulers"),
]


@pytest.mark.parametrize(("args", "env"), [*REFUSED, *WORKER_REFUSED])
def test_refused_before_any_write(
    request: pytest.FixtureRequest,
    args: list[str],
    env: dict[str, str],
    kernel_cgroup: KernelCgroup,
    started_pids: set[int],
) -> None:
    worker_case = request.node.callspec.id.startswith("worker-")
    noop = (
        []
        if worker_case or "--worker-command" in " ".join(args)
        else [
            "--worker-command",
            NOOP_WORKER,
        ]
    )
    kernel_cgroup.set_limit(2 * GiB)
    with other_process(kernel_cgroup, started_pids):
        before = cgroup_state(kernel_cgroup.path)
        proc = run_in(
            kernel_cgroup,
            ["--log-format", "json", *noop, *args],
            env,
        )
        after = cgroup_state(kernel_cgroup.path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert after == before
    # One line that says what is wrong, besides the JSON audit lines.
    human = [line for line in proc.stderr.splitlines() if not line.startswith("{")]
    assert human and all(line.strip() for line in human[-1:])
    for line in proc.stderr.splitlines():
        if line.startswith("{"):
            json.loads(line)


def test_the_same_run_with_good_values_does_write(
    kernel_cgroup: KernelCgroup, started_pids: set[int]
) -> None:
    # The counterpart of the refusals: the setup really is one where a write happens.
    kernel_cgroup.set_limit(2 * GiB)
    with other_process(kernel_cgroup, started_pids):
        before = cgroup_state(kernel_cgroup.path)
        proc = run_in(
            kernel_cgroup,
            # Exec'd, so that the child stays after the worker ends (a supervisor, the
            # default, removes it).
            ["--no-follow", "--worker-command", NOOP_WORKER, "--cgroup-child", "my-worker"],
        )
        after = cgroup_state(kernel_cgroup.path)
    assert proc.returncode == 0, proc.stderr
    (made,) = set(after) - set(before)
    assert made == "my-worker"
    # Own RSS + headroom of a shared cgroup exceeds its limit (VmRSS counts pages the
    # cgroup does not charge): the budget is capped at the limit (issue 13 row 12).
    assert after[made] <= 2 * GiB
    assert after["."] == before["."]


@pytest.mark.parametrize(
    "name", ["", ".", "..", "/", "/abs", "a/b", "a\0b", "a\nb", "tab\there", "x" * 300]
)
def test_child_names_that_are_not_one_component(name: str) -> None:
    assert child_name_problem(name) is not None
    with pytest.raises(ValueError, match="one plain path component"):
        WriteOptions(child_name=name)


def test_nul_in_child_name_is_a_usage_error() -> None:
    # argv and the environment cannot carry NUL through exec; a caller in Python can.
    result = CliRunner().invoke(cli.command, ["--dry-run", "--cgroup-child", "a\0b"])
    assert result.exit_code == 2
    assert "one plain path component" in result.output


@pytest.mark.parametrize("name", ["dask-safe-worker", "worker.1", "w_2", "ünï"])
def test_plain_child_names_are_accepted(name: str) -> None:
    assert child_name_problem(name) is None


@pytest.mark.parametrize(
    ("fraction", "swap"), [(float("nan"), 0), (float("inf"), 0), (1.0, 0), (0.5, -1)]
)
def test_write_options_refuse_values_that_cannot_be_written(fraction: float, swap: int) -> None:
    with pytest.raises(ValueError):
        WriteOptions(memory_high_fraction=fraction, swap_max=swap)


@pytest.mark.parametrize("command", ["/nonexistent/worker", "no-such-worker-program-here"])
def test_a_worker_command_that_is_not_found_writes_nothing(
    command: str, kernel_cgroup: KernelCgroup, started_pids: set[int]
) -> None:
    # Found before the write rather than at exec: no child cgroup is left behind.
    kernel_cgroup.set_limit(2 * GiB)
    with other_process(kernel_cgroup, started_pids):
        before = cgroup_state(kernel_cgroup.path)
        proc = run_in(kernel_cgroup, ["--worker-command", command, "tcp://127.0.0.1:1"])
        after = cgroup_state(kernel_cgroup.path)
    assert proc.returncode == 127, proc.stderr
    assert "cannot run" in proc.stderr and "Traceback" not in proc.stderr
    assert after == before


@pytest.mark.parametrize(
    "bad", [["--nthreads", "two"], ["--nworkers", "many"], ["--memory-limit", "lots"]]
)
def test_every_bad_worker_value_is_one_usage_error(bad: list[str]) -> None:
    """Each is refused before planning, by the same check, in the same words."""
    proc = subprocess.run(
        [sys.executable, "-m", "dask_safe_worker", "--dry-run", "--log-format", "none", *bad],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("dask-safe-worker: invalid dask worker arguments: ")
    assert bad[0] in proc.stderr and "Traceback" not in proc.stderr


def _run_as_old_kernel(cg: KernelCgroup, args: list[str]) -> subprocess.CompletedProcess[str]:
    # setarch's UNAME26 personality: the real kernel reports itself as 2.6.x to uname(2).
    argv = ["setarch", platform.machine(), "--uname-2.6", *DSW, *args]
    return subprocess.run(
        cg.enter_command(argv), capture_output=True, text=True, timeout=60, check=False
    )


def test_memory_high_fraction_is_refused_before_linux_5_9(
    kernel_cgroup: KernelCgroup, started_pids: set[int]
) -> None:
    kernel_cgroup.set_limit(2 * GiB)
    with other_process(kernel_cgroup, started_pids):
        before = cgroup_state(kernel_cgroup.path)
        args = ["--worker-command", NOOP_WORKER, "--memory-high-fraction", "0.9"]
        proc = _run_as_old_kernel(kernel_cgroup, args)
        after = cgroup_state(kernel_cgroup.path)
    assert proc.returncode == 2, proc.stderr
    assert after == before
    human = [line for line in proc.stderr.splitlines() if not line.startswith("{")]
    assert human == [
        "dask-safe-worker: --memory-high-fraction needs Linux 5.9 or later (older kernels "
        "can stall a worker held at memory.high); this kernel is 2.6: drop the option or "
        "use --memory-high-fraction 0"
    ]


def test_memory_high_off_by_default_starts_on_an_old_kernel(
    kernel_cgroup: KernelCgroup, started_pids: set[int]
) -> None:
    # The default (0 = off) never asks the kernel's version: old kernels start.
    kernel_cgroup.set_limit(2 * GiB)
    with other_process(kernel_cgroup, started_pids):
        proc = _run_as_old_kernel(kernel_cgroup, ["--worker-command", NOOP_WORKER])
    assert proc.returncode == 0, proc.stderr
