"""Scenario "small VM" on cgroup v2, in the virtme-ng VM of tests/vm/vmrun.py (issue 5).

A VM with 1.5 GiB of RAM; inside it an agent holding 350 MiB in its own cgroup, the
scheduler in the root cgroup, and the worker in a cgroup W without a limit. Contenders:

- plain: `python -m distributed.cli.dask_worker` in W; only the global OOM killer can
  stop it;
- safe: `dask-safe-worker` with the same arguments in W (it writes W's memory.max);
- safe-high (`--contenders safe,safe-high`): safe with `--memory-high-fraction`
  HIGH_FRACTION, the throttle zone of issue 21;
- seed: the blog post's approach, reproduced exactly: W's memory.max set to MemAvailable
  read just before the start, and the plain worker started in a private cgroup namespace
  with cgroup2 remounted, so that dask itself reads that limit at /sys/fs/cgroup.

Workload "spill" (the default): random arrays of 1.5 x MemAvailable measured before the
worker starts, persisted, then summed. Three rounds (VM boots); each runs plain, safe and
seed one after the other, in fresh cgroups, the order rotated per round (interleaved). The
guest is software-emulated, so a round takes many minutes.

Workload "neighbour" (`--workload neighbour`, issue 10): the same spill, and partway through
it the agent grows by half the worker's budget (GROW_AT below). A fourth contender, follow:
`dask-safe-worker --follow`. Per run also: who the kernel killed (its log's oom-kill lines
and the cgroups' memory.events), the agent's memory and W's memory.max against time, the
spill, the follow audit events (latencies) and the supervisor's CPU over the workload.
benchmarks/neighbour_report.py renders the results into docs/benchmarks.md.

Workloads "burst" and "fastburst" (issue 20, `--workload burst,fastburst` runs both in one
boot): the v1 benchmark's bursts (dswbench.workloads) with dask-safe-worker, and after
each run the deaths as users find them (`deaths_seen`: the scheduler's events,
`dask_safe_worker.deaths(client)`, `dask-safe-audit --json`), beside W's memory.events
and the nanny's restarts in the worker's log.

Host side:  uv run python benchmarks/pressure_vm.py [--workload spill|neighbour] [--rounds 3]
            [--contenders plain,safe,seed] [--json out.json]
            uv run python benchmarks/pressure_vm.py --collect --json out.json  # cut short
Guest side: run by the host side through run_in_vm (`--guest C1,C2,C3 --round N`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MiB = 2**20
VM_MEMORY = "1536M"
AGENT_BYTES = 350 * MiB
CHUNK = 32 * MiB
WORKLOAD_TIMEOUT = 300.0
START_TIMEOUT = 600.0
RESTART_MEMORY_RE = re.compile(r"exceeded \d+% memory budget\. Restarting")
KILLED_RE = re.compile(r"Worker process \d+ was killed by signal (\d+)")
WORKLOADS = ("spill", "neighbour", "burst", "fastburst")
CONTENDERS = {
    "spill": ("plain", "safe", "seed"),
    "neighbour": ("plain", "safe", "follow", "seed"),
    # Issue 20: the deaths each causes, as users find them (only ours explain them).
    "burst": ("safe",),
    "fastburst": ("safe",),
}
# The burst workloads' share of MemAvailable and their bound, as on v1 (dswbench).
BURSTS = ("burst", "fastburst")
# Seconds of VM time per run. A burst ends in four worker deaths, each followed by a new
# worker's start: 7.5 minutes for the first start alone at a host load of 12 (22:00 UTC
# on 2026-12-07), and the audit in the guest took over 2 minutes.
RUN_BOUND_S = {"burst": 3600, "fastburst": 3600}
# A burst's workload is four deaths and three new workers: at a host load of 5-15
# (2026-12-08) each new worker took about 6 minutes to register in the guest, so 300 s
# cut the burst short after its third death ("hung").
BURST_WORKLOAD_TIMEOUT = 1800.0
# "neighbour grows": the agent grows by half the worker's budget (MemAvailable measured
# before the start, which is what every contender's budget is cut from) once W's charge has
# reached GROW_AT of that budget, i.e. when the worker holds real data, shortly before it
# starts to spill. A point in the spill's progress, not a time: the emulated guest runs
# several times slower when the host is busy (a worker registered in 23-174 s), and a fixed
# time would land at a different stage of the workload in every run. GROW_FALLBACK_S
# bounds the wait for a worker that never gets there.
GROW_AT = 0.5
GROW_FALLBACK_S = 90.0
FOLLOW_INTERVAL = 1.0
# Contender "safe-high" (issue 21, throttle before kill; not in any workload's default
# set, `--contenders safe,safe-high`): dask-safe-worker with memory.high at this fraction
# of the budget. Dask's terminate threshold (95 % of its limit, itself the budget less
# the nanny's allowance) puts W's charge at about 0.95 of the budget in these runs; the
# throttle zone starts above it, so a burst is slowed where the nanny is about to act
# instead of running on into memory.max, and Dask's own spilling and pausing below it are
# never throttled.
HIGH_FRACTION = 0.97
OOM_KILL_RE = re.compile(r"oom-kill:.*task_memcg=(\S*?),task=(\S+?),pid=(\d+)")


# ----------------------------------------------------------------------------- guest


def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0]) * 1024
    return out


def _vmstat(key: str) -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def protect_harness() -> None:
    """oom_score_adj -1000 for this process and its ancestors (the guest's script and init),
    which are the benchmark's machinery, not part of the scenario."""
    pid = os.getpid()
    while pid > 1:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/oom_score_adj").write_text("-1000")
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        pid = int(stat.rsplit(")", 1)[1].split()[1])


def run_tag(workload: str, contender: str, round_no: int) -> str:
    """The name of a run's files; the spill runs keep the names they always had."""
    prefix = "" if workload == "spill" else f"{workload}-"
    return f"{prefix}{contender}-{round_no}"


def guest_main(contenders: list[str], round_no: int, results: Path, workloads: str) -> int:
    """The contenders one after the other in this boot, each in fresh cgroups; for each
    of the comma-separated workloads in turn (the bursts share a boot)."""
    for workload, contender in [(w, c) for w in workloads.split(",") for c in contenders]:
        try:
            guest_run(contender, round_no, results, workload)
        except Exception as exc:
            # One contender's failure (e.g. a start-up timeout on a starved host) must not
            # cost the round's other contenders: record it and go on.
            doc_path = results / f"vm-{run_tag(workload, contender, round_no)}.json"
            doc = json.loads(doc_path.read_text()) if doc_path.exists() else {}
            doc.update(contender=contender, round=round_no, workload=workload, outcome="run failed",
                       error=f"{type(exc).__name__}: {str(exc)[:300]}")  # fmt: skip
            doc_path.write_text(json.dumps(doc, default=str))
    return 0


def charge_snapshot(w: Any) -> dict[str, Any]:
    """The nanny side's charge to W (dswbench/charge.py), as on the v1 host."""
    from dswbench.charge import charge, parse_stat, read_procs

    stat = parse_stat(w.read("memory.stat"))
    kernel = stat.get("kernel")
    if kernel is None:  # kernels before 5.18 have no "kernel" line: its main parts
        kernel = sum(stat.get(k, 0) for k in ("kernel_stack", "pagetables", "slab", "percpu"))
    return charge(stat, int(w.read("memory.current")), kernel, read_procs(w.pids())).as_dict()


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _audit_events(text: str) -> list[dict[str, Any]]:
    """The follow and kernel events of a safe worker's JSON audit log."""
    out = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        with contextlib.suppress(json.JSONDecodeError):
            event = json.loads(line)
            if str(event.get("event", "")).startswith(("follow.", "kernel.")):
                out.append(event)
    return out


def _oom_kill_lines() -> list[str]:
    out = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if "Killed process" in line or "oom-kill:" in line]


def guest_run(contender: str, round_no: int, results: Path, workload: str = "spill") -> int:
    for path in ("tests", "tests/vm/guest", "benchmarks"):
        sys.path.insert(0, str(REPO / path))
    from dswbench.harness import deaths_seen
    from dswbench.workloads import (
        GROWING_AGENT_CODE,
        persist_and_sum,
        pickle_by_value,
        run_workload,
        spill_bytes,
        worker_stats,
    )
    from guest_cgroups import (
        CGROUP2,
        PYTHON,
        SAFE_WORKER,
        Cgroup,
        Processes,
        enter,
        enter_container,
        make_cgroup_tree,
        memory_hog,
    )

    from scheduler_util import free_port, scheduler_argv

    neighbour = workload == "neighbour"
    root = Cgroup(CGROUP2)
    if "memory" not in root.read("cgroup.subtree_control").split():
        root.enable_memory()
    out: dict[str, Any] = {
        "contender": contender,
        "round": round_no,
        "workload": workload,
        "series": {"t": [], "used": [], "w": [], "agent": [], "w_max": []},
    }
    tag = run_tag(workload, contender, round_no)
    result_file = results / f"vm-{tag}.json"

    def save() -> None:
        result_file.write_text(json.dumps(out, default=str))

    # The previous run's protect_harness() left this process at -1000, and the scenario's
    # processes would inherit it: back to 0 until they are started.
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("0")
    procs = Processes()
    oom_before = _vmstat("oom_kill")
    # The kernel's ring buffer spans the boot: only lines after this many are this run's.
    dmesg_before = len(_oom_kill_lines())
    with make_cgroup_tree(procs, "bench") as base:
        agent_cg = base.child("agent")
        w = base.child("w")
        if neighbour:
            agent = procs.popen(
                enter(agent_cg, [PYTHON, "-c", GROWING_AGENT_CODE, str(AGENT_BYTES)]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert agent.stdout is not None
            assert agent.stdout.readline().strip() == "ready", "the agent did not start"
        else:
            agent = memory_hog(procs, agent_cg, AGENT_BYTES)
        port = free_port()
        address = f"tcp://127.0.0.1:{port}"
        sched_log = open(results / f"vm-{tag}-scheduler.log", "wb")  # noqa: SIM115
        scheduler = procs.popen(
            scheduler_argv(port),
            stdout=sched_log,
            stderr=subprocess.STDOUT,
        )
        from distributed import Client

        client = Client(address, timeout=START_TIMEOUT)
        mem = _meminfo()
        available = mem["MemAvailable"]
        out.update(mem_total=mem["MemTotal"], mem_available_before=available)
        out["pids"] = {"agent": agent.pid, "scheduler": scheduler.pid}
        local = results / f"vm-{tag}-local"
        local.mkdir(exist_ok=True)
        args = [address, "--nthreads", "2", "--nworkers", "1", "--host", "127.0.0.1"]
        # --death-timeout also bounds the start of the worker process, which takes minutes
        # in the emulated guest when the host is busy.
        args += ["--no-dashboard", "--local-directory", str(local), "--death-timeout", "600"]
        safe = [SAFE_WORKER, "--log-format", "json", "--plan-file",
                str(results / f"vm-{tag}-plan.json")]  # fmt: skip
        if contender == "safe":
            argv = enter(w, [*safe, *args])
        elif contender == "safe-high":
            argv = enter(w, [*safe, "--memory-high-fraction", str(HIGH_FRACTION), *args])
        elif contender == "follow":
            interval = ["--follow-interval", str(FOLLOW_INTERVAL)]
            argv = enter(w, [*safe, "--follow", *interval, *args])
        elif contender == "seed":
            w.write("memory.max", available)
            argv = enter_container(w, [PYTHON, "-m", "distributed.cli.dask_worker", *args])
        else:
            argv = enter(w, [PYTHON, "-m", "distributed.cli.dask_worker", *args])
        stop = threading.Event()
        t0 = time.monotonic()

        def sample() -> None:
            series = out["series"]
            while not stop.is_set():
                with contextlib.suppress(OSError, ValueError, KeyError):
                    m = _meminfo()
                    w_now = int(w.read("memory.current"))
                    agent_now = int(agent_cg.read("memory.current"))
                    w_max = w.read("memory.max")
                    series["t"].append(round(time.monotonic() - t0, 2))
                    series["used"].append(m["MemTotal"] - m["MemAvailable"])
                    series["w"].append(w_now)
                    series["agent"].append(agent_now)
                    series["w_max"].append(None if w_max == "max" else int(w_max))
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        worker_log = open(results / f"vm-{tag}-worker.log", "wb")  # noqa: SIM115
        launched = time.monotonic()
        worker = procs.popen(argv, stdout=worker_log, stderr=subprocess.STDOUT)
        # Only now, with every process of the scenario started (they would inherit it),
        # keep the global OOM killer off the harness so that it can report.
        protect_harness()
        grower: threading.Thread | None = None
        done = threading.Event()
        try:
            client.wait_for_workers(1, timeout=START_TIMEOUT)
            out["register_s"] = time.monotonic() - launched
            limits = client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
            out["dask_memory_limit"] = next(iter(limits.values()))
            out["w_memory_max"] = w.read("memory.max")
            out["pids"]["w_at_start"] = w.pids()
            time.sleep(2)  # past the worker's start-up allocations
            with contextlib.suppress(OSError, ValueError):
                out["charge_idle"] = charge_snapshot(w)
            save()
            out["workload_bytes"] = spill_bytes(available, 1.5, CHUNK)
            start = time.monotonic()
            out["workload_start_s"] = round(start - t0, 2)
            # The supervisor's CPU over the workload: the watch is all it does then.
            cpu_start = _cpu_seconds(worker.pid) if contender == "follow" else None
            if neighbour:
                growth = available // 2
                out["growth_bytes"] = growth
                threshold = int(GROW_AT * available)
                out["grow_threshold"] = threshold

                def grow() -> None:
                    deadline = start + GROW_FALLBACK_S
                    out["grow_trigger"] = "fallback time"
                    while time.monotonic() < deadline:
                        if done.is_set():
                            return
                        with contextlib.suppress(OSError, ValueError):
                            if int(w.read("memory.current")) >= threshold:
                                out["grow_trigger"] = "W charge"
                                break
                        time.sleep(0.1)
                    out["grow_at_s"] = round(time.monotonic() - t0, 2)
                    out["grow_wall"] = time.time()
                    with contextlib.suppress(OSError, ValueError):
                        out["grow_w_charge"] = int(w.read("memory.current"))
                    assert agent.stdin is not None and agent.stdout is not None
                    try:
                        agent.stdin.write(f"{growth}\n")
                        agent.stdin.flush()
                        if agent.stdout.readline().strip() == "grown":
                            out["grown_at_s"] = round(time.monotonic() - t0, 2)
                    except (OSError, ValueError) as exc:
                        out["grow_error"] = f"{type(exc).__name__}: {exc}"

                grower = threading.Thread(target=grow, daemon=True)
                grower.start()

            def charge_spilled() -> None:
                with contextlib.suppress(OSError, ValueError):
                    out["charge_spilled"] = charge_snapshot(w)

            try:
                if workload in BURSTS:
                    info: dict[str, Any] = {}
                    try:
                        run_workload(
                            client, workload, available, BURST_WORKLOAD_TIMEOUT, info, False
                        )
                    finally:
                        out["populate_probe_s"] = info.get("populate_probe_s")
                else:
                    persist_and_sum(
                        client, out["workload_bytes"], CHUNK, WORKLOAD_TIMEOUT, charge_spilled
                    )
                out["outcome"] = "completed"
            except TimeoutError:
                bound = BURST_WORKLOAD_TIMEOUT if workload in BURSTS else WORKLOAD_TIMEOUT
                out["outcome"] = f"hung (>{bound:.0f} s)"
            except Exception as exc:
                out["outcome"] = "Dask error"
                out["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            out["wall_s"] = time.monotonic() - start
            done.set()
            if cpu_start is not None:
                cpu_end = _cpu_seconds(worker.pid)
                if cpu_end is not None:
                    out["supervisor_cpu_s"] = cpu_end - cpu_start
                    out["supervisor_cpu_window_s"] = out["wall_s"]
            out["agent_alive"] = agent.poll() is None
            out["scheduler_alive"] = scheduler.poll() is None
            out["nanny_alive"] = worker.poll() is None
            out["global_oom_kills"] = _vmstat("oom_kill") - oom_before
            if workload in BURSTS:
                log_so_far = (results / f"vm-{tag}-worker.log").read_text(errors="replace")
                counted = int(w.events().get("oom_kill", 0)) + len(
                    RESTART_MEMORY_RE.findall(log_so_far)
                )
                # The audit imports distributed and asks every worker: minutes when emulated.
                out["deaths"] = deaths_seen(client, address, counted, audit_timeout=900)
            out["w_events"] = w.events()
            out["agent_events"] = agent_cg.events()
            out["base_events"] = base.events()
            if neighbour:
                with contextlib.suppress(Exception):
                    pickle_by_value()
                    stats = client.run(worker_stats, on_error="return")
                    vals = [v for v in stats.values() if isinstance(v, dict)]
                    out["spilled"] = sum(v["disk_write_bytes"] for v in vals) if vals else None
                    out["dask_memory_limit_end"] = vals[0]["memory_limit"] if vals else None
            with contextlib.suppress(Exception):
                client.close(timeout=10)
        finally:
            stop.set()
            done.set()
            sampler.join(5)
            if grower is not None:
                grower.join(5)
            worker_log.close()
            sched_log.close()
            text = (results / f"vm-{tag}-worker.log").read_text(errors="replace")
            out["memory_restarts"] = len(RESTART_MEMORY_RE.findall(text))
            out["killed_by_signal"] = len(KILLED_RE.findall(text))
            if contender in ("safe", "safe-high", "follow"):
                out["audit"] = _audit_events(text)[:60]
            lines = _oom_kill_lines()
            out["dmesg_oom"] = [line for line in lines if "Killed process" in line][-20:]
            # Who the kernel killed in this run: the cgroup and pid of each victim.
            out["oom_victims"] = [
                {"memcg": m.group(1), "task": m.group(2), "pid": int(m.group(3))}
                for m in map(OOM_KILL_RE.search, lines[dmesg_before:])
                if m
            ]
            save()
    return 0


# ------------------------------------------------------------------------------ host


def _print(msg: str) -> None:
    print(msg, flush=True)


def run_round(
    round_no: int, order: list[str], results: Path, log: Any = _print, workload: str = "spill"
) -> list[dict[str, Any]]:
    """One boot: the contenders in `order`, one after the other, for each workload of the
    comma-separated `workload`; a result per workload and contender."""
    sys.path.insert(0, str(REPO / "tests" / "vm"))
    from vmrun import VMBootError, VMUnavailable, run_in_vm

    results.mkdir(parents=True, exist_ok=True)
    venv_bin = Path(sys.executable).parent
    env = {
        "PATH": f"{venv_bin}:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONUNBUFFERED": "1",
        # Not the guest test suite: its conftest refuses to run outside it, this does not.
        "DSW_VM_RESULTS": str(results),
        # The bursts' tasks are dswbench.workloads functions, pickled by reference: the
        # guest's scheduler and worker must import them (harness.bench_env on v1).
        "PYTHONPATH": str(REPO / "benchmarks"),
    }
    command = (
        f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))} "
        f"--guest {','.join(order)} --round {round_no} --results {shlex.quote(str(results))} "
        f"--workload {workload}"
    )
    workloads = workload.split(",")
    t = time.monotonic()
    try:
        # warm_python: bytecode compiled on the host, else every Python process that
        # imports distributed compiles it again in the emulated CPU (~20 s each).
        bound = sum(RUN_BOUND_S.get(w, 900) for w in workloads) * len(order)
        completed = run_in_vm(
            command, memory=VM_MEMORY, timeout=bound, rwdirs=[results], env=env,
            warm_python=True,
        )  # fmt: skip
    except VMUnavailable as exc:
        return [{"contender": c, "round": round_no, "workload": w, "outcome": "not run",
                 "error": str(exc)[:400]} for w in workloads for c in order]  # fmt: skip
    except VMBootError as exc:
        # The guest may have died under memory pressure: keep what it saved so far.
        completed = subprocess.CompletedProcess([], -1, "", str(exc)[-1500:])
    boot_s = time.monotonic() - t
    docs = []
    runs = [(w, c) for w in workloads for c in order]
    for position, (one, contender) in enumerate(runs):
        doc: dict[str, Any] = {"contender": contender, "round": round_no, "workload": one}
        result_file = results / f"vm-{run_tag(one, contender, round_no)}.json"
        if result_file.exists():
            doc = json.loads(result_file.read_text())
        doc.setdefault("outcome", "VM ended before the run finished")
        doc["position"] = position
        doc["vm_wall_s"] = boot_s
        doc["vm_exit"] = completed.returncode
        if completed.returncode:
            doc["vm_stderr_tail"] = (completed.stdout + completed.stderr)[-1500:]
        log(
            f"vm round {round_no} {contender}: {doc.get('outcome')} wall={doc.get('wall_s')} "
            f"dask_limit={doc.get('dask_memory_limit')} W.max={doc.get('w_memory_max')} "
            f"global_oom={doc.get('global_oom_kills')} agent={doc.get('agent_alive')} "
            f"sched={doc.get('scheduler_alive')} boot+runs={boot_s:.0f}s "
            f"exit={completed.returncode} deaths={doc.get('deaths')}"
        )
        docs.append(doc)
    return docs


def collect(results: Path, workload: str) -> list[dict[str, Any]]:
    """The runs the guest has saved so far, in round order: for a series cut short (its
    current run, still without an outcome, left out)."""
    workloads = workload.split(",")
    docs = []
    for path in results.glob("vm-*.json"):
        doc = json.loads(path.read_text())
        # Plan files have no contender; spill runs of older versions no workload.
        if "contender" in doc and "outcome" in doc and doc.get("workload", "spill") in workloads:
            docs.append(doc)
    return sorted(docs, key=lambda d: (int(d.get("round", 0)), str(d.get("contender"))))


def run_rounds(
    contenders: list[str],
    rounds: int,
    results: Path,
    first: int = 0,
    log: Any = _print,
    workload: str = "spill",
    json_out: Path | None = None,
) -> list[dict[str, Any]]:
    """`rounds` boots; each runs every contender once, the order rotated per round so that
    each contender goes first, second and third as often (interleaved)."""
    docs: list[dict[str, Any]] = []
    for r in range(first, first + rounds):
        k = r % len(contenders)
        docs += run_round(r, contenders[k:] + contenders[:k], results, log, workload)
        if json_out is not None:  # after every round: a cut-short series keeps what finished
            json_out.write_text(json.dumps(docs, default=str))
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guest", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, default=REPO / ".tmp" / "pressure-vm")
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--workload",
        default="spill",
        help=f"one of {', '.join(WORKLOADS)}; several, comma-separated, share each boot",
    )
    parser.add_argument(
        "--contenders", default=None, help="comma-separated; default: all of the workload's"
    )
    parser.add_argument("--rounds", type=int, default=3, help="boots; each runs all contenders")
    parser.add_argument("--first-round", type=int, default=0, help="number of the first round")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--collect",
        action="store_true",
        help="no run: write the runs saved in --results so far to --json",
    )
    ns = parser.parse_args(argv)
    unknown = [w for w in ns.workload.split(",") if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {', '.join(unknown)}: choose from {', '.join(WORKLOADS)}")
    if ns.guest:
        return guest_main(ns.guest.split(","), ns.round, ns.results, ns.workload)
    if ns.collect:
        if ns.json is None:
            parser.error("--collect needs --json")
        ns.json.write_text(json.dumps(collect(ns.results, ns.workload), default=str))
        return 0
    first = ns.workload.split(",")[0]
    contenders = ns.contenders.split(",") if ns.contenders else list(CONTENDERS[first])
    known = {"plain", "safe-high", *(c for cs in CONTENDERS.values() for c in cs)}
    if not set(contenders) <= known:
        parser.error(f"unknown contender: choose from {', '.join(sorted(known))}")
    docs = run_rounds(
        contenders, ns.rounds, ns.results.resolve(), ns.first_round, _print, ns.workload, ns.json
    )
    if ns.json:
        ns.json.write_text(json.dumps(docs, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
