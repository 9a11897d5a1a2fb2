"""Start a scheduler on 127.0.0.1 and dask-safe-worker, compute, and show the limits.

When it can (root, a writable memory cgroup), the worker runs in a demo cgroup created
below this process's own and limited to --cgroup-limit, so the tool's kernel limit lands
there and is removed afterwards. Otherwise the worker runs with --cgroup-write never.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cgroup_util import kernel_cgroups_usable, make_test_cgroup
from dask_safe_worker.sizes import format_bytes, parse_bytes
from scheduler_util import scheduler


def kernel_sentence(outcome: dict[str, Any], budget: int) -> str:
    """The write outcome of the plan file in words, e.g. "kernel limit 2.00 GiB already
    set (not above the budget), left as is"."""
    reason, read_back = outcome.get("reason"), outcome.get("read_back")
    where = {"own": " on our own cgroup", "child": " on a child cgroup made for the worker"}
    shown = "?" if read_back is None else format_bytes(int(read_back))
    if reason == "written":
        return f"kernel limit {shown} written{where.get(str(outcome.get('strategy')), '')}"
    if reason == "existing_lower":
        return f"kernel limit {shown} already set (not above the budget), left as is"
    if reason == "below_usage":
        return (
            f"no kernel limit written: the cgroup already uses more than the budget of "
            f"{format_bytes(budget)}"
        )
    if reason == "disabled":
        return "no kernel limit written (--cgroup-write never)"
    if reason == "no_memory_cgroup":
        return "no kernel limit written: no memory cgroup to limit"
    return f"no kernel limit written: the kernel refused ({reason})"


def planned_workers(plan_file: Path, timeout: float = 60) -> int:
    """The worker count the tool resolved (it writes its plan before exec)."""
    import time

    deadline = time.monotonic() + timeout
    while not plan_file.exists() or not plan_file.stat().st_size:
        if time.monotonic() > deadline:
            raise TimeoutError("dask-safe-worker wrote no plan")
        time.sleep(0.1)
    return int(json.loads(plan_file.read_text())["plan"]["n_workers"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nworkers", default="2")
    parser.add_argument("--cgroup-limit", default="2GiB", help="limit of the demo cgroup")
    args = parser.parse_args()

    import dask.array as da
    from distributed import Client

    plan_file = Path(tempfile.mkdtemp(prefix="dsw-demo-")) / "plan.json"
    argv = [sys.executable, "-m", "dask_safe_worker", "--plan-file", str(plan_file)]
    with ExitStack() as stack:
        started: set[int] = set()
        why_not = kernel_cgroups_usable()
        if why_not is None:
            cg = stack.enter_context(make_test_cgroup(started, prefix="dsw-demo"))
            cg.set_limit(parse_bytes(args.cgroup_limit))
            print(f"demo cgroup limited to {args.cgroup_limit}; the worker starts inside it")
        else:
            cg = None
            argv += ["--cgroup-write", "never"]
            print(f"no demo cgroup ({why_not}); running with --cgroup-write never")
        address = stack.enter_context(scheduler())
        argv += [address, "--nworkers", args.nworkers, "--nthreads", "1", "--no-dashboard"]
        full = cg.enter_command(argv) if cg else argv
        worker = subprocess.Popen(full, stderr=subprocess.DEVNULL)
        started.add(worker.pid)
        try:
            with Client(address, timeout=30) as client:
                client.wait_for_workers(planned_workers(plan_file), timeout=120)
                x = da.random.random((4000, 4000), chunks=(1000, 1000))
                total = float((x + x.T).mean().compute())
                limits = client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
        finally:
            os.kill(worker.pid, signal.SIGTERM)
            worker.wait(60)
        doc = json.loads(plan_file.read_text())
    plan, measured = doc["plan"], doc["measurement"]
    outcome = doc["cgroup_write"]["outcome"] or {}
    print(f"\ncomputation result: mean = {total:.4f}\n")
    print(
        f"measured: MemAvailable {format_bytes(measured['mem_available'])}, "
        f"available {format_bytes(measured['available'])} (limited by {measured['limiting']})"
    )
    print(
        f"planned:  budget {format_bytes(plan['budget'])}, overhead "
        f"{format_bytes(plan['overhead'])}, per worker {format_bytes(plan['per_worker'])}"
    )
    print(f"kernel:   {kernel_sentence(outcome, plan['budget'])}\n")
    print(f"{'worker':<28} {'Dask memory_limit':>18} {'planned':>14} {'available':>14}")
    ok = True
    for address_, limit in sorted(limits.items()):
        print(
            f"{address_:<28} {format_bytes(limit):>18} "
            f"{format_bytes(plan['effective_per_worker']):>14} "
            f"{format_bytes(measured['available']):>14}"
        )
        ok &= limit == plan["effective_per_worker"]
    print("\nevery worker's limit equals the plan" if ok else "\nMISMATCH between plan and worker")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
