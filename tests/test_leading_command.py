"""Issue 15 items 3 and 12: charts that name the worker command; a limit that does not fit.

With `ENTRYPOINT ["dask-safe-worker"]`, the args of the dask Helm chart, the
dask-kubernetes operator and dask-docker's compose file arrive as ours. Every run is a
`--dry-run`: nothing is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler_util import audit_events

DSW = [sys.executable, "-m", "dask_safe_worker"]
DEFAULT = [sys.executable, "-m", "distributed.cli.dask_worker"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DASK_SAFE_WORKER")}
    return subprocess.run(
        [*DSW, "--log-format", "json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **(env or {})},
        check=False,
    )


SHAPES = [
    # dask/helm-chart, dask/templates/dask-worker-deployment.yaml with its values.yaml
    # defaults (worker.image.dask_worker "dask-worker", default_resources, portDashboard)
    pytest.param(
        ["dask-worker", "dask-scheduler:8786", "--nthreads", "1", "--memory-limit", "4GiB",
         "--no-dashboard", "--dashboard-address", "8790"],
        id="helm-chart",
    ),
    # dask-kubernetes operator, the worker spec of a DaskCluster (address from the env)
    pytest.param(
        ["dask-worker", "--name", "worker-0", "--dashboard", "--dashboard-address", "8788"],
        id="operator-dask-worker",
    ),
    pytest.param(
        ["dask", "worker", "--name", "worker-0", "--dashboard", "--dashboard-address", "8788"],
        id="operator-dask-worker-subcommand",
    ),
    # dask/dask-docker, docker-compose.yml: command: ["dask-worker", "tcp://scheduler:8786"]
    pytest.param(["dask-worker", "tcp://scheduler:8786"], id="compose-dask-worker"),
    pytest.param(["dask", "worker", "scheduler:8786"], id="compose-dask-worker-subcommand"),
]  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
def test_chart_shapes_run_distributeds_worker(shape: list[str]) -> None:
    proc = run("--dry-run", *shape, env={"DASK_SCHEDULER_ADDRESS": "tcp://127.0.0.1:1"})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    given = shape[2:] if shape[0] == "dask" else shape[1:]
    # The worker command is run as distributed's own worker, its arguments unchanged.
    assert doc["argv"][: len(DEFAULT)] == DEFAULT
    assert doc["argv"][len(DEFAULT) : len(DEFAULT) + len(given)] == given
    leading = [e for e in audit_events(proc.stderr) if e["event"] == "worker.command.leading"]
    assert leading and leading[0]["given"] == shape[: len(shape) - len(given)]


@pytest.mark.parametrize(
    "shape",
    [
        ["dask", "cuda", "worker", "tcp://127.0.0.1:1", "--rmm-pool-size", "1GB"],
        ["dask-cuda-worker", "tcp://127.0.0.1:1", "--device-memory-limit", "1GB"],
    ],
)
def test_dask_cuda_worker_is_run_as_given(shape: list[str]) -> None:
    proc = run("--dry-run", *shape, env={"CUDA_VISIBLE_DEVICES": "0"})
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout)["argv"]
    assert argv[: len(shape)] == shape
    assert argv[-2] == "--memory-limit"


@pytest.mark.parametrize(
    "shape",
    [
        ["dask-scheduler"],
        ["dask", "scheduler"],
        ["python", "app.py"],
        ["bash", "-c", "dask worker tcp://127.0.0.1:1"],
        ["prepare.sh", "dask-worker", "tcp://127.0.0.1:1"],
    ],
)
def test_anything_else_is_refused_before_any_write(shape: list[str], tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    proc = run("--cgroup-write", "never", "--plan-file", str(plan), *shape)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--worker-help" in proc.stderr.splitlines()[-1]
    assert not plan.exists()


def test_a_leading_command_and_worker_command_together_are_refused() -> None:
    proc = run("--dry-run", "--worker-command", "dask worker", "dask-worker", "tcp://x:1")
    assert proc.returncode == 2
    assert "give one" in proc.stderr


def test_a_memory_limit_that_does_not_fit_warns_and_names_the_flag() -> None:
    proc = run("--dry-run", "tcp://127.0.0.1:1", "--nworkers", "2", "--memory-limit", "0.9")
    assert proc.returncode == 0, proc.stderr
    human = [line for line in proc.stderr.splitlines() if not line.startswith("{")]
    assert len(human) == 1 and "--clamp-memory-limit" in human[0], human
    warning = [
        e for e in audit_events(proc.stderr) if e["event"] == "plan.user_memory_limit.warning"
    ]
    assert warning and warning[0]["level"] == "warning"
    # The user's value still goes to dask unchanged.
    argv = json.loads(proc.stdout)["argv"]
    assert argv[argv.index("--memory-limit") + 1] == "0.9"


@pytest.mark.parametrize(
    "extra",
    [["--memory-limit", "0.9", "--clamp-memory-limit"], ["--memory-limit", "300MiB"]],
)
def test_no_warning_when_clamped_or_fitting(extra: list[str]) -> None:
    proc = run("--dry-run", "tcp://127.0.0.1:1", "--nworkers", "2", *extra)
    assert proc.returncode == 0, proc.stderr
    assert all(line.startswith("{") for line in proc.stderr.splitlines())
