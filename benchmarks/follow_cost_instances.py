"""What following costs with several real instances on one host (issue 25): the watch's
CPU and the supervisor's memory.

N (default 4) `dask-safe-worker` instances with the default (following, `--follow-interval`
1 s), each with a real Dask nanny and worker (`--nthreads 1`), are started inside one test
cgroup below our own (limit `--limit`, default 4 GiB: they share its pool and each writes
its share into its own child cgroup) and register with one scheduler on 127.0.0.1. After
`--warmup` seconds (arrival, shares settled) the supervisors' CPU time (utime + stime of
/proc/<pid>/stat) is read at the start and the end of `--seconds`, and their VmRSS,
RssAnon and RssFile at the end. The pool's claims go to a private runtime directory.
The supervisor is the launched process itself (it forks the worker and stays beside it);
the script checks that it is `dask-safe-worker` and the parent of the nanny.

    uv run python benchmarks/follow_cost_instances.py [--instances 4] [--seconds 60]
        [--json benchmarks/data/follow-cost-instances.json] [--window-at EPOCH]

Prints one JSON document on stdout. Only processes it started are ended, by pid.
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

# dswbench is found beside this file (a script's directory leads sys.path).
from dswbench.common import GiB, compile_bytecode
from dswbench.harness import contender_argv, end_process, scheduler, tree_pids, worker_args
from dswbench.support import kernel_cgroups_usable, make_test_cgroup

CLK_TCK = os.sysconf("SC_CLK_TCK")
FIELDS = ("VmRSS", "RssAnon", "RssFile")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_mib(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            out[f"{key}_mib"] = round(int(value.split()[0]) / 1024, 2)
    return out


def kids(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cmdline(pid: int) -> str:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return " ".join(p.decode(errors="replace") for p in raw.split(b"\0") if p)


def follow_events(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("{") and '"follow.' in line:
            with contextlib.suppress(ValueError):
                name = str(json.loads(line).get("event"))
                counts[name] = counts.get(name, 0) + 1
    return counts


def audit_lines(text: str) -> list[dict[str, Any]]:
    """The plan, pool and follow audit lines of one instance (what it planned, and why)."""
    keep = ("plan.made", "pool.", "follow.", "cgroup.write.outcome")
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if str(event.get("event", "")).startswith(keep):
                    event.pop("plan", None)
                    out.append(event)
    return out


def measure(
    instances: int, seconds: float, warmup: float, limit: int, window_at: float = 0.0
) -> dict[str, Any]:
    from distributed import Client

    started: set[int] = set()
    with tempfile.TemporaryDirectory(prefix="dsw-cost-") as tmp:
        work = Path(tmp)
        runtime = work / "run"
        runtime.mkdir(mode=0o700)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_SAFE_WORKER")}
        env["XDG_RUNTIME_DIR"] = str(runtime)
        with make_test_cgroup(started, prefix="dsw-bench-cost") as m:
            m.set_limit(limit)
            with scheduler(work / "scheduler.log", started) as (address, _sched):
                client = Client(address, timeout=60)
                procs: list[subprocess.Popen[bytes]] = []
                logs = []
                try:
                    for i in range(instances):
                        args = worker_args(address, str(work / f"local-{i}"))
                        args[args.index("--nthreads") + 1] = "1"
                        argv = contender_argv("safe", args, work / f"plan-{i}.json")
                        logs.append(open(work / f"instance-{i}.log", "wb"))  # noqa: SIM115
                        proc = subprocess.Popen(
                            m.enter_command(argv), stdout=logs[-1], stderr=subprocess.STDOUT,
                            env=env,
                        )  # fmt: skip
                        started.add(proc.pid)
                        procs.append(proc)
                    client.wait_for_workers(instances, timeout=240)
                    time.sleep(warmup)
                    # Two checkouts run side by side share one window: both wait for it.
                    time.sleep(max(0.0, window_at - time.time()))
                    pids = [p.pid for p in procs]
                    for pid in pids:
                        assert "dask-safe-worker" in cmdline(pid), cmdline(pid)
                        nannies = [cmdline(k) for k in kids(pid)]
                        assert any("distributed" in c for c in nannies), (pid, nannies)
                    before_events = [
                        follow_events((work / f"instance-{i}.log").read_text(errors="replace"))
                        for i in range(instances)
                    ]
                    load0 = os.getloadavg()
                    window_start = time.time()
                    c0 = [cpu_s(pid) for pid in pids]
                    t0 = time.monotonic()
                    time.sleep(seconds)
                    c1 = [cpu_s(pid) for pid in pids]
                    t1 = time.monotonic()
                    load1 = os.getloadavg()
                    rss = [status_mib(pid) for pid in pids]
                    after_events = [
                        follow_events((work / f"instance-{i}.log").read_text(errors="replace"))
                        for i in range(instances)
                    ]
                    alive = sum(p.poll() is None for p in procs)
                    audit = [
                        audit_lines((work / f"instance-{i}.log").read_text(errors="replace"))
                        for i in range(instances)
                    ]
                    limits = client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
                finally:
                    with contextlib.suppress(Exception):
                        client.close(timeout=5)
                    for proc in procs:
                        end_process(proc, 20)
                    for f in logs:
                        f.close()
                    for pid in tree_pids(m):
                        if pid in started:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, 9)
    wall = t1 - t0
    used = [b - a for a, b in zip(c0, c1, strict=True)]
    events_in_window = [
        {
            k: after.get(k, 0) - before.get(k, 0)
            for k in after
            if after.get(k, 0) != before.get(k, 0)
        }
        for before, after in zip(before_events, after_events, strict=True)
    ]
    return {
        "instances": instances,
        "interval_s": 1.0,
        "limit_bytes": limit,
        "window_s": round(wall, 2),
        "warmup_s": warmup,
        "supervisor_cpu_s": [round(u, 2) for u in used],
        "supervisor_cpu_percent": [round(100 * u / wall, 3) for u in used],
        "total_cpu_percent_of_one_core": round(100 * sum(used) / wall, 3),
        "clock_ticks_per_s": CLK_TCK,
        "supervisor_status": rss,
        "supervisor_vmrss_mib_median": statistics.median(r["VmRSS_mib"] for r in rss),
        "dask_limits_gib": sorted(round(v / GiB, 3) for v in limits.values()),
        "follow_events_in_window": events_in_window,
        "audit": audit,
        "instances_alive": alive,
        "window_start_unix": round(window_start, 1),
        "loadavg_start": load0,
        "loadavg_end": load1,
        "cpu_count": os.cpu_count(),
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--limit", type=int, default=4 * GiB, help="the test cgroup's limit")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--window-at",
        type=float,
        default=0.0,
        help="start the window no sooner than this time (seconds since the epoch): two "
        "checkouts measured side by side then share one window",
    )
    ns = parser.parse_args()
    reason = kernel_cgroups_usable()
    if reason:
        print(f"follow_cost_instances.py: cannot create test cgroups: {reason}", file=sys.stderr)
        return 2
    compile_bytecode()
    doc = {"benchmark": "follow_cost_instances", **measure(
        ns.instances, ns.seconds, ns.warmup, ns.limit, ns.window_at)}  # fmt: skip
    given = " ".join(sys.argv[1:])
    doc["command"] = f"uv run python benchmarks/follow_cost_instances.py {given}".rstrip()
    text = json.dumps(doc, indent=1)
    if ns.json:
        ns.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
