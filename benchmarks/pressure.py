# ruff: noqa: RUF001
"""Memory-pressure benchmark: plain `dask worker` against dask-safe-worker (issue 5).

Scenario "VM with agents" on this host's cgroup v1 memory hierarchy:

- M: a cgroup created below our own memory cgroup, limited to 3 GiB (plays the VM);
- an "agent" process inside M holding 600 MiB of touched memory (the OS and its agents);
- W: a child of M without a limit of its own, where the worker starts (a compose
  service without mem_limit);
- the scheduler runs outside M, on 127.0.0.1.

Contenders: plain `python -m distributed.cli.dask_worker`, `dask-safe-worker` with the same
arguments, and the seed's approach (W limited to M's headroom measured just before the
start, and that value passed as --memory-limit, which is what dask would read inside a
container with a private cgroup namespace).

    uv run python benchmarks/pressure.py            # full run, writes docs/benchmarks.md
    uv run python benchmarks/pressure.py --quick    # one spill pair, for a smoke run

Every cgroup is created below our own and removed afterwards; every process ended is one
this benchmark started (or a descendant that can only have entered M through one).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from cgroup_util import KernelCgroup, kernel_cgroups_usable, make_test_cgroup  # noqa: E402

KiB = 2**10
MiB = 2**20
GiB = 2**30

M_LIMIT = 3 * GiB
AGENT_BYTES = 600 * MiB
NTHREADS = 2
CHUNK_BYTES = 64 * MiB

PY = sys.executable
SAFE = str(Path(PY).parent / "dask-safe-worker")
CONTENDERS = ("plain", "safe", "seed")
WORKLOADS = ("spill", "burst", "steady")
# Per-workload bound after which a run counts as hung.
TIMEOUTS = {"spill": 180.0, "burst": 120.0, "steady": 90.0}

AGENT_CODE = """
import sys, time
n = int(sys.argv[1])
b = bytearray(n)
# bytearray(n) is calloc'd and stays untouched; write one byte per page so it is charged.
b[::4096] = b"\\x01" * len(range(0, n, 4096))
print("ready", flush=True)
while True:
    time.sleep(3600)
"""

RESTART_MEMORY_RE = re.compile(r"exceeded \d+% memory budget\. Restarting")
KILLED_RE = re.compile(r"Worker process \d+ was killed by signal (\d+)")


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_stat(cg: KernelCgroup, key: str) -> int:
    for line in (cg.path / "memory.stat").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def working_set(cg: KernelCgroup) -> int:
    return max(0, cg.usage() - read_stat(cg, "total_inactive_file"))


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def proc_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    except OSError:
        return None
    return None


def proc_cmd(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)[:120]


def proc_ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def tree_pids(cg: KernelCgroup) -> list[int]:
    pids: list[int] = []
    for procs in cg.path.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            pids += [int(p) for p in procs.read_text().split()]
    return pids


def end_process(proc: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds: only ever a process we started."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB"


def fmt_med_range(values: list[float], fmt: Callable[[float], str]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    med = statistics.median(values)
    if len(values) == 1 or min(values) == max(values):
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(values))}–{fmt(max(values))})"


# ------------------------------------------------------------- worker-side functions
# They run inside the worker; cloudpickle sends them by value (see _pickle_by_value).


def burst_task(nbytes: int) -> int:
    import numpy as np

    # np.ones writes every page, so the whole allocation is charged within about a second.
    block = np.ones(nbytes, dtype=np.uint8)
    return int(block[::4096].sum())


def worker_stats(dask_worker: Any) -> dict[str, Any]:
    written = 0
    for key, value in dask_worker.digests_total.items():
        if isinstance(key, tuple) and "disk-write" in key and key[-1] == "bytes":
            written += int(value)
    try:
        _, spilled_disk = dask_worker.data.spilled_total
    except AttributeError:
        spilled_disk = 0
    return {
        "memory_limit": dask_worker.memory_manager.memory_limit,
        "disk_write_bytes": written,
        "spilled_now_bytes": int(spilled_disk),
        "pid": os.getpid(),
    }


def _pickle_by_value() -> None:
    # Imported as a module (from the smoke test) the functions above would be pickled by
    # reference, and the worker cannot import this file.
    if __name__ != "__main__":
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ----------------------------------------------------------------------- sampling


@dataclass
class Series:
    t: list[float] = field(default_factory=list)
    m_usage: list[int] = field(default_factory=list)
    m_working_set: list[int] = field(default_factory=list)
    w_usage: list[int] = field(default_factory=list)
    w_limit: list[int | None] = field(default_factory=list)
    nanny_rss: list[int | None] = field(default_factory=list)
    oom_kill_times: list[float] = field(default_factory=list)


class Sampler(threading.Thread):
    """Every 100 ms: M's and W's usage, W's limit, the nanny's RSS, M's oom_kill count.

    It also records every pid seen in M: they can only have entered M through a process
    this benchmark started there, so they are ours to end.
    """

    def __init__(self, m: KernelCgroup, w: KernelCgroup, seen: set[int], t0: float) -> None:
        super().__init__(daemon=True)
        self.m, self.w, self.seen, self.t0 = m, w, seen, t0
        self.series = Series()
        self.nanny_pid: int | None = None
        self.stop_event = threading.Event()
        self._last_kills = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            now = time.monotonic() - self.t0
            with contextlib.suppress(OSError, ValueError):
                s = self.series
                m_usage, w_usage = self.m.usage(), self.w.usage()
                w_limit = self.w.limit()
                s.t.append(now)
                s.m_usage.append(m_usage)
                s.m_working_set.append(max(0, m_usage - read_stat(self.m, "total_inactive_file")))
                s.w_usage.append(w_usage)
                s.w_limit.append(w_limit if w_limit < 2**62 else None)
                s.nanny_rss.append(proc_rss(self.nanny_pid) if self.nanny_pid else None)
                # v1 counts a kill only in the victim's own cgroup: W for the worker and
                # nanny, M itself for the agent.
                kills = self.m.oom_kills() + self.w.oom_kills()
                if kills > self._last_kills:
                    s.oom_kill_times += [now] * (kills - self._last_kills)
                    self._last_kills = kills
                self.seen.update(tree_pids(self.m))
            self.stop_event.wait(0.1)


# ----------------------------------------------------------------------- scheduler


@contextlib.contextmanager
def scheduler(log_path: Path, started: set[int]) -> Iterator[tuple[str, subprocess.Popen[Any]]]:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [PY, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", str(port), "--no-dashboard"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    started.add(proc.pid)
    try:
        yield address, proc
    finally:
        end_process(proc, 10)


def worker_args(address: str, local_dir: str) -> list[str]:
    return [
        address,
        "--nthreads", str(NTHREADS),
        "--nworkers", "1",
        "--host", "127.0.0.1",
        "--no-dashboard",
        "--local-directory", local_dir,
        "--death-timeout", "60",
    ]  # fmt: skip


def contender_argv(contender: str, args: list[str], plan_file: Path) -> list[str]:
    if contender == "safe":
        return [SAFE, "--log-format", "json", "--plan-file", str(plan_file), *args]
    return [PY, "-m", "distributed.cli.dask_worker", *args]


def wait_registered(client: Any, since: float, timeout: float) -> float | None:
    """Seconds from `since` (time.time()) to the scheduler's add-worker event."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for stamp, msg in client.get_events("all"):
            if isinstance(msg, dict) and msg.get("action") == "add-worker" and stamp >= since:
                return float(stamp) - since
        time.sleep(0.05)
    return None


def call_with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(fn).result(timeout)
    except Exception as exc:
        return exc
    finally:
        pool.shutdown(wait=False)


# --------------------------------------------------------------------------- a run


@dataclass
class RunResult:
    contender: str
    workload: str
    repeat: int
    outcome: str = "?"
    error: str | None = None
    wall_s: float | None = None
    register_s: float | None = None
    headroom_before: int = 0
    workload_bytes: int = 0
    dask_memory_limit: int | None = None
    w_kernel_limit: int | None = None
    oom_kills_w: int = 0
    oom_kills_m: int = 0
    failcnt_w: int = 0
    failcnt_m: int = 0
    memory_restarts: int = 0
    killed_by_signal: int = 0
    disk_write_bytes: int | None = None
    agent_alive: bool = False
    # The process we launched (after the execs: the nanny) still running at the end.
    nanny_alive: bool = False
    scheduler_alive: bool = False
    peak_m: int = 0
    peak_m_working_set: int = 0
    stats_error: str | None = None
    nanny_rss_median: int | None = None
    nanny_rss_max: int | None = None
    processes_in_w: list[tuple[int, int | None, int | None, str]] = field(default_factory=list)
    series: Series = field(default_factory=Series)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("series")
        return d


def run_workload(client: Any, workload: str, budget: int, timeout: float) -> tuple[str, Any]:
    import dask.array as da

    chunk = CHUNK_BYTES // 8
    if workload == "burst":
        fut = client.submit(burst_task, int(1.2 * budget), pure=False)
        return "burst", fut.result(timeout=timeout)
    share = 1.5 if workload == "spill" else 0.3
    n = int(share * budget) // 8 // chunk * chunk
    x = da.random.random(n, chunks=chunk)
    persisted = client.persist(x)
    total = client.compute(persisted.sum())
    try:
        return workload, total.result(timeout=timeout)
    finally:
        del persisted


def run_once(
    contender: str, workload: str, repeat: int, work: Path, log: Callable[[str], None]
) -> RunResult:
    from distributed import Client

    res = RunResult(contender, workload, repeat)
    run_dir = work / f"{workload}-{contender}-{repeat}"
    run_dir.mkdir(parents=True)
    started: set[int] = set()
    with make_test_cgroup(started, prefix="dsw-bench") as m:
        m.set_limit(M_LIMIT)
        w = m.child("w")
        agent = subprocess.Popen(
            m.enter_command([PY, "-c", AGENT_CODE, str(AGENT_BYTES)]),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        started.add(agent.pid)
        try:
            assert agent.stdout is not None
            if agent.stdout.readline().strip() != b"ready":
                raise RuntimeError("agent did not start")
            (m.path / "memory.max_usage_in_bytes").write_text("0")
            # The MemAvailable-equivalent of the "VM": its limit minus its working set.
            headroom = M_LIMIT - working_set(m)
            res.headroom_before = headroom
            res.workload_bytes = int(
                {"spill": 1.5, "burst": 1.2, "steady": 0.3}[workload] * headroom
            )
            args = worker_args("", str(run_dir / "local"))
            if contender == "seed":
                w.set_limit(headroom)
                args += ["--memory-limit", str(headroom)]
            with scheduler(run_dir / "scheduler.log", started) as (address, sched):
                args[0] = address
                argv = contender_argv(contender, args, run_dir / "plan.json")
                client = Client(address, timeout=30)
                t0 = time.monotonic()
                sampler = Sampler(m, w, started, t0)
                sampler.start()
                worker_log = open(run_dir / "worker.log", "wb")  # noqa: SIM115
                since = time.time()
                worker = subprocess.Popen(
                    w.enter_command(argv), stdout=worker_log, stderr=subprocess.STDOUT
                )
                started.add(worker.pid)
                sampler.nanny_pid = worker.pid
                try:
                    res.register_s = wait_registered(client, since, 90)
                    if res.register_s is None:
                        raise RuntimeError("worker did not register within 90 s")
                    client.wait_for_workers(1, timeout=30)
                    limits = client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
                    res.dask_memory_limit = next(iter(limits.values()))
                    time.sleep(1.0)  # a baseline on the plot, before the work starts
                    t_start = time.monotonic()
                    try:
                        run_workload(client, workload, headroom, TIMEOUTS[workload])
                        res.outcome = "completed"
                    except TimeoutError:
                        res.outcome = f"hung (>{TIMEOUTS[workload]:.0f} s)"
                    except Exception as exc:
                        res.outcome = "Dask error"
                        res.error = f"{type(exc).__name__}: {str(exc)[:160]}"
                    res.wall_s = time.monotonic() - t_start
                    snap = []
                    for pid in tree_pids(w):
                        snap.append((pid, proc_ppid(pid), proc_rss(pid), proc_cmd(pid)))
                    res.processes_in_w = snap
                    stats = call_with_timeout(
                        lambda: client.run(worker_stats, on_error="return"), 20
                    )
                    if isinstance(stats, dict):
                        values = [v for v in stats.values() if isinstance(v, dict)]
                        if values:
                            res.disk_write_bytes = sum(v["disk_write_bytes"] for v in values)
                        else:
                            res.stats_error = f"no worker answered: {stats!r}"[:200]
                    else:
                        res.stats_error = f"{type(stats).__name__}: {stats}"[:200]
                    time.sleep(0.5)
                    events = call_with_timeout(lambda: client.get_events(), 10)
                    if isinstance(events, dict):
                        (run_dir / "events.json").write_text(json.dumps(events, default=str))
                    res.agent_alive = agent.poll() is None
                    res.nanny_alive = worker.poll() is None
                    res.scheduler_alive = sched.poll() is None
                finally:
                    with contextlib.suppress(Exception):
                        call_with_timeout(lambda: client.close(timeout=5), 10)
                    end_process(worker, 20)
                    worker_log.close()
                    sampler.stop_event.set()
                    sampler.join(5)
                    for pid in tree_pids(w):
                        if pid in started:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGKILL)
            res.series = sampler.series
            res.oom_kills_m, res.oom_kills_w = m.oom_kills(), w.oom_kills()
            res.failcnt_m = read_int(m.path / "memory.failcnt") or 0
            res.failcnt_w = read_int(w.path / "memory.failcnt") or 0
            res.peak_m = read_int(m.path / "memory.max_usage_in_bytes") or 0
            res.peak_m_working_set = max(res.series.m_working_set, default=0)
            limits_seen = [v for v in res.series.w_limit if v is not None]
            res.w_kernel_limit = min(limits_seen) if limits_seen else None
            text = (run_dir / "worker.log").read_text(errors="replace")
            res.memory_restarts = len(RESTART_MEMORY_RE.findall(text))
            res.killed_by_signal = len(KILLED_RE.findall(text))
            rss = [v for v in res.series.nanny_rss if v is not None]
            if rss:
                res.nanny_rss_median = int(statistics.median(rss))
                res.nanny_rss_max = max(rss)
        finally:
            end_process(agent, 5)
    log(
        f"{workload:6} {contender:5} #{repeat}: {res.outcome:18} wall={res.wall_s or 0:6.1f}s "
        f"dask_limit={fmt_bytes(res.dask_memory_limit)} W_limit={fmt_bytes(res.w_kernel_limit)} "
        f"oom W/M={res.oom_kills_w}/{res.oom_kills_m} failcnt W/M={res.failcnt_w}/{res.failcnt_m} "
        f"restarts={res.memory_restarts} killed={res.killed_by_signal} "
        f"spilled={fmt_bytes(res.disk_write_bytes)} peakM={fmt_bytes(res.peak_m)} "
        f"peakM_ws={fmt_bytes(res.peak_m_working_set)} reg={res.register_s or 0:.2f}s "
        f"agent={res.agent_alive} sched={res.scheduler_alive} {res.error or ''}"
    )
    return res


# ------------------------------------------------------------------- start-up cost


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
    out.import_total_ms, out.importtime_top = importtime_profile()
    out.measured_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out.commit = source_commit()
    script = REPO / "benchmarks" / "supervisor_rss.py"
    if script.exists():
        try:
            proc = subprocess.run(
                [PY, str(script)], capture_output=True, text=True, timeout=300, cwd=REPO
            )
            out.supervisor_rss = (proc.stdout.strip() or proc.stderr.strip()[-2000:]) + (
                f"\n(exit code {proc.returncode})" if proc.returncode else ""
            )
        except subprocess.TimeoutExpired:
            out.supervisor_rss = "benchmarks/supervisor_rss.py did not finish within 300 s"
    return out


# --------------------------------------------------------------------------- plots

COLOURS = {"plain": "tab:brown", "safe": "tab:blue", "seed": "tab:green"}
LABELS = {
    "plain": "(a) plain dask worker",
    "safe": "(b) dask-safe-worker",
    "seed": "(c) seed: W limit = headroom, --memory-limit = headroom",
}


def plot_workload(workload: str, runs: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contenders = [c for c in CONTENDERS if any(r.contender == c for r in runs)]
    fig, axes = plt.subplots(
        len(contenders), 1, figsize=(12.5, 3.1 * len(contenders)), sharex=True, squeeze=False
    )
    top = M_LIMIT / GiB * 1.12
    for ax, contender in zip(axes[:, 0], contenders, strict=True):
        mine = [r for r in runs if r.contender == contender]
        first = mine[0]
        for r in mine:
            s = r.series
            if not s.t:
                continue
            alpha, width = (1.0, 1.6) if r is first else (0.25, 0.8)
            ax.plot(s.t, [v / GiB for v in s.m_usage], color="black", alpha=alpha, lw=width,
                    label="M usage (VM: agent + worker)" if r is first else None)  # fmt: skip
            if r is first:
                ax.plot(s.t, [v / GiB for v in s.m_working_set], color="grey", lw=0.9,
                        label="M working set (usage − inactive file)")  # fmt: skip
            ax.plot(s.t, [v / GiB for v in s.w_usage], color=COLOURS[contender], alpha=alpha,
                    lw=width, label="W usage (worker + nanny)" if r is first else None)  # fmt: skip
            for k in s.oom_kill_times if r is first else []:
                ax.axvline(k, color="red", alpha=0.5, lw=0.8, ls=":")
        ax.axhline(M_LIMIT / GiB, color="red", lw=1.2, label="M limit (3 GiB, kernel)")
        if first.w_kernel_limit:
            ax.axhline(first.w_kernel_limit / GiB, color="orange", lw=1.2, ls="--",
                       label=f"W kernel limit ({fmt_bytes(first.w_kernel_limit)})")  # fmt: skip
        if first.dask_memory_limit:
            dl = first.dask_memory_limit / GiB
            if dl < top:
                ax.axhline(dl, color="purple", lw=1, ls="-.",
                           label=f"Dask memory limit ({fmt_bytes(dl * GiB)})")  # fmt: skip
                ax.axhline(0.95 * dl, color="purple", lw=0.8, ls=":",
                           label="Dask terminate (95%)")  # fmt: skip
                ax.axhline(0.6 * dl, color="grey", lw=0.8, ls=":", label="Dask spill target (60%)")
            else:
                ax.annotate(
                    f"Dask memory limit {fmt_bytes(first.dask_memory_limit)}: off the chart",
                    xy=(0.01, 0.93),
                    xycoords="axes fraction",
                    color="purple",
                    fontsize=9,
                )
        ax.set_title(
            f"{LABELS[contender]} — {first.outcome}, wall {first.wall_s or 0:.1f} s, "
            f"kernel OOM kills W/M: {first.oom_kills_w}/{first.oom_kills_m}, "
            f"nanny memory restarts: {first.memory_restarts}",
            fontsize=9,
        )
        ax.set_ylim(0, top)
        ax.set_ylabel("GiB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel(
        "seconds since the worker was launched (dotted red: kernel OOM kills; faint: repeats)"
    )
    fig.suptitle(f"'VM with agents' on cgroup v1 — workload: {workload}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -------------------------------------------------------------------------- report


def machine_description() -> list[str]:
    meminfo = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import dask
    import distributed
    import numpy

    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical CPUs; RAM: {int(meminfo) // 1024} MiB, no swap"
        if re.search(r"^SwapTotal:\s+0 kB", Path("/proc/meminfo").read_text(), re.M)
        else f"- CPU: {cpu}, {os.cpu_count()} logical CPUs; RAM: {int(meminfo) // 1024} MiB",
        f"- Kernel {platform.release()}, memory controller on cgroup v1 (hybrid host)",
        f"- Python {platform.python_version()}, dask {dask.__version__}, "
        f"distributed {distributed.__version__}, numpy {numpy.__version__}",
        "- Shared development machine: other engineers' tests ran at the same time, so "
        "wall times are noisy; compare medians of interleaved runs only.",
    ]


def outcome_cell(runs: list[RunResult]) -> str:
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    return ", ".join(f"{k} ×{v}" if len(runs) > 1 else k for k, v in counts.items())


def total(values: list[int]) -> str:
    return f"{sum(values)} ({'/'.join(str(v) for v in values)})"


def workload_table(runs: list[RunResult]) -> list[str]:
    rows = [
        "| | "
        + " | ".join(
            LABELS[c].split(" ", 1)[0] + " " + c
            for c in CONTENDERS
            if any(r.contender == c for r in runs)
        )
        + " |",
    ]
    cs = [c for c in CONTENDERS if any(r.contender == c for r in runs)]
    rows.append("|---" * (len(cs) + 1) + "|")

    def row(name: str, cell: Callable[[list[RunResult]], str]) -> None:
        rows.append(
            f"| {name} | "
            + " | ".join(cell([r for r in runs if r.contender == c]) for c in cs)
            + " |"
        )

    s = lambda v: f"{v:.1f} s"  # noqa: E731
    row("runs", lambda rs: str(len(rs)))
    row("outcome", outcome_cell)
    row("wall time, median (range)", lambda rs: fmt_med_range([r.wall_s for r in rs], s))
    row("Dask memory limit", lambda rs: fmt_med_range([r.dask_memory_limit for r in rs], fmt_bytes))
    row("W kernel limit", lambda rs: fmt_med_range([r.w_kernel_limit for r in rs], fmt_bytes)
        if any(r.w_kernel_limit for r in rs) else "none")  # fmt: skip
    row("kernel OOM kills in W, total (per run)", lambda rs: total([r.oom_kills_w for r in rs]))
    row("kernel OOM kills in M, total (per run)", lambda rs: total([r.oom_kills_m for r in rs]))
    row("limit hits (failcnt) W / M, median",
        lambda rs: f"{statistics.median([r.failcnt_w for r in rs]):.0f} / "
        f"{statistics.median([r.failcnt_m for r in rs]):.0f}")  # fmt: skip
    row("nanny memory restarts, total (per run)", lambda rs: total([r.memory_restarts for r in rs]))
    row("worker deaths by signal (nanny log), total",
        lambda rs: total([r.killed_by_signal for r in rs]))  # fmt: skip
    row("bytes spilled (last worker incarnation)",
        lambda rs: fmt_med_range([r.disk_write_bytes for r in rs], fmt_bytes))  # fmt: skip
    row("agent survived", lambda rs: f"{sum(r.agent_alive for r in rs)}/{len(rs)}")
    row("nanny survived", lambda rs: f"{sum(r.nanny_alive for r in rs)}/{len(rs)}")
    row("scheduler survived", lambda rs: f"{sum(r.scheduler_alive for r in rs)}/{len(rs)}")
    row("peak memory of M (kernel max_usage)",
        lambda rs: fmt_med_range([r.peak_m for r in rs], fmt_bytes))  # fmt: skip
    row("peak working set of M (sampled)",
        lambda rs: fmt_med_range([r.peak_m_working_set for r in rs], fmt_bytes))  # fmt: skip
    row("launch → registered", lambda rs: fmt_med_range([r.register_s for r in rs], s))
    return rows


def nanny_overhead(runs: list[RunResult]) -> tuple[list[int], list[int]]:
    """Per run: the nanny's RSS (max over the run) and nanny + resource tracker at the end."""
    nanny = [r.nanny_rss_max for r in runs if r.nanny_rss_max]
    helpers: list[int] = []
    for r in runs:
        pids = {p[0] for p in r.processes_in_w}
        worker_pids = {p[0] for p in r.processes_in_w if "spawn_main" in p[3]}
        if not pids or not worker_pids:
            continue
        helpers.append(sum(p[2] or 0 for p in r.processes_in_w if p[0] not in worker_pids))
    return [int(v) for v in nanny], helpers


def write_report(
    path: Path,
    img_dir: Path,
    runs: list[RunResult],
    startup: StartupResult | None,
    command: str,
    quick: bool,
    started_at: str,
    vm_note: str,
    vm_docs: list[dict[str, Any]] | None = None,
) -> None:
    lines = [
        "# Benchmarks: plain `dask worker` against dask-safe-worker under memory pressure",
        "",
        "Generated by `benchmarks/pressure.py` — do not edit by hand; rerun instead:",
        "",
        "```",
        command,
        "```",
        "",
        f"Run started {started_at}{' (quick mode: one spill pair only)' if quick else ''}.",
        "",
        "## Machine",
        "",
        *machine_description(),
        "",
        '## Scenario "VM with agents" (cgroup v1, this host)',
        "",
        "- **M** (the VM): a memory cgroup created below the benchmark's own, "
        f"`memory.limit_in_bytes` = {fmt_bytes(M_LIMIT)}, no swap.",
        f"- **Agent**: a Python process inside M holding {fmt_bytes(AGENT_BYTES)} of touched "
        "memory, started before the worker.",
        "- **W**: a child cgroup of M, no limit of its own; the worker command starts inside "
        "it (`sh -c 'echo $$ > W/cgroup.procs && exec …'`).",
        "- **Scheduler**: `python -m distributed.cli.dask_scheduler --host 127.0.0.1`, in the "
        "benchmark's own cgroup (outside M), a fresh one per run.",
        f"- **Worker arguments** (identical for all): `--nthreads {NTHREADS} --nworkers 1 "
        "--host 127.0.0.1 --no-dashboard --local-directory <run dir on ext4> "
        "--death-timeout 60`.",
        "- **Contenders**:",
        "  - (a) **plain**: `python -m distributed.cli.dask_worker ARGS`. distributed reads "
        "only the root cgroup files, so its limit is the host's RAM.",
        "  - (b) **safe**: `dask-safe-worker --log-format json --plan-file … ARGS` inside W. "
        "It is W's sole occupant, measures M's headroom through the ancestor walk, writes "
        "the budget to W's `memory.limit_in_bytes` and passes a per-worker `--memory-limit`.",
        "  - (c) **seed** (the blog post's approach, reproduced): just before the start the "
        "benchmark reads M's headroom (`limit − (usage − total_inactive_file)`, the "
        'MemAvailable of this "VM"), writes it to W\'s `memory.limit_in_bytes` (the '
        "container's `mem_limit`), and passes the same number as `--memory-limit` to the "
        "plain worker. On v1 a private cgroup namespace cannot be given to the worker "
        "cheaply, so the explicit flag stands in for dask reading the container limit: it "
        "is the value dask would read, with `--nthreads 2` on 2 CPUs (auto = full limit).",
        "- **Workloads** (sized from M's headroom `H` measured just before each start, "
        "about 2.4 GiB):",
        f"  - **spill**: `da.random.random` in {CHUNK_BYTES // MiB} MiB chunks, 1.5 × H in "
        f"total, persisted, then `.sum()`; bound {TIMEOUTS['spill']:.0f} s.",
        f"  - **burst**: one task `np.ones(1.2 × H, uint8)` (meant to touch every page "
        f"within about a second; it took several seconds on this loaded machine, see the "
        f"note); bound "
        f"{TIMEOUTS['burst']:.0f} s.",
        f"  - **steady**: like spill with 0.3 × H (fits); bound {TIMEOUTS['steady']:.0f} s.",
        "- Per run: outcome (completed / Dask error / hung past the bound), wall time from "
        "submit to result, `oom_kill` of `memory.oom_control` in W and M, `memory.failcnt` "
        "(which limit was hit), nanny restarts (`exceeded 95% memory budget` in the worker "
        "log), worker deaths by signal (nanny log), bytes written to disk by spilling "
        "(`digests_total` disk-write bytes via `client.run`, only the worker incarnation "
        "alive at the end), agent and scheduler alive at the end, "
        "`memory.max_usage_in_bytes` of M, and a 100 ms series of M and W usage.",
        "- v1 counts an OOM kill only in the victim's own cgroup (observed here: kills of "
        "the worker raise W's `oom_kill` and leave M's at 0), so M's count is kills of "
        "processes directly in M, i.e. the agent. `failcnt` says whose limit was hit: M's "
        "(the whole \"VM\" is full) or W's (the worker's own wall). Usage includes page "
        "cache written by spilling, which the kernel reclaims at the limit; the working "
        "set (usage − `total_inactive_file`) is what cannot simply be dropped.",
        "- Order: for each repeat, for each workload: plain, safe, seed (interleaved).",
        "",
    ]
    for workload in WORKLOADS:
        mine = [r for r in runs if r.workload == workload]
        if not mine:
            continue
        img = img_dir / f"pressure-{workload}.png"
        rel = os.path.relpath(img, path.parent)
        lines += [f"### Workload: {workload}", "", *workload_table(mine), ""]
        lines += WORKLOAD_NOTES.get(workload, [])
        errors = sorted({f"{r.contender}: {r.error}" for r in mine if r.error})
        if errors:
            lines += ["Errors seen:", ""] + [f"- `{e}`" for e in errors] + [""]
        lines += [f"![memory against time, {workload}]({rel})", ""]

    nanny, helpers = nanny_overhead(runs)
    lines += ["## Nanny overhead (measured in every run)", ""]
    if nanny:
        lines += [
            f"- Nanny process (the `dask_worker` main process) RSS, max per run: median "
            f"{fmt_bytes(statistics.median(nanny))}, range {fmt_bytes(min(nanny))}–"
            f"{fmt_bytes(max(nanny))} over {len(nanny)} runs.",
        ]
    if helpers:
        lines += [
            f"- Everything in W except the worker process (nanny + multiprocessing "
            f"resource tracker), RSS at the end of each run: median "
            f"{fmt_bytes(statistics.median(helpers))}, range {fmt_bytes(min(helpers))}–"
            f"{fmt_bytes(max(helpers))}.",
        ]
    lines += [""]

    lines += ["## Start-up cost", ""]
    if startup is None:
        lines += ["Not measured in this run.", ""]
    else:
        rp, rs, ratios = startup.register_plain, startup.register_safe, startup.ratios
        ms = lambda v: f"{v:.0f} ms"  # noqa: E731
        sec = lambda v: f"{v:.2f} s"  # noqa: E731
        ratio = statistics.median(ratios) if ratios else float("nan")
        pl = statistics.median(startup.print_limit_ms)
        lines += [
            "Each worker launched inside a fresh child cgroup of ours (no memory pressure), "
            'one scheduler on 127.0.0.1; "registered" is the scheduler\'s own `add-worker` '
            "event timestamp minus the launch time. Pairs alternate which contender goes "
            "first.",
            "",
            "| measure | value | goal | met |",
            "|---|---|---|---|",
            f"| launch → registered, plain, median (range) | {fmt_med_range(rp, sec)} | | |",
            f"| launch → registered, safe, median (range) | {fmt_med_range(rs, sec)} | | |",
            f"| safe / plain per pair, median (range), {len(ratios)} pairs | "
            f"{fmt_med_range(ratios, lambda v: f'{v:.3f}')} | ≤ 1.05 | "
            f"{'yes' if ratio <= 1.05 else 'no'} |",
            f"| `--print-limit`, median (range), {len(startup.print_limit_ms)} runs | "
            f"{fmt_med_range(startup.print_limit_ms, ms)} | ≤ 60 ms | "
            f"{'yes' if pl <= 60 else 'no'} |",
            f"| `--dry-run`, median (range) | {fmt_med_range(startup.dry_run_ms, ms)} | | |",
            *(
                [
                    "| start path up to exec (JSON audit log), median (range) | "
                    f"{fmt_med_range(startup.start_path_ms, ms)} | | |",
                    "| start path up to exec (`--log-format none`), median (range) | "
                    f"{fmt_med_range(startup.start_path_nolog_ms, ms)} | | |",
                ]
                if startup.start_path_ms
                else []
            ),
            f"| baseline: `python -c pass` | {fmt_med_range(startup.python_ms, ms)} | | |",
            f"| baseline: the cgroup-entering `sh` wrapper with `true` | "
            f"{fmt_med_range(startup.wrapper_ms, ms)} | | |",
            "",
            f"Measured {startup.measured_at or 'with the runs above'}"
            + (f", source at commit {startup.commit}" if startup.commit else "")
            + ". Query timings are hyperfine-style: wall time of the whole process from the "
            "benchmark's `subprocess.run`, one warm-up run discarded, the console script "
            "started directly (not through `uv run`), inside a cgroup of ours.",
            "",
        ]
        if startup.importtime_top:
            lines += (
                [
                    f"`python -X importtime -c 'import dask_safe_worker.cli'` (one run, "
                    f"total {startup.import_total_ms:.0f} ms). Heaviest imports one or two "
                    "levels below `dask_safe_worker.cli` (cumulative, so nested rows overlap):",
                    "",
                    "| module | cumulative |",
                    "|---|---|",
                ]
                + [f"| `{name}` | {us / 1000:.1f} ms |" for name, us in startup.importtime_top]
                + [""]
            )
        if pl > 60 or ratio > 1.05:
            lines += goal_notes(startup)
        lines += ["### Supervisor RSS", ""]
        if startup.supervisor_rss is None:
            lines += [
                "`benchmarks/supervisor_rss.py` (a colleague's) did not exist when this ran: "
                "not measured; goal ≤ 15 MiB.",
                "",
            ]
        else:
            lines += supervisor_table(startup.supervisor_rss)
    lines += ['## Scenario "small VM" (cgroup v2)', ""]
    if vm_docs:
        lines += vm_section(vm_docs, img_dir / "pressure-small-vm.png", path)
    else:
        lines += [vm_note, ""]
    if DEFAULTS_FILE.exists():
        lines += ["", DEFAULTS_FILE.read_text().rstrip(), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")


def supervisor_table(raw: str) -> list[str]:
    """The colleague's JSON (benchmarks/supervisor_rss.py) as a table against the goal."""
    try:
        doc = json.loads(raw)
        results = doc["results"]
    except (ValueError, KeyError, TypeError):
        return ["Output of `benchmarks/supervisor_rss.py` (goal ≤ 15 MiB):", "", "```", raw,
                "```", ""]  # fmt: skip
    meaning = {
        "python": "bare interpreter sleeping (the floor)",
        "supervise": "`supervise()` from `python -c` (stdlib only)",
        "supervise-module": "`python -m dask_safe_worker.supervise`",
        "cli": "`dask-safe-worker --init`, the whole path: what stays alive as PID 1",
    }
    lines = [
        f"From `benchmarks/supervisor_rss.py` (a colleague's; median of {doc.get('repeat')} "
        "runs, MiB). Goal: supervisor RSS ≤ 15 MiB.",
        "",
        "| process | VmRSS | RssAnon | RssFile | ≤ 15 MiB |",
        "|---|---|---|---|---|",
    ]
    for name, values in results.items():
        rss = values.get("VmRSS_mib")
        met = "" if name == "python" else ("yes" if rss is not None and rss <= 15 else "no")
        lines.append(
            f"| {meaning.get(name, name)} | {rss} | {values.get('RssAnon_mib')} | "
            f"{values.get('RssFile_mib')} | {met} |"
        )
    return [*lines, ""]


# Written by hand from the evidence of the committed full run, and appended to every
# report, so that a rerun keeps the reasoning next to the numbers it rests on.
DEFAULTS_FILE = REPO / "benchmarks" / "defaults_from_evidence.md"


WORKLOAD_NOTES = {
    "spill": [
        "Plain never spills: its limit is the host's RAM, so W grows until M is full. The "
        "kernel then kills the worker inside W, and the nanny restarts it until the "
        "scheduler gives up with KilledWorker. Safe and seed spill at their Dask limit, and "
        "both finish. Their `failcnt` on W counts reclaims of spill page cache at W's "
        "limit, not kills.",
        "",
    ],
    "burst": [
        "A single task of 1.2 × the headroom cannot succeed anywhere: the point is "
        "*who* stops it. Plain hits M's limit (M's `failcnt`) and is OOM-killed by the "
        "kernel 4 times per run. With safe and seed, the nanny's 95 % terminate fires "
        "first every time (nanny restarts = deaths by signal, zero kernel kills). On this "
        "shared machine, touching 2.9 GiB took several seconds (see the plot), which "
        "gave the nanny's 100 ms RSS poll time to act. A faster allocation would reach "
        "W's kernel limit instead, and the kill would still be confined to W.",
        "",
    ],
    "steady": [
        "Nothing goes wrong with any contender. Wall times differ only by noise.",
        "",
    ],
}


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


def goal_notes(startup: StartupResult) -> list[str]:
    """Where a start-up goal is missed: what the measurements say costs the time."""
    pl = statistics.median(startup.print_limit_ms)
    base = statistics.median(startup.python_ms)
    ratio = statistics.median(startup.ratios) if startup.ratios else float("nan")
    lines: list[str] = []
    if pl > 60:
        lines += [
            f"**`--print-limit` misses its goal:** {pl:.0f} ms median, {pl - base:.0f} ms "
            "above a bare interpreter. A plain `--print-limit` already takes the click-free "
            "path in `dask_safe_worker.entry` (no click, no structlog); what remains is the "
            "interpreter, our measurement and planning modules, and the run itself, and the "
            "spread between runs (see the range) is as large as the miss.",
            "",
        ]
    if ratio > 1.05 and startup.register_plain and startup.start_path_ms:
        full = statistics.median(startup.start_path_ms) - base
        nolog = statistics.median(startup.start_path_nolog_ms) - base
        reg = statistics.median(startup.register_plain)
        safe = statistics.median(startup.register_safe)
        lines += [
            f"**The registration ratio misses its goal:** {ratio:.3f}. Before it execs the "
            f"worker, the safe path costs about {full:.0f} ms above a bare interpreter "
            f"({100 * full / 1000 / reg:.1f} % of plain's {reg:.2f} s registration): "
            f"{full - nolog:.0f} ms of it is the JSON audit log, i.e. importing structlog, "
            f"and {nolog:.0f} ms the rest (click, measuring, planning, the plan file). The "
            f"measured medians differ by {1000 * (safe - reg):.0f} ms, so about "
            f"{max(0.0, 1000 * (safe - reg) - full):.0f} ms of the excess is not explained "
            "by these measurements; the per-pair range is wide. structlog is the audit "
            "log's named dependency, so it stays; `--log-format none` removes its share "
            "where the audit log is not wanted.",
            "",
        ]
    return lines


def vm_section(docs: list[dict[str, Any]], img: Path, report: Path) -> list[str]:
    """The v2 "small VM" runs (benchmarks/pressure_vm.py) as a table and a plot."""
    by = {d["contender"]: d for d in docs}
    cs = [c for c in CONTENDERS if c in by]
    first = by[cs[0]]
    lines = [
        "Run with `uv run python benchmarks/pressure_vm.py` (one virtme-ng boot per "
        "contender, software-emulated, `--disable-kvm`). The VM has "
        f"{fmt_bytes(first.get('mem_total'))} of MemTotal. An agent holds "
        "350 MiB in its own cgroup, the scheduler and the benchmark driver sit in the root "
        "cgroup. The driver and its ancestors (the guest's script and init) get "
        "`oom_score_adj` -1000 once every process of the scenario has started, so that it "
        "can report; the agent, the scheduler and the worker keep 0. The "
        "worker runs in a cgroup W without a limit. Workload: spill, 1.5 × MemAvailable "
        "measured before the worker starts, in 32 MiB chunks. Seed = W's `memory.max` set "
        "to that MemAvailable, with the plain worker started under `unshare --cgroup` and "
        "cgroup2 remounted, so that dask itself reads the limit (the blog post's "
        "container, reproduced exactly). One run per contender.",
        "",
        "| | " + " | ".join(f"{LABELS[c].split(' ', 1)[0]} {c}" for c in cs) + " |",
        "|---" * (len(cs) + 1) + "|",
    ]

    def row(name: str, cell: Callable[[dict[str, Any]], object]) -> None:
        lines.append(f"| {name} | " + " | ".join(str(cell(by[c])) for c in cs) + " |")

    def secs(v: object) -> str:
        return f"{v:.1f} s" if isinstance(v, (int, float)) else "–"

    def w_max(d: dict[str, Any]) -> str:
        value = d.get("w_memory_max")
        if value is None:
            return "–"
        return str(value) if value == "max" else fmt_bytes(int(value))

    row("outcome", lambda d: d.get("outcome", "?"))
    row("wall time", lambda d: secs(d.get("wall_s")))
    row("MemAvailable before start", lambda d: fmt_bytes(d.get("mem_available_before")))
    row("workload", lambda d: fmt_bytes(d.get("workload_bytes")))
    row("Dask memory limit", lambda d: fmt_bytes(d.get("dask_memory_limit")))
    row("W `memory.max`", w_max)
    row("global OOM kills (`/proc/vmstat`)", lambda d: d.get("global_oom_kills", "–"))
    row("OOM kills in W (`memory.events`)", lambda d: d.get("w_events", {}).get("oom_kill", "–"))
    row("OOM kills of the agent", lambda d: d.get("agent_events", {}).get("oom_kill", "–"))
    row("nanny memory restarts", lambda d: d.get("memory_restarts", "–"))
    row("worker deaths by signal (nanny log)", lambda d: d.get("killed_by_signal", "–"))
    row("agent survived", lambda d: d.get("agent_alive", "–"))
    row("scheduler survived", lambda d: d.get("scheduler_alive", "–"))
    row("nanny survived", lambda d: d.get("nanny_alive", "–"))
    row("launch → registered", lambda d: secs(d.get("register_s")))
    row("whole VM boot and run", lambda d: secs(d.get("vm_wall_s")))
    lines.append("")
    errors = [f"{c}: {by[c].get('error')}" for c in cs if by[c].get("error")]
    if errors:
        lines += ["Errors seen:", ""] + [f"- `{e[:300]}`" for e in errors] + [""]
    kills = [f"- {c}: `{line.strip()[:200]}`" for c in cs for line in by[c].get("dmesg_oom", [])]
    if kills:
        lines += ["Kernel log, `Killed process` lines:", "", *kills[:20], ""]
    if plot_vm(docs, img):
        rel = os.path.relpath(img, report.parent)
        lines += [f"![memory against time, small VM]({rel})", ""]
    return lines


VM_LABELS = {
    "plain": "(a) plain dask worker",
    "safe": "(b) dask-safe-worker",
    "seed": "(c) seed: W memory.max = MemAvailable, dask reads it in a private cgroupns",
}


def plot_vm(docs: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = [d for d in docs if d.get("series", {}).get("t")]
    if not docs:
        return False
    fig, axes = plt.subplots(len(docs), 1, figsize=(12.5, 3.1 * len(docs)), squeeze=False)
    for ax, d in zip(axes[:, 0], docs, strict=True):
        s = d["series"]
        total = d.get("mem_total") or 0
        colour = COLOURS.get(d["contender"], "tab:blue")
        ax.plot(s["t"], [v / GiB for v in s["used"]], color="black",
                label="VM used (MemTotal − MemAvailable)")  # fmt: skip
        ax.plot(s["t"], [v / GiB for v in s["w"]], color=colour,
                label="W memory.current (worker + nanny)")  # fmt: skip
        if total:
            ax.axhline(total / GiB, color="red", lw=1.2, label="MemTotal")
        if d.get("w_memory_max") not in (None, "max"):
            ax.axhline(int(d["w_memory_max"]) / GiB, color="orange", ls="--",
                       label="W memory.max")  # fmt: skip
        if d.get("dask_memory_limit"):
            dl = d["dask_memory_limit"] / GiB
            ax.axhline(dl, color="purple", ls="-.", lw=1, label="Dask memory limit")
            ax.axhline(0.95 * dl, color="purple", ls=":", lw=0.8, label="Dask terminate (95%)")
        ax.set_ylim(0, (total / GiB if total else 2) * 1.12)
        ax.set_title(
            f"{VM_LABELS.get(d['contender'], d['contender'])} — {d.get('outcome')}, "
            f"global OOM kills {d.get('global_oom_kills')}, wall {d.get('wall_s') or 0:.0f} s",
            fontsize=9,
        )
        ax.set_ylabel("GiB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel("seconds since the worker was launched (in the VM)")
    fig.suptitle("'small VM' on cgroup v2 (virtme-ng, software-emulated) — spill", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def vm_tools_ok() -> bool:
    vmrun = REPO / "tests" / "vm" / "vmrun.py"
    if not vmrun.exists():
        return False
    sys.path.insert(0, str(vmrun.parent))
    try:
        from vmrun import VMUnavailable, find_tools

        find_tools()
    except (ImportError, VMUnavailable):
        return False
    return True


def vm_scenario_note() -> str:
    vmrun = REPO / "tests" / "vm" / "vmrun.py"
    if not vmrun.exists():
        return (
            "Not run: the VM harness (`tests/vm/vmrun.py` with `run_in_vm`) did not exist "
            "when this report was generated."
        )
    return (
        "Not run in this report (quick mode, `--no-vm`, or the VM could not boot here: "
        "`benchmarks/pressure_vm.py` runs it through `tests/vm/vmrun.py`). Issue 5's "
        "calibration (virtme-ng, 1.5 GiB, 300 MiB agent, 1.2 GB persist-and-sum, 2 threads): "
        "plain failed with KilledWorker after 4 global OOM kills (148.6 s); the seed's "
        "approach completed in 24.5 s with 0 kills."
    )


# ---------------------------------------------------------------------------- main


def run_pressure(
    quick: bool, repeats: int, work: Path, log: Callable[[str], None]
) -> list[RunResult]:
    _pickle_by_value()
    runs: list[RunResult] = []
    workloads = ("spill",) if quick else WORKLOADS
    contenders = ("plain", "safe") if quick else CONTENDERS
    for repeat in range(1 if quick else repeats):
        for workload in workloads:
            for contender in contenders:
                runs.append(run_once(contender, workload, repeat, work, log))
    return runs


def load_raw(path: Path) -> tuple[list[RunResult], StartupResult | None, dict[str, Any]]:
    doc = json.loads(path.read_text())
    runs = []
    for d in doc["runs"]:
        d["series"] = Series(**d["series"])
        d["processes_in_w"] = [tuple(p) for p in d["processes_in_w"]]
        runs.append(RunResult(**d))
    startup = StartupResult(**doc["startup"]) if doc.get("startup") else None
    return runs, startup, doc.get("meta", {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one spill pair (plain, safe)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=7, help="registration pairs")
    parser.add_argument("--loops", type=int, default=20, help="runs per query-mode timing")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--img-dir", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--json", type=Path, default=None, help="also dump raw results here")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="re-render the report from a raw dump"
    )
    parser.add_argument(
        "--vm-json", type=Path, default=None, help="v2 results of benchmarks/pressure_vm.py"
    )
    parser.add_argument(
        "--remeasure-startup",
        action="store_true",
        help="with --from-json: measure the start-up cost again (current code), keep the runs",
    )
    parser.add_argument(
        "--no-vm",
        action="store_true",
        help="skip the v2 'small VM' scenario (full mode runs it when the VM harness works)",
    )
    ns = parser.parse_args(argv)
    command = "uv run python benchmarks/pressure.py" + (" --quick" if ns.quick else "")
    remeasured = ns.remeasure_startup
    if ns.from_json:
        remeasured = remeasured or bool(
            json.loads(ns.from_json.read_text()).get("meta", {}).get("startup_remeasured")
        )
    if ns.from_json and ns.vm_json:
        command = (
            "uv run python benchmarks/pressure.py --no-vm --json raw.json  # v1 and start-up\n"
            "uv run python benchmarks/pressure_vm.py --json vm.json     # v2 small VM\n"
            "uv run python benchmarks/pressure.py --from-json raw.json --vm-json vm.json"
            + (" --remeasure-startup  # start-up again, on newer code" if remeasured else "")
            + "\n"
            "# `uv run python benchmarks/pressure.py` alone runs all three steps in one go"
        )
    if ns.from_json:
        runs, startup, meta = load_raw(ns.from_json)
        started_at = meta.get("started_at", "?")
        if not ns.vm_json:
            command = meta.get("command", command)
        quick = bool(meta.get("quick", ns.quick))
        if ns.remeasure_startup:
            with tempfile.TemporaryDirectory(prefix="dsw-bench-") as tmp:
                startup = measure_startup(ns.pairs, ns.loops, Path(tmp), log)
            doc = json.loads(ns.from_json.read_text())
            doc["startup"] = asdict(startup)
            doc.setdefault("meta", {})["startup_remeasured"] = True
            ns.from_json.write_text(json.dumps(doc, default=str))
    else:
        reason = kernel_cgroups_usable()
        if reason:
            print(f"pressure.py: cannot create test cgroups: {reason}", file=sys.stderr)
            return 2
        started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        quick = ns.quick
        with tempfile.TemporaryDirectory(prefix="dsw-bench-") as tmp:
            work = Path(tmp)
            runs = run_pressure(ns.quick, ns.repeats, work, log)
            if ns.json:
                # A first dump, in case the start-up part fails: runs are the slow part.
                ns.json.parent.mkdir(parents=True, exist_ok=True)
                ns.json.write_text(json.dumps({"runs": [asdict(r) for r in runs]}, default=str))
            startup = measure_startup(
                2 if ns.quick else ns.pairs, 5 if ns.quick else ns.loops, work, log
            )
        raw = {
            "meta": {"started_at": started_at, "command": command, "quick": ns.quick},
            "runs": [asdict(r) for r in runs],
            "startup": asdict(startup),
        }
        if ns.json:
            ns.json.parent.mkdir(parents=True, exist_ok=True)
            ns.json.write_text(json.dumps(raw, default=str))
    vm_docs: list[dict[str, Any]] | None = None
    if ns.vm_json:
        vm_docs = json.loads(ns.vm_json.read_text())
    elif not (ns.no_vm or ns.quick or ns.from_json) and vm_tools_ok():
        import pressure_vm

        vm_docs = [
            pressure_vm.run_contender(c, REPO / ".tmp" / "pressure-vm", log) for c in CONTENDERS
        ]
        if ns.json:
            ns.json.with_suffix(".vm.json").write_text(json.dumps(vm_docs, default=str))
    for workload in WORKLOADS:
        mine = [r for r in runs if r.workload == workload]
        if mine:
            plot_workload(workload, mine, ns.img_dir / f"pressure-{workload}.png")
    write_report(
        ns.out, ns.img_dir, runs, startup, command, quick, started_at, vm_scenario_note(), vm_docs
    )
    log(f"wrote {ns.out} and plots in {ns.img_dir}")
    return 0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
