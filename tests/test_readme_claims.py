"""The figures README.md quotes are the committed benchmark run's (docs/benchmarks.md).

README.md quotes numbers from that page instead of measuring anything itself; this keeps
each quoted number traceable to the page, so a rerun that changes them makes this fail
until the README is brought in line.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
README = (REPO_ROOT / "README.md").read_text()
BENCHMARKS = (REPO_ROOT / "docs" / "benchmarks.md").read_text()

# A number with a unit, as both pages write them ("16.5 s", "2.19 GiB", "56 ms").
FIGURE = re.compile(r"\b\d+(?:\.\d+)? (?:s|ms|GiB|MiB)\b")


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end)]


def _benchmark_figures() -> set[str]:
    return set(FIGURE.findall(BENCHMARKS))


def test_every_figure_in_the_readmes_benchmark_story_is_on_the_benchmark_page() -> None:
    story = _section(README, "What that looks like", "## Quick start")
    quoted = FIGURE.findall(story)
    assert len(quoted) >= 8, quoted
    missing = [figure for figure in quoted if figure not in _benchmark_figures()]
    assert not missing, f"README quotes figures docs/benchmarks.md does not have: {missing}"


def test_the_checker_catches_a_figure_from_elsewhere() -> None:
    # The claim this test exists for: "finished in 4.6 s" came from no committed run.
    assert "4.6 s" not in _benchmark_figures()
    assert "4.6 s" not in README


def _spill_rows() -> dict[str, list[str]]:
    spill = _section(BENCHMARKS, "### Workload: spill", "![memory against time, spill]")
    return {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
        for line in spill.splitlines()
        if line.startswith("| ") and line.count("|") >= 5
    }


def test_readme_quotes_the_spill_rows_that_say_what_is_shown() -> None:
    rows = _spill_rows()
    plain_kills, safe_kills, _ = rows["kernel OOM kills in W, total (per run)"]
    runs = rows["runs"][0]
    # "6 (2/4)": the total, then each run's count.
    assert f"OOM-killed by the kernel {plain_kills.split()[0]} times in {runs} runs" in README
    assert "never finished" in README and "completed" not in rows["outcome"][0]
    assert safe_kills.split()[0] == "0" and "no kernel OOM kill in any run" in README
    # Every outcome of the safe contender is told, the runs that did not complete too.
    safe_outcomes = rows["outcome"][1]
    if "hung" in safe_outcomes:
        assert "ran out of its 180 s bound" in README
    efficiency = rows["**budget efficiency** (Dask limit ÷ M's headroom)"][1].split()[0]
    assert f"gave Dask {efficiency} of the memory really" in README


def test_start_up_figures_name_the_machine_they_come_from() -> None:
    machine = _section(BENCHMARKS, "## Machine", "## Scenario")
    cpus = re.search(r"(\d+) logical CPUs", machine)
    assert cpus is not None
    assert f"{cpus.group(1)}-core" in README
    assert "cgroup v1" in machine and "cgroup v1" in README
    start_up = _section(BENCHMARKS, "## Start-up cost", "Measured ")
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in start_up.splitlines()
        if line.startswith("| ")
    }
    plain = rows["launch → registered, plain, median (range)"].split(" (")[0]
    safe = rows["launch → registered, safe, median (range)"].split(" (")[0]
    ratio = next(v for k, v in rows.items() if k.startswith("safe / plain")).split()[0]
    print_limit = next(v for k, v in rows.items() if k.startswith("`--print-limit`"))
    for figure in (plain, safe, ratio, print_limit.split(" (")[0]):
        assert figure in README, figure
    assert "expect other numbers on other machines" in " ".join(README.split())
