"""Launch → registered for several `dask-safe-worker` builds against plain `dask worker`,
side by side in one run (issues 21 and 25).

Each round starts plain `dask worker` and every contender once, in a rotating order,
each inside a fresh child cgroup of a test cgroup below ours, with one scheduler on
127.0.0.1; "registered" is the scheduler's own `add-worker` timestamp minus the launch.
A contender is `LABEL=EXECUTABLE [ARGS...]` (e.g. the `dask-safe-worker` of another
checkout's venv, to compare before and after a change under the same load); its ratio
to the plain worker of the same round is what counts on a shared, noisy machine.
Bytecode is compiled first for this venv and for each contender's checkout (`--compile`),
as pip installs it. The pool's claims go to a private runtime directory. Each start's
CPU by process (supervisor, main process, Dask's worker process) is sampled when its
registration is seen: CPU, unlike wall time, tells where a contender's extra work goes
even on a loaded machine. `--cpu-to-worker N` gives the CPU each contender's start has
used when its worker starts (JSON lines, worker `true`): the start's cost before the
worker in a figure that load barely moves. `--to-worker-log-format json` makes
`--to-worker`'s starts write their audit lines as a real start does.

    uv run python benchmarks/startup_vs.py --rounds 8 \
        'before=/path/to/other/.venv/bin/dask-safe-worker' \
        'after=.venv/bin/dask-safe-worker' \
        'no-follow=.venv/bin/dask-safe-worker --no-follow' \
        [--compile /path/to/other] [--json FILE]

Prints one JSON document on stdout. Only processes it started are ended, by pid.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# dswbench is found beside this file (a script's directory leads sys.path).
from dswbench.common import PY, compile_bytecode
from dswbench.harness import (
    end_process,
    proc_cmd,
    proc_ppid,
    scheduler,
    tree_pids,
    wait_registered,
)
from dswbench.harness import worker_args as base_worker_args
from dswbench.support import kernel_cgroups_usable, make_test_cgroup


def contender_argv(command: list[str], args: list[str], plan_file: Path) -> list[str]:
    if not command:
        return [PY, "-m", "distributed.cli.dask_worker", *args]
    return [command[0], "--log-format", "json", "--plan-file", str(plan_file), *command[1:], *args]


def role_of(cmd: str) -> str:
    """Which process of a start's tree: the supervisor (its CPU includes our start path
    before its exec, same pid), Dask's worker process and resource tracker (children of
    the nanny), or the main process (the nanny; with --no-follow it includes our start
    path before the exec)."""
    if "dask_safe_worker.supervise" in cmd:
        return "supervisor"
    if "resource_tracker" in cmd:
        return "resource_tracker"
    if "multiprocessing" in cmd:
        return "worker_process"
    return "main"


def proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of `pid` so far (/proc/PID/stat fields 14 and 15)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(cg: Any) -> dict[str, float]:
    """CPU seconds by role of every process in the start's cgroup, now."""
    out: dict[str, float] = {}
    for pid in tree_pids(cg):
        cpu = proc_cpu(pid)
        if cpu is not None:
            role = role_of(proc_cmd(pid))
            out[role] = out.get(role, 0.0) + cpu
    return out


def one_start(
    argv: list[str], cg: Any, client: Any, started: set[int], env: dict[str, str]
) -> tuple[float, dict[str, float]]:
    """Seconds from launch to the scheduler's add-worker, and the CPU each process of the
    start had used by then (sampled right after the registration was seen)."""
    since = time.time()
    proc = subprocess.Popen(
        cg.enter_command(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    started.add(proc.pid)
    cpu: dict[str, float] = {}
    try:
        took = wait_registered(client, since, 120)
        cpu = tree_cpu(cg)
    finally:
        end_process(proc, 20)
        for pid in tree_pids(cg):
            if pid in started or proc_ppid(pid) in started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    if took is None:
        raise RuntimeError(f"{argv[0]} did not register")
    deadline = time.monotonic() + 20
    while client.scheduler_info()["workers"] and time.monotonic() < deadline:
        time.sleep(0.1)
    return took, cpu


def _start_env(tmp: Path) -> dict[str, str]:
    """Our environment without the tool's own settings, and a runtime directory below
    `tmp` (as root the default, /run/dask-safe-worker, would keep every run's plan)."""
    runtime = tmp / "run"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_SAFE_WORKER")}
    env["XDG_RUNTIME_DIR"] = str(runtime)
    return env


def start_path_cpu(contenders: dict[str, list[str]], runs: int) -> dict[str, Any]:
    """CPU seconds (user + system, the whole process tree: our start, and the supervisor
    where one follows) of each contender's start path up to a worker that is `true`,
    without any cgroup write, the contenders alternating run by run. CPU time, unlike wall
    time, barely moves with the other sessions' load on a shared machine."""
    cpu: dict[str, list[float]] = {n: [] for n in contenders}
    with tempfile.TemporaryDirectory(prefix="dsw-startpath-") as tmp:
        env = _start_env(Path(tmp))
        for i in range(runs + 1):
            for name, command in contenders.items():
                argv = [*command[:1], "--cgroup-write", "never", "--worker-command", "true"]
                argv += [*command[1:], "--log-format", "json", "tcp://127.0.0.1:1"]
                argv += ["--plan-file", str(Path(tmp) / f"plan-{name}.json")]
                proc = subprocess.Popen(
                    argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
                )
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                if proc.returncode != 0:
                    raise RuntimeError(f"{name}: the start path exited {proc.returncode}")
                if i:  # the first round warms the page cache
                    cpu[name].append(usage.ru_utime + usage.ru_stime)
    return {
        "start_path_cpu_ms": {n: [round(1000 * x, 1) for x in xs] for n, xs in cpu.items()},
        "start_path_cpu_ms_median": {
            n: round(1000 * statistics.median(xs), 1) for n, xs in cpu.items()
        },
    }


def to_worker(
    contenders: dict[str, list[str]], runs: int, log_format: str = "none"
) -> dict[str, Any]:
    """Wall milliseconds from each contender's launch to the start of its worker (a `sh`
    that prints the clock): what the start puts before the worker, on the way to its
    registration. Without a cgroup write, the contenders alternating run by run, one
    warm-up round. Wall time, so noisy on a shared machine; read it pair by pair.
    `log_format` json: with the audit lines a real start writes (their writer's import
    included, where it comes before the worker)."""
    took: dict[str, list[float]] = {n: [] for n in contenders}
    with tempfile.TemporaryDirectory(prefix="dsw-toworker-") as tmp:
        env = _start_env(Path(tmp))
        # The clock first thing in the worker; the arguments the start adds are ignored.
        clock = f"sh -c 'exec {sys.executable} -S -c \"import time; print(time.time())\"' sh"
        for i in range(runs + 1):
            for name, command in contenders.items():
                argv = [*command[:1], "--cgroup-write", "never", "--worker-command", clock]
                argv += [*command[1:], "--log-format", log_format, "tcp://127.0.0.1:1"]
                argv += ["--plan-file", str(Path(tmp) / f"plan-{name}.json")]
                since = time.time()
                out = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
                if out.returncode != 0:
                    raise RuntimeError(f"{name}: exited {out.returncode}: {out.stderr}")
                if i:
                    took[name].append(1000 * (float(out.stdout.split()[-1]) - since))
    return {
        "to_worker_log_format": log_format,
        "to_worker_ms": {n: [round(x, 1) for x in xs] for n, xs in took.items()},
        "to_worker_ms_median": {n: round(statistics.median(xs), 1) for n, xs in took.items()},
    }


def cpu_medians(samples: list[dict[str, float]]) -> dict[str, float]:
    """Per role, and for the whole tree ("total"), the median CPU seconds at registration."""
    totals = [{**s, "total": sum(s.values())} for s in samples]
    roles = sorted({r for s in totals for r in s})
    return {r: round(statistics.median(s.get(r, 0.0) for s in totals), 3) for r in roles}


def measure(contenders: dict[str, list[str]], rounds: int) -> dict[str, Any]:
    from distributed import Client

    names = ["plain", *contenders]
    times: dict[str, list[float]] = {n: [] for n in names}
    cpus: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    loads = [os.getloadavg()[0]]
    started: set[int] = set()
    with tempfile.TemporaryDirectory(prefix="dsw-startup-vs-") as tmp:
        work = Path(tmp)
        env = _start_env(work)
        with (
            make_test_cgroup(started, prefix="dsw-bench-startup-vs") as parent,
            scheduler(work / "scheduler.log", started) as (address, _sched),
        ):
            client = Client(address, timeout=60)
            try:
                for r in range(rounds):
                    order = names[r % len(names) :] + names[: r % len(names)]
                    for name in order:
                        cg = parent.child(f"{name}-{r}")
                        args = base_worker_args(address, str(work / "local"))
                        argv = contender_argv(
                            contenders.get(name, []), args, work / f"plan-{name}-{r}.json"
                        )
                        took, cpu = one_start(argv, cg, client, started, env)
                        times[name].append(took)
                        cpus[name].append(cpu)
                    loads.append(os.getloadavg()[0])
                    line = " ".join(f"{n} {times[n][-1]:.3f}s" for n in names)
                    print(f"[{time.strftime('%H:%M:%S')}] round {r}: {line}", file=sys.stderr)
            finally:
                client.close()
    ratios = {n: [s / p for s, p in zip(times[n], times["plain"], strict=True)] for n in contenders}
    return {
        "rounds": rounds,
        "registered_s": {n: [round(t, 3) for t in ts] for n, ts in times.items()},
        "median_s": {n: round(statistics.median(ts), 3) for n, ts in times.items()},
        "ratio_to_plain": {n: [round(x, 3) for x in xs] for n, xs in ratios.items()},
        "ratio_median": {n: round(statistics.median(xs), 3) for n, xs in ratios.items()},
        "ratio_range": {n: [round(min(xs), 3), round(max(xs), 3)] for n, xs in ratios.items()},
        "cpu_at_registered_s_median": {n: cpu_medians(cpus[n]) for n in names},
        "contenders": {n: " ".join(c) for n, c in contenders.items()},
        "loadavg_1min_per_round": [round(x, 2) for x in loads],
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# Prints the CPU (user + system) this process has used when it first forks (following:
# the worker's start) or execs (--no-follow: the worker's exec), then starts as usual.
_CPU_AT_WORKER = """
import os, sys, time
def at_worker(event, args):
    if event in ("os.fork", "os.exec") and not hasattr(at_worker, "seen"):
        at_worker.seen = True
        os.write(1, f"{time.process_time():.6f}\\n".encode())
sys.addaudithook(at_worker)
from dask_safe_worker.cli import main
main(sys.argv[1:])
"""


def cpu_to_worker(contenders: dict[str, list[str]], runs: int) -> dict[str, Any]:
    """CPU milliseconds (user + system) of each contender's start when its worker starts,
    JSON lines written, worker `true`, no cgroup write: what the start spends before the
    worker, in CPU, which a loaded machine barely moves (wall time it moves a lot). Run
    with the Python beside the contender's executable (its venv); the contenders
    alternate run by run, after one warm-up round."""
    cpu: dict[str, list[float]] = {n: [] for n in contenders}
    with tempfile.TemporaryDirectory(prefix="dsw-cpu-to-worker-") as tmp:
        env = _start_env(Path(tmp))
        for i in range(runs + 1):
            for name, command in contenders.items():
                python = str(Path(command[0]).parent / "python")
                argv = [python, "-c", _CPU_AT_WORKER, "--cgroup-write", "never"]
                argv += ["--worker-command", "true", *command[1:], "--log-format", "json"]
                argv += ["--plan-file", str(Path(tmp) / f"plan-{name}.json")]
                argv += ["tcp://127.0.0.1:1"]
                out = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
                if out.returncode != 0 or not out.stdout.strip():
                    raise RuntimeError(f"{name}: exited {out.returncode}: {out.stderr}")
                if i:
                    cpu[name].append(1000 * float(out.stdout.split()[0]))
    return {
        "cpu_to_worker_ms": {n: [round(x, 1) for x in xs] for n, xs in cpu.items()},
        "cpu_to_worker_ms_median": {n: round(statistics.median(xs), 1) for n, xs in cpu.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("contender", nargs="+", help="LABEL=EXECUTABLE [ARGS...]")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--compile", action="append", default=[], metavar="CHECKOUT")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--start-path", type=int, default=0, metavar="RUNS",
        help="also the CPU of each contender's start path, RUNS runs each",
    )  # fmt: skip
    parser.add_argument(
        "--to-worker", type=int, default=0, metavar="RUNS",
        help="also the wall time from each contender's launch to its worker's start",
    )  # fmt: skip
    parser.add_argument(
        "--cpu-to-worker", type=int, default=0, metavar="RUNS",
        help="also the CPU each contender's start has used when its worker starts",
    )  # fmt: skip
    parser.add_argument(
        "--to-worker-log-format", choices=("none", "json"), default="none",
        help="the contenders' --log-format in --to-worker's runs (default none)",
    )  # fmt: skip
    ns = parser.parse_args()
    reason = kernel_cgroups_usable()
    if reason:
        print(f"startup_vs.py: cannot create test cgroups: {reason}", file=sys.stderr)
        return 2
    contenders: dict[str, list[str]] = {}
    for spec in ns.contender:
        label, eq, command = spec.partition("=")
        if not eq or not command or label == "plain":
            parser.error(f"a contender is LABEL=EXECUTABLE [ARGS...], not {spec!r}")
        contenders[label] = shlex.split(command)
    compile_bytecode()
    for checkout in ns.compile:
        # The other checkout's own sources and venv, as pip would have compiled them.
        venvs = Path(checkout).glob(".venv/lib/python*/site-packages")
        for tree in (Path(checkout) / "src", *venvs):
            compileall.compile_dir(str(tree), quiet=1, workers=0)
    doc: dict[str, Any] = {"benchmark": "startup_vs", "loadavg_before": os.getloadavg()}
    if ns.start_path:
        doc.update(start_path_cpu(contenders, ns.start_path))
    if ns.cpu_to_worker:
        doc.update(cpu_to_worker(contenders, ns.cpu_to_worker))
    if ns.to_worker:
        doc.update(to_worker(contenders, ns.to_worker, ns.to_worker_log_format))
    if ns.rounds:
        doc.update(measure(contenders, ns.rounds))
    doc["command"] = shlex.join(["uv", "run", "python", "benchmarks/startup_vs.py", *sys.argv[1:]])
    text = json.dumps(doc, indent=1)
    if ns.json:
        ns.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
