"""Reaction of `--follow` to a neighbour's growth: the tick alone against kernel wake-ups.

M (2 GiB, a test cgroup below our own) holds an agent and W, where dask-safe-worker starts
(`--nworkers 1 --nthreads 2`, so one worker's limit moves with the whole pool). The agent
grows by STEP in one go; the moment its growth has crossed the band that moves the
limit (`max(32 MiB, 2 %)` of the limit in force) is the start; the end is the last of the
worker's and the nanny's acknowledgements of the new limit (written by each when its Dask
limit moved: `acks/` beside live.json). Then the agent frees the step and the limit
comes back up (not measured: a raise waits a tick for confirmation by design).

Variants, interleaved in one run: "tick" (`DASK_SAFE_WORKER_FOLLOW_WAKE=0`: the periodic
tick alone, as before) and "events" (the default: the kernel's usage thresholds and
pressure wake the supervisor, inotify wakes the preloads). Also the supervisor's idle
CPU over `--idle` seconds with nothing changing.

    uv run python benchmarks/follow_reaction.py [--rounds 2] [--steps 12] [--json out.json]

Only cgroups below the benchmark's own memory cgroup are created (tests/cgroup_util.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dswbench.common import PY, SAFE, GiB
from dswbench.harness import end_process, scheduler
from dswbench.main import log as say
from dswbench.support import kernel_cgroups_usable, make_test_cgroup

from dask_safe_worker.follow.live_limit import read_acks

MiB = 2**20
M_LIMIT = 2 * GiB
STEP = 192 * MiB
VARIANTS = ("tick", "events")

# Reads "+N BAND" (map and touch N bytes, print the time the first `band` bytes were
# touched) or "-" (free the last allocation); prints one line per command.
AGENT = """
import mmap, sys, time
held = []
for line in sys.stdin:
    if line.startswith("-"):
        held.pop().close()
        print("freed", time.time(), flush=True)
        continue
    n, band = (int(x) for x in line[1:].split())
    b = mmap.mmap(-1, n)  # untouched: charged page by page below (bytearray zero-fills)
    crossed = None
    for i in range(0, n, 4096):
        b[i] = 1
        if crossed is None and i >= band:
            crossed = time.time()
    held.append(b)
    print("grown", crossed, flush=True)
"""


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def channel_of(log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"follow.started"' in line:
                return str(json.loads(line)["channel"])
        time.sleep(0.1)
    raise TimeoutError(f"no follow.started in {log}")


def held(channel: str) -> tuple[int, float, int]:
    """(lowest generation held by the worker and nanny, when the last took it, count)."""
    acks = read_acks(channel)
    if not acks:
        return -1, 0.0, 0
    return min(a.generation for a in acks.values()), max(a.at for a in acks.values()), len(acks)


def first_holds(channel: str, above: int, first: dict[Any, float], timeout: float = 30) -> None:
    """Fill `first` with when each server (worker, nanny) first held a generation past
    `above` (its acknowledgement's time), until both have."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(first) < 2:
        for key, ack in read_acks(channel).items():
            if ack.generation > above and key not in first:
                first[key] = ack.at
        time.sleep(0.002)


def wait_generation(channel: str, above: int, timeout: float) -> tuple[int, float] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gen, at, n = held(channel)
        if n >= 2 and gen > above:
            return gen, at
        time.sleep(0.005)
    return None


def settled(channel: str, timeout: float) -> tuple[int, int] | None:
    """(generation, per-worker limit) once the worker and nanny hold the current record
    and nothing has changed for 1.5 s (the raise back after a step has landed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = json.loads(Path(channel).read_text())
        gen, _, n = held(channel)
        if n >= 2 and gen >= record["generation"]:
            time.sleep(1.5)
            again = json.loads(Path(channel).read_text())
            if again["generation"] == record["generation"]:
                return int(record["generation"]), int(record["per_worker"])
        time.sleep(0.05)
    return None


def command(agent: subprocess.Popen[str], line: str) -> str:
    assert agent.stdin is not None and agent.stdout is not None
    agent.stdin.write(line + "\n")
    agent.stdin.flush()
    return agent.stdout.readline().strip()


def run_variant(variant: str, steps: int, idle: float, work: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"variant": variant, "reaction_s": [], "missed": 0}
    work.mkdir(parents=True)
    started: set[int] = set()
    with make_test_cgroup(started, prefix="dsw-bench") as m:
        m.set_limit(M_LIMIT)
        w = m.child("w")
        agent = subprocess.Popen(
            m.enter_command([PY, "-c", AGENT]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.add(agent.pid)
        try:
            with scheduler(work / "scheduler.log", started) as (address, _):
                env = {
                    **os.environ,
                    "DASK_SAFE_WORKER_FOLLOW_WAKE": "0" if variant == "tick" else "1",
                }
                log_path = work / "worker.log"
                with open(log_path, "wb") as log:
                    argv = [SAFE, "--log-format", "json", address, "--nworkers", "1",
                            "--nthreads", "2", "--host", "127.0.0.1", "--no-dashboard",
                            "--local-directory", str(work / "local")]  # fmt: skip
                    worker = subprocess.Popen(
                        w.enter_command(argv), stdout=log, stderr=subprocess.STDOUT, env=env
                    )
                started.add(worker.pid)
                try:
                    channel = channel_of(log_path, 120)
                    if wait_generation(channel, -1, 120) is None:
                        raise TimeoutError("the worker and nanny never acknowledged")
                    time.sleep(2.0)
                    c0, t0 = cpu_s(worker.pid), time.monotonic()
                    time.sleep(idle)
                    res["idle_cpu_pct"] = 100 * (cpu_s(worker.pid) - c0) / (time.monotonic() - t0)
                    for _ in range(steps):
                        now = settled(channel, 60)
                        if now is None:
                            res["missed"] += 1
                            continue
                        gen, limit = now
                        band = max(32 * MiB, limit // 50)
                        # Watched from before the growth: the first generation past `gen`
                        # each server took, not a later one of the same step.
                        first: dict[Any, float] = {}
                        watcher = threading.Thread(target=first_holds, args=(channel, gen, first))
                        watcher.start()
                        reply = command(agent, f"+{STEP} {band}")
                        crossed = float(reply.split()[1])
                        watcher.join(30)
                        if len(first) < 2:
                            res["missed"] += 1
                        else:
                            res["reaction_s"].append(max(first.values()) - crossed)
                        command(agent, "-")
                finally:
                    end_process(worker, 20)
        finally:
            end_process(agent, 5)
    r = res["reaction_s"]
    say(
        f"{variant:6}: {len(r)} steps, reaction median {statistics.median(r) * 1000:.0f} ms, "
        f"p95 {p95(r) * 1000:.0f} ms, max {max(r) * 1000:.0f} ms; missed {res['missed']}; "
        f"idle CPU {res['idle_cpu_pct']:.3f} %"
        if r
        else f"{variant}: no reaction measured"
    )
    return res


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="growth steps per round")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/dsw-reaction-bench"))
    opts = parser.parse_args()
    reason = kernel_cgroups_usable()
    if reason:
        sys.exit(f"cannot run: {reason}")
    work = opts.work / time.strftime("%Y%m%d-%H%M%S")
    runs = [
        run_variant(v, opts.steps, opts.idle, work / f"{v}-{r}")
        for r in range(opts.rounds)
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1])
    ]
    summary: dict[str, Any] = {}
    for v in VARIANTS:
        mine = [r for r in runs if r["variant"] == v]
        lat = [x for r in mine for x in r["reaction_s"]]
        summary[v] = {
            "steps": len(lat),
            "missed": sum(r["missed"] for r in mine),
            "reaction_ms_median": round(statistics.median(lat) * 1000) if lat else None,
            "reaction_ms_p95": round(p95(lat) * 1000) if lat else None,
            "reaction_ms_max": round(max(lat) * 1000) if lat else None,
            "idle_cpu_pct": [round(r.get("idle_cpu_pct", float("nan")), 3) for r in mine],
        }
    doc = {"benchmark": "follow_reaction", "step": STEP, "m_limit": M_LIMIT, "summary": summary}
    if opts.json:
        opts.json.write_text(json.dumps({**doc, "runs": runs}))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
