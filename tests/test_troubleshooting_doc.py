"""docs/troubleshooting.md quotes real output: check it against what the code and dask emit."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

from dask_safe_worker import exits
from dask_safe_worker.cgroup import write as cgroup_write
from dask_safe_worker.cluster_audit import verdicts
from release_util import require_distributed_at_least

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "troubleshooting.md").read_text()


def _documented_events() -> set[str]:
    text = (ROOT / "docs" / "audit-log.md").read_text()
    return set(re.findall(r"^### `([a-z_.]+)`$", text, flags=re.M))


def test_audit_lines_are_json_of_documented_events() -> None:
    lines = [
        line
        for block in re.findall(r"```json\n(.*?)\n```", DOC, flags=re.S)
        for line in block.splitlines()
    ]
    assert len(lines) >= 4
    for line in lines:
        event = json.loads(line)
        assert event["event"] in _documented_events()
        assert {"pid", "level", "timestamp", "schema"} <= event.keys()
    outcomes = [json.loads(line) for line in lines if '"cgroup.write.outcome"' in line]
    assert {o["enforced"] for o in outcomes} == {True, False}


def test_the_nanny_and_kernel_lines_are_dasks_own_wording() -> None:
    require_distributed_at_least(2026, 1, "the page quotes the current release's wording")
    import distributed.nanny
    import distributed.worker_memory

    memory = inspect.getsource(distributed.worker_memory)
    assert "% memory budget. " in memory and "Restarting..." in memory
    assert "exceeded 95% memory budget. Restarting..." in DOC
    assert "was killed by signal {-exitcode}" in inspect.getsource(distributed.nanny)
    assert "was killed by signal 9" in DOC and "was killed by signal 15" in DOC


def test_the_required_refusal_is_the_clis_exit_code_and_message() -> None:
    assert exits.EXIT_WRITE_REQUIRED == 4
    assert "--cgroup-write required, but the kernel limit could not be set (EROFS)" in DOC
    assert "$ echo $?\n4\n" in DOC
    source = inspect.getsource(cgroup_write)
    assert "--cgroup-write required, but the kernel limit could not be set" in source


def test_the_audit_example_is_the_audits_wording() -> None:
    source = inspect.getsource(verdicts)
    for phrase in (
        "fix the unmanaged worker(s) beside it",
        "restart this worker to re-plan",
        "is available now in",
        "the kernel kills before Dask restarts",
    ):
        assert phrase in DOC and phrase in source, phrase
    assert (
        "without `--follow` the plan is made once at start"
        in (ROOT / "docs" / "audit-cluster.md").read_text()
    )
    assert "Without `--follow`, dask-safe-worker measures and plans once" in DOC


def test_readme_links_the_page_and_the_page_names_no_machine_path() -> None:
    assert "(docs/troubleshooting.md)" in (ROOT / "README.md").read_text()
    own = [
        line.split(":", 2)[2]
        for line in Path("/proc/self/cgroup").read_text().splitlines()
        if line.count(":") >= 2
    ]
    for path in {p for p in own if p not in ("/", "")} | {str(ROOT)}:
        assert path not in DOC, path
