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

`--vm`: the same experiment on cgroup v2, in one boot of the virtme-ng VM of
tests/vm/vmrun.py (the guest runs this script with `--guest`; results come back through
`--work`, shared read-write). M (VM_M_LIMIT) is a child of the guest's root, the agent in
M/agent. v2 has no usage thresholds: the wake-ups are PSI triggers on memory.pressure and
memory.events, so a growth that neither stalls nor moves memory.events waits for the tick.
Per step the deltas of M's and W's memory.events and PSI `some` total are recorded, and
where the time went: until the supervisor saw the change (the record's `changed_at`), and
from there to the acknowledgements.

    uv run python benchmarks/follow_reaction.py --vm --rounds 1 --steps 22 \
        --variants events,tick --idle 0 [--vm-timeout 1500] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from dswbench.common import PY, REPO, SAFE, GiB
from dswbench.harness import bench_env, end_process, scheduler
from dswbench.main import log as say
from dswbench.support import kernel_cgroups_usable, make_test_cgroup

from dask_safe_worker.follow.live_limit import parse_live_limit, read_acks
from scheduler_util import audit_events

MiB = 2**20
M_LIMIT = 2 * GiB
STEP = 192 * MiB
VARIANTS = ("tick", "events")
# In the VM (`--vm`): 1.5 GiB of RAM, M smaller than what the guest has free once the
# scheduler and the worker run, so that M is the level that limits the worker.
VM_MEMORY = "1536M"
VM_M_LIMIT = 1 * GiB
# A worker's start in the software-emulated guest takes from 20 s to minutes.
GUEST_START_S = 900.0

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


def first_holds(
    channel: str, above: int, limit: int, first: dict[Any, float], poll: float, timeout: float = 30
) -> None:
    """Fill `first` with when each server (worker, nanny) first held the first generation
    past `above` that lowers the limit below `limit` (its acknowledgement's time), until
    both have; `first["changed_at"]`: when the supervisor saw that change. A raise still
    on its way from the step before (its confirmation waits a tick) is not the reaction.
    The time is the ack's own, so `poll` bounds only how soon a later generation could
    hide the first."""
    deadline = time.monotonic() + timeout
    target: int | None = None
    while time.monotonic() < deadline and len(first) < 3:
        if target is None:
            with contextlib.suppress(OSError, ValueError):
                record = parse_live_limit(Path(channel).read_text())
                if record.generation > above and record.per_worker < limit:
                    target = record.generation
                    first["changed_at"] = record.changed_at
        if target is not None:
            for key, ack in read_acks(channel).items():
                if ack.generation >= target and key not in first:
                    first[key] = ack.at
        time.sleep(poll)


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


def settled_back(channel: str, top: int | None, timeout: float) -> tuple[int, int] | None:
    """`settled`, and the limit back within a band of `top` (the first step's): in the
    emulated guest a raise back can come more than 1.5 s after the free."""
    deadline = time.monotonic() + timeout
    while (now := settled(channel, max(1.0, deadline - time.monotonic()))) is not None:
        if top is None or now[1] >= top - max(32 * MiB, top // 50):
            return now
        if time.monotonic() >= deadline:
            return None
    return None


def command(agent: subprocess.Popen[str], line: str) -> str:
    assert agent.stdin is not None and agent.stdout is not None
    agent.stdin.write(line + "\n")
    agent.stdin.flush()
    return agent.stdout.readline().strip()


def follow_steps(
    res: dict[str, Any],
    worker: subprocess.Popen[Any],
    log_path: Path,
    agent: subprocess.Popen[str],
    steps: int,
    idle: float,
    start_timeout: float,
    counters: Callable[[], dict[str, int]] | None = None,
    poll: float = 0.002,
) -> None:
    """The experiment once the agent, the scheduler and the worker run (v1 and v2 alike):
    the idle CPU, then `steps` growths, each measured from the band's crossing to the
    acknowledgements. Per step also when the supervisor saw the change (the record's
    `changed_at`) and how much each of `counters` (kernel counters) moved meanwhile."""
    channel = channel_of(log_path, start_timeout)
    if wait_generation(channel, -1, start_timeout) is None:
        raise TimeoutError("the worker and nanny never acknowledged")
    time.sleep(2.0)
    if idle > 0:
        c0, t0 = cpu_s(worker.pid), time.monotonic()
        time.sleep(idle)
        res["idle_cpu_pct"] = 100 * (cpu_s(worker.pid) - c0) / (time.monotonic() - t0)
    top: int | None = None
    for _ in range(steps):
        now = settled_back(channel, top, 60)
        if now is None:
            res["missed"] += 1
            continue
        gen, limit = now
        top = limit if top is None else top
        band = max(32 * MiB, limit // 50)
        before = counters() if counters else {}
        # Watched from before the growth: the first lower generation past `gen` each
        # server took, not a later one of the same step.
        first: dict[Any, float] = {}
        watcher = threading.Thread(target=first_holds, args=(channel, gen, limit, first, poll))
        watcher.start()
        reply = command(agent, f"+{STEP} {band}")
        crossed = float(reply.split()[1])
        watcher.join(30)
        after = counters() if counters else {}
        step: dict[str, Any] = {"crossed": crossed, "band": band, "limit": limit}
        step["moved"] = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k)}
        seen = first.pop("changed_at", None)
        if len(first) < 2 or seen is None:
            res["missed"] += 1
        else:
            res["reaction_s"].append(max(first.values()) - crossed)
            # crossed -> the tick or wake-up that saw it -> the last acknowledgement.
            step["seen_s"] = seen - crossed
            step["acked_s"] = max(first.values()) - seen
        res["steps"].append(step)
        command(agent, "-")
    # A wake-up source the kernel refused leaves that variant on the tick: say so.
    res["wake_unavailable"] = [
        {k: e.get(k) for k in ("source", "cgroup", "reason")}
        for e in audit_events(log_path.read_text(errors="replace"))
        if e.get("event") == "follow.wake.unavailable"
    ]


def run_variant(variant: str, steps: int, idle: float, work: Path) -> dict[str, Any]:
    res = new_result(variant)
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
                log_path = work / "worker.log"
                with open(log_path, "wb") as log:
                    worker = subprocess.Popen(
                        w.enter_command(worker_argv(address, work)),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=variant_env(variant),
                    )
                started.add(worker.pid)
                try:
                    follow_steps(res, worker, log_path, agent, steps, idle, 120)
                finally:
                    end_process(worker, 20)
        finally:
            end_process(agent, 5)
    say(summary_line(res))
    return res


def _epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def audit_breakdown(events: list[dict[str, Any]], crossed: list[float]) -> list[dict[str, float]]:
    """Per step, from the supervisor's audit lines alone: the first lowering it saw after
    the band was crossed (`follow.changed`: the tick or wake-up), and its `follow.applied`
    `latency_s` (from that tick to the last worker or nanny holding it)."""
    changed = [(_epoch(e["timestamp"]), e) for e in events if e.get("event") == "follow.changed"]
    applied = [(_epoch(e["timestamp"]), e) for e in events if e.get("event") == "follow.applied"]
    out = []
    for t in crossed:
        seen = next((at for at, e in changed if at > t and e.get("action") == "lower"), None)
        if seen is None:
            continue
        done = next((e for at, e in applied if at > seen and e.get("action") == "lower"), None)
        if done is not None:
            out.append({"seen_s": seen - t, "latency_s": float(done["latency_s"])})
    return out


def new_result(variant: str) -> dict[str, Any]:
    return {"variant": variant, "reaction_s": [], "missed": 0, "steps": []}


def variant_env(variant: str) -> dict[str, str]:
    # bench_env: a runtime directory of the benchmark's own (as root the tool's default,
    # /run/dask-safe-worker, kept every run's plan file and limit record).
    return {**bench_env(), "DASK_SAFE_WORKER_FOLLOW_WAKE": "0" if variant == "tick" else "1"}


def worker_argv(address: str, work: Path) -> list[str]:
    return [SAFE, "--log-format", "json", address, "--nworkers", "1", "--nthreads", "2",
            "--host", "127.0.0.1", "--no-dashboard",
            "--local-directory", str(work / "local")]  # fmt: skip


def summary_line(res: dict[str, Any]) -> str:
    r = res["reaction_s"]
    if not r:
        return f"{res['variant']}: no reaction measured; missed {res['missed']}"
    idle = res.get("idle_cpu_pct")
    return (
        f"{res['variant']:6}: {len(r)} steps, reaction median {median_ms(r)} ms, "
        f"p95 {p95(r) * 1000:.0f} ms, max {max(r) * 1000:.0f} ms; missed {res['missed']}"
        + (f"; idle CPU {idle:.3f} %" if idle is not None else "")
    )


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def median_ms(values: list[float]) -> int | None:
    return round(statistics.median(values) * 1000) if values else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant over all its runs: the reaction's median, p95 and max, and where the
    time went (until the change was seen, from there to the acknowledgements)."""
    summary: dict[str, Any] = {}
    for v in VARIANTS:
        mine = [r for r in runs if r["variant"] == v]
        if not mine:
            continue
        lat = [x for r in mine for x in r["reaction_s"]]
        steps = [s for r in mine for s in r.get("steps", [])]
        audit = [s for r in mine for s in r.get("audit_steps", [])]
        both = [s["seen_s"] + s["latency_s"] for s in audit]
        summary[v] = {
            "steps": len(lat),
            "missed": sum(r["missed"] for r in mine),
            "reaction_ms_median": median_ms(lat),
            "reaction_ms_p95": round(p95(lat) * 1000) if lat else None,
            "reaction_ms_max": round(max(lat) * 1000) if lat else None,
            "seen_ms_median": median_ms([s["seen_s"] for s in steps if "seen_s" in s]),
            "acked_ms_median": median_ms([s["acked_s"] for s in steps if "acked_s" in s]),
            "audit_seen_ms_median": median_ms([s["seen_s"] for s in audit]),
            "audit_latency_ms_median": median_ms([s["latency_s"] for s in audit]),
            "audit_reaction_ms_p95": round(p95(both) * 1000) if both else None,
            "idle_cpu_pct": [round(r["idle_cpu_pct"], 3) for r in mine if "idle_cpu_pct" in r],
        }
    return summary


# ------------------------------------------------------------------ cgroup v2, in the VM


def psi_some_total(text: str) -> int:
    """The `some` line's `total=` (microseconds stalled) of a memory.pressure file."""
    for line in text.splitlines():
        kind, _, fields = line.partition(" ")
        if kind == "some":
            for field in fields.split():
                key, _, value = field.partition("=")
                if key == "total":
                    return int(value)
    raise ValueError(f"no some total in {text!r}")


def guest_variant(variant: str, steps: int, idle: float, work: Path) -> dict[str, Any]:
    """The experiment in the VM: M a cgroup2 child of the guest's root with memory.max
    VM_M_LIMIT, the agent in M/agent (v2 has no processes in inner cgroups), W in M/w."""
    for path in ("tests", "tests/vm/guest"):
        sys.path.insert(0, str(REPO / path))
    from guest_cgroups import (
        CGROUP2,
        PYTHON,
        Cgroup,
        Processes,
        enter,
        make_cgroup_tree,
        start_scheduler,
    )

    root = Cgroup(CGROUP2)
    if "memory" not in root.read("cgroup.subtree_control").split():
        root.enable_memory()
    res = new_result(variant)
    work.mkdir(parents=True)
    procs = Processes()
    with make_cgroup_tree(procs, "reaction") as m:
        m.write("memory.max", VM_M_LIMIT)
        agent_cg, w = m.child("agent"), m.child("w")
        agent = procs.popen(
            enter(agent_cg, [PYTHON, "-c", AGENT]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        _, address = start_scheduler(procs, work / "scheduler.log")
        log_path = work / "worker.log"
        with open(log_path, "wb") as log:
            worker = procs.popen(
                enter(w, worker_argv(address, work)),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=variant_env(variant),
            )

        def counters() -> dict[str, int]:
            # What v2 wakes on (docs/follow.md): memory.events and the stall in PSI.
            out: dict[str, int] = {}
            for name, cg in (("M", m), ("W", w)):
                out.update({f"{name}.{k}": v for k, v in cg.events().items()})
                out[f"{name}.psi_some_us"] = psi_some_total(cg.read("memory.pressure"))
            return out

        try:
            # Polled every 20 ms, not 2: in the emulated guest the poll's own CPU would
            # compete with the supervisor and the worker being measured.
            follow_steps(
                res, worker, log_path, agent, steps, idle, GUEST_START_S, counters, poll=0.02
            )
        finally:
            end_process(worker, 20)
    say(summary_line(res))
    return res


def guest_main(order: list[str], steps: int, idle: float, results: Path) -> int:
    """In the VM: the variants in `order`, each with a fresh M, W and worker; each run's
    result saved as soon as it ends (a VM cut short keeps the finished ones)."""
    for i, variant in enumerate(order):
        out = results / f"run-{i}-{variant}.json"
        try:
            res = guest_variant(variant, steps, idle, results / f"{i}-{variant}")
        except Exception as exc:  # one variant's failure must not cost the others
            res = {**new_result(variant), "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            say(f"{variant}: {res['error']}")
        out.write_text(json.dumps(res))
    return 0


def run_vm(order: list[str], steps: int, idle: float, results: Path, timeout: float) -> Any:
    """One boot of the cgroup v2 VM (tests/vm/vmrun.py) running `--guest` with `order`."""
    sys.path.insert(0, str(REPO / "tests" / "vm"))
    from vmrun import VMBootError, VMUnavailable, run_in_vm

    results.mkdir(parents=True)
    env = {"PATH": f"{Path(PY).parent}:/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONUNBUFFERED": "1"}
    argv = [PY, str(Path(__file__).resolve()), "--guest", ",".join(order), "--steps", str(steps)]
    command = shlex.join([*argv, "--idle", str(idle), "--work", str(results)])
    try:
        # warm_python: bytecode compiled on the host (else ~20 s per process in TCG).
        done = run_in_vm(command, memory=VM_MEMORY, timeout=timeout, rwdirs=[results],
                         env=env, warm_python=True)  # fmt: skip
        say(f"VM exit {done.returncode}; guest output tail:\n{(done.stdout + done.stderr)[-3000:]}")
    except VMUnavailable as exc:
        sys.exit(f"cannot run: {exc}")
    except VMBootError as exc:  # cut short: what the guest saved so far still counts
        say(f"VM: {str(exc)[-2000:]}")
    return collect(results)


def collect(results: Path) -> list[dict[str, Any]]:
    """The guest's runs in `results`, each with its steps' times from the audit lines."""
    runs = []
    for path in sorted(results.glob("run-*.json")):
        res = json.loads(path.read_text())
        log = path.with_name(path.stem.removeprefix("run-")) / "worker.log"
        if log.exists():
            crossed = [s["crossed"] for s in res.get("steps", [])]
            events = audit_events(log.read_text(errors="replace"))
            res["audit_steps"] = audit_breakdown(events, crossed)
        runs.append(res)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="growth steps per round")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--vm", action="store_true", help="cgroup v2, in one boot of the VM")
    parser.add_argument("--vm-timeout", type=float, default=2400.0, help="bound of the boot, s")
    parser.add_argument("--collect", type=Path, default=None, help="no run: a --vm run's results")
    parser.add_argument("--guest", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    variants = opts.variants.split(",")
    if not variants or not set(variants) <= set(VARIANTS):
        parser.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if opts.guest:
        sys.exit(guest_main(opts.guest.split(","), opts.steps, opts.idle, opts.work))
    # Interleaved: the order turns round every round.
    order = [v for r in range(opts.rounds) for v in (variants if r % 2 == 0 else variants[::-1])]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    load_before = os.getloadavg()
    if opts.collect:
        runs, kernel, m_limit = collect(opts.collect), "cgroup v2 (VM, TCG)", VM_M_LIMIT
    elif opts.vm:
        work = (opts.work or REPO / ".tmp" / "follow-reaction-vm") / stamp
        runs = run_vm(order, opts.steps, opts.idle, work.resolve(), opts.vm_timeout)
        kernel, m_limit = "cgroup v2 (VM, TCG)", VM_M_LIMIT
    else:
        reason = kernel_cgroups_usable()
        if reason:
            sys.exit(f"cannot run: {reason}")
        work = (opts.work or Path("/var/tmp/dsw-reaction-bench")) / stamp
        runs = [
            run_variant(v, opts.steps, opts.idle, work / f"{v}-{i}") for i, v in enumerate(order)
        ]
        kernel, m_limit = "cgroup v1", M_LIMIT
    doc = {"benchmark": "follow_reaction", "kernel": kernel, "step": STEP, "m_limit": m_limit,
           "host_load": {"before": load_before, "after": os.getloadavg()},
           "summary": summarise(runs)}  # fmt: skip
    if opts.json:
        opts.json.write_text(json.dumps({**doc, "runs": runs}))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
