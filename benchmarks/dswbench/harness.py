"""One run of the "VM with agents" scenario on this host's cgroup v1 hierarchy."""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from .common import (
    AGENT_BYTES,
    AUDIT,
    CONTENDERS,
    FRONTIER_ALLOWANCES,
    M_LIMIT,
    NTHREADS,
    PY,
    REPO,
    SAFE,
    SHARES,
    SMALL_M_LIMIT,
    TIMEOUTS,
    WORKLOADS,
    KiB,
    fmt_bytes,
)
from .support import KernelCgroup, free_port, make_test_cgroup
from .workloads import AGENT_CODE, pickle_by_value, run_workload, worker_stats

RESTART_MEMORY_RE = re.compile(r"exceeded \d+% memory budget\. Restarting")
KILLED_RE = re.compile(r"Worker process \d+ was killed by signal (\d+)")


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


def end_run(
    client: Any,
    worker: subprocess.Popen[Any],
    worker_log: IO[bytes],
    sampler: Sampler,
    w: KernelCgroup,
    started: set[int],
) -> None:
    """The end of every run: the client closed, the worker ended, the sampler stopped, and
    what is left in W killed (only pids this run started or saw in M, see Sampler)."""
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
                s.m_working_set.append(max(0, m_usage - self.m.stat("total_inactive_file")))
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
            stdout=log, stderr=subprocess.STDOUT, env=bench_env(),
        )  # fmt: skip
    started.add(proc.pid)
    try:
        yield address, proc
    finally:
        end_process(proc, 10)


def bench_env() -> dict[str, str]:
    """Our environment plus this package on the path: distributed pickles a task graph as a
    whole, by reference, so the scheduler and worker must import dswbench.workloads. And
    a runtime directory of the benchmark's own: as root the tool's default is
    /run/dask-safe-worker, where its records of the runs' cgroups would outlive them."""
    path = os.environ.get("PYTHONPATH")
    bench = str(REPO / "benchmarks")
    env = {**os.environ, "PYTHONPATH": f"{bench}:{path}" if path else bench}
    return {**env, "XDG_RUNTIME_DIR": env.get("XDG_RUNTIME_DIR") or _runtime_dir()}


@functools.cache
def _runtime_dir() -> str:
    directory = tempfile.mkdtemp(prefix="dsw-bench-run-")  # mode 0700, ours
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


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


def allowance_of(contender: str) -> int | None:
    """ "safe@40" is dask-safe-worker with --nanny-allowance 40MiB (the frontier's points)."""
    _, sep, mib = contender.partition("@")
    return int(mib) * 2**20 if sep else None


def contender_argv(contender: str, args: list[str], plan_file: Path) -> list[str]:
    if contender.startswith("safe"):
        allowance = allowance_of(contender)
        extra = ["--nanny-allowance", str(allowance)] if allowance is not None else []
        return [SAFE, "--log-format", "json", "--plan-file", str(plan_file), *extra, *args]
    if contender == "follow":
        return [SAFE, "--log-format", "json", "--plan-file", str(plan_file), "--follow", *args]
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


def init_started() -> str:
    """PID 1's start time (field 22 of /proc/1/stat): unchanged means PID 1 survived."""
    try:
        return Path("/proc/1/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def call_with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(fn).result(timeout)
    except Exception as exc:
        return exc
    finally:
        pool.shutdown(wait=False)


def deaths_seen(
    client: Any, address: str, expected: int = 0, audit_timeout: float = 120
) -> dict[str, list[str]]:
    """The workers' deaths as a user finds them: the causes of our events on the
    scheduler, `dask_safe_worker.deaths(client)`'s sentences, and the causes that
    `dask-safe-audit --json` lists (each row's deaths and those of workers gone).

    A nanny sends its record once its new worker runs, seconds after the death: first
    wait (up to 60 s) until the scheduler holds `expected` records, what the kernel and
    the nanny's log counted."""
    from dask_safe_worker import deaths
    from dask_safe_worker.deaths_client import death_records

    deadline = time.monotonic() + 60
    while True:
        records = call_with_timeout(lambda: death_records(client), 20)
        done = isinstance(records, list) and len(records) >= expected
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    sentences = call_with_timeout(lambda: deaths(client), 20)
    try:
        audit = subprocess.run(
            [AUDIT, address, "--json", "--timeout", str(audit_timeout / 4)],
            capture_output=True,
            text=True,
            timeout=audit_timeout,
            env=bench_env(),
        )
    except subprocess.TimeoutExpired:
        # The events and the sentences are kept: the audit is one view of three.
        audit_causes = [f"no audit JSON: no answer in {audit_timeout:.0f} s"]
    else:
        try:
            doc = json.loads(audit.stdout)
            listed = [d for row in doc["workers"] for d in row.get("deaths") or []]
            listed += list(doc["deaths_of_workers_gone"])
            audit_causes = [str(d["cause"]) for d in listed]
        except (ValueError, KeyError, TypeError):
            audit_causes = [f"no audit JSON (exit {audit.returncode}): {audit.stderr[-160:]}"]
    return {
        "events": [str(r["cause"]) for r in records] if isinstance(records, list) else [],
        "sentences": list(sentences) if isinstance(sentences, list) else [repr(sentences)],
        "audit": audit_causes,
    }


# --------------------------------------------------------------------------- a run


@dataclass
class RunResult:
    contender: str
    workload: str
    repeat: int
    m_limit: int = M_LIMIT
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
    # Dask's total limit across workers (one worker here) / M's headroom before the start:
    # how much of the memory the "VM" could give the worker Dask may use.
    efficiency: float | None = None
    # The fast burst: seconds to populate PROBE_BYTES (its second try), and PID 1 alive.
    populate_probe_s: float | None = None
    init_alive: bool = True
    # Largest growth of W's usage between two samples (about 100 ms apart), and the gap.
    w_max_step: int = 0
    w_max_step_s: float | None = None
    nanny_rss_median: int | None = None
    nanny_rss_max: int | None = None
    processes_in_w: list[tuple[int, int | None, int | None, str]] = field(default_factory=list)
    # Why workers died, where users look (issue 20): the causes in the scheduler's events
    # (`client.get_events`), the helper's sentences and the causes `dask-safe-audit
    # --json` lists; empty for contenders without our supervisor.
    deaths: dict[str, list[str]] = field(default_factory=dict)
    series: Series = field(default_factory=Series)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("series")
        return d


def run_once(
    contender: str,
    workload: str,
    repeat: int,
    work: Path,
    log: Callable[[str], None],
    m_limit: int = M_LIMIT,
) -> RunResult:
    from distributed import Client

    res = RunResult(contender, workload, repeat, m_limit)
    run_dir = work / f"{workload}-{contender}-{repeat}-{m_limit >> 20}"
    run_dir.mkdir(parents=True)
    started: set[int] = set()
    init_before = init_started()
    with make_test_cgroup(started, prefix="dsw-bench") as m:
        m.set_limit(m_limit)
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
            headroom = m_limit - m.working_set()
            res.headroom_before = headroom
            res.workload_bytes = int(SHARES[workload] * headroom)
            args = worker_args("", str(run_dir / "local"))
            if contender == "seed":
                w.set_limit(headroom)
                args += ["--memory-limit", str(headroom)]
            with scheduler(run_dir / "scheduler.log", started) as (address, sched):
                args[0] = address
                argv = contender_argv(contender, args, run_dir / "plan.json")
                client = Client(address, timeout=120)
                t0 = time.monotonic()
                sampler = Sampler(m, w, started, t0)
                sampler.start()
                worker_log = open(run_dir / "worker.log", "wb")  # noqa: SIM115
                since = time.time()
                worker = subprocess.Popen(
                    w.enter_command(argv),
                    stdout=worker_log,
                    stderr=subprocess.STDOUT,
                    env=bench_env(),
                )
                started.add(worker.pid)
                sampler.nanny_pid = worker.pid
                try:
                    res.register_s = wait_registered(client, since, 240)
                    if res.register_s is None:
                        raise RuntimeError("worker did not register within 240 s")
                    client.wait_for_workers(1, timeout=60)
                    limits = client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
                    res.dask_memory_limit = next(iter(limits.values()))
                    res.efficiency = sum(limits.values()) / headroom
                    time.sleep(1.0)  # a baseline on the plot, before the work starts
                    t_start = time.monotonic()
                    info: dict[str, Any] = {}
                    try:
                        run_workload(client, workload, headroom, TIMEOUTS[workload], info)
                        res.outcome = "completed"
                    except TimeoutError:
                        res.outcome = f"hung (>{TIMEOUTS[workload]:.0f} s)"
                    except Exception as exc:
                        res.outcome = "Dask error"
                        res.error = f"{type(exc).__name__}: {str(exc)[:160]}"
                    res.wall_s = time.monotonic() - t_start
                    res.populate_probe_s = info.get("populate_probe_s")
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
                    if contender != "plain" and contender != "seed":
                        log_so_far = (run_dir / "worker.log").read_text(errors="replace")
                        counted = w.oom_kills() + len(RESTART_MEMORY_RE.findall(log_so_far))
                        res.deaths = deaths_seen(client, address, counted)
                    events = call_with_timeout(lambda: client.get_events(), 10)
                    if isinstance(events, dict):
                        (run_dir / "events.json").write_text(json.dumps(events, default=str))
                    res.agent_alive = agent.poll() is None
                    res.nanny_alive = worker.poll() is None
                    res.scheduler_alive = sched.poll() is None
                finally:
                    end_run(client, worker, worker_log, sampler, w, started)
            res.series = sampler.series
            res.oom_kills_m, res.oom_kills_w = m.oom_kills(), w.oom_kills()
            res.failcnt_m = read_int(m.path / "memory.failcnt") or 0
            res.failcnt_w = read_int(w.path / "memory.failcnt") or 0
            res.peak_m = read_int(m.path / "memory.max_usage_in_bytes") or 0
            res.peak_m_working_set = max(res.series.m_working_set, default=0)
            s = res.series
            for i in range(1, len(s.t)):
                step = s.w_usage[i] - s.w_usage[i - 1]
                if step > res.w_max_step:
                    res.w_max_step, res.w_max_step_s = step, s.t[i] - s.t[i - 1]
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
    res.init_alive = init_started() == init_before
    log(
        f"{workload:6} {contender:5} #{repeat}: {res.outcome:18} wall={res.wall_s or 0:6.1f}s "
        f"dask_limit={fmt_bytes(res.dask_memory_limit)} W_limit={fmt_bytes(res.w_kernel_limit)} "
        f"oom W/M={res.oom_kills_w}/{res.oom_kills_m} failcnt W/M={res.failcnt_w}/{res.failcnt_m} "
        f"restarts={res.memory_restarts} killed={res.killed_by_signal} "
        f"spilled={fmt_bytes(res.disk_write_bytes)} peakM={fmt_bytes(res.peak_m)} "
        f"peakM_ws={fmt_bytes(res.peak_m_working_set)} reg={res.register_s or 0:.2f}s "
        f"agent={res.agent_alive} sched={res.scheduler_alive} nanny={res.nanny_alive} "
        f"eff={res.efficiency or 0:.3f} probe={res.populate_probe_s or 0:.3f}s "
        f"step={fmt_bytes(res.w_max_step)}/{res.w_max_step_s or 0:.2f}s init={res.init_alive} "
        f"{res.error or ''}"
    )
    return res


def run_retrying(
    contender: str,
    workload: str,
    repeat: int,
    work: Path,
    log: Callable[[str], None],
    m_limit: int = M_LIMIT,
) -> RunResult:
    """One run; a run whose set-up failed (scheduler or worker not up in time on a
    saturated machine) is tried once more, then recorded as not measured."""
    for attempt in range(2):
        try:
            return run_once(contender, workload, repeat, work / f"try{attempt}", log, m_limit)
        except (OSError, RuntimeError, TimeoutError) as exc:
            log(f"{workload} {contender} #{repeat}: set-up failed ({exc}); attempt {attempt + 1}")
            error = f"{type(exc).__name__}: {exc}"[:200]
    return RunResult(contender, workload, repeat, m_limit, outcome="not measured", error=error)


def run_pressure(
    quick: bool,
    repeats: int,
    work: Path,
    log: Callable[[str], None],
    workloads: tuple[str, ...] = WORKLOADS,
    dump: Callable[[list[RunResult]], None] | None = None,
) -> list[RunResult]:
    """Every workload and contender, interleaved, `repeats` times; `dump` gets the results so
    far after each run, so that an interrupted series still leaves its finished runs."""
    pickle_by_value()
    runs: list[RunResult] = []
    contenders = ("plain", "safe") if quick else CONTENDERS
    for repeat in range(1 if quick else repeats):
        for workload in ("spill",) if quick else workloads:
            for contender in contenders:
                runs.append(run_retrying(contender, workload, repeat, work, log))
                if dump is not None:
                    dump(runs)
    return runs


def run_frontier(
    repeats: int,
    work: Path,
    log: Callable[[str], None],
    dump: Callable[[list[RunResult]], None] | None = None,
) -> list[RunResult]:
    """Efficiency against kills: M shrunk to SMALL_M_LIMIT (about the small VM's headroom),
    the seed (no allowance: kernel limit = Dask limit = headroom) and dask-safe-worker at
    each allowance, on spill and burst (the fast burst reaches the kernel limit whatever
    the allowance: see its own table), interleaved."""
    pickle_by_value()
    runs: list[RunResult] = []
    contenders = ["seed"] + [f"safe@{a}" for a in FRONTIER_ALLOWANCES]
    for repeat in range(repeats):
        for workload in ("spill", "burst"):
            for contender in contenders:
                runs.append(run_retrying(contender, workload, repeat, work, log, SMALL_M_LIMIT))
                if dump is not None:
                    dump(runs)
    return runs
