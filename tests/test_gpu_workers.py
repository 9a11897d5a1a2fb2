"""Issue 11: `dask cuda worker` starts one worker per visible GPU, each with the whole
`--memory-limit`, so the plan divides the budget by the devices it counts, or refuses.

No GPU here: a stand-in `dask-cuda-worker` on PATH records its argv, and a stand-in
`nvidia-smi` prints what the real one lists. Nothing is written (`--cgroup-write never`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_safe_worker.gpus import (
    count_device_list,
    count_nvidia_smi_list,
    devices_option,
    is_dask_cuda,
    visible_gpus,
)
from scheduler_util import audit_events

DSW = [sys.executable, "-m", "dask_safe_worker"]
GiB = 2**30


def _stand_ins(bin_dir: Path, gpus_listed: int | None) -> Path:
    bin_dir.mkdir(parents=True)
    record = bin_dir.parent / "argv.json"
    worker = bin_dir / "dask-cuda-worker"
    worker.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    worker.chmod(0o755)
    if gpus_listed is not None:
        lines = "".join(
            f"GPU {i}: NVIDIA A100-SXM4-40GB (UUID: GPU-{i:08x}-0000-0000-0000-000000000000)\\n"
            for i in range(gpus_listed)
        )
        smi = bin_dir / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] && printf '{lines}'\n")
        smi.chmod(0o755)
    return record


def run(
    tmp_path: Path, args: list[str], env: dict[str, str], gpus_listed: int | None = None
) -> tuple[subprocess.CompletedProcess[str], Path]:
    record = _stand_ins(tmp_path / "bin", gpus_listed)
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DASK_SAFE_WORKER") and k != "CUDA_VISIBLE_DEVICES"
    }
    # Only the stand-ins and the basic tools: no real nvidia-smi can be found.
    base["PATH"] = f"{tmp_path / 'bin'}:/usr/bin:/bin"
    proc = subprocess.run(
        [*DSW, "--log-format", "json", "--cgroup-write", "never", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **env},
        check=False,
    )
    return proc, record


def _limit(argv: list[str]) -> int:
    return int(argv[argv.index("--memory-limit") + 1])


def _plan(stderr: str) -> dict[str, object]:
    (made,) = [e for e in audit_events(stderr) if e["event"] == "plan.made"]
    return made


@pytest.mark.parametrize(
    "leading", [["dask-cuda-worker"], ["dask", "cuda", "worker"]], ids=["script", "subcommand"]
)
def test_one_share_per_visible_gpu(tmp_path: Path, leading: list[str]) -> None:
    args = [*leading, "tcp://127.0.0.1:1", "--rmm-pool-size", "1GB"]
    if leading[0] == "dask":
        args = ["--worker-command", "dask-cuda-worker", *leading[3:], *args[3:]]
    proc, record = run(tmp_path, args, {"CUDA_VISIBLE_DEVICES": "0,1,2"})
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(record.read_text())
    plan = _plan(proc.stderr)
    assert plan["n_workers"] == 3 and plan["nannies"] == 3
    pool, system = plan["pool"], plan["dask_default_limit"]
    assert isinstance(pool, int) and isinstance(system, int)
    # Each of the three workers gets a third of the pool: three limits fit the budget.
    assert _limit(argv) == plan["per_worker"] == min(pool // 3, system)
    (gpus,) = [e for e in audit_events(proc.stderr) if e["event"] == "worker.gpus"]
    assert (gpus["count"], gpus["source"]) == (3, "CUDA_VISIBLE_DEVICES")


def test_more_gpus_mean_a_smaller_share(tmp_path: Path) -> None:
    one, record_one = run(
        tmp_path / "a", ["dask-cuda-worker", "tcp://127.0.0.1:1"], {"CUDA_VISIBLE_DEVICES": "0"}
    )
    four, record_four = run(
        tmp_path / "b",
        ["dask-cuda-worker", "tcp://127.0.0.1:1"],
        {"CUDA_VISIBLE_DEVICES": "0,1,2,3"},
    )
    assert one.returncode == four.returncode == 0, one.stderr + four.stderr
    single = _limit(json.loads(record_one.read_text()))
    quarter = _limit(json.loads(record_four.read_text()))
    # Not N times the budget: each of four gets about a quarter of what one gets. (Not
    # `4 * quarter < single`: the host's memory moves between the two runs by more than
    # the three extra nannies' allowance on a busy machine.)
    assert 3 * quarter < single < 5 * quarter


def test_the_workers_own_devices_option_wins(tmp_path: Path) -> None:
    args = ["dask-cuda-worker", "tcp://127.0.0.1:1", "--CUDA_VISIBLE_DEVICES", "2,3"]
    proc, record = run(tmp_path, args, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert proc.returncode == 0, proc.stderr
    assert _plan(proc.stderr)["n_workers"] == 2
    assert json.loads(record.read_text())[:3] == args[
        1:4
    ] or "--CUDA_VISIBLE_DEVICES" in json.loads(record.read_text())


def test_nvidia_smi_counts_when_no_variable_is_set(tmp_path: Path) -> None:
    proc, record = run(tmp_path, ["dask-cuda-worker", "tcp://127.0.0.1:1"], {}, gpus_listed=2)
    assert proc.returncode == 0, proc.stderr
    assert _plan(proc.stderr)["n_workers"] == 2
    (gpus,) = [e for e in audit_events(proc.stderr) if e["event"] == "worker.gpus"]
    assert gpus["source"] == "nvidia-smi -L"
    assert record.exists()


@pytest.mark.parametrize(
    ("env", "gpus_listed", "says"),
    [
        pytest.param({"CUDA_VISIBLE_DEVICES": ""}, None, "no GPU is visible", id="empty-variable"),
        pytest.param({}, None, "cannot be counted", id="nothing-to-count"),
        pytest.param({}, 0, "no GPU is visible", id="nvidia-smi-lists-none"),
    ],
)
def test_refused_with_one_line_when_the_count_is_unknown_or_zero(
    tmp_path: Path, env: dict[str, str], gpus_listed: int | None, says: str
) -> None:
    proc, record = run(tmp_path, ["dask-cuda-worker", "tcp://127.0.0.1:1"], env, gpus_listed)
    assert proc.returncode == 2, proc.stderr
    human = [line for line in proc.stderr.splitlines() if not line.startswith("{")]
    assert len(human) == 1 and says in human[0], human
    assert "Traceback" not in proc.stderr
    assert not record.exists()


def test_distributeds_worker_is_not_counted(tmp_path: Path) -> None:
    proc, _ = run(tmp_path, ["--dry-run", "tcp://127.0.0.1:1"], {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert proc.returncode == 0, proc.stderr
    assert _plan(proc.stderr)["n_workers"] == 1
    assert not [e for e in audit_events(proc.stderr) if e["event"] == "worker.gpus"]


# The pure parts.

_ITEM = st.text(alphabet="0123456789abcdefGPU-", min_size=1, max_size=12)


@given(st.lists(_ITEM, max_size=8), st.sampled_from([",", ", ", " ,"]))
def test_device_list_counts_its_items(items: list[str], sep: str) -> None:
    assert count_device_list(sep.join(items)) == len(items)


def test_an_empty_device_list_is_none() -> None:
    assert count_device_list("") == 0 and count_device_list(" ") == 0


@given(st.integers(0, 16), st.booleans())
def test_nvidia_smi_list_counts_gpu_lines_not_mig_lines(gpus: int, mig: bool) -> None:
    lines = []
    for i in range(gpus):
        lines.append(f"GPU {i}: NVIDIA A100 (UUID: GPU-{i})")
        if mig:
            lines.append(f"  MIG 1g.5gb     Device  0: (UUID: MIG-{i})")
    assert count_nvidia_smi_list("\n".join(lines)) == gpus


@given(st.lists(st.sampled_from(["a", "--x", "0,1", "--"]), max_size=6))
def test_devices_option_takes_the_last_before_the_separator(rest: list[str]) -> None:
    args = ["--CUDA_VISIBLE_DEVICES", "5", *rest, "--CUDA_VISIBLE_DEVICES=6,7"]
    expected = "5" if "--" in rest else "6,7"
    assert devices_option(args) == expected


def test_which_commands_are_dask_cuda() -> None:
    assert is_dask_cuda(["/opt/conda/bin/dask-cuda-worker"])
    assert is_dask_cuda(["dask", "cuda", "worker"])
    assert not is_dask_cuda(["dask", "worker"]) and not is_dask_cuda([])
    assert not is_dask_cuda([sys.executable, "-m", "distributed.cli.dask_worker"])


def test_the_driver_files_count_before_nvidia_smi(tmp_path: Path) -> None:
    gpus = tmp_path / "driver/nvidia/gpus"
    for bus in ("0000:3b:00.0", "0000:5e:00.0"):
        (gpus / bus).mkdir(parents=True)
    found = visible_gpus([], {}, proc_root=tmp_path, nvidia_smi=None)
    assert (found.count, found.source) == (2, "/proc/driver/nvidia/gpus")
    assert visible_gpus([], {}, proc_root=tmp_path / "none", nvidia_smi=None).count is None
