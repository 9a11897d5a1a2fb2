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
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .common import CONTENDERS, REPO, WORKLOADS
from .harness import RunResult, Series, run_frontier, run_pressure
from .plots import plot_workload
from .report import refresh_startup, vm_scenario_note, vm_tools_ok, write_report
from .startup import StartupResult, measure_startup
from .support import kernel_cgroups_usable


def runs_of(dicts: list[dict[str, Any]]) -> list[RunResult]:
    runs = []
    for d in dicts:
        d["series"] = Series(**d["series"])
        d["processes_in_w"] = [tuple(p) for p in d["processes_in_w"]]
        runs.append(RunResult(**d))
    return runs


def load_raw(path: Path) -> tuple[list[RunResult], StartupResult | None, dict[str, Any]]:
    doc = json.loads(path.read_text())
    runs = runs_of(doc["runs"])
    startup = StartupResult(**doc["startup"]) if doc.get("startup") else None
    return runs, startup, doc.get("meta", {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one spill pair (plain, safe)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help="comma-separated, of " + ",".join(WORKLOADS),
    )
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
        "--frontier",
        type=int,
        default=2,
        help="repeats of the efficiency frontier (small M, allowances); 0: skip",
    )
    parser.add_argument(
        "--only-frontier",
        action="store_true",
        help="run only the frontier and dump it to --frontier-json (no report)",
    )
    parser.add_argument(
        "--frontier-json", type=Path, default=None, help="frontier runs: dump or re-render"
    )
    parser.add_argument(
        "--remeasure-startup",
        action="store_true",
        help="measure the start-up cost again (current code): with --from-json, keep its "
        "runs; without, replace only the start-up section of --out (and dump it to --json)",
    )
    parser.add_argument(
        "--no-vm",
        action="store_true",
        help="skip the v2 'small VM' scenario (full mode runs it when the VM harness works)",
    )
    ns = parser.parse_args(argv)
    if ns.only_frontier:
        if ns.frontier_json is None or ns.frontier < 1:
            parser.error("--only-frontier needs --frontier-json and --frontier >= 1")
        if no_test_cgroups():
            return 2
        with tempfile.TemporaryDirectory(prefix="dsw-bench-") as tmp:
            path = ns.frontier_json

            def dump_frontier(so_far: list[RunResult]) -> None:
                path.write_text(json.dumps([asdict(r) for r in so_far], default=str))

            dump_frontier(run_frontier(ns.frontier, Path(tmp), log, dump_frontier))
        return 0
    if ns.remeasure_startup and not ns.from_json:
        return remeasure_startup_only(ns.pairs, ns.loops, ns.out, ns.json)
    # The command as given, so that the report names the options it was generated with.
    given = [a for a in (sys.argv[1:] if argv is None else argv)]
    command = " ".join(["uv run python benchmarks/pressure.py", *given])
    remeasured = ns.remeasure_startup
    if ns.from_json:
        remeasured = remeasured or bool(
            json.loads(ns.from_json.read_text()).get("meta", {}).get("startup_remeasured")
        )
    if ns.from_json and ns.vm_json:
        first = json.loads(ns.from_json.read_text()).get("meta", {}).get("command", "")
        if "--no-vm" not in first:
            first = "uv run python benchmarks/pressure.py --no-vm --json raw.json"
        rounds = len({d.get("round") for d in json.loads(ns.vm_json.read_text())})
        repeats = 1
        if ns.frontier_json and ns.frontier_json.exists():
            repeats = 1 + max((r["repeat"] for r in json.loads(ns.frontier_json.read_text())),
                              default=0)  # fmt: skip
        command = (
            f"{first}  # v1 and start-up\n"
            "uv run python benchmarks/pressure.py --only-frontier "
            f"--frontier {repeats} --frontier-json f.json\n"
            f"uv run python benchmarks/pressure_vm.py --rounds {rounds} --json vm.json"
            "  # v2 small VM\n"
            "uv run python benchmarks/pressure.py --from-json raw.json --vm-json vm.json"
            + (" --frontier-json f.json" if ns.frontier_json else "")
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
        if no_test_cgroups():
            return 2
        started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        quick = ns.quick
        with tempfile.TemporaryDirectory(prefix="dsw-bench-") as tmp:
            work = Path(tmp)

            def dump(so_far: list[RunResult]) -> None:
                # After every run, in case the series or the start-up part is cut short:
                # runs are the slow part, and --from-json renders what finished.
                if ns.json:
                    ns.json.parent.mkdir(parents=True, exist_ok=True)
                    meta = {"started_at": started_at, "command": command, "quick": ns.quick}
                    raw = {"meta": meta, "runs": [asdict(r) for r in so_far]}
                    ns.json.write_text(json.dumps(raw, default=str))

            workloads = tuple(w for w in ns.workloads.split(",") if w)
            unknown = set(workloads) - set(WORKLOADS)
            if unknown:
                parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
            runs = run_pressure(ns.quick, ns.repeats, work, log, workloads, dump)
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
    frontier: list[RunResult] = []
    if ns.frontier_json and ns.frontier_json.exists():
        frontier = runs_of(json.loads(ns.frontier_json.read_text()))
    elif not (ns.quick or ns.from_json) and ns.frontier > 0:
        with tempfile.TemporaryDirectory(prefix="dsw-bench-") as tmp:
            frontier = run_frontier(ns.frontier, Path(tmp), log)
        if ns.json:
            ns.json.with_suffix(".frontier.json").write_text(
                json.dumps([asdict(r) for r in frontier], default=str)
            )
    vm_docs: list[dict[str, Any]] | None = None
    if ns.vm_json:
        vm_docs = json.loads(ns.vm_json.read_text())
    elif not (ns.no_vm or ns.quick or ns.from_json) and vm_tools_ok():
        import pressure_vm

        vm_docs = pressure_vm.run_rounds(
            list(CONTENDERS), ns.repeats, REPO / ".tmp" / "pressure-vm", 0, log
        )
        if ns.json:
            ns.json.with_suffix(".vm.json").write_text(json.dumps(vm_docs, default=str))
    for workload in WORKLOADS:
        mine = [r for r in runs if r.workload == workload]
        if mine:
            plot_workload(workload, mine, ns.img_dir / f"pressure-{workload}.png")
    write_report(
        ns.out,
        ns.img_dir,
        runs,
        startup,
        command,
        quick,
        started_at,
        vm_scenario_note(),
        vm_docs,
        frontier,
    )
    log(f"wrote {ns.out} and plots in {ns.img_dir}")
    return 0


def remeasure_startup_only(pairs: int, loops: int, out: Path, dump: Path | None) -> int:
    """The start-up section of an existing report, measured again on the current code."""
    if no_test_cgroups():
        return 2
    with tempfile.TemporaryDirectory(prefix="dsw-bench-") as tmp:
        startup = measure_startup(pairs, loops, Path(tmp), log)
    if dump:
        dump.parent.mkdir(parents=True, exist_ok=True)
        dump.write_text(json.dumps({"startup": asdict(startup)}, indent=1, default=str) + "\n")
    refresh_startup(out, startup)
    log(f"replaced the start-up section of {out}")
    return 0


def no_test_cgroups() -> bool:
    """True, with the reason on stderr, when this machine cannot give us test cgroups."""
    reason = kernel_cgroups_usable()
    if reason:
        print(f"pressure.py: cannot create test cgroups: {reason}", file=sys.stderr)
    return bool(reason)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
