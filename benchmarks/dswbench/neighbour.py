# ruff: noqa: RUF001
"""Workload "neighbour grows" (issue 10): tables and plots of the v1 runs
(benchmarks/follow_neighbour.py) and the v2 small-VM runs (benchmarks/pressure_vm.py
--workload neighbour), rendered into a note that docs/benchmarks.md carries.

Pure rendering over the raw JSON those scripts write; benchmarks/neighbour_report.py is
the command that reads the files and writes the note and the plots.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .common import AGENT_BYTES, M_LIMIT, GiB, fmt_bytes, fmt_med_range
from .plots import plot_vm_usage, save_vm_figure, style_vm_axis, vm_figure

CONTENDERS = ("plain", "safe", "follow", "seed")
HEADINGS = {
    "plain": "plain",
    "safe": "safe (static)",
    "follow": "safe `--follow`",
    "seed": "seed",
}
COLOURS = {"plain": "tab:brown", "safe": "tab:blue", "follow": "tab:purple", "seed": "tab:green"}
Doc = dict[str, Any]


def compact(run: Doc, step: int = 5) -> Doc:
    """A run with every `step`-th sample of its series (every 0.5 s of 0.1 s samples):
    enough for the plot, small enough to commit."""
    out = dict(run)
    series = run.get("series")
    if isinstance(series, dict):
        out["series"] = {k: list(v)[::step] for k, v in series.items()}
    return out


def _med(values: Sequence[float | None], fmt: Callable[[float], str]) -> str:
    """fmt_med_range, without a range whose ends print the same."""
    known = [v for v in values if v is not None]
    if known and fmt(min(known)) == fmt(max(known)):
        return fmt(statistics.median(known))
    return fmt_med_range(values, fmt)


def _by_contender(runs: Sequence[Doc]) -> dict[str, list[Doc]]:
    by = {c: [r for r in runs if r.get("contender") == c] for c in CONTENDERS}
    return {c: rs for c, rs in by.items() if rs}


def _per_run(values: Sequence[object]) -> str:
    return " / ".join("–" if v is None else str(v) for v in values)


def _table(
    by: dict[str, list[Doc]], rows: Sequence[tuple[str, Callable[[list[Doc]], str]]]
) -> list[str]:
    lines = [
        "| | " + " | ".join(HEADINGS[c] for c in by) + " |",
        "|---" * (len(by) + 1) + "|",
    ]
    for name, cell in rows:
        lines.append(f"| {name} | " + " | ".join(cell(rs) for rs in by.values()) + " |")
    return lines


def _outcomes(rs: list[Doc]) -> str:
    counts: dict[str, int] = {}
    for r in rs:
        outcome = str(r.get("outcome", "?"))
        counts[outcome] = counts.get(outcome, 0) + 1
    return ", ".join(f"{o} ×{n}" for o, n in counts.items())


def _alive(key: str) -> Callable[[list[Doc]], str]:
    return lambda rs: f"{sum(r.get(key) is True for r in rs)}/{len(rs)}"


def _seconds(values: Sequence[float | None]) -> str:
    return _med(values, lambda v: f"{v:.1f} s")


# ------------------------------------------------------------------------------ v1


def v1_lines(doc: Doc, img: Path | None, report: Path) -> list[str]:
    """The v1 runs (follow_neighbour.py's --json): a table per contender and the plot."""
    by = _by_contender(doc["runs"])
    growth = statistics.median(r["growth"] for r in doc["runs"] if r.get("growth"))

    def limits(rs: list[Doc]) -> str:
        start = _med([r.get("dask_limit_start") for r in rs], fmt_bytes)
        end = _med([r.get("dask_limit_end") for r in rs], fmt_bytes)
        return start if end == "–" else f"{start} → {end}"

    def spilled(rs: list[Doc]) -> str:
        values = [r.get("spilled") for r in rs]
        if not any(values):
            return "– (no worker answered at the end)"
        return _med(values, fmt_bytes)

    def latency(rs: list[Doc]) -> str:
        values = [f"{r['follow_latency_s']:.2f} s" for r in rs if "follow_latency_s" in r]
        return " / ".join(values) if values else "–"

    rows: list[tuple[str, Callable[[list[Doc]], str]]] = [
        ("runs", lambda rs: str(len(rs))),
        ("outcome", _outcomes),
        ("kernel OOM kills in W (the worker), per run",
         lambda rs: _per_run([r.get("oom_kills_w") for r in rs])),
        ("kernel OOM kills at M's limit (the agent), per run",
         lambda rs: _per_run([r.get("oom_kills_m") for r in rs])),
        ("agent alive at the end", _alive("agent_alive")),
        ("nanny memory restarts, per run",
         lambda rs: _per_run([r.get("nanny_restarts") for r in rs])),
        ("Dask limit at start → end", limits),
        ("spilled", spilled),
        ("wall time, median (range)", lambda rs: _seconds([
            r.get("wall_s") for r in rs if r.get("outcome") == "completed"])),
        ("follow latency (growth seen → every worker holds the new limit)", latency),
    ]  # fmt: skip
    lines = [
        '### Workload "neighbour grows" (cgroup v1, this host)',
        "",
        '`benchmarks/follow_neighbour.py`, the "VM with agents" scenario above: M = '
        f"{fmt_bytes(M_LIMIT)} holding an agent of {fmt_bytes(AGENT_BYTES)} and W, where the "
        "worker starts (`--nthreads 2 --nworkers 1`). A spill workload of 1.5 × M's headroom "
        f"runs; {doc.get('grow_after_s', 0):.0f} s into it the agent grows by half the "
        "worker's budget (half of M's headroom before the start): "
        f"{fmt_bytes(growth)}. Contenders: plain, safe (static plan and kernel limit), safe "
        "with `--follow` (interval 1 s), and the seed (W's limit and `--memory-limit` = M's "
        f"headroom at start). {max(len(rs) for rs in by.values())} runs per contender, "
        "interleaved, on the shared 2-CPU host (other test suites and VMs ran at the same "
        "time, so wall times are noisy).",
        "",
        *_table(by, rows),
        "",
    ]
    if img is not None:
        lines += [f"![M's working set against time, the agent's growth marked]"
                  f"({os.path.relpath(img, report.parent)})", ""]  # fmt: skip
    return lines


def plot_v1(runs: Sequence[Doc], path: Path, m_limit: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = _by_contender(runs)
    fig, axes = plt.subplots(1, len(by), figsize=(16, 4), sharey=True, squeeze=False)
    for ax, (contender, mine) in zip(axes[0], by.items(), strict=True):
        for r in mine:
            s = r["series"]
            ax.plot(s["t"], [v / GiB for v in s["m_ws"]], lw=1, label=f"#{r['repeat']} M ws")
            ax.axvline(r.get("grow_at_s", 0), color="red", ls="--", lw=0.8)
        ax.axhline(m_limit / GiB, color="black", lw=0.8)
        ax.set_title(HEADINGS[contender].replace("`", ""))
        ax.set_xlabel("s")
    axes[0, 0].set_ylabel("GiB (M's working set; red: agent grows)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------ v2


def _iso(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def lowerings(run: Doc) -> list[Doc]:
    """The follow.applied events that lowered the limit after the growth was requested.

    The agent allocates for several seconds in the emulated guest, so the budget comes
    down in steps, each one a change beyond the hysteresis band."""
    grow_wall = run.get("grow_wall")
    if grow_wall is None:
        return []
    return [
        e
        for e in run.get("audit", [])
        if e.get("event") == "follow.applied"
        and e.get("action") == "lower"
        and _iso(e["timestamp"]) >= grow_wall
    ]


def follow_latencies(run: Doc) -> dict[str, Any]:
    """From a --follow run's audit events, around the agent's growth.

    `latency_s` / `kernel_latency_s`: per lowering, the tick that saw the change → every
    worker and nanny holding the new limit / → W's memory.max lowered (follow.applied);
    `first_s`: the growth requested → the first lowering held by every worker (later
    steps follow the agent's allocation, or page-cache drift, or wait for a worker that
    its nanny restarted, so only the first one times the reaction)."""
    steps = lowerings(run)
    out: dict[str, Any] = {
        "latency_s": [float(e["latency_s"]) for e in steps if e.get("latency_s") is not None],
        "kernel_latency_s": [
            float(e["kernel_latency_s"]) for e in steps if e.get("kernel_latency_s") is not None
        ],
        "steps": len(steps),
    }
    if steps:
        out["first_s"] = _iso(steps[0]["timestamp"]) - float(run["grow_wall"])
    return out


def victims(run: Doc) -> list[str]:
    """Who the kernel killed in this run, from the kernel log's oom-kill lines."""
    out = []
    for v in run.get("oom_victims", []):
        memcg = str(v.get("memcg", ""))
        if memcg.endswith("/agent"):
            out.append("agent")
        elif "/w" in memcg:
            out.append("worker (W)")
        else:
            out.append(f"{v.get('task')} in {memcg or '?'}")
    return out


def v2_lines(docs: Sequence[Doc], img: Path | None, report: Path, series: str = "") -> list[str]:
    """The v2 small-VM runs (pressure_vm.py --workload neighbour --json); `series` names
    one series of rounds when there are several."""
    by = _by_contender(docs)
    rounds = len({d.get("round") for d in docs})

    def tot(get: Callable[[Doc], Any]) -> Callable[[list[Doc]], str]:
        def cell(rs: list[Doc]) -> str:
            values = [get(r) for r in rs]
            if any(not isinstance(v, int) for v in values):
                return _per_run(values)
            return f"{sum(values)} ({_per_run(values)})"

        return cell

    def who(rs: list[Doc]) -> str:
        per_run = [", ".join(victims(r)) or "none" for r in rs]
        return " / ".join(per_run)

    def limits(rs: list[Doc]) -> str:
        start = _med([r.get("dask_memory_limit") for r in rs], fmt_bytes)
        end = _med([r.get("dask_memory_limit_end") for r in rs], fmt_bytes)
        return start if end == "–" else f"{start} → {end}"

    def w_max(rs: list[Doc]) -> str:
        def last(r: Doc) -> int | None:
            known = [v for v in r.get("series", {}).get("w_max", []) if v is not None]
            return known[-1] if known else None

        start = [r.get("w_memory_max") for r in rs]
        if all(v in (None, "max") for v in start):
            return "max"
        first = _med([int(v) for v in start if v not in (None, "max")], fmt_bytes)
        end = _med([last(r) for r in rs], fmt_bytes)
        return first if end == first else f"{first} → {end}"

    def growth_at(rs: list[Doc]) -> str:
        parts = []
        for r in rs:
            if "grow_at_s" not in r:
                parts.append("–")
                continue
            grown = r.get("grown_at_s")
            if grown:
                took = f", allocated in {grown - r['grow_at_s']:.1f} s"
            else:
                took = ", killed while allocating" if r.get("agent_alive") is False else ""
            parts.append(f"{r['grow_at_s']:.0f} s ({r.get('grow_trigger', '?')}{took})")
        return " / ".join(parts)

    def per_run(key: str) -> Callable[[list[Doc]], str]:
        def cell(rs: list[Doc]) -> str:
            values = [follow_latencies(r).get(key) for r in rs]
            if all(v is None for v in values):
                return "–"
            return " / ".join("–" if v is None else f"{v:.1f} s" for v in values)

        return cell

    def pooled(key: str) -> Callable[[list[Doc]], str]:
        def cell(rs: list[Doc]) -> str:
            values = [v for r in rs for v in follow_latencies(r)[key]]
            return _med(values, lambda v: f"{v:.1f} s") + f", {len(values)} steps"

        return cell

    def cpu(rs: list[Doc]) -> str:
        parts = []
        for r in rs:
            used, window = r.get("supervisor_cpu_s"), r.get("supervisor_cpu_window_s")
            if used is None or not window:
                continue
            parts.append(f"{100 * used / window:.2f} % ({used:.1f} s of {window:.0f} s)")
        return " / ".join(parts) if parts else "–"

    secs = lambda rs: _seconds([r.get("wall_s") for r in rs])  # noqa: E731
    rows: list[tuple[str, Callable[[list[Doc]], str]]] = [
        ("runs", lambda rs: str(len(rs))),
        ("outcome", _outcomes),
        ("wall time, median (range)", secs),
        ("MemAvailable before start", lambda rs: _med(
            [r.get("mem_available_before") for r in rs], fmt_bytes)),
        ("the agent grows by", lambda rs: _med(
            [r.get("growth_bytes") for r in rs], fmt_bytes)),
        ("growth requested at (since launch; trigger)", growth_at),
        ("Dask memory limit at start → end", limits),
        ("W `memory.max` at start → end", w_max),
        ("global OOM kills (`/proc/vmstat`), total (per run)",
         tot(lambda r: r.get("global_oom_kills", "–"))),
        ("OOM kills in W (`memory.events`), total (per run)",
         tot(lambda r: r.get("w_events", {}).get("oom_kill", "–"))),
        ("OOM kills in the agent's cgroup, total (per run)",
         tot(lambda r: r.get("agent_events", {}).get("oom_kill", "–"))),
        ("who the kernel killed (kernel log), per run", who),
        ("agent alive at the end", _alive("agent_alive")),
        ("scheduler alive at the end", _alive("scheduler_alive")),
        ("nanny (or supervisor) alive at the end", _alive("nanny_alive")),
        ("nanny memory restarts, total (per run)", tot(lambda r: r.get("memory_restarts", "–"))),
        ("worker deaths by signal (nanny log), total (per run)",
         tot(lambda r: r.get("killed_by_signal", "–"))),
        ("spilled (Dask's disk writes)", lambda rs: _med(
            [r.get("spilled") for r in rs], fmt_bytes)),
        ("follow: growth requested → first lower limit held by every worker and nanny",
         per_run("first_s")),
        ("follow, each lowering: change seen → every worker and nanny hold it (`latency_s`)",
         lambda rs: pooled("latency_s")(rs) if rs[0]["contender"] == "follow" else "–"),
        ("follow, each lowering: change seen → W's `memory.max` lowered (`kernel_latency_s`)",
         lambda rs: pooled("kernel_latency_s")(rs) if rs[0]["contender"] == "follow" else "–"),
        ("follow: supervisor CPU during the workload (the watch)", cpu),
    ]  # fmt: skip
    lines = [
        f'### Workload "neighbour grows" (cgroup v2, small VM){series}',
        "",
        '`benchmarks/pressure_vm.py --workload neighbour`, the "small VM" scenario above '
        "(virtme-ng, software-emulated): an agent of 350 MiB in its own cgroup, the worker in "
        "W without a limit, the spill workload of 1.5 × MemAvailable. Partway through it the "
        "agent grows by half the worker's budget (half the MemAvailable measured before the "
        "start, from which every contender's budget is cut). The moment is a point in the "
        "spill's progress, not a time: the growth is requested once W's charge reaches half "
        "that budget, so that the worker holds real data when the agent grows, in every "
        "contender and however slow the emulated guest runs on the busy host (90 s into the "
        "workload at the latest). Contenders: plain, safe (static), safe `--follow` "
        "(`--follow-interval 1`), and the seed (W's `memory.max` = MemAvailable, the plain "
        f"worker in a cgroup namespace). {rounds} rounds, one VM boot each, every contender "
        "once per round, the order rotated (interleaved). Cells: median (range), totals, or "
        "one value per run in round order.",
        "",
        *_table(by, rows),
        "",
    ]
    errors = sorted({f"{d['contender']}: {d.get('error')}"[:300] for d in docs if d.get("error")})
    if errors:
        lines += ["Errors seen:", "", *(f"- `{e}`" for e in errors), ""]
    if img is not None:
        lines += [f"![memory against time, small VM, neighbour grows: each contender's first "
                  f"round and every round of --follow]"
                  f"({os.path.relpath(img, report.parent)})", ""]  # fmt: skip
    return lines


def dask_limit_steps(run: Doc, end: float) -> tuple[list[float], list[float]] | None:
    """Dask's limit against the plot's time: the start's, then every follow.applied (the
    guest's wall clock mapped to the plot's through the moment of growth)."""
    start = run.get("dask_memory_limit")
    if not start or "register_s" not in run:
        return None
    ts, values = [float(run["register_s"])], [start / GiB]
    grow_wall, grow_at = run.get("grow_wall"), run.get("grow_at_s")
    if grow_wall is not None and grow_at is not None:
        for event in run.get("audit", []):
            if event.get("event") == "follow.applied" and event.get("per_worker"):
                ts.append(grow_at + _iso(event["timestamp"]) - grow_wall)
                values.append(event["per_worker"] / GiB)
    ts.append(end)
    values.append(values[-1])
    return ts, values


def _gib(values: Sequence[int | None]) -> list[float | None]:
    return [None if v is None else v / GiB for v in values]


def plot_v2(docs: Sequence[Doc], path: Path) -> bool:
    """One panel per contender, its first run: the VM's used memory, W's and the agent's
    charge, W's memory.max, the moment of growth."""
    by = _by_contender(docs)
    # Every contender's first round, and every round of --follow: its runs differ.
    made = vm_figure([rs[0] for rs in by.values()] + by.get("follow", [])[1:])
    if made is None:
        return False
    fig, axes, runs = made
    for ax, d in zip(axes[:, 0], runs, strict=True):
        s = d["series"]
        total = d.get("mem_total") or 0
        plot_vm_usage(ax, d, COLOURS[d["contender"]])
        ax.plot(s["t"], _gib(s.get("agent", [])) if s.get("agent") else [], color="tab:orange",
                label="agent's cgroup memory.current")  # fmt: skip
        if any(v is not None for v in s.get("w_max", [])):
            ax.plot(s["t"], _gib(s["w_max"]), color="tab:red", ls="--", lw=1,
                    label="W memory.max")  # fmt: skip
        steps = dask_limit_steps(d, s["t"][-1])
        if steps:
            ax.step(*steps, where="post", color="tab:purple", ls="-.", lw=1,
                    label="Dask memory limit")  # fmt: skip
        if total:
            ax.axhline(total / GiB, color="red", lw=1.2, label="MemTotal")
        if "grow_at_s" in d:
            ax.axvline(d["grow_at_s"], color="red", ls=":", lw=1.5, label="agent grows")
        style_vm_axis(
            ax,
            total,
            f"{HEADINGS[d['contender']].replace('`', '')}, round {d.get('round')} — "
            f"{d.get('outcome')}, kernel OOM "
            f"kills: {', '.join(victims(d)) or 'none'}, wall {d.get('wall_s') or 0:.0f} s",
        )
    save_vm_figure(fig, axes, "'small VM' on cgroup v2 — neighbour grows during a spill", path)
    return True
