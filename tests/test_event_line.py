"""The audit line, built in one place (event_line) for the planning process and the
supervisor: stamps, JSON shape, the console rendering, and the worker name."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from dask_safe_worker.dask_compat.dask_worker import WORKER_VALUE_OPTIONS
from dask_safe_worker.event_line import (
    Stamp,
    console_line,
    format_size,
    json_line,
    record,
    worker_name,
)
from dask_safe_worker.events import SCHEMA_VERSION, make_audit, start_id

DSW = [sys.executable, "-m", "dask_safe_worker"]
GiB, MiB = 2**30, 2**20

LEVELS = [
    {"path": "/a/b", "limit": GiB, "usage": 300 * MiB, "working_set": 200 * MiB},
    {"path": "/a", "limit": None, "usage": 2 * GiB, "error": "limit: EACCES"},
]


def test_record_stamps_every_line_and_the_writer_pid_wins() -> None:
    stamp = Stamp("0123456789abcdef", "node-7", "w-1")
    rec = record("cgroup.moved", {"target": "/x", "pid": 1}, stamp)
    assert list(rec) == [
        "target",
        "event",
        "schema",
        "pid",
        "host",
        "start_id",
        "worker_name",
        "level",
        "timestamp",
    ]
    assert rec["pid"] == os.getpid() and rec["schema"] == SCHEMA_VERSION == 3
    assert (rec["host"], rec["start_id"], rec["worker_name"]) == ("node-7", stamp.start_id, "w-1")
    assert record("plan.refused", {}, stamp)["level"] == "warning"
    assert "worker_name" not in record("x.y", {}, Stamp("s", "h"))


def test_the_structlog_writer_builds_the_same_line() -> None:
    out = io.StringIO()
    make_audit("json", out, worker_name="w-2")("measure.done", cgroup_levels=LEVELS, n=1)
    line = json.loads(out.getvalue())
    expected = record("measure.done", {"cgroup_levels": LEVELS, "n": 1}, Stamp(start_id(), "h"))
    assert list(line) == [*list(expected)[:-2], "worker_name", "level", "timestamp"]
    assert line["start_id"] == start_id() and line["host"] == os.uname().nodename
    assert line["cgroup_levels"] == LEVELS and line["worker_name"] == "w-2"


def test_console_is_short_and_in_gib_mib() -> None:
    rec = record(
        "measure.done",
        {"available": 1055948800, "limiting": "/a/b", "cgroup_levels": LEVELS, "warnings": []},
        Stamp("s", "h"),
    )
    text = console_line(rec)
    first, *levels = text.split("\n")
    assert "measure.done" in first and "available=1007.0 MiB" in first
    assert "{" not in text and "'" not in text
    assert (
        levels[0].strip()
        == "cgroup_levels: /a/b limit=1.00 GiB usage=300.0 MiB working_set=200.0 MiB"
    )
    assert "error=limit: EACCES" in levels[1]
    assert json.loads(json_line(rec)) == rec


@given(st.integers(-(2**62), 2**62))
def test_format_size_is_exact_to_its_unit(n: int) -> None:
    text = format_size(n)
    number, unit = text.split(" ")
    scale, decimals = {"B": (1, 0), "KiB": (2**10, 1), "MiB": (2**20, 1), "GiB": (2**30, 2)}[unit]
    # Rounded to its decimals, in the largest unit not above the value.
    assert abs(float(number) * scale - n) <= scale * 0.5 * 10**-decimals * (1 + 1e-9)
    assert scale <= max(abs(n), 1) and (unit == "GiB" or abs(n) < scale * 1024)


names = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12)


@given(
    before=st.lists(
        st.sampled_from([("--nthreads", "2"), ("--no-nanny",), ("tcp://h:1",)]), max_size=4
    ).map(lambda groups: [token for group in groups for token in group]),
    name=names,
    equals=st.booleans(),
)
def test_worker_name_is_read_as_dask_reads_it(before: list[str], name: str, equals: bool) -> None:
    given_name = [f"--name={name}"] if equals else ["--name", name]
    args = [*before, *given_name, "--memory-limit", "--name"]
    # "--name" after --memory-limit is that option's value, not a second name.
    assert worker_name(args, WORKER_VALUE_OPTIONS) == name
    assert worker_name(["--local-directory", "--name", "x"], WORKER_VALUE_OPTIONS) is None
    assert worker_name(["--", "--name", "x"]) is None


def _events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_one_start_id_host_and_worker_name_on_every_line_of_a_start() -> None:
    # The planning process and the supervisor it execs (--init) write the lines of one
    # start; nothing is written to a cgroup.
    argv = [*DSW, "--init", "--cgroup-write", "never", "--log-format", "json"]
    argv += ["--worker-command", "sh -c 'exit 3' sh", "tcp://127.0.0.1:1", "--name", "w-9"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 3, proc.stderr
    events = _events(proc.stderr)
    names = [e["event"] for e in events]
    assert "cli.started" in names and "init.exit" in names
    assert len({e["pid"] for e in events}) == 1, "the supervisor is exec'd: same pid"
    assert len({e["start_id"] for e in events}) == 1
    assert {e["host"] for e in events} == {os.uname().nodename}
    assert {e.get("worker_name") for e in events} == {"w-9"}
    assert {e["schema"] for e in events} == {SCHEMA_VERSION}
    # Two starts, two ids.
    again = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert _events(again.stderr)[0]["start_id"] != events[0]["start_id"]


def test_console_format_from_a_real_run() -> None:
    argv = [*DSW, "--dry-run", "--log-format", "console", "tcp://127.0.0.1:1"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    done = next(i for i, line in enumerate(lines) if " measure.done " in line)
    assert "GiB" in lines[done] or "MiB" in lines[done]
    assert lines[done + 1].startswith("    cgroup_levels: /")
    assert not any("{" in line for line in lines)
    assert not any(" plan.made " in line and "budget=" not in line for line in lines)


def test_console_start_says_what_matters_in_one_line() -> None:
    # A real start (--init, nothing written to a cgroup) in the console format: one
    # summary line; the release's internals stay in the JSON log.
    argv = [*DSW, "--init", "--cgroup-write", "never", "--log-format", "console"]
    argv += ["--worker-command", "sh -c 'exit 3' sh", "tcp://127.0.0.1:1", "--nworkers", "2"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 3, proc.stderr
    summary = [line for line in proc.stderr.splitlines() if " start.summary " in line]
    assert len(summary) == 1, proc.stderr
    text = summary[0].split(" start.summary ", 1)[1]
    assert text.startswith("2 workers of ") and " GiB each, from a budget of " in text
    assert "the host's available memory" in text or "the headroom of cgroup /" in text
    assert ", less a reserve of 0 B; no kernel limit written (--cgroup-write never)" in text
    for internal in ("memory_limit_paths", "nprocs_alias", "own_procs_count", "="):
        assert internal not in text
    assert "memory_limit_paths" not in proc.stderr and "own_procs_count" not in proc.stderr
    json_run = subprocess.run(
        [*argv[:7], "json", *argv[8:]], capture_output=True, text=True, timeout=120, check=False
    )
    events = {e["event"]: e for e in _events(json_run.stderr)}
    assert "memory_limit_paths" in events["dask.release"]
    assert "own_procs_count" in events["measure.done"]
    assert events["start.summary"]["n_workers"] == 2
