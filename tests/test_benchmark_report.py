"""The benchmark report's start-up section is replaced in place, and nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from dswbench.common import REPO
from dswbench.report import STARTUP_HEADING, refresh_startup
from dswbench.startup import StartupResult


def startup(print_limit_ms: float) -> StartupResult:
    return StartupResult(
        register_plain=[2.0, 2.1],
        register_safe=[2.1, 2.2],
        ratios=[1.05, 1.048],
        dry_run_ms=[100.0],
        print_limit_ms=[print_limit_ms],
        start_path_ms=[200.0],
        start_path_nolog_ms=[150.0],
        wrapper_ms=[2.0],
        python_ms=[10.0],
        measured_at="2026-01-01 00:00 UTC",
        commit="abc1234",
    )


def outside(text: str) -> tuple[str, str]:
    start = text.index(f"\n{STARTUP_HEADING}\n")
    end = text.index("\n## ", start + 1)
    return text[:start], text[end:]


def section(text: str) -> str:
    start = text.index(f"\n{STARTUP_HEADING}\n")
    return text[start : text.index("\n## ", start + 1)]


def test_refresh_replaces_the_start_up_section_only(tmp_path: Path) -> None:
    report = tmp_path / "benchmarks.md"
    original = (REPO / "docs" / "benchmarks.md").read_text()
    report.write_text(original)
    refresh_startup(report, startup(print_limit_ms=23.0))
    once = report.read_text()
    assert outside(once) == outside(original)
    assert "| 23 ms | ≤ 60 ms | yes |" in section(once)
    assert "source at commit abc1234" in section(once)
    assert "### Supervisor RSS" in section(once)
    refresh_startup(report, startup(print_limit_ms=91.0))
    twice = report.read_text()
    assert outside(twice) == outside(original)
    assert "| 91 ms | ≤ 60 ms | no |" in section(twice)
    assert "| 23 ms |" not in section(twice)


def _vm_doc(events: list[str], audit: list[str], oom_kill: int, restarts: int) -> dict[str, object]:
    return {
        "workload": "fastburst",
        "round": 0,
        "outcome": "Dask error",
        "w_events": {"oom_kill": oom_kill, "max": 3},
        "memory_restarts": restarts,
        "deaths": {"events": events, "audit": audit, "sentences": ["s"] * len(events)},
    }


def test_deaths_verdict_on_the_v2_vm_runs_counts_memory_events_kills() -> None:
    from deaths_by_cause import Seen, verdict

    both = ["kernel_oom_limit", "nanny_memory_restart"]
    assert verdict(Seen.of_vm(_vm_doc(both, both, 1, 1))) == "right"
    # A kill the kernel counted in W's memory.events that no event explains.
    wrong = Seen.of_vm(_vm_doc(["nanny_memory_restart"], ["nanny_memory_restart"], 1, 1))
    assert verdict(wrong) == "events: 0 kernel_oom_limit, the kernel/log: 1"
    # The audit disagreeing with the events is named.
    assert verdict(Seen.of_vm(_vm_doc(both, both[:1], 1, 1))) == "audit: kernel_oom_limit"
    assert verdict(Seen.of_vm(_vm_doc([], [], 0, 0))) == "no death recorded"
