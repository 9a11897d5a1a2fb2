# ruff: noqa: RUF001
"""What the nanny costs the worker's cgroup (cgroup v1, this host), per distributed release.

For each interpreter given (default: the project's venv), a fresh test cgroup W below our
own holds one `python -m distributed.cli.dask_worker --nworkers 1` (the nanny, its
multiprocessing resource tracker and the worker process); the scheduler and a client run
outside W. Two snapshots per run: idle after registration, and while the worker holds
spilled data (its own --memory-limit of 512 MiB, 1 GiB persisted). Each snapshot gives
two estimates of the nanny side's charge (see dswbench/charge.py):

- by_cgroup: W's working set minus the worker process's anonymous memory;
- by_smaps: anonymous memory of the nanny and the resource tracker (smaps_rollup).

    uv run python benchmarks/nanny_charge.py [--python PY ...] [--repeats 3] [--json out]

The cgroup v2 figures come from the same snapshot taken in every run of
benchmarks/pressure_vm.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dswbench.charge import charge, parse_stat, read_procs
from dswbench.harness import end_process, tree_pids
from dswbench.support import KernelCgroup, free_port, kernel_cgroups_usable, make_test_cgroup

MiB = 2**20
WORKER_LIMIT = 512 * MiB

VERSION_CODE = "import distributed, sys; print(distributed.__version__, sys.version.split()[0])"
CLIENT = """
import sys, time
from distributed import Client
import dask.array as da
c = Client(sys.argv[1], timeout=60)
x = c.persist(da.random.random(2**30 // 8, chunks=2**25 // 8))
print(float(c.compute(x.sum()).result()) > 0, flush=True)
print("holding", flush=True)
time.sleep(600)
"""


def snapshot(w: KernelCgroup) -> dict[str, Any]:
    stat = parse_stat((w.path / "memory.stat").read_text())
    kmem_file = w.path / "memory.kmem.usage_in_bytes"
    kernel = int(kmem_file.read_text()) if kmem_file.exists() else None
    procs = read_procs(tree_pids(w))
    return charge(stat, w.usage(), kernel, procs).as_dict()


def wait_for(path: Path, needle: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if needle in path.read_text(errors="replace"):
                return True
        time.sleep(0.2)
    return False


def version_of(py: str) -> str:
    out = subprocess.run(
        [py, "-c", VERSION_CODE],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def run_once(py: str, work: Path) -> dict[str, Any]:
    started: set[int] = set()
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    result: dict[str, Any] = {"python": py, "release": version_of(py)}
    with make_test_cgroup(started, prefix="dsw-charge") as w:
        sched = subprocess.Popen(
            [py, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", str(port), "--no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        started.add(sched.pid)
        log_path = work / f"worker-{port}.log"
        with open(log_path, "wb") as log:
            worker = subprocess.Popen(
                w.enter_command(
                    [py, "-m", "distributed.cli.dask_worker", address, "--nthreads", "2",
                     "--nworkers", "1", "--host", "127.0.0.1", "--no-dashboard",
                     "--memory-limit", str(WORKER_LIMIT),
                     "--local-directory", str(work / f"local-{port}")]
                ),
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        started.add(worker.pid)
        client: subprocess.Popen[str] | None = None
        try:
            if not wait_for(log_path, "Registered to", 120):
                result["error"] = "worker did not register"
                return result
            time.sleep(3)
            result["idle"] = snapshot(w)
            client = subprocess.Popen(
                [py, "-c", CLIENT, address], stdout=subprocess.PIPE, text=True
            )
            started.add(client.pid)
            assert client.stdout is not None
            lines = [client.stdout.readline().strip(), client.stdout.readline().strip()]
            if lines[-1] != "holding":
                result["error"] = f"client: {lines}"
                return result
            time.sleep(2)
            result["spilled"] = snapshot(w)
            result["worker_log_has_spill"] = "spill" in log_path.read_text(errors="replace")
        finally:
            if client is not None:
                end_process(client, 5)
            end_process(worker, 20)
            end_process(sched, 10)
    return result


def fmt(values: list[int]) -> str:
    med = statistics.median(values) / MiB
    lo, hi = min(values) / MiB, max(values) / MiB
    return f"{med:.1f}" if lo == hi else f"{med:.1f} ({lo:.1f}–{hi:.1f})"


def table(results: list[dict[str, Any]]) -> str:
    fields = [
        ("nanny RSS", "nanny_rss"),
        ("nanny anonymous", "nanny_anon"),
        ("nanny private (clean + dirty)", "nanny_private"),
        ("resource tracker anonymous", "tracker_anon"),
        ("**by_smaps**: nanny + tracker anonymous", "by_smaps"),
        ("worker anonymous", "worker_anon"),
        ("W working set", "working_set"),
        ("W kernel memory (kmem)", "cgroup_kernel"),
        ("**by_cgroup**: W working set − worker anonymous", "by_cgroup"),
    ]
    releases = sorted({r["release"] for r in results if "idle" in r})
    head = (
        "| MiB, median (range) | "
        + " | ".join(f"{rel} {phase}" for rel in releases for phase in ("idle", "spilled"))
        + " |"
    )
    lines = [head, "|---" * (1 + 2 * len(releases)) + "|"]
    for label, key in fields:
        cells = []
        for rel in releases:
            for phase in ("idle", "spilled"):
                mine = [r[phase] for r in results if r["release"] == rel and phase in r]
                vals = [m[key] for m in mine if m[key] is not None]
                cells.append(fmt(vals) if vals else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    runs = {rel: sum(1 for r in results if r["release"] == rel and "idle" in r) for rel in releases}
    lines.append("")
    lines.append("Runs per release: " + ", ".join(f"{k}: {v}" for k, v in runs.items()) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", default=None,
                        help="interpreter of a venv with distributed (repeatable)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, default=None, help="only print the table")
    ns = parser.parse_args(argv)
    if ns.from_json:
        print(table(json.loads(ns.from_json.read_text())))
        return 0
    reason = kernel_cgroups_usable()
    if reason:
        print(f"nanny_charge.py: cannot create test cgroups: {reason}", file=sys.stderr)
        return 2
    pythons = ns.python or [sys.executable]
    results = []
    with tempfile.TemporaryDirectory(prefix="dsw-charge-") as tmp:
        for repeat in range(ns.repeats):
            for py in pythons:  # interleaved: release after release, then again
                r = run_once(py, Path(tmp))
                r["repeat"] = repeat
                results.append(r)
                idle = r.get("idle", {})
                print(
                    f"{r['release']} #{repeat}: by_smaps={idle.get('by_smaps', 0) / MiB:.1f} "
                    f"by_cgroup={idle.get('by_cgroup', 0) / MiB:.1f} MiB idle; "
                    f"spilled by_smaps={r.get('spilled', {}).get('by_smaps', 0) / MiB:.1f} "
                    f"by_cgroup={r.get('spilled', {}).get('by_cgroup', 0) / MiB:.1f} "
                    f"{r.get('error', '')}",
                    flush=True,
                )
                if ns.json:
                    ns.json.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
