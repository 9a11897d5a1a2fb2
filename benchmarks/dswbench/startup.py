"""Start-up cost: registration pairs, query-mode timings, import profile, supervisor RSS."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .common import NTHREADS, PY, REPO, SAFE, compile_bytecode
from .harness import (
    contender_argv,
    end_process,
    proc_ppid,
    scheduler,
    tree_pids,
    wait_registered,
    worker_args,
)
from .support import make_test_cgroup


@dataclass
class StartupResult:
    register_plain: list[float] = field(default_factory=list)
    register_safe: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    dry_run_ms: list[float] = field(default_factory=list)
    print_limit_ms: list[float] = field(default_factory=list)
    # The whole start path up to exec (measure, plan, plan file, audit), exec'ing `true`.
    start_path_ms: list[float] = field(default_factory=list)
    start_path_nolog_ms: list[float] = field(default_factory=list)
    wrapper_ms: list[float] = field(default_factory=list)
    python_ms: list[float] = field(default_factory=list)
    importtime_top: list[tuple[str, int]] = field(default_factory=list)
    import_total_ms: float | None = None
    supervisor_rss: str | None = None
    measured_at: str | None = None
    commit: str | None = None
    # /proc/loadavg's 1-minute figure before the pairs and after the query timings: on
    # the shared 2-CPU machine the load of other test suites is what moves these numbers most.
    loadavg: list[float] | None = None


def time_command(argv: list[str], n: int) -> list[float]:
    """Wall milliseconds per run, hyperfine-style (one warm-up run, output discarded)."""
    times: list[float] = []
    for i in range(n + 1):
        t = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        if i:
            times.append((time.perf_counter() - t) * 1000)
    return times


def importtime_profile() -> tuple[float, list[tuple[str, int]]]:
    """`python -X importtime` of the console script's import: total and top cumulative."""
    proc = subprocess.run(
        [PY, "-X", "importtime", "-c", "import dask_safe_worker.cli"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows: list[tuple[str, int, int]] = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cumulative, name = line[len("import time:") :].split("|", 2)
        rows.append((name.rstrip(), int(self_us), int(cumulative)))

    # Nesting is shown by indentation: one space for a top-level import, two more a level.
    def depth(name: str) -> int:
        return (len(name) - len(name.lstrip(" ")) - 1) // 2

    total = sum(cum for name, _, cum in rows if depth(name) == 0) / 1000
    shallow = [(name.strip(), cum) for name, _, cum in rows if 1 <= depth(name) <= 2]
    return total, sorted(shallow, key=lambda r: -r[1])[:12]


def measure_startup(
    pairs: int, loops: int, work: Path, log: Callable[[str], None]
) -> StartupResult:
    from distributed import Client

    out = StartupResult()
    compile_bytecode()
    load_before = os.getloadavg()[0]
    started: set[int] = set()
    with make_test_cgroup(started, prefix="dsw-bench-startup") as parent:
        with scheduler(work / "startup-scheduler.log", started) as (address, _sched):
            client = Client(address, timeout=30)
            try:
                for i in range(pairs):
                    pair: dict[str, float] = {}
                    for contender in ("plain", "safe") if i % 2 == 0 else ("safe", "plain"):
                        cg = parent.child(f"{contender}-{i}")
                        argv = contender_argv(
                            contender,
                            worker_args(address, str(work / "startup-local")),
                            work / f"startup-plan-{i}.json",
                        )
                        since = time.time()
                        proc = subprocess.Popen(
                            cg.enter_command(argv),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        )  # fmt: skip
                        started.add(proc.pid)
                        try:
                            took = wait_registered(client, since, 60)
                        finally:
                            end_process(proc, 20)
                            for pid in tree_pids(cg):
                                if pid in started or proc_ppid(pid) in started:
                                    with contextlib.suppress(ProcessLookupError):
                                        os.kill(pid, signal.SIGKILL)
                        if took is None:
                            raise RuntimeError(f"{contender} worker did not register")
                        pair[contender] = took
                        # Let the scheduler forget the worker before the next launch.
                        deadline = time.monotonic() + 20
                        while client.scheduler_info()["workers"] and time.monotonic() < deadline:
                            time.sleep(0.1)
                    out.register_plain.append(pair["plain"])
                    out.register_safe.append(pair["safe"])
                    out.ratios.append(pair["safe"] / pair["plain"])
                    log(f"register pair {i}: plain {pair['plain']:.3f}s safe {pair['safe']:.3f}s")
            finally:
                client.close()
        # Query modes write nothing, but they still run inside a cgroup of ours.
        cg = parent.child("query")
        out.wrapper_ms = time_command(cg.enter_command(["true"]), loops)
        out.python_ms = time_command(cg.enter_command([PY, "-c", "pass"]), loops)
        args = ["tcp://127.0.0.1:1", "--nthreads", str(NTHREADS)]
        out.dry_run_ms = time_command(cg.enter_command([SAFE, "--dry-run", *args]), loops)
        out.print_limit_ms = time_command(cg.enter_command([SAFE, "--print-limit", *args]), loops)
        start = [SAFE, "--cgroup-write", "never", "--worker-command", "true"]
        plan = ["--plan-file", str(work / "startup-plan.json")]
        for fmt, into in (("json", out.start_path_ms), ("none", out.start_path_nolog_ms)):
            into[:] = time_command(
                cg.enter_command([*start, *plan, "--log-format", fmt, *args]), loops
            )
    log(
        f"--dry-run median {statistics.median(out.dry_run_ms):.0f} ms, "
        f"--print-limit median {statistics.median(out.print_limit_ms):.0f} ms"
    )
    out.loadavg = [load_before, os.getloadavg()[0]]
    out.import_total_ms, out.importtime_top = importtime_profile()
    out.measured_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out.commit = source_commit()
    script = REPO / "benchmarks" / "supervisor_rss.py"
    if script.exists():
        try:
            done = subprocess.run(
                [PY, str(script)], capture_output=True, text=True, timeout=300, cwd=REPO
            )
            out.supervisor_rss = (done.stdout.strip() or done.stderr.strip()[-2000:]) + (
                f"\n(exit code {done.returncode})" if done.returncode else ""
            )
        except subprocess.TimeoutExpired:
            out.supervisor_rss = "benchmarks/supervisor_rss.py did not finish within 300 s"
    return out


def source_commit() -> str | None:
    """The commit the measured code comes from, marked when src/ has local changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return None
    return f"{sha}{' + local changes in src/' if dirty else ''}" if sha else None
