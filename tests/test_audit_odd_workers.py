"""Issue 24 row 7: `dask-safe-audit` survives any worker.

One worker with an odd `distributed.worker.memory.terminate` (`.nan` in a config file,
a value dask cannot parse in the environment), or whose `run` handler answers with
something that is not the audit's report, is one "unknown" row with the reason; the
others are audited as usual, and what the workers send is printed with terminal
control characters escaped. The pure part is a property test over arbitrary plain data
as a report; the end-to-end part runs a real scheduler and real workers on 127.0.0.1.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_safe_worker.cluster_audit.facts import facts_from_report, terminate_fraction
from dask_safe_worker.cluster_audit.render import render_table, result_rows
from dask_safe_worker.cluster_audit.verdicts import (
    EXIT_UNVERIFIED,
    FITS,
    UNKNOWN,
    UNMANAGED,
    exit_code,
    judge,
)
from scheduler_util import scheduler

GiB, MiB = 2**30, 2**20
AUDIT = str(Path(sys.executable).with_name("dask-safe-audit"))


def _report(**changes: Any) -> dict[str, Any]:
    """A worker's report as `remote.collect` makes it, without a plan file."""
    level = {
        "path": "/w",
        "key": "b:1:2",
        "limit": 2 * GiB,
        "own_limit": 2 * GiB,
        "hierarchical_limit": 2 * GiB,
        "working_set": 300 * MiB,
        "headroom": 2 * GiB - 300 * MiB,
    }
    report = {
        "schema": 1,
        "pid": 10,
        "hostname": "h",
        "boot_id": "b",
        "error": None,
        "dask_memory_limit": GiB,
        "terminate_fraction": 0.95,
        "has_nanny": True,
        "plan_file": None,
        "plan": None,
        "plan_error": None,
        "rss": 100 * MiB,
        "mem_total": 16 * GiB,
        "mem_available": 8 * GiB,
        "available": 8 * GiB,
        "levels": [level],
        "warnings": [],
    }
    report.update(changes)
    return report


@pytest.mark.parametrize(
    "value, shown",
    [
        (math.nan, "nan"),  # `.nan` in a YAML config file
        (".nan", "'.nan'"),  # the same in the environment: dask keeps the string
        ("nan", "'nan'"),
        (math.inf, "inf"),
        ("0.95", "'0.95'"),  # a string, which the nanny cannot compare with a number
        (0, "0"),
        (-1.0, "-1.0"),
        ("[1]", "'[1]'"),
    ],
)
def test_a_terminate_fraction_that_cannot_be_judged_is_unknown(value: Any, shown: str) -> None:
    assert terminate_fraction(value)[0] is None
    f = facts_from_report("tcp://x", {"name": "odd"}, _report(terminate_fraction=value))
    [v] = judge([f])
    assert v.verdict == UNKNOWN
    assert v.reasons[0].startswith(f"distributed.worker.memory.terminate is {shown}, not a ")
    assert v.action is not None and "memory.terminate to a fraction such as 0.95" in v.action


def test_terminate_off_and_plain_fractions_are_judged() -> None:
    assert terminate_fraction(False) == (None, None)
    assert terminate_fraction(None) == (None, None)
    assert terminate_fraction(0.95) == (0.95, None)
    assert terminate_fraction(1) == (1.0, None)


@pytest.mark.parametrize(
    "answer, reason",
    [
        (["not", "a", "report"], "the worker answered with a list, not the audit's report"),
        (("raw", "list"), "the worker answered with a tuple, not the audit's report"),
        ("text", "the worker answered with a str, not the audit's report"),
        (7, "the worker answered with a int, not the audit's report"),
    ],
)
def test_an_answer_that_is_no_report_is_unknown(answer: Any, reason: str) -> None:
    f = facts_from_report("tcp://x", {"name": "odd", "memory_limit": GiB}, answer)
    [v] = judge([f])
    assert v.verdict == UNKNOWN and v.reasons[0].startswith(reason)
    assert f.dask_limit == GiB  # the scheduler's view still counts


plain = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(),
        st.text(max_size=8),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
KEYS = [*sorted(_report()), "plan", "pool", "own_limit"]


@given(
    st.dictionaries(st.sampled_from(KEYS), plain, max_size=6),
    st.one_of(st.none(), plain),
    st.lists(st.dictionaries(st.sampled_from(sorted(_report()["levels"][0])), plain), max_size=2),
)
def test_any_report_gives_one_row_and_never_an_exception(
    changes: dict[str, Any], other: Any, levels: list[dict[str, Any]]
) -> None:
    report = {**_report(**changes), "levels": levels or _report()["levels"]}
    good = facts_from_report("tcp://good", {}, _report())
    for answer in (report, other):
        odd = facts_from_report("tcp://odd", {"name": "odd"}, answer)
        verdicts = judge([good, odd])
        rows = result_rows([good, odd], verdicts)
        assert [r["worker"] for r in rows] == ["tcp://good", "tcp://odd"]
        render_table(rows)
        json.dumps(rows)
        exit_code(verdicts)


# --- a real scheduler and real workers on 127.0.0.1 ----------------------------------

LIST_RUN = """
def dask_setup(worker):
    async def run(comm=None, function=None, args=(), wait=True, kwargs=None):
        return {"status": "OK", "result": ["not", "a", "report"]}
    worker.handlers["run"] = run
"""
RAW_RUN = """
def dask_setup(worker):
    async def run(comm=None, function=None, args=(), wait=True, kwargs=None):
        return ["raw", "list"]
    worker.handlers["run"] = run
"""
ODD_NAME = "plain\x1b[31m\x07"


@pytest.mark.e2e
def test_odd_workers_are_unknown_rows_and_the_audit_goes_on(tmp_path: Path) -> None:
    (tmp_path / "nan.yaml").write_text(
        "distributed:\n  worker:\n    memory:\n      terminate: .nan\n"
    )
    (tmp_path / "list_run.py").write_text(LIST_RUN)
    (tmp_path / "raw_run.py").write_text(RAW_RUN)
    workers: list[tuple[list[str], dict[str, str]]] = [
        (["--name", ODD_NAME], {}),
        (["--name", "config-nan"], {"DASK_CONFIG": str(tmp_path / "nan.yaml")}),
        (["--name", "env-nan"], {"DASK_DISTRIBUTED__WORKER__MEMORY__TERMINATE": ".nan"}),
        (["--name", "list-run", "--preload", str(tmp_path / "list_run.py")], {}),
        (["--name", "raw-run", "--preload", str(tmp_path / "raw_run.py")], {}),
    ]
    base = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    procs: list[subprocess.Popen[bytes]] = []
    with scheduler() as address:
        try:
            for args, env in workers:
                argv = [sys.executable, "-m", "distributed.cli.dask_worker", address]
                argv += ["--host", "127.0.0.1", "--nthreads", "1", "--no-nanny"]
                argv += ["--no-dashboard", "--memory-limit", "256MiB", *args]
                procs.append(
                    subprocess.Popen(
                        argv,
                        env={**base, **env},
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            deadline = time.monotonic() + 180
            while True:
                r = subprocess.run(
                    [AUDIT, address, "--json"], capture_output=True, text=True, timeout=120
                )
                assert "Traceback" not in r.stderr, r.stderr
                doc = json.loads(r.stdout)
                if len(doc["workers"]) == len(workers) or time.monotonic() > deadline:
                    break
                time.sleep(1)
            table = subprocess.run([AUDIT, address], capture_output=True, text=True, timeout=120)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    (tmp_path / "audit.json").write_text(r.stdout)
    (tmp_path / "audit.txt").write_text(table.stdout)
    rows = {row["name"]: row for row in doc["workers"]}
    assert sorted(rows) == sorted(args[1] for args, _ in workers)
    # Nothing at risk, but not every worker verified: 3, not the traceback's 1.
    assert r.returncode == EXIT_UNVERIFIED == doc["exit_code"], r.stderr
    plain_row = rows[ODD_NAME]
    assert (plain_row["verdict"], plain_row["risk"]) == (UNMANAGED, FITS)
    for name, shown in (("config-nan", "nan"), ("env-nan", "'.nan'")):
        row = rows[name]
        assert row["verdict"] == UNKNOWN, row
        assert row["reasons"][0].startswith(f"distributed.worker.memory.terminate is {shown}")
        assert row["dask_memory_limit"] == 256 * MiB
    assert rows["list-run"]["verdict"] == UNKNOWN
    assert rows["list-run"]["reasons"][0].startswith("the worker answered with a tuple")
    assert rows["raw-run"]["verdict"] == UNKNOWN
    assert rows["raw-run"]["reasons"][0].startswith("the audit function failed")
    assert doc["summary"] == {"safe": 0, "at risk": 0, UNMANAGED: 1, UNKNOWN: 4}

    # The table: every row, and the worker's name with its control characters escaped.
    assert table.returncode == EXIT_UNVERIFIED and "Traceback" not in table.stderr
    assert "\x1b" not in table.stdout and "\x07" not in table.stdout
    assert "plain\\x1b[31m\\x07" in table.stdout
    for name in ("config-nan", "env-nan", "list-run", "raw-run"):
        assert any(
            line.startswith(name) and line.endswith(UNKNOWN) for line in table.stdout.splitlines()
        ), table.stdout


def test_troubleshooting_quotes_the_unknown_reasons() -> None:
    from dask_safe_worker.cluster_audit.facts import TERMINATE_FIX

    doc = (Path(__file__).resolve().parent.parent / "docs" / "troubleshooting.md").read_text()
    reason = terminate_fraction(math.nan)[1]
    assert reason is not None and f"  - {reason}\n" in doc
    assert f"  what to do: {TERMINATE_FIX}\n" in doc
    answered = facts_from_report("tcp://x", {}, ("raw",)).error
    assert answered is not None and f'"{answered}"' in doc.replace("\n", " ")
