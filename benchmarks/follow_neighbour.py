"""Workload "neighbour grows" in the "VM with agents" scenario (cgroup v1, this host).

M (3 GiB) holds an agent of 600 MiB and W, where the worker starts. A spill workload sized
from M's headroom runs; GROW_AFTER_S seconds into it the agent grows by half the worker's
budget (the headroom measured before the start). Contenders, interleaved per repeat:

- plain: `python -m distributed.cli.dask_worker` (limit = host RAM);
- safe: `dask-safe-worker` (static plan, kernel limit on W);
- follow: `dask-safe-worker --follow` (the plan, and W's limit, follow the agent);
- seed: W's limit and `--memory-limit` = M's headroom at start (the blog post's approach).

Per run: outcome, wall time, kernel OOM kills in W (worker/nanny) and in M (the agent),
agent alive, bytes spilled, Dask's limit at start and at the end, and for follow the latency
from the growth to the new limit (follow.applied). A plot of M's working set against time
with the moment of growth marked.

    uv run python benchmarks/follow_neighbour.py [--repeat 3] [--json raw.json] [--plot out.png]

Only cgroups below the benchmark's own memory cgroup are created (tests/cgroup_util.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

# dswbench is found beside this file (a script's directory leads sys.path).
from dswbench.common import AGENT_BYTES, M_LIMIT, PY, GiB, fmt_bytes
from dswbench.harness import (
    RESTART_MEMORY_RE,
    Sampler,
    call_with_timeout,
    contender_argv,
    end_process,
    end_run,
    scheduler,
    worker_args,
)
from dswbench.main import log as say
from dswbench.neighbour import plot_v1
from dswbench.support import kernel_cgroups_usable, make_test_cgroup
from dswbench.workloads import (
    GROWING_AGENT_CODE,
    pickle_by_value,
    run_workload,
    worker_stats,
)

GROW_AFTER_S = 4.0
CONTENDERS = ("plain", "safe", "follow", "seed")
TIMEOUT = 240.0


def grow_agent(agent: subprocess.Popen[bytes], growth: int) -> None:
    """Tell the agent (GROWING_AGENT_CODE) to allocate `growth` bytes more."""
    assert agent.stdin is not None
    with contextlib.suppress(OSError, ValueError):
        agent.stdin.write(f"{growth}\n".encode())
        agent.stdin.flush()


def run_once(contender: str, repeat: int, work: Path) -> dict[str, Any]:
    from distributed import Client

    res: dict[str, Any] = {"contender": contender, "repeat": repeat, "outcome": "?"}
    run_dir = work / f"{contender}-{repeat}"
    run_dir.mkdir(parents=True)
    started: set[int] = set()
    with make_test_cgroup(started, prefix="dsw-bench") as m:
        m.set_limit(M_LIMIT)
        w = m.child("w")
        agent = subprocess.Popen(
            m.enter_command([PY, "-c", GROWING_AGENT_CODE, str(AGENT_BYTES)]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        started.add(agent.pid)
        try:
            assert agent.stdout is not None and agent.stdout.readline().strip() == b"ready"
            headroom = M_LIMIT - m.working_set()
            growth = headroom // 2
            res["headroom"], res["growth"] = headroom, growth
            args = worker_args("", str(run_dir / "local"))
            if contender == "seed":
                w.set_limit(headroom)
                args += ["--memory-limit", str(headroom)]
            with scheduler(run_dir / "scheduler.log", started) as (address, sched):
                args[0] = address
                client = Client(address, timeout=30)
                t0 = time.monotonic()
                sampler = Sampler(m, w, started, t0)
                sampler.start()
                log = open(run_dir / "worker.log", "wb")  # noqa: SIM115
                worker = subprocess.Popen(
                    w.enter_command(contender_argv(contender, args, run_dir / "plan.json")),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                started.add(worker.pid)
                sampler.nanny_pid = worker.pid
                try:
                    client.wait_for_workers(1, timeout=90)
                    limit = client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
                    res["dask_limit_start"] = next(iter(limit.values()))
                    time.sleep(1.0)
                    t_start = time.monotonic()
                    res["grow_at_s"] = t_start - t0 + GROW_AFTER_S
                    timer = threading.Timer(GROW_AFTER_S, grow_agent, (agent, growth))
                    timer.start()
                    try:
                        run_workload(client, "spill", headroom, TIMEOUT)
                        res["outcome"] = "completed"
                    except TimeoutError:
                        res["outcome"] = f"hung (>{TIMEOUT:.0f} s)"
                    except Exception as exc:
                        res["outcome"] = "Dask error"
                        res["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                    timer.join()
                    res["wall_s"] = time.monotonic() - t_start
                    stats = call_with_timeout(
                        lambda: client.run(worker_stats, on_error="return"), 20
                    )
                    if isinstance(stats, dict):
                        vals = [v for v in stats.values() if isinstance(v, dict)]
                        res["spilled"] = sum(v["disk_write_bytes"] for v in vals) if vals else None
                    end_limit = call_with_timeout(
                        lambda: client.run(
                            lambda dask_worker: dask_worker.memory_manager.memory_limit
                        ),
                        10,
                    )
                    if isinstance(end_limit, dict) and end_limit:
                        res["dask_limit_end"] = next(iter(end_limit.values()))
                    res["agent_alive"] = agent.poll() is None
                    res["scheduler_alive"] = sched.poll() is None
                finally:
                    end_run(client, worker, log, sampler, w, started)
            res["oom_kills_w"], res["oom_kills_m"] = w.oom_kills(), m.oom_kills()
            s = sampler.series
            res["series"] = {"t": s.t, "m_ws": s.m_working_set, "w_limit": s.w_limit}
            text = (run_dir / "worker.log").read_text(errors="replace")
            res["nanny_restarts"] = len(RESTART_MEMORY_RE.findall(text))
            applied = [
                json.loads(line)
                for line in text.splitlines()
                if line.startswith("{") and '"follow.applied"' in line
            ]
            if applied:
                res["follow_latency_s"] = applied[0]["latency_s"]
                res["follow_kernel"] = applied[0]["kernel"]["action"]
        finally:
            end_process(agent, 5)
    say(
        f"{contender:6} #{repeat}: {res['outcome']:18} wall={res.get('wall_s', 0):6.1f}s "
        f"oom W/M={res.get('oom_kills_w')}/{res.get('oom_kills_m')} agent={res.get('agent_alive')} "
        f"limit {fmt_bytes(res.get('dask_limit_start'))}"
        f"->{fmt_bytes(res.get('dask_limit_end'))} "
        f"spilled={fmt_bytes(res.get('spilled'))} latency={res.get('follow_latency_s')}"
    )
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/dsw-follow-bench"))
    opts = parser.parse_args()
    reason = kernel_cgroups_usable()
    if reason:
        sys.exit(f"cannot run: {reason}")
    # pressure's task functions must reach the worker by value, as in pressure's own main.
    pickle_by_value()
    work = opts.work / time.strftime("%Y%m%d-%H%M%S")
    contenders = [c for c in opts.contenders.split(",") if c]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    runs = [run_once(c, r, work) for r in range(opts.repeat) for c in contenders]
    if opts.plot:
        plot_v1(runs, opts.plot, M_LIMIT)
    summary: dict[str, Any] = {}
    for c in contenders:
        mine = [r for r in runs if r["contender"] == c]
        walls = [r["wall_s"] for r in mine if r["outcome"] == "completed"]
        lat = [r["follow_latency_s"] for r in mine if "follow_latency_s" in r]
        summary[c] = {
            "outcomes": [r["outcome"] for r in mine],
            "oom_kills_w": [r.get("oom_kills_w") for r in mine],
            "oom_kills_m_agent": [r.get("oom_kills_m") for r in mine],
            "agent_alive": [r.get("agent_alive") for r in mine],
            "nanny_restarts": [r.get("nanny_restarts") for r in mine],
            "spilled_gib": [round((r.get("spilled") or 0) / GiB, 2) for r in mine],
            "wall_s_median": round(statistics.median(walls), 1) if walls else None,
            "dask_limit_start_gib": [
                round((r.get("dask_limit_start") or 0) / GiB, 2) for r in mine
            ],
            "dask_limit_end_gib": [round((r.get("dask_limit_end") or 0) / GiB, 2) for r in mine],
            "follow_latency_s": lat,
        }
    doc = {"benchmark": "follow_neighbour", "grow_after_s": GROW_AFTER_S, "summary": summary}
    if opts.json:
        opts.json.write_text(json.dumps({**doc, "runs": runs}, default=str))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
