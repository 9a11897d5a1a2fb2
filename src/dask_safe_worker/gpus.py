"""How many workers `dask cuda worker` will start: one per visible GPU.

dask-cuda's `--memory-limit` applies to each of them, so the plan must divide the budget
by the device count. The rule is dask-cuda's own: its `--CUDA_VISIBLE_DEVICES` option,
else the `CUDA_VISIBLE_DEVICES` variable, else every GPU the driver has. Parsers are
pure; `visible_gpus` reads the driver's files below `proc_root` and asks `nvidia-smi`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .events import Audit
from .exits import EXIT_USAGE, Refused

CUDA_OPTION = "--CUDA_VISIBLE_DEVICES"


def is_dask_cuda(prefix: Sequence[str]) -> bool:
    """Whether the worker command is dask-cuda's, which starts one worker per GPU."""
    if not prefix:
        return False
    tail = [os.path.basename(prefix[0]), *prefix[1:]]
    return tail[:1] == ["dask-cuda-worker"] or tail[:3] == ["dask", "cuda", "worker"]


def count_device_list(value: str) -> int:
    """`CUDA_VISIBLE_DEVICES`: a comma-separated list of indices or UUIDs; empty is none."""
    return len([item for item in value.split(",") if item.strip()])


def count_nvidia_smi_list(text: str) -> int:
    """`nvidia-smi -L`: one `GPU <n>: <name> (UUID: ...)` line per device (MIG lines,
    indented below their GPU, are not separate devices to dask-cuda)."""
    return sum(1 for line in text.splitlines() if line.startswith("GPU "))


def devices_option(args: Sequence[str]) -> str | None:
    """The last `--CUDA_VISIBLE_DEVICES` given to dask-cuda's worker, before any `--`."""
    value: str | None = None
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            break
        if token == CUDA_OPTION:
            value = args[i + 1] if i + 1 < len(args) else None
            i += 2
            continue
        if token.startswith(CUDA_OPTION + "="):
            value = token.split("=", 1)[1]
        i += 1
    return value


@dataclass(frozen=True)
class GpuCount:
    count: int | None
    source: str  # where the count came from, or why there is none

    def as_dict(self) -> dict[str, object]:
        return {"count": self.count, "source": self.source}


def visible_gpus(
    args: Sequence[str],
    environ: Mapping[str, str],
    proc_root: Path = Path("/proc"),
    nvidia_smi: str | None = "nvidia-smi",
) -> GpuCount:
    """The number of workers `dask cuda worker args` starts, or None with the reason."""
    option = devices_option(args)
    if option is not None:
        return GpuCount(count_device_list(option), CUDA_OPTION)
    if "CUDA_VISIBLE_DEVICES" in environ:
        return GpuCount(count_device_list(environ["CUDA_VISIBLE_DEVICES"]), "CUDA_VISIBLE_DEVICES")
    try:
        found = sorted(p.name for p in (proc_root / "driver/nvidia/gpus").iterdir())
    except OSError:
        found = []
    if found:
        return GpuCount(len(found), "/proc/driver/nvidia/gpus")
    # Only for dask-cuda without a device list: every other start is spared their import.
    import shutil
    import subprocess

    program = shutil.which(nvidia_smi) if nvidia_smi else None
    if program is None:
        return GpuCount(None, "no CUDA_VISIBLE_DEVICES, no NVIDIA driver in /proc, no nvidia-smi")
    try:
        out = subprocess.run(
            [program, "-L"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return GpuCount(None, f"nvidia-smi -L failed: {exc}")
    if out.returncode != 0:
        return GpuCount(None, f"nvidia-smi -L exited {out.returncode}")
    return GpuCount(count_nvidia_smi_list(out.stdout), "nvidia-smi -L")


def gpu_workers(prefix: Sequence[str], worker_args: Sequence[str], audit: Audit) -> int | None:
    """How many workers dask-cuda starts (None: not dask-cuda). It gives every GPU's
    worker the whole --memory-limit, so the GPUs are counted, or the start is Refused
    rather than give each of them the node's budget."""
    if not is_dask_cuda(prefix):
        return None
    found = visible_gpus(worker_args, os.environ)
    audit("worker.gpus", **found.as_dict())
    if found.count is None:
        raise Refused(
            EXIT_USAGE,
            f"{' '.join(prefix)} starts one worker per GPU, and the GPUs cannot be counted "
            f"({found.source}): set CUDA_VISIBLE_DEVICES",
        )
    if found.count == 0:
        raise Refused(
            EXIT_USAGE,
            f"{' '.join(prefix)} would start no worker: no GPU is visible ({found.source} "
            "lists none)",
        )
    return found.count
