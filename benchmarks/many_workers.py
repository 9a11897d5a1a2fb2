# ruff: noqa: RUF002
"""Many workers (issue 14): `--nworkers 8` in a 4 GiB cgroup, and the audit of 32 workers.

Part 1, on this host's cgroup v1: a test cgroup M (4 GiB, below our own) with W inside,
`dask-safe-worker --nworkers 8 --nthreads 1` (2 CPUs) started in W. Reported: every
worker's Dask limit, their sum against W's kernel limit (which the tool wrote) and M's,
the budget efficiency, the nanny side's charge (one process hosts all eight nannies),
and a spill workload of 1.5 × M's headroom across the eight workers: outcome, wall
time, kernel OOM kills, nanny restarts, bytes spilled per worker.

Part 2: a cluster of 32 workers on 127.0.0.1 in a test cgroup: three plain
`dask worker --nworkers 8 --memory-limit 256MiB` and one
`dask-safe-worker --cgroup-write never --nworkers 8`; then `dask-safe-audit --json`
five times: wall time and peak RSS of the audit process (goal ≤ 5 s for 32 workers),
and its verdicts.

    uv run python benchmarks/many_workers.py [--json out.json] [--audits 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dswbench.charge import charge, parse_stat, read_procs
from dswbench.common import PY, SAFE, GiB, MiB
from dswbench.harness import bench_env, end_process, scheduler, tree_pids
from dswbench.support import kernel_cgroups_usable, make_test_cgroup
from dswbench.workloads import (
    persist_and_sum,
    pickle_by_value,
    spill_bytes,
    worker_stats,
)

AUDIT = str(Path(PY).parent / "dask-safe-audit")
M_LIMIT = 4 * GiB
NWORKERS = 8
# The spill's chunks: as in the small VM (benchmarks/pressure_vm.py).
CHUNK = 32 * MiB


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def common_args(address: str, local: Path) -> list[str]:
    # --death-timeout also bounds the start of the nanny's worker processes: eight of them
    # spawning at once on two busy CPUs need minutes, not the usual 60 s.
    return [address, "--nthreads", "1", "--nworkers", str(NWORKERS), "--host", "127.0.0.1",
            "--no-dashboard", "--local-directory", str(local),
            "--death-timeout", "600"]  # fmt: skip


def part_nworkers(work: Path) -> dict[str, Any]:
    from distributed import Client

    out: dict[str, Any] = {"m_limit": M_LIMIT, "nworkers": NWORKERS}
    started: set[int] = set()
    with make_test_cgroup(started, prefix="dsw-many") as m:
        m.set_limit(M_LIMIT)
        w = m.child("w")
        out["headroom_before"] = headroom = M_LIMIT - m.working_set()
        with scheduler(work / "sched-nw.log", started) as (address, _sched):
            argv = [SAFE, "--log-format", "json", "--plan-file", str(work / "plan.json"),
                    *common_args(address, work / "local-nw")]  # fmt: skip
            log_file = open(work / "worker-nw.log", "wb")  # noqa: SIM115
            launched = time.monotonic()
            worker = subprocess.Popen(
                w.enter_command(argv), stdout=log_file, stderr=subprocess.STDOUT, env=bench_env()
            )
            started.add(worker.pid)
            client = Client(address, timeout=30)
            try:
                client.wait_for_workers(NWORKERS, timeout=300)
                out["register_all_s"] = time.monotonic() - launched
                limits = client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
                out["limits"] = sorted(limits.values())
                out["sum_limits"] = sum(limits.values())
                out["w_kernel_limit"] = w.limit()
                out["efficiency"] = out["sum_limits"] / headroom
                time.sleep(2)
                stat = parse_stat((w.path / "memory.stat").read_text())
                out["charge_idle"] = charge(
                    stat, w.usage(), None, read_procs(tree_pids(w))
                ).as_dict()
                out["plan"] = json.loads((work / "plan.json").read_text())
                out["workload_bytes"] = spill_bytes(headroom, 1.5, CHUNK)
                t = time.monotonic()
                try:
                    persist_and_sum(client, out["workload_bytes"], CHUNK, 600)
                    out["outcome"] = "completed"
                except Exception as exc:
                    out["outcome"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                out["wall_s"] = time.monotonic() - t
                stats = client.run(worker_stats, on_error="return")
                out["spilled_per_worker"] = sorted(
                    v["disk_write_bytes"] for v in stats.values() if isinstance(v, dict)
                )
                out["nanny_alive"] = worker.poll() is None
            finally:
                with contextlib.suppress(Exception):
                    client.close(timeout=5)
                end_process(worker, 30)
                log_file.close()
        out["oom_kills_w"], out["oom_kills_m"] = w.oom_kills(), m.oom_kills()
        out["failcnt_w"] = int((w.path / "memory.failcnt").read_text())
        out["peak_w"] = int((w.path / "memory.max_usage_in_bytes").read_text())
        text = (work / "worker-nw.log").read_text(errors="replace")
        out["memory_restarts"] = text.count("memory budget. Restarting")
        out["killed_by_signal"] = text.count("was killed by signal")
    return out


def run_audit(address: str) -> dict[str, Any]:
    t = time.monotonic()
    proc = subprocess.Popen([AUDIT, address, "--json", "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    stdout, stderr = proc.communicate()
    wall = time.monotonic() - t
    doc: dict[str, Any] = {"wall_s": wall, "exit": proc.returncode}
    try:
        report = json.loads(stdout)
        doc["summary"] = report.get("summary")
        doc["workers"] = len(report.get("workers", []))
    except ValueError:
        doc["stderr"] = stderr.decode(errors="replace")[-500:]
    return doc


def audit_peak_rss(address: str) -> int:
    """Peak RSS (bytes) of one audit run, from wait4's rusage of that process alone."""
    proc = subprocess.Popen([AUDIT, address, "--json"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return int(usage.ru_maxrss) * 1024


def part_audit(work: Path, audits: int) -> dict[str, Any]:
    from distributed import Client

    out: dict[str, Any] = {}
    started: set[int] = set()
    with (
        make_test_cgroup(started, prefix="dsw-audit") as m,
        scheduler(work / "sched-audit.log", started) as (address, _sched),
    ):
        procs = []
        logs = []
        client = Client(address, timeout=30)
        # One member at a time: 32 interpreters importing distributed at once on two
        # CPUs miss the nanny's start-up timeout.
        try:
            env = {**bench_env(), "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "300s"}
            for i in range(4):
                args = common_args(address, work / f"local-a{i}")
                if i == 0:
                    argv = [SAFE, "--cgroup-write", "never", "--log-format", "none", *args]
                else:
                    argv = [PY, "-m", "distributed.cli.dask_worker", *args,
                            "--memory-limit", "256MiB"]  # fmt: skip
                f = open(work / f"worker-a{i}.log", "wb")  # noqa: SIM115
                logs.append(f)
                p = subprocess.Popen(
                    m.enter_command(argv), stdout=f, stderr=subprocess.STDOUT, env=env
                )
                started.add(p.pid)
                procs.append(p)
                client.wait_for_workers(NWORKERS * (i + 1), timeout=600)
                log(f"audit cluster: {NWORKERS * (i + 1)} workers")
            out["workers"] = len(client.scheduler_info(n_workers=-1)["workers"])
            time.sleep(2)
            runs = [run_audit(address) for _ in range(audits)]
            out["runs"] = runs
            out["peak_rss"] = [audit_peak_rss(address) for _ in range(3)]
        finally:
            with contextlib.suppress(Exception):
                client.close(timeout=5)
            for p in procs:
                end_process(p, 30)
            for f in logs:
                f.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--audits", type=int, default=5)
    parser.add_argument("--skip-nworkers", action="store_true")
    ns = parser.parse_args(argv)
    reason = kernel_cgroups_usable()
    if reason:
        print(f"many_workers.py: cannot create test cgroups: {reason}", file=sys.stderr)
        return 2
    pickle_by_value()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dsw-many-") as tmp:
        if not ns.skip_nworkers:
            result["nworkers"] = nw = part_nworkers(Path(tmp))
            log(
                f"nworkers {NWORKERS}: limits {[round(v / MiB) for v in nw.get('limits', [])]} "
                f"MiB, sum {nw.get('sum_limits', 0) / MiB:.0f} MiB, W kernel limit "
                f"{nw.get('w_kernel_limit', 0) / MiB:.0f} MiB, headroom "
                f"{nw['headroom_before'] / MiB:.0f} MiB, efficiency {nw.get('efficiency', 0):.3f}; "
                f"spill {nw.get('outcome')} in {nw.get('wall_s', 0):.1f} s, OOM kills W/M "
                f"{nw.get('oom_kills_w')}/{nw.get('oom_kills_m')}, restarts "
                f"{nw.get('memory_restarts')}, nanny side by_smaps "
                f"{nw.get('charge_idle', {}).get('by_smaps', 0) / MiB:.1f} MiB"
            )
            if ns.json:
                ns.json.write_text(json.dumps(result, indent=1, default=str))
        result["audit"] = au = part_audit(Path(tmp), ns.audits)
        walls = [r["wall_s"] for r in au.get("runs", [])]
        log(
            f"audit over {au.get('workers')} workers: wall median "
            f"{statistics.median(walls) if walls else 0:.2f} s (range "
            f"{min(walls, default=0):.2f}-{max(walls, default=0):.2f}), peak RSS "
            f"{max(au.get('peak_rss', [0])) / MiB:.0f} MiB, summary "
            f"{au.get('runs', [{}])[0].get('summary')}"
        )
    if ns.json:
        ns.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
