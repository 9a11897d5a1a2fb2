"""Every death explained where users look (issue 20), under the pressure benchmark.

The fast burst (512 MiB populated in about 70 ms: the kernel kills the worker at W's limit
before Dask's 100 ms monitor sees it) and the burst (the nanny's memory restart) of
`benchmarks/pressure.py`, run with dask-safe-worker (following, the default) on this
host's cgroup v1, in the same "VM with agents" test cgroup. After each run, the causes as
a user finds them: the scheduler's events (`client.get_events`), the sentences of
`dask_safe_worker.deaths(client)` and the causes `dask-safe-audit --json` lists, against
the kernel's own count (W's `oom_kill`) and the nanny's restarts in the worker's log.

    uv run python benchmarks/deaths_by_cause.py --repeats 2 --json out.json
    uv run python benchmarks/deaths_by_cause.py --from-vm vm.json   # the v2 VM's runs

Prints a Markdown table and, with --json, the runs' summaries; exits 1 when a run's
causes disagree with the kernel's count of kills in W or the nanny's restarts in the
worker's log, in the events or in the audit (`verdict`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dswbench.harness import RunResult, run_retrying

# What each workload is there to cause; on a busy host a populate slow enough for Dask's
# monitor turns a fast burst's kernel kill into a nanny restart, so each run is judged
# against what the kernel and the nanny say happened, not against this.
EXPECTED = {"fastburst": "kernel_oom_limit", "burst": "nanny_memory_restart"}


@dataclass(frozen=True)
class Seen:
    """One run as the table judges it: what the kernel and the nanny counted, and the
    deaths as users found them (`dswbench.harness.deaths_seen`)."""

    workload: str
    repeat: int
    outcome: str
    oom_kills_w: int
    memory_restarts: int
    deaths: dict[str, Any]

    @classmethod
    def of_run(cls, res: RunResult) -> Seen:
        return cls(
            res.workload,
            res.repeat,
            res.outcome,
            res.oom_kills_w,
            res.memory_restarts,
            res.deaths,
        )

    @classmethod
    def of_vm(cls, doc: dict[str, Any]) -> Seen:
        """A run of `benchmarks/pressure_vm.py --workload burst,fastburst` (cgroup v2): the
        kernel's count is W's `memory.events` `oom_kill`."""
        return cls(
            str(doc.get("workload")),
            int(doc.get("round", 0)),
            str(doc.get("outcome")),
            int((doc.get("w_events") or {}).get("oom_kill", 0)),
            int(doc.get("memory_restarts") or 0),
            doc.get("deaths") or {},
        )


def verdict(res: Seen) -> str:
    """'right' when the causes agree with the kernel's count of kills in W and the
    nanny's restarts in the worker's log, in the events and in the audit, with one
    sentence per event; else what is wrong."""
    seen = res.deaths
    events = sorted(seen.get("events", []))
    if not events:
        return "no death recorded"
    truth = {"kernel_oom_limit": res.oom_kills_w, "nanny_memory_restart": res.memory_restarts}
    for cause, count in truth.items():
        if events.count(cause) != count:
            return f"events: {events.count(cause)} {cause}, the kernel/log: {count}"
    if sorted(seen.get("audit", [])) != events:
        return f"audit: {', '.join(seen.get('audit', []))}"
    if len(seen.get("sentences", [])) != len(events):
        return "sentences: not one per event"
    return "right"


def row(res: Seen) -> str:
    seen = res.deaths
    first = seen.get("sentences", ["-"])[0] if seen.get("sentences") else "-"
    return (
        f"| {res.workload} | {res.repeat} | {res.outcome} | {res.oom_kills_w} | "
        f"{res.memory_restarts} | {', '.join(seen.get('events', [])) or '-'} | "
        f"{', '.join(seen.get('audit', [])) or '-'} | {verdict(res)} | {first} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the runs' summaries here")
    parser.add_argument(
        "--from-vm",
        type=Path,
        help="no run: judge the runs of pressure_vm.py --workload burst,fastburst --json FILE",
    )
    args = parser.parse_args(argv)
    if args.from_vm is not None:
        try:
            docs = json.loads(args.from_vm.read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--from-vm {args.from_vm}: {exc}")
        seen = [Seen.of_vm(d) for d in docs if d.get("workload") in EXPECTED]
    else:
        runs: list[RunResult] = []
        with tempfile.TemporaryDirectory(prefix="dsw-deaths-bench-") as tmp:
            for repeat in range(args.repeats):
                for workload in EXPECTED:
                    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
                    runs.append(run_retrying("safe", workload, repeat, Path(tmp), log))
        seen = [Seen.of_run(r) for r in runs]
        if args.json:
            args.json.write_text(json.dumps([r.summary() for r in runs], indent=1, default=str))
    print(
        "| workload | run | outcome | kernel kills in W | nanny restarts (log) "
        "| causes, `client.get_events` | causes, `dask-safe-audit` | | first sentence |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for res in seen:
        print(row(res))
    return 0 if seen and all(verdict(r) == "right" for r in seen) else 1


if __name__ == "__main__":
    sys.exit(main())
