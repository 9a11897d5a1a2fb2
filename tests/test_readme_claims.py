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


def test_readme_quotes_the_spill_rows_that_say_what_is_shown() -> None:
    spill = _section(BENCHMARKS, "### Workload: spill", "![memory against time, spill]")
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
        for line in spill.splitlines()
        if line.startswith("| ") and line.count("|") >= 5
    }
    safe = rows["wall time, median (range)"][1]
    # "16.5 s (14.5 s<en dash>39.7 s)"
    match = re.fullmatch(r"(\S+ s) \((\S+ s)\u2013(\S+ s)\)", safe)
    assert match is not None, safe
    median, low, high = match.groups()
    assert f"in {median} (median; range\n{low}\u2013{high})" in README
    assert rows["outcome"][:2] == ["Dask error \u00d73", "completed \u00d73"]
    assert "`KilledWorker` 3 times out of 3" in README and "completed 3 times out of 3" in README
    assert rows["kernel OOM kills in W, total (per run)"][0] == "12 (4/4/4)"
    assert "OOM-killed by the kernel 4 times per run" in README
    assert rows["kernel OOM kills in W, total (per run)"][1] == "0 (0/0/0)"
    assert "no kernel OOM kill anywhere" in README


def test_start_up_figures_name_the_machine_they_come_from() -> None:
    machine = _section(BENCHMARKS, "## Machine", "## Scenario")
    cpus = re.search(r"(\d+) logical CPUs", machine)
    assert cpus is not None
    assert f"{cpus.group(1)}-core" in README
    assert "cgroup v1" in machine and "cgroup v1" in README
    start_up = _section(BENCHMARKS, "## Start-up cost", "Measured ")
    for figure in ("1.96 s", "1.90 s", "1.031", "56 ms"):
        assert figure in start_up and figure in README, figure
    assert "expect other numbers on\nother machines" in README
