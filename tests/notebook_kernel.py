"""A notebook kernel for tests/test_notebook.py: a process that starts a safe LocalCluster.

Run inside a test cgroup (it is "ours" there, never the session's). Prints one JSON
document on stdout with what it saw; the audit log goes to stderr.

    python notebook_kernel.py {processes,threads} [grow MIB] [beside]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

GROW_WAIT = 60.0


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def memory_cgroup() -> str:
    for line in read("/proc/self/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    return ""


def child_limits(kernel_cgroup: str) -> list[int]:
    """The kernel limits of the workers' child cgroups below the kernel's own."""
    base = f"/sys/fs/cgroup/memory{kernel_cgroup}"
    if not os.path.isdir(base):
        return []
    return [
        int(read(os.path.join(base, name, "memory.limit_in_bytes")))
        for name in sorted(os.listdir(base))
        if name.startswith("dask-safe-worker")
    ]


def limits(client: Any) -> dict[str, int]:
    def limit(dask_worker: Any) -> int:
        return int(dask_worker.memory_manager.memory_limit)

    return {str(k): int(v) for k, v in client.run(limit).items()}


def scheduler_limits(client: Any) -> list[int]:
    return sorted(int(w["memory_limit"]) for w in client.scheduler_info()["workers"].values())


def main() -> None:
    from distributed import Client

    import dask_safe_worker as dsw

    processes = sys.argv[1] == "processes"
    grow = int(sys.argv[3]) * 2**20 if len(sys.argv) > 3 and sys.argv[2] == "grow" else 0
    out: dict[str, Any] = {
        "kernel_pid": os.getpid(),
        "kernel_cgroup": memory_cgroup(),
        "memory_limit": dsw.memory_limit(n_workers=2, threads_per_worker=1, processes=processes),
    }
    cluster = dsw.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=processes,
        dashboard_address=None,
        log_format="json",
        follow_interval=0.5,
    )
    with cluster, Client(cluster) as client:
        out["limits"] = limits(client)
        out["child_limits"] = child_limits(out["kernel_cgroup"])
        out["scheduler_limits"] = scheduler_limits(client)
        out["worker_pids"] = sorted(client.run(os.getpid).values())
        out["worker_cgroups"] = sorted(client.run(memory_cgroup).values())
        out["worker_oom_score_adj"] = sorted(
            int(v) for v in client.run(read, "/proc/self/oom_score_adj").values()
        )
        out["plan_files"] = sorted(
            set(client.run(lambda: os.environ.get("DASK_SAFE_WORKER_PLAN", "")).values())
        )
        # What a dask-safe-worker started from the kernel would read as its --plan-file
        # (threads: the workers' environment is the kernel's).
        out["kernel_plan_file_option"] = os.environ.get("DASK_SAFE_WORKER_PLAN_FILE")
        from dask_safe_worker.cluster_audit.client import run_audit

        _, rows, _, _ = run_audit(cluster.scheduler_address, None, None, 10.0, 60.0)
        keys = ("managed", "verdict", "kernel_limit", "kernel_limit_path", "dask_memory_limit")
        out["audit"] = [{k: row[k] for k in keys} for row in rows]
        if "beside" in sys.argv:
            # A dask-safe-worker start beside the cluster, in the kernel's cgroup.
            cli = os.path.join(os.path.dirname(sys.executable), "dask-safe-worker")
            dry = subprocess.run(
                [cli, "--dry-run", "--nworkers", "1", "tcp://127.0.0.1:1"],
                capture_output=True,
                text=True,
                check=True,
            )
            plan = json.loads(dry.stdout)["plan"]
            out["beside"] = {k: plan[k] for k in ("siblings", "siblings_committed", "members")}
        if grow:
            # The kernel pulls a result to the client: pages really touched.
            held = bytearray(b"\1") * grow
            before = out["limits"]
            deadline = time.monotonic() + GROW_WAIT
            while time.monotonic() < deadline:
                now = limits(client)
                if all(now[k] < before[k] for k in now):
                    break
                time.sleep(0.25)
            # The kernel limit follows once Dask's side holds the lower limit.
            time.sleep(3)
            out["limits_after_growth"] = limits(client)
            out["scheduler_limits_after_growth"] = scheduler_limits(client)
            out["child_limits_after_growth"] = child_limits(out["kernel_cgroup"])
            out["grown"] = len(held)
        out["child_cgroups"] = (
            [p for p in os.listdir(f"/sys/fs/cgroup/memory{out['kernel_cgroup']}") if "dask" in p]
            if os.path.isdir(f"/sys/fs/cgroup/memory{out['kernel_cgroup']}")
            else []
        )
    out["after_close_children"] = (
        [p for p in os.listdir(f"/sys/fs/cgroup/memory{out['kernel_cgroup']}") if "dask" in p]
        if os.path.isdir(f"/sys/fs/cgroup/memory{out['kernel_cgroup']}")
        else []
    )
    out["after_close_plan_files"] = [p for p in out["plan_files"] if p and os.path.exists(p)]
    out["kernel_cgroup_after_close"] = memory_cgroup()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
