# ruff: noqa: RUF001, RUF002
"""Workload "siblings" (issue 25): three instances share one 3 GiB cgroup with an agent.

The "VM with agents" scenario (cgroup v1, this host) with three workers instead of one:

- M: a cgroup below our own, 3 GiB, no swap, holding the 600 MiB agent;
- plain: three `python -m distributed.cli.dask_worker`, each started in its own child of
  M without a limit (so that v1 counts a kill of a worker in its child, apart from the
  agent's in M), each sized by Dask's "auto" (the host's RAM);
- safe: three `dask-safe-worker` (following, the default), each started in M itself; each
  creates its own child of M, and the three share M's pool live (docs/follow.md, "Several
  instances, one pool"). The pool's claims go to a private runtime directory of the run.

The instances start STAGGER_S apart, register with one scheduler on 127.0.0.1 outside M,
and run one spill workload of 1.5 × M's headroom together. Every 100 ms a sampler reads M
and every child of M: usage, working set, kernel limit, `oom_kill`. The audit lines of
the safe instances (`follow.*`, `pool.*`) are kept with their times.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .common import AGENT_BYTES, M_LIMIT, PY, GiB, fmt_bytes, fmt_med_range
from .harness import (
    RESTART_MEMORY_RE,
    call_with_timeout,
    contender_argv,
    end_process,
    scheduler,
    tree_pids,
    worker_args,
)
from .support import KernelCgroup, make_test_cgroup
from .workloads import AGENT_CODE, run_workload, worker_stats

INSTANCES = 3
STAGGER_S = 3.0
TIMEOUT = 240.0
CONTENDERS = ("plain", "safe")
UNLIMITED = 2**62
Doc = dict[str, Any]


class ChildSampler(threading.Thread):
    """Every 100 ms: M's usage and working set, and per child of M its usage, kernel
    limit and oom_kill; every pid seen in M goes to `seen` (ours to end, see Sampler)."""

    def __init__(self, m: KernelCgroup, seen: set[int], t0: float) -> None:
        super().__init__(daemon=True)
        self.m, self.seen, self.t0 = m, seen, t0
        self.t: list[float] = []
        self.m_usage: list[int] = []
        self.m_ws: list[int] = []
        # child name -> {"t", "usage", "limit"} samples, and its largest oom_kill seen.
        self.children: dict[str, dict[str, list[Any]]] = {}
        self.child_kills: dict[str, int] = {}
        self.child_pids: dict[str, set[int]] = {}
        self.m_kills = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            now = time.monotonic() - self.t0
            with contextlib.suppress(OSError, ValueError):
                usage = self.m.usage()
                self.t.append(now)
                self.m_usage.append(usage)
                self.m_ws.append(max(0, usage - self.m.stat("total_inactive_file")))
                self.m_kills = max(self.m_kills, self.m.oom_kills())
                for child in sorted(p for p in self.m.path.iterdir() if p.is_dir()):
                    self._child(KernelCgroup(child), now)
                self.seen.update(tree_pids(self.m))
            self.stop_event.wait(0.1)

    def _child(self, cg: KernelCgroup, now: float) -> None:
        with contextlib.suppress(OSError, ValueError):
            limit, usage = cg.limit(), cg.usage()
            kills = cg.oom_kills()
            pids = set(cg.pids())
            name = cg.path.name
            s = self.children.setdefault(name, {"t": [], "usage": [], "limit": []})
            s["t"].append(now)
            s["usage"].append(usage)
            s["limit"].append(limit if limit < UNLIMITED else None)
            self.child_kills[name] = max(self.child_kills.get(name, 0), kills)
            self.child_pids.setdefault(name, set()).update(pids)


def _events(text: str, wall0: float) -> list[Doc]:
    """The safe instance's follow.* and pool.* audit lines, with `t` on the run's clock."""
    out = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        name = str(event.get("event", ""))
        if not name.startswith(("follow.", "pool.", "cgroup.", "plan", "limit")):
            continue
        stamp = event.get("timestamp")
        if isinstance(stamp, str):
            with contextlib.suppress(ValueError):
                iso = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
                event["t"] = round(iso - wall0, 3)
        out.append(event)
    return out


def run_once(contender: str, repeat: int, work: Path, log: Callable[[str], None]) -> Doc:
    from distributed import Client

    res: Doc = {"contender": contender, "repeat": repeat, "outcome": "?"}
    run_dir = work / f"{contender}-{repeat}"
    run_dir.mkdir(parents=True)
    runtime = run_dir / "run"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_SAFE_WORKER")}
    bench = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = f"{bench}:{env['PYTHONPATH']}" if env.get("PYTHONPATH") else bench
    env["XDG_RUNTIME_DIR"] = str(runtime)
    started: set[int] = set()
    with make_test_cgroup(started, prefix="dsw-bench-sib") as m:
        m.set_limit(M_LIMIT)
        agent = subprocess.Popen(
            m.enter_command([PY, "-c", AGENT_CODE, str(AGENT_BYTES)]),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        started.add(agent.pid)
        procs: list[subprocess.Popen[bytes]] = []
        logs: list[Any] = []
        try:
            assert agent.stdout is not None
            if agent.stdout.readline().strip() != b"ready":
                raise RuntimeError("agent did not start")
            headroom = M_LIMIT - m.working_set()
            res["headroom"] = headroom
            with scheduler(run_dir / "scheduler.log", started) as (address, sched):
                client = Client(address, timeout=60)
                t0 = time.monotonic()
                wall0 = time.time()
                sampler = ChildSampler(m, started, t0)
                sampler.start()
                try:
                    for i in range(INSTANCES):
                        args = worker_args(address, str(run_dir / f"local-{i}"))
                        argv = contender_argv(contender, args, run_dir / f"plan-{i}.json")
                        into = m if contender == "safe" else m.child(f"plain-{i}")
                        logs.append(open(run_dir / f"worker-{i}.log", "wb"))  # noqa: SIM115
                        proc = subprocess.Popen(
                            into.enter_command(argv),
                            stdout=logs[-1], stderr=subprocess.STDOUT, env=env,
                        )  # fmt: skip
                        started.add(proc.pid)
                        procs.append(proc)
                        res.setdefault("launched_at_s", []).append(time.monotonic() - t0)
                        if i < INSTANCES - 1:
                            time.sleep(STAGGER_S)
                    client.wait_for_workers(INSTANCES, timeout=240)
                    res["registered_s"] = time.monotonic() - t0
                    limits = client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
                    res["dask_limits_start"] = sorted(limits.values())
                    time.sleep(1.0)
                    t_start = time.monotonic()
                    res["workload_at_s"] = t_start - t0
                    try:
                        run_workload(client, "spill", headroom, TIMEOUT)
                        res["outcome"] = "completed"
                    except TimeoutError:
                        res["outcome"] = f"hung (>{TIMEOUT:.0f} s)"
                    except Exception as exc:
                        res["outcome"] = "Dask error"
                        res["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    res["wall_s"] = time.monotonic() - t_start
                    stats = call_with_timeout(
                        lambda: client.run(worker_stats, on_error="return"), 20
                    )
                    if isinstance(stats, dict):
                        vals = [v for v in stats.values() if isinstance(v, dict)]
                        res["spilled"] = [v["disk_write_bytes"] for v in vals]
                        res["dask_limits_end"] = sorted(v["memory_limit"] for v in vals)
                    time.sleep(0.5)
                    res["agent_alive"] = agent.poll() is None
                    res["scheduler_alive"] = sched.poll() is None
                    res["instances_alive"] = sum(p.poll() is None for p in procs)
                finally:
                    with contextlib.suppress(Exception):
                        call_with_timeout(lambda: client.close(timeout=5), 10)
                    # Counters first: an instance that ends removes its child cgroup.
                    time.sleep(0.3)
                    for proc in procs:
                        end_process(proc, 20)
                    for f in logs:
                        f.close()
                    sampler.stop_event.set()
                    sampler.join(5)
                    for pid in tree_pids(m):
                        if pid in started:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, 9)
            res["exit_codes"] = [p.returncode for p in procs]
            res["oom_kills_m"] = max(sampler.m_kills, m.oom_kills())
            res["oom_kills_children"] = dict(sampler.child_kills)
            for child in m.path.iterdir():
                if child.is_dir():
                    kills = KernelCgroup(child).oom_kills()
                    res["oom_kills_children"][child.name] = max(
                        kills, res["oom_kills_children"].get(child.name, 0)
                    )
            res["oom_kills_total"] = res["oom_kills_m"] + sum(res["oom_kills_children"].values())
            res["series"] = {"t": sampler.t, "m_usage": sampler.m_usage, "m_ws": sampler.m_ws}
            res["children"] = sampler.children
            texts = [(run_dir / f"worker-{i}.log").read_text(errors="replace")
                     for i in range(len(procs))]  # fmt: skip
            res["nanny_restarts"] = [len(RESTART_MEMORY_RE.findall(t)) for t in texts]
            # Which child holds which instance: the child where its pid (the supervisor)
            # or a descendant was seen.
            res["child_of"] = {}
            for i, proc in enumerate(procs):
                for name, pids in sampler.child_pids.items():
                    if proc.pid in pids:
                        res["child_of"][str(i)] = name
            if contender == "safe":
                res["events"] = [_events(t, wall0) for t in texts]
            res["log_tails"] = [t[-1500:] for t in texts if res["outcome"] != "completed"]
        finally:
            for proc in procs:
                end_process(proc, 5)
            end_process(agent, 5)
    shutil.rmtree(run_dir / "run", ignore_errors=True)
    log(
        f"siblings {contender:5} #{repeat}: {res['outcome']:18} wall={res.get('wall_s', 0):6.1f}s "
        f"oom M={res.get('oom_kills_m')} children={res.get('oom_kills_children')} "
        f"agent={res.get('agent_alive')} "
        f"limits={[fmt_bytes(v) for v in res.get('dask_limits_start', [])]}"
        f"->{[fmt_bytes(v) for v in res.get('dask_limits_end', [])]} "
        f"spilled={[fmt_bytes(v) for v in res.get('spilled', [])]} {res.get('error', '')}"
    )
    return res


def compact(run: Doc, step: int = 5) -> Doc:
    """Every `step`-th sample (0.5 s of 0.1 s ones), but every change of a kernel limit;
    the sums of the shares computed first, from every sample."""
    out = dict(run)
    out["max_limit_sum"] = max_limit_sum(run)
    out["over_pool_s"] = over_pool_s(run)
    s = run.get("series", {})
    out["series"] = {k: list(v)[::step] for k, v in s.items()}
    kids = {}
    for name, c in run.get("children", {}).items():
        keep = [
            i
            for i in range(len(c["t"]))
            if i % step == 0 or i == len(c["t"]) - 1 or c["limit"][i] != c["limit"][i - 1]
        ]
        kids[name] = {k: [v[i] for i in keep] for k, v in c.items()}
    out["children"] = kids
    # The audit lines without the plan's inputs (each level's figures): what moved, when.
    out["events"] = [
        [{k: v for k, v in e.items() if k not in ("plan", "levels")} for e in evs]
        for evs in run.get("events", [])
    ]
    return out


# ------------------------------------------------------------------------- report


def _med_bytes(values: Sequence[int]) -> str:
    """Median (range) of byte counts, without a range whose ends print the same."""
    if fmt_bytes(min(values)) == fmt_bytes(max(values)):
        return fmt_bytes(min(values))
    return fmt_med_range(values, fmt_bytes)


def _per_run(values: Sequence[object]) -> str:
    return " / ".join("–" if v is None else str(v) for v in values)


def _limit_changes(run: Doc) -> int:
    return sum(
        1
        for e in (x for evs in run.get("events", []) for x in evs)
        if e.get("event") == "follow.applied"
    )


def lines(doc: Doc, img: Path | None, report: Path, command: str) -> list[str]:
    runs = doc["runs"]
    by = {c: [r for r in runs if r["contender"] == c] for c in CONTENDERS}
    by = {c: rs for c, rs in by.items() if rs}

    def agents(rs: list[Doc]) -> str:
        return f"{sum(bool(r.get('agent_alive')) for r in rs)}/{len(rs)}"

    def outcomes(rs: list[Doc]) -> str:
        return _per_run([r["outcome"] for r in rs])

    def kills_children(rs: list[Doc]) -> str:
        return _per_run([sum(r.get("oom_kills_children", {}).values()) for r in rs])

    def limits(key: str) -> Callable[[list[Doc]], str]:
        def cell(rs: list[Doc]) -> str:
            parts = []
            for r in rs:
                vals = r.get(key)
                parts.append(", ".join(fmt_bytes(v) for v in vals) if vals else "–")
            return " / ".join(parts)

        return cell

    def spilled(rs: list[Doc]) -> str:
        return _per_run([fmt_bytes(sum(r["spilled"])) if r.get("spilled") else None for r in rs])

    def walls(rs: list[Doc]) -> str:
        return _per_run([f"{r['wall_s']:.1f} s" if r.get("wall_s") else None for r in rs])

    def share_sum(rs: list[Doc]) -> str:
        parts = []
        for r in rs:
            worst = r.get("max_limit_sum", max_limit_sum(r))
            parts.append(fmt_bytes(worst) if worst else "no limits")
        return " / ".join(parts)

    rows: list[tuple[str, Callable[[list[Doc]], str]]] = [
        ("outcome, per run", outcomes),
        ("kernel OOM kills in the instances' children (the workers), per run", kills_children),
        ("kernel OOM kills in M itself (the agent), per run",
         lambda rs: _per_run([r.get("oom_kills_m") for r in rs])),
        ("agent alive at the end", agents),
        ("instances alive at the end, per run",
         lambda rs: _per_run([f"{r.get('instances_alive')}/3" for r in rs])),
        ("nanny memory restarts, per run",
         lambda rs: _per_run([sum(r.get("nanny_restarts", [])) for r in rs])),
        ("Dask limits when all three registered, per run", limits("dask_limits_start")),
        ("Dask limits at the end, per run", limits("dask_limits_end")),
        ("largest sum of the children's kernel limits (sampled), per run", share_sum),
        ("time that sum was above M's limit less the agent, per run",
         lambda rs: _per_run([f"{r.get('over_pool_s', over_pool_s(r)):.1f} s"
                              if r["contender"] == "safe" else None for r in rs])),
        ("spilled (Dask's disk writes, all workers), per run", spilled),
        ("wall time of the workload, per run", walls),
        ("`follow.applied` lines (all three instances), per run",
         lambda rs: _per_run([_limit_changes(r) if r["contender"] == "safe" else None
                              for r in rs])),
    ]  # fmt: skip
    heads = {"plain": "plain (3 × `dask worker`)", "safe": "safe (3 × `dask-safe-worker`)"}
    table = [
        "| | " + " | ".join(heads[c] for c in by) + " |",
        "|---" * (len(by) + 1) + "|",
        *(f"| {n} | " + " | ".join(cell(rs) for rs in by.values()) + " |" for n, cell in rows),
    ]
    headroom = [r["headroom"] for r in runs if r.get("headroom")]
    out = [
        "## Several instances, one pool: three siblings in one cgroup",
        "",
        "Generated by `uv run python benchmarks/siblings.py --render` from "
        "`benchmarks/data/siblings-v1.json`, which these commands produced (the second "
        "keeps a compact copy of the first one's raw dump):",
        "",
        f"    {command}",
        "",
        'The "VM with agents" scenario (cgroup v1, this host) with three workers: M = '
        f"{fmt_bytes(M_LIMIT)} below the benchmark's own cgroup, no swap, holding an agent of "
        f"{fmt_bytes(AGENT_BYTES)} (M's headroom before the start: "
        f"{_med_bytes(headroom)}). Three instances start "
        f"{STAGGER_S:.0f} s apart, each with `--nthreads 2 --nworkers 1`, and register with one "
        "scheduler on 127.0.0.1 outside M; then one spill workload of 1.5 × M's headroom "
        "(64 MiB chunks, persisted, then summed) runs across the three workers, bound "
        f"{TIMEOUT:.0f} s. **plain**: three `python -m distributed.cli.dask_worker`, each in "
        "its own child of M without a limit, each sized by Dask's `auto` (the host's RAM). "
        "**safe**: three `dask-safe-worker --log-format json --plan-file …` with the default "
        "(following), each started in M itself: each creates its own child of M and writes "
        "its share there as the kernel limit; the pool's claims live in a private runtime "
        "directory of the run. v1 counts a kernel OOM kill in the victim's own cgroup: the "
        "children's counts are kills of workers (or nannies), M's own count is the agent. "
        f"{max(len(rs) for rs in by.values())} runs per contender, interleaved (plain, safe, "
        "plain, …), on the shared 2-CPU host: other engineers' test suites ran at the same "
        "time, so wall times are noisy. Series started "
        f"{doc.get('started_at', '?')}; the source was the working tree of the moment "
        "(an editable install).",
        "",
        *table,
        "",
    ]
    if img is not None:
        out += [
            "![the three safe instances' shares (their children's kernel limits) against "
            f"time]({os.path.relpath(img, report.parent)})",
            "",
        ]
    return out


def share_sums(run: Doc) -> tuple[list[float], list[int]]:
    """The sum of the children's kernel limits at each sample time (0.1 s grid). A child
    counts from its first sample to its last: an instance that ends removes its child."""
    kids = [c for c in run.get("children", {}).values() if c["t"]]
    times = sorted({round(t, 1) for c in kids for t in c["t"]})
    totals = []
    for t in times:
        total = 0
        for c in kids:
            if not round(c["t"][0], 1) <= t <= round(c["t"][-1], 1):
                continue
            known = [lim for tt, lim in zip(c["t"], c["limit"], strict=True) if round(tt, 1) <= t]
            if known and known[-1] is not None:
                total += known[-1]
        totals.append(total)
    return times, totals


def max_limit_sum(run: Doc) -> int:
    """The largest sum of the children's kernel limits at one sample time."""
    return max(share_sums(run)[1], default=0)


def over_pool_s(run: Doc) -> float:
    """Seconds (on the 0.1 s grid) in which the children's kernel limits added up to more
    than M's headroom before the start (M's limit less the agent)."""
    times, totals = share_sums(run)
    over = [t for t, v in zip(times, totals, strict=True) if v > run["headroom"]]
    return round(0.1 * len(over), 1)


COLOURS = ("tab:blue", "tab:orange", "tab:green")


def plot(runs: Sequence[Doc], path: Path) -> bool:
    """One panel per run of safe (the three shares against time), and plain's first run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_vm_figure, style_vm_axis

    shown = [r for r in runs if r["contender"] == "safe"]
    shown += [r for r in runs if r["contender"] == "plain"][:1]
    if not shown:
        return False
    fig, axes = plt.subplots(len(shown), 1, figsize=(12.5, 3.3 * len(shown)), squeeze=False)
    for ax, r in zip(axes[:, 0], shown, strict=True):
        s = r["series"]
        ax.plot(s["t"], [v / GiB for v in s["m_ws"]], color="black", lw=1,
                label="M working set (agent + all instances)")  # fmt: skip
        instance = {name: int(i) for i, name in r.get("child_of", {}).items()}
        # Each instance in its own colour in every panel, whatever its child is called.
        names = sorted(r.get("children", {}), key=lambda n: instance.get(n, len(instance)))
        shares: list[tuple[list[float], list[float | None]]] = []
        for i, name in enumerate(names):
            c = r["children"][name]
            colour = COLOURS[instance.get(name, i) % len(COLOURS)]
            who = f"instance {instance.get(name, '?')}"
            ax.plot(c["t"], [v / GiB for v in c["usage"]], color=colour, lw=0.7, alpha=0.45,
                    label=f"{who}: usage of its child")  # fmt: skip
            lim = [None if v is None else v / GiB for v in c["limit"]]
            if any(v is not None for v in lim):
                ax.step(c["t"], lim, where="post", color=colour, lw=1.8,
                        label=f"{who}: share (kernel limit)")  # fmt: skip
                shares.append((c["t"], lim))
        if len(shares) > 1:
            ts, totals = share_sums(r)
            ax.step(ts, [v / GiB for v in totals], where="post", color="grey", ls="--", lw=1,
                    label="sum of the shares")  # fmt: skip
            ax.axhline(r["headroom"] / GiB, color="grey", lw=0.8, ls=":",
                       label="M's limit less the agent (the pool)")  # fmt: skip
        ax.axhline(M_LIMIT / GiB, color="red", lw=1.2, label="M limit (3 GiB)")
        if r.get("workload_at_s"):
            ax.axvline(r["workload_at_s"], color="grey", ls=":", lw=1, label="workload starts")
        kills = sum(r.get("oom_kills_children", {}).values())
        style_vm_axis(
            ax,
            M_LIMIT,
            f"{r['contender']} #{r['repeat']} — {r['outcome']}, wall {r.get('wall_s') or 0:.0f} s, "
            f"kernel OOM kills: children {kills}, M {r.get('oom_kills_m')}, agent "
            f"{'alive' if r.get('agent_alive') else 'dead'}",
        )
    save_vm_figure(
        fig,
        axes,
        "three instances, one 3 GiB cgroup with a 600 MiB agent (cgroup v1) — spill",
        path,
        xlabel="seconds since the first instance was launched (100 ms samples, every 0.5 s kept)",
    )
    return True
