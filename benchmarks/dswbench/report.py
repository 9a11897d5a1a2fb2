# ruff: noqa: RUF001
"""docs/benchmarks.md from the results: tables and numbers in a prose template."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from string import Template
from typing import Any

from .common import (
    AGENT_BYTES,
    CHUNK_BYTES,
    CONTENDERS,
    FRONTIER_ALLOWANCES,
    M_LIMIT,
    NTHREADS,
    REPO,
    TIMEOUTS,
    WORKLOADS,
    MiB,
    fmt_bytes,
    fmt_med_range,
)
from .harness import RunResult
from .plots import LABELS, plot_vm
from .startup import StartupResult

# The report's fixed prose, with the numbers it quotes as $placeholders.
HEADER = Template((Path(__file__).parent / "report_header.md").read_text())


def machine_description() -> list[str]:
    meminfo = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    from importlib.metadata import version

    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical CPUs; RAM: {int(meminfo) // 1024} MiB, no swap"
        if re.search(r"^SwapTotal:\s+0 kB", Path("/proc/meminfo").read_text(), re.M)
        else f"- CPU: {cpu}, {os.cpu_count()} logical CPUs; RAM: {int(meminfo) // 1024} MiB",
        f"- Kernel {platform.release()}, memory controller on cgroup v1 (hybrid host)",
        f"- Python {platform.python_version()}, dask {version('dask')}, "
        f"distributed {version('distributed')}, numpy {version('numpy')}",
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
    row("**budget efficiency** (Dask limit ÷ M's headroom)", efficiency_cell)
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
    if any(r.populate_probe_s for r in runs):
        row("fast-burst rate: 512 MiB populated in (median, range)",
            lambda rs: fmt_med_range([r.populate_probe_s * 1000 for r in rs
                                      if r.populate_probe_s], lambda v: f"{v:.0f} ms"))  # fmt: skip
        row("largest growth of W between two samples (~100 ms)",
            lambda rs: fmt_med_range([r.w_max_step for r in rs], fmt_bytes))  # fmt: skip
        row("PID 1 survived", lambda rs: f"{sum(r.init_alive for r in rs)}/{len(rs)}")
    return rows


def efficiency_cell(runs: list[RunResult]) -> str:
    values = [r.efficiency for r in runs if r.efficiency is not None]
    if not values:
        return "–"
    cell = fmt_med_range(values, lambda v: f"{v:.3f}")
    return cell + " (over-commits)" if statistics.median(values) > 1 else cell


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
    frontier: list[RunResult] | None = None,
) -> None:
    lines = [
        HEADER.substitute(
            command=command,
            started_at=started_at,
            quick=" (quick mode: one spill pair only)" if quick else "",
            machine="\n".join(machine_description()),
            m_limit=fmt_bytes(M_LIMIT),
            agent=fmt_bytes(AGENT_BYTES),
            nthreads=NTHREADS,
            chunk_mib=CHUNK_BYTES // MiB,
            spill_bound=f"{TIMEOUTS['spill']:.0f}",
            burst_bound=f"{TIMEOUTS['burst']:.0f}",
            steady_bound=f"{TIMEOUTS['steady']:.0f}",
        ).rstrip("\n"),
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
        if workload == "fastburst":
            lines += fastburst_note(mine)
        errors = sorted({f"{r.contender}: {r.error}" for r in mine if r.error})
        if errors:
            lines += ["Errors seen:", ""] + [f"- `{e}`" for e in errors] + [""]
        lines += [f"![memory against time, {workload}]({rel})", ""]

    if frontier:
        lines += frontier_section(frontier)
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
    lines += [
        "- RSS is not what the nanny costs the cgroup: it counts the shared libraries' file "
        "pages, which the kernel charges to whichever cgroup read them first. Its charge "
        "(anonymous memory of the nanny and the resource tracker, and W's working set minus "
        "the worker's anonymous memory) is measured by `benchmarks/nanny_charge.py` on v1 "
        "and in every v2 run below; docs/design.md has the table and the allowance derived "
        "from it.",
        "",
    ]

    lines += startup_section(startup)
    lines += ['## Scenario "small VM" (cgroup v2)', ""]
    if vm_docs:
        lines += vm_section(vm_docs, img_dir / "pressure-small-vm.png", path)
    else:
        lines += [vm_note, ""]
    lines += appendix_lines()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")


STARTUP_HEADING = "## Start-up cost"


# safe / plain, launch → registered: the goal since following became the default (issue
# 25); it was 1.05 for the exec start.
REGISTER_GOAL = 1.10


def startup_section(startup: StartupResult | None) -> list[str]:
    """The start-up section, from its heading to the supervisor's RSS."""
    lines = [STARTUP_HEADING, ""]
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
            f"{fmt_med_range(ratios, lambda v: f'{v:.3f}')} | ≤ {REGISTER_GOAL:.2f} | "
            f"{'yes' if ratio <= REGISTER_GOAL else 'no'} |",
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
            + (
                f", load average (1 min) {startup.loadavg[0]:.1f} before the pairs and "
                f"{startup.loadavg[1]:.1f} after the query timings on this shared 2-CPU "
                "machine"
                if startup.loadavg
                else ""
            )
            + ". Query timings are hyperfine-style: wall time of the whole process from the "
            "benchmark's `subprocess.run`, one warm-up run discarded, the console script "
            "started directly (not through `uv run`), inside a cgroup of ours, with "
            "bytecode compiled as pip installs it. This section alone is measured again by "
            "`uv run python benchmarks/pressure.py --remeasure-startup --json "
            "benchmarks/data/startup.json`.",
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
        if pl > 60 or ratio > REGISTER_GOAL:
            lines += goal_notes(startup)
        lines += ["### Supervisor RSS", ""]
        if startup.supervisor_rss is None:
            lines += [
                "`benchmarks/supervisor_rss.py` did not exist when this ran: "
                "not measured; goal ≤ 15 MiB.",
                "",
            ]
        else:
            lines += supervisor_table(startup.supervisor_rss)
    return lines


def refresh_startup(path: Path, startup: StartupResult) -> None:
    """Replace a generated report's start-up section with a new measurement: how the
    start-up cost of newer code reaches docs/benchmarks.md without rerunning the pressure
    runs (which take an hour, and whose raw results another run may not have kept)."""
    text = path.read_text()
    start = text.index(f"\n{STARTUP_HEADING}\n") + 1
    end = text.index("\n## ", start) + 1
    section = "\n".join(startup_section(startup)).rstrip("\n") + "\n\n"
    path.write_text(text[:start] + section + text[end:])


def appendix_lines() -> list[str]:
    """What every report ends with: the defaults' reasoning, then the notes."""
    lines: list[str] = []
    if DEFAULTS_FILE.exists():
        lines += ["", DEFAULTS_FILE.read_text().rstrip(), ""]
    # Measurements made by other benchmark scripts, kept beside these numbers on a rerun.
    for note in sorted(NOTES_DIR.glob("*.md")):
        lines += [note.read_text().rstrip(), ""]
    return lines


def refresh_appendix(path: Path) -> None:
    """Replace a generated report's appendix (from the defaults' heading on) with the
    current one, as write_report would write it: how a note regenerated by another script
    reaches docs/benchmarks.md without rerunning the pressure benchmark."""
    text = path.read_text()
    heading = DEFAULTS_FILE.read_text().lstrip().splitlines()[0]
    cut = text.index(f"\n{heading}\n") + 1
    appendix = "\n".join(appendix_lines()).strip("\n")
    path.write_text(text[:cut] + appendix + "\n")


def supervisor_table(raw: str) -> list[str]:
    """benchmarks/supervisor_rss.py's JSON as a table against the goal."""
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
        f"From `benchmarks/supervisor_rss.py` (median of {doc.get('repeat')} "
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
NOTES_DIR = REPO / "benchmarks" / "notes"


WORKLOAD_NOTES = {
    "spill": [
        "Plain never spills: its limit is the host's RAM, so W grows until M is full. The "
        "kernel then kills the worker inside W, and the nanny restarts it until the "
        "scheduler gives up with KilledWorker (or the bound runs out). Safe and seed spill "
        "at their Dask limit with no kernel OOM kill. Their `failcnt` on W counts reclaims "
        "of spill page cache at W's limit, not kills. Safe's hung run was a run on a "
        "saturated host (load average about 50 while other test suites' VMs ran on the "
        "same two cores): its worker "
        "took 184 s to register, its event loop stalled for up to 16 s at a time, it had "
        "spilled 192 MiB when the 180 s bound ran out, and nothing was OOM-killed.",
        "",
    ],
    "burst": [
        "A single task of 1.2 × the headroom cannot succeed anywhere: the point is "
        "*who* stops it. Plain reaches M's limit (M's `failcnt`) and the kernel kills the "
        "worker 4 times per run. `np.ones` faults its pages in from user space; here it "
        "grew W by up to 0.6–0.7 GiB between two 100 ms samples, so whether the nanny's "
        "95 % restart or W's kernel limit comes first is a race. Safe's allowance leaves "
        "room for one poll's growth: the nanny won every time. The seed (no allowance) "
        "lost the race once. Every kill stayed inside W.",
        "",
    ],
    "fastburst": [],
    "steady": [
        "Nothing goes wrong with any contender. Wall times differ only by noise.",
        "",
    ],
}


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
    if ratio > REGISTER_GOAL and startup.register_plain and startup.start_path_ms:
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
    """The v2 "small VM" runs (benchmarks/pressure_vm.py): medians over the rounds, a plot
    of the first round."""
    cs = [c for c in CONTENDERS if any(d["contender"] == c for d in docs)]
    by = {c: [d for d in docs if d["contender"] == c] for c in cs}
    rounds = max(len(v) for v in by.values())
    first = by[cs[0]][0]
    lines = [
        "Run with `uv run python benchmarks/pressure_vm.py` (virtme-ng, software-emulated, "
        f"`--disable-kvm`): {rounds} rounds, one VM boot each; every round runs every "
        "contender once, one after the other in fresh cgroups, the order rotated per round "
        "(interleaved). The VM has "
        f"{fmt_bytes(first.get('mem_total'))} of MemTotal. An agent holds "
        "350 MiB in its own cgroup, the scheduler and the benchmark driver sit in the root "
        "cgroup. The driver and its ancestors (the guest's script and init) get "
        "`oom_score_adj` -1000 once every process of the run has started, so that it "
        "can report; the agent, the scheduler and the worker keep 0. The "
        "worker runs in a cgroup W without a limit. Workload: spill, 1.5 × MemAvailable "
        "measured before the worker starts, in 32 MiB chunks. Seed = W's `memory.max` set "
        "to that MemAvailable, with the plain worker started under `unshare --cgroup` and "
        "cgroup2 remounted, so that dask itself reads the limit (the blog post's "
        "container, reproduced exactly). Cells: median (range) over the rounds, or totals.",
        "",
        "| | " + " | ".join(f"{LABELS[c].split(' ', 1)[0]} {c}" for c in cs) + " |",
        "|---" * (len(cs) + 1) + "|",
    ]

    def row(name: str, cell: Callable[[list[dict[str, Any]]], object]) -> None:
        lines.append(f"| {name} | " + " | ".join(str(cell(by[c])) for c in cs) + " |")

    def nums(ds: list[dict[str, Any]], key: str) -> list[float | None]:
        return [d.get(key) if isinstance(d.get(key), (int, float)) else None for d in ds]

    def med(key: str, fmt: Callable[[float], str]) -> Callable[[list[dict[str, Any]]], str]:
        return lambda ds: fmt_med_range(nums(ds, key), fmt)

    def tot(get: Callable[[dict[str, Any]], Any]) -> Callable[[list[dict[str, Any]]], str]:
        def cell(ds: list[dict[str, Any]]) -> str:
            values = [get(d) for d in ds]
            if any(not isinstance(v, int) for v in values):
                return "/".join(str(v) for v in values)
            return f"{sum(values)} ({'/'.join(str(v) for v in values)})"

        return cell

    def count(key: str) -> Callable[[list[dict[str, Any]]], str]:
        return lambda ds: f"{sum(d.get(key) is True for d in ds)}/{len(ds)}"

    def w_max(ds: list[dict[str, Any]]) -> str:
        values = [d.get("w_memory_max") for d in ds]
        if all(v in (None, "max") for v in values):
            return str(values[0] or "–")
        return fmt_med_range([int(v) for v in values if v not in (None, "max")], fmt_bytes)

    def eff(d: dict[str, Any]) -> float | None:
        limit, avail = d.get("dask_memory_limit"), d.get("mem_available_before")
        return limit / avail if limit and avail else None

    def eff_cell(ds: list[dict[str, Any]]) -> str:
        values = [eff(d) for d in ds]
        cell = fmt_med_range(values, lambda v: f"{v:.3f}")
        known = [v for v in values if v is not None]
        return cell + " (over-commits)" if known and statistics.median(known) > 1 else cell

    def charge_of(key: str) -> Callable[[list[dict[str, Any]]], str]:
        return lambda ds: fmt_med_range(
            [d.get("charge_idle", {}).get(key) for d in ds],
            lambda v: f"{v / MiB:.1f} MiB",
        )

    secs = lambda v: f"{v:.1f} s"  # noqa: E731
    row("runs", lambda ds: str(len(ds)))
    row("outcome", lambda ds: ", ".join(str(d.get("outcome", "?")) for d in ds))
    row("wall time, median (range)", med("wall_s", secs))
    row("MemAvailable before start", med("mem_available_before", fmt_bytes))
    row("workload", med("workload_bytes", fmt_bytes))
    row("Dask memory limit", med("dask_memory_limit", fmt_bytes))
    row("W `memory.max`", w_max)
    row("**budget efficiency** (Dask limit ÷ MemAvailable)", eff_cell)
    row(
        "global OOM kills (`/proc/vmstat`), total (per run)",
        tot(lambda d: d.get("global_oom_kills", "–")),
    )
    row("OOM kills in W (`memory.events`), total (per run)",
        tot(lambda d: d.get("w_events", {}).get("oom_kill", "–")))  # fmt: skip
    row("OOM kills of the agent, total",
        tot(lambda d: d.get("agent_events", {}).get("oom_kill", "–")))  # fmt: skip
    row("nanny memory restarts, total", tot(lambda d: d.get("memory_restarts", "–")))
    row("worker deaths by signal (nanny log), total", tot(lambda d: d.get("killed_by_signal", "–")))
    row("agent survived", count("agent_alive"))
    row("scheduler survived", count("scheduler_alive"))
    row("nanny survived", count("nanny_alive"))
    row("nanny side's charge: nanny + tracker anonymous (smaps)", charge_of("by_smaps"))
    row("nanny side's charge: W working set − worker anonymous", charge_of("by_cgroup"))
    row("nanny RSS (for comparison)", charge_of("nanny_rss"))
    row("launch → registered", med("register_s", secs))
    lines.append("")
    errors = sorted({f"{d['contender']}: {d.get('error')}"[:300] for d in docs if d.get("error")})
    if errors:
        lines += ["Errors seen:", ""] + [f"- `{e}`" for e in errors] + [""]

    # The kernel's ring buffer spans a boot: a round's later runs list its earlier kills
    # too. Each line goes to the first run of its round (rounds rotate the order) that saw it.
    def run_order(d: dict[str, Any]) -> tuple[int, int]:
        r = int(d.get("round", 0))
        return r, (CONTENDERS.index(d["contender"]) - r) % len(CONTENDERS)

    seen: dict[str, str] = {}
    for d in sorted(docs, key=run_order):
        for line in d.get("dmesg_oom", []):
            seen.setdefault(line.strip(), f"{d['contender']} (round {d.get('round', 0)})")
    kills = [f"- {who}: `{line[:200]}`" for line, who in seen.items()]
    if kills:
        lines += ["Kernel log, `Killed process` lines, each under the run that caused it:",
                  "", *kills[:24], ""]  # fmt: skip
    firsts = [by[c][0] for c in cs]
    if plot_vm(firsts, img):
        rel = os.path.relpath(img, report.parent)
        lines += [f"![memory against time, small VM, first round]({rel})", ""]
    return lines


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


def fastburst_note(runs: list[RunResult]) -> list[str]:
    """Who stopped the fast burst, per contender, from the counters of every run."""
    out = [
        "The fast burst populates 1.2 × the headroom in one `madvise(MADV_POPULATE_WRITE)` "
        "on transparent huge pages, inside the kernel, after a probe of 512 MiB measured "
        "the rate (row above). Before each burst the benchmark populates and frees the same "
        "size outside M, so that free huge pages exist on this busy host. Who stopped it:",
        "",
    ]
    for c in CONTENDERS:
        rs = [r for r in runs if r.contender == c]
        if not rs:
            continue
        kw, km = sum(r.oom_kills_w for r in rs), sum(r.oom_kills_m for r in rs)
        restarts = sum(r.memory_restarts for r in rs)
        alive = (
            f"agent {sum(r.agent_alive for r in rs)}/{len(rs)}, scheduler "
            f"{sum(r.scheduler_alive for r in rs)}/{len(rs)}, nanny "
            f"{sum(r.nanny_alive for r in rs)}/{len(rs)}, PID 1 "
            f"{sum(r.init_alive for r in rs)}/{len(rs)}"
        )
        out.append(
            f"- **{c}**: {kw} kernel OOM kills inside W (worker processes: the nanny "
            f"logged {sum(r.killed_by_signal for r in rs)} worker deaths by signal), {km} "
            f"in M outside W, {restarts} nanny memory restarts; alive at the end: {alive}."
        )
    return [*out, ""]


def frontier_section(runs: list[RunResult]) -> list[str]:
    """Efficiency against kills, from the small-M runs (harness.run_frontier)."""
    from .harness import allowance_of

    m_limit = runs[0].m_limit
    contenders = list(dict.fromkeys(r.contender for r in runs))
    lines = [
        "## Efficiency frontier (cgroup v1, small M)",
        "",
        f"The same scenario with M = {fmt_bytes(m_limit)} (the agent still holds "
        f"{fmt_bytes(AGENT_BYTES)}), so that the worker's headroom is about the small VM's. "
        "Points: the seed (no allowance, Dask limit = kernel limit = headroom) and "
        "dask-safe-worker with `--nanny-allowance` "
        + ", ".join(str(a) for a in FRONTIER_ALLOWANCES)
        + " MiB; spill and burst (`np.ones`), "
        f"{max(r.repeat for r in runs) + 1} run(s) per point and workload, interleaved.",
        "",
        "| point | allowance | budget efficiency | spill: outcome | spill: wall | "
        "kernel OOM kills W / M (spill) | burst: kernel OOM kills W / M | "
        "burst: nanny restarts | agent, scheduler, nanny, PID 1 alive |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in contenders:
        rs = [r for r in runs if r.contender == c]
        sp = [r for r in rs if r.workload == "spill"]
        fb = [r for r in rs if r.workload == "burst"]
        a = allowance_of(c)
        alive = sum(r.agent_alive and r.scheduler_alive and r.nanny_alive and r.init_alive
                    for r in rs)  # fmt: skip
        lines.append(
            f"| {c} | {'none' if a is None else fmt_bytes(a)} | "
            f"{fmt_med_range([r.efficiency for r in rs], lambda v: f'{v:.3f}')} | "
            f"{outcome_cell(sp) if sp else '–'} | "
            f"{fmt_med_range([r.wall_s for r in sp], lambda v: f'{v:.1f} s')} | "
            f"{sum(r.oom_kills_w for r in sp)} / {sum(r.oom_kills_m for r in sp)} | "
            f"{sum(r.oom_kills_w for r in fb)} / {sum(r.oom_kills_m for r in fb)} | "
            f"{sum(r.memory_restarts for r in fb)} | {alive}/{len(rs)} |"
        )
    return [*lines, ""]
