"""What `--follow` costs: CPU per tick, CPU share at each interval, the preload's poll,
and the supervisor's RSS with the watch loaded.

- ``tick``: `Watch.tick()` in this process, on this host's real cgroup (no limit of ours
  to move: the spec has none), N ticks; CPU time (user+sys) per tick.
- ``remeasure`` / ``measure``: one re-read of the level files against a full `measure()`
  that locates the cgroup through /proc/self/mountinfo first.
- ``poll``: the worker/nanny preload's check when nothing changed (one stat).
- ``supervisor``: `dask-safe-worker --follow` with a sleeping stand-in worker
  (``--cgroup-write never``: this benchmark writes no cgroup limit), run for
  ``--seconds`` at each interval; the supervisor's CPU from /proc/<pid>/stat and its
  VmRSS. A share of one CPU is CPU seconds over wall seconds.

    uv run python benchmarks/follow_cost.py [--ticks N] [--seconds S]
    uv run python benchmarks/follow_cost.py --in-vm --warmup 30   # in the cgroup v2 VM

`--in-vm` runs the same measurements in the software-emulated guest of tests/vm/vmrun.py
(root cgroup of a real cgroup v2 kernel), to set the supervisor's CPU during
`benchmarks/pressure_vm.py --workload neighbour` against the guest's own idle cost.

Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dask_safe_worker.dask_compat.release import installed_release
from dask_safe_worker.events import no_audit
from dask_safe_worker.follow import preload as follow_dask
from dask_safe_worker.follow.decide import FollowSpec
from dask_safe_worker.follow.live_limit import LiveLimit, prepare_channel, write_live_limit
from dask_safe_worker.follow.watch import Watch
from dask_safe_worker.measure import locate, measure, remeasure
from dask_safe_worker.plan import Settings, make_plan
from dask_safe_worker.worker_args import WorkerArgs

SLEEP = shutil.which("sleep") or "/bin/sleep"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_per_call(fn: object, n: int) -> float:
    """CPU seconds (user+sys of this process) per call, median of 5 batches."""
    call = fn  # type: ignore[assignment,unused-ignore]
    batches = []
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(n):
            call()  # type: ignore[operator]
        batches.append((time.process_time() - t0) / n)
    return statistics.median(batches)


def in_process(ticks: int) -> dict[str, float]:
    proc, root = Path("/proc"), Path("/")
    location = locate(proc, root)
    release = installed_release()
    m = measure(release=release)
    args = WorkerArgs(nworkers="2", nthreads=1)
    settings = Settings(supervised=True)
    plan = make_plan(m, args, settings)
    assert plan.effective_per_worker is not None
    with tempfile.TemporaryDirectory() as d:
        live = prepare_channel(d)
        write_live_limit(live, LiveLimit(0, plan.effective_per_worker, plan.budget, 1.0, 0.0))
        spec = FollowSpec(
            settings=settings,
            args=args,
            first_budget=plan.budget,
            first_per_worker=plan.effective_per_worker,
            interval=1.0,
            channel=live,
        )
        watch = Watch(spec, no_audit, release=release)
        tick = cpu_per_call(watch.tick, ticks)
        re = cpu_per_call(
            lambda: remeasure(location, proc, root, release=release, tree_root=os.getpid()),
            ticks,
        )
        full = cpu_per_call(lambda: measure(release=release), ticks)
        follower = follow_dask.Follower(live, "worker", None)  # type: ignore[arg-type]
        follower.changed()
        poll = cpu_per_call(follower.changed, ticks * 20)
    mountinfo_lines = len(Path("/proc/self/mountinfo").read_text().splitlines())
    return {
        "tick_ms": round(tick * 1e3, 3),
        "remeasure_ms": round(re * 1e3, 3),
        "measure_ms": round(full * 1e3, 3),
        "mountinfo_lines": mountinfo_lines,
        "own_cgroup_procs": len(m.own_procs or ()),
        "cgroup_levels": len(m.levels),
        "poll_us": round(poll * 1e6, 2),
    }


def stat_cpu_s(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def vmrss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def supervisor(interval: float, seconds: float, warmup: float = 2.0) -> dict[str, float]:
    entry = str(Path(sys.executable).parent / "dask-safe-worker")
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            entry,
            "--follow",
            "--follow-interval",
            str(interval),
            "--cgroup-write",
            "never",
            "--log-format",
            "none",
            "--plan-file",
            os.path.join(tmp, "plan.json"),
            "--worker-command",
            # The preload options the CLI appends become the shell's positional args.
            f"sh -c 'exec {SLEEP} 100000'",
            "tcp://127.0.0.1:1",
        ]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "TMPDIR": tmp},
        )
        try:
            time.sleep(warmup)  # start-up, imports, first tick
            c0, t0 = stat_cpu_s(proc.pid), time.monotonic()
            time.sleep(seconds)
            c1, t1 = stat_cpu_s(proc.pid), time.monotonic()
            rss = vmrss_mib(proc.pid)
        finally:
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            for pid in [*map(int, kids), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
    return {
        "interval_s": interval,
        "cpu_share_percent": round(100 * (c1 - c0) / (t1 - t0), 3),
        "cpu_s": round(c1 - c0, 3),
        "wall_s": round(t1 - t0, 1),
        "vmrss_mib": round(rss, 2),
    }


def in_vm(ticks: int, seconds: float, intervals: str, warmup: float) -> int:
    """This script in the VM of tests/vm/vmrun.py; its JSON on stdout."""
    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo / "tests" / "vm"))
    from vmrun import run_in_vm

    results = repo / ".tmp" / "follow-cost-vm"
    results.mkdir(parents=True, exist_ok=True)
    out = results / "follow_cost.json"
    out.unlink(missing_ok=True)
    me = Path(__file__).resolve()
    command = (
        f"{sys.executable} {me} --ticks {ticks} --seconds {seconds} --intervals {intervals} "
        f"--warmup {warmup} > {out}"
    )
    n = len(intervals.split(","))
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin"}
    completed = run_in_vm(
        command,
        memory="1536M",
        timeout=600 + n * (seconds + warmup) * 2,
        rwdirs=[results],
        env=env,
        warm_python=True,
    )
    if completed.returncode or not out.exists():
        print(completed.stdout[-2000:], completed.stderr[-2000:], file=sys.stderr)
        return 1
    doc = json.loads(out.read_text())
    doc["where"] = "cgroup v2 VM (virtme-ng, software-emulated, tests/vm/vmrun.py)"
    print(json.dumps(doc, indent=2))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--intervals", default="0.25,0.5,1,2")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--in-vm", action="store_true", help="run in the cgroup v2 VM")
    opts = parser.parse_args()
    if opts.in_vm:
        sys.exit(in_vm(opts.ticks, opts.seconds, opts.intervals, opts.warmup))
    local = in_process(opts.ticks)
    runs = [supervisor(float(i), opts.seconds, opts.warmup) for i in opts.intervals.split(",")]
    for interval in (0.25, 0.5, 1.0, 2.0, 5.0):
        local[f"estimated_share_at_{interval}s_percent"] = round(
            100 * local["tick_ms"] / 1e3 / interval, 3
        )
    print(
        json.dumps(
            {
                "benchmark": "follow_cost",
                "python": sys.version.split()[0],
                "cpu_count": os.cpu_count(),
                "in_process": local,
                "supervisor": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
