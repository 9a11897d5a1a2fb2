"""`dask-safe-audit`: the pure verdict logic, the worker-side collector, and a real cluster
with a safe, an unmanaged and an at-risk worker in test cgroups on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cgroup_util import KernelCgroup
from dask_safe_worker import options
from dask_safe_worker.cluster_audit import remote as audit_remote
from dask_safe_worker.cluster_audit.client import scheduler_file_address
from dask_safe_worker.cluster_audit.facts import facts_from_report
from dask_safe_worker.cluster_audit.render import render_table, result_rows
from dask_safe_worker.cluster_audit.verdicts import (
    AT_RISK,
    AUDIT_SCHEMA,
    EXIT_AT_RISK,
    EXIT_SAFE,
    EXIT_UNVERIFIED,
    EXIT_USAGE,
    FITS,
    SAFE,
    UNKNOWN,
    UNMANAGED,
    Constraint,
    Verdict,
    WorkerFacts,
    exit_code,
    judge,
)
from dask_safe_worker.sizes import format_bytes
from scheduler_util import free_port, scheduler_argv, wait_listening

GiB, MiB = 2**30, 2**20
AUDIT = str(Path(sys.executable).with_name("dask-safe-audit"))
DSW = [sys.executable, "-m", "dask_safe_worker"]
HOST = Constraint("host:boot", "host", None, 20 * GiB)


def worker(
    address: str = "tcp://w",
    *,
    dask_limit: int | None = 800 * MiB,
    rss: int = 100 * MiB,
    nanny_room: int = 96 * MiB,
    managed: bool = True,
    constraints: tuple[Constraint, ...] = (HOST,),
    terminate: float | None = 0.95,
    error: str | None = None,
) -> WorkerFacts:
    limits = [c.limit for c in constraints if c.limit is not None]
    return WorkerFacts(
        address,
        "h",
        dask_limit=dask_limit,
        rss=rss,
        terminate_fraction=terminate,
        nanny_room=nanny_room,
        managed=managed,
        kernel_limit=min(limits) if limits else None,
        constraints=constraints,
        error=error,
    )


# --- the pure verdict logic -------------------------------------------------------


def test_planned_worker_within_its_cgroup_is_safe() -> None:
    cg = Constraint("cg:w", "/w", GiB, GiB - 200 * MiB)
    [v] = judge([worker(constraints=(HOST, cg))])
    assert v == Verdict("tcp://w", SAFE, None, ())


def test_agent_growth_makes_a_managed_worker_at_risk() -> None:
    # The kernel limit still fits, but only 100 MiB is free now where 660 MiB may come.
    parent = Constraint("cg:m", "/m", GiB, 100 * MiB)
    [v] = judge([worker(constraints=(HOST, parent))])
    assert v.verdict == AT_RISK
    assert any("available now in cgroup /m" in r for r in v.reasons)


def test_kernel_limit_below_dask_threshold_is_at_risk() -> None:
    # Dask's own limit of MemTotal inside a 1 GiB cgroup: the seed's failure.
    cg = Constraint("cg:u", "/u", GiB, GiB - 100 * MiB)
    [v] = judge([worker(dask_limit=12 * GiB, managed=False, constraints=(HOST, cg))])
    assert (v.verdict, v.risk) == (UNMANAGED, AT_RISK)
    assert any("kernel limit" in r and "cgroup /u" in r for r in v.reasons)


def test_workers_sharing_a_cgroup_are_judged_together() -> None:
    # Each alone fits in the 1 GiB cgroup; two of them at the same limit do not.
    cg = Constraint("cg:shared", "/shared", GiB, GiB - 100 * MiB)
    alone = judge([worker(dask_limit=600 * MiB, constraints=(HOST, cg))])
    both = judge(
        [
            worker("tcp://a", dask_limit=600 * MiB, constraints=(HOST, cg)),
            worker("tcp://b", dask_limit=600 * MiB, constraints=(HOST, cg)),
        ]
    )
    assert [v.verdict for v in alone] == [SAFE]
    assert [v.verdict for v in both] == [AT_RISK, AT_RISK]


def test_separate_cgroups_do_not_add_up() -> None:
    a = Constraint("cg:a", "/a", GiB, GiB - 100 * MiB)
    b = Constraint("cg:b", "/b", GiB, GiB - 100 * MiB)
    verdicts = judge(
        [
            worker("tcp://a", dask_limit=600 * MiB, constraints=(HOST, a)),
            worker("tcp://b", dask_limit=600 * MiB, constraints=(HOST, b)),
        ]
    )
    assert [v.verdict for v in verdicts] == [SAFE, SAFE]


def test_inner_kernel_limit_caps_a_workers_demand_on_the_host() -> None:
    # The unmanaged worker claims 12 GiB but its cgroup holds it to 1 GiB, so the
    # safe worker beside it on a host with 2 GiB free stays safe.
    small_host = Constraint("host:boot", "host", None, 2 * GiB)
    u = Constraint("cg:u", "/u", GiB, GiB - 100 * MiB)
    s = Constraint("cg:s", "/s", GiB, GiB - 100 * MiB)
    verdicts = judge(
        [
            worker("tcp://u", dask_limit=12 * GiB, managed=False, constraints=(small_host, u)),
            worker("tcp://s", dask_limit=600 * MiB, constraints=(small_host, s)),
        ]
    )
    assert (verdicts[0].verdict, verdicts[0].risk) == (UNMANAGED, AT_RISK)
    assert verdicts[1].verdict == SAFE


def test_no_dask_limit_or_no_terminate_is_at_risk() -> None:
    assert judge([worker(dask_limit=None)])[0].verdict == AT_RISK
    assert judge([worker(terminate=None)])[0].verdict == AT_RISK


def test_unmeasured_worker_is_unknown_and_does_not_count() -> None:
    cg = Constraint("cg:shared", "/shared", GiB, GiB - 100 * MiB)
    verdicts = judge(
        [
            worker("tcp://a", dask_limit=600 * MiB, constraints=(HOST, cg)),
            worker("tcp://b", error="cannot measure memory: boom", constraints=(HOST, cg)),
        ]
    )
    assert [v.verdict for v in verdicts] == [SAFE, UNKNOWN]
    assert verdicts[1].reasons[0] == "cannot measure memory: boom"


def test_exit_codes() -> None:
    safe = Verdict("a", SAFE, None)
    risky = Verdict("b", AT_RISK, None)
    fits = Verdict("c", UNMANAGED, FITS)
    unmanaged_risky = Verdict("d", UNMANAGED, AT_RISK)
    unknown = Verdict("e", UNKNOWN, None)
    assert exit_code([safe, safe]) == EXIT_SAFE == 0
    assert exit_code([safe, risky, unknown]) == EXIT_AT_RISK == 1
    assert exit_code([safe, unmanaged_risky]) == EXIT_AT_RISK
    assert exit_code([safe, fits]) == EXIT_UNVERIFIED == 3
    assert exit_code([safe, unknown]) == EXIT_UNVERIFIED
    assert exit_code([]) == EXIT_UNVERIFIED


sizes = st.integers(min_value=0, max_value=64 * GiB)
constraint_lists = st.lists(
    st.builds(
        Constraint,
        key=st.sampled_from(["cg:a", "cg:b", "cg:c"]),
        name=st.just("/x"),
        limit=st.one_of(st.none(), sizes),
        headroom=st.one_of(st.none(), sizes),
    ),
    max_size=3,
    unique_by=lambda c: c.key,
)
facts = st.builds(
    worker,
    address=st.text(min_size=1, max_size=5),
    dask_limit=st.one_of(st.none(), st.integers(min_value=1, max_value=64 * GiB)),
    rss=sizes,
    nanny_room=st.integers(min_value=0, max_value=GiB),
    managed=st.booleans(),
    constraints=constraint_lists.map(lambda cs: (HOST, *cs)),
    terminate=st.one_of(st.none(), st.floats(min_value=0.5, max_value=1.0)),
)


@given(st.lists(facts, max_size=6))
def test_verdict_shape(ws: list[WorkerFacts]) -> None:
    verdicts = judge(ws)
    assert [v.address for v in verdicts] == [w.address for w in ws]
    for w, v in zip(ws, verdicts, strict=True):
        if w.managed:
            assert v.verdict in (SAFE, AT_RISK) and v.risk is None
        else:
            assert v.verdict == UNMANAGED and v.risk in (FITS, AT_RISK)
        # A problem is always explained.
        assert v.at_risk == (v.verdict == AT_RISK or v.risk == AT_RISK)
        if v.at_risk:
            assert v.reasons
    code = exit_code(verdicts)
    assert (code == EXIT_AT_RISK) == any(v.at_risk for v in verdicts)
    assert (code == EXIT_SAFE) == (bool(verdicts) and all(v.verdict == SAFE for v in verdicts))


@given(st.lists(facts, min_size=1, max_size=5), facts)
def test_another_worker_never_makes_one_safer(ws: list[WorkerFacts], extra: WorkerFacts) -> None:
    before = judge(ws)
    after = judge([*ws, extra])[: len(ws)]
    for b, a in zip(before, after, strict=True):
        if b.at_risk:
            assert a.at_risk


@given(facts, st.integers(min_value=0, max_value=8 * GiB))
def test_less_headroom_never_makes_a_worker_safer(w: WorkerFacts, cut: int) -> None:
    shrunk = tuple(
        c if c.headroom is None else Constraint(c.key, c.name, c.limit, max(0, c.headroom - cut))
        for c in w.constraints
    )
    before = judge([w])[0]
    after = judge([WorkerFacts(**{**w.__dict__, "constraints": shrunk})])[0]
    if before.at_risk:
        assert after.at_risk


def test_a_safe_worker_at_risk_names_its_unmanaged_neighbour_and_what_to_do() -> None:
    parent = Constraint("cg:p", "/p", 4 * GiB, 3 * GiB)
    plain = WorkerFacts(
        "tcp://u", "h", "plain", dask_limit=23 * GiB, rss=100 * MiB, managed=False,
        kernel_limit=4 * GiB, constraints=(HOST, parent),
    )  # fmt: skip
    safe = WorkerFacts(
        "tcp://s", "h", "safe", dask_limit=3 * GiB, rss=100 * MiB, nanny_room=96 * MiB,
        managed=True, kernel_limit=4 * GiB, constraints=(HOST, parent),
    )  # fmt: skip
    u, v = judge([plain, safe])
    assert v.verdict == AT_RISK
    assert any("sharing it: plain (unmanaged, Dask limit 23.00 GiB)" in r for r in v.reasons)
    assert v.action is not None
    assert v.action.startswith("fix the unmanaged worker(s) beside it (plain)")
    assert "restart this worker to re-plan" in v.action
    assert (u.verdict, u.risk) == (UNMANAGED, AT_RISK)
    assert u.action is not None and "start this worker with dask-safe-worker" in u.action
    assert any("sharing it: safe (Dask limit 3.00 GiB)" in r for r in u.reasons)


def test_actions_follow_the_cause() -> None:
    shrunk = Constraint("cg:m", "/m", GiB, 100 * MiB)
    [grown] = judge([worker(constraints=(HOST, shrunk))])
    assert grown.action is not None
    assert "plan is made once at start" in grown.action and "--reserve" in grown.action
    cg = Constraint("cg:shared", "/shared", GiB, GiB - 100 * MiB)
    pair = judge(
        [
            worker("tcp://a", dask_limit=600 * MiB, constraints=(HOST, cg)),
            worker("tcp://b", dask_limit=600 * MiB, constraints=(HOST, cg)),
        ]
    )
    assert all(v.action and "planned separately" in v.action for v in pair)
    [off] = judge([worker(terminate=None)])
    assert off.action is not None and "memory.terminate back to 0.95" in off.action
    [fine] = judge([worker()])
    assert fine.action is None
    [blind] = judge([worker(error="dask-safe-worker is not installed on this worker (x)")])
    assert blind.action is not None and "install dask-safe-worker" in blind.action


def _level(path: str, own: int | None, hierarchical: int | None, ws: int) -> dict[str, Any]:
    limits = [v for v in (own, hierarchical) if v is not None]
    effective = min(limits) if limits else None
    return {
        "path": path,
        "key": f"k:{path}",
        "limit": effective,
        "own_limit": own,
        "hierarchical_limit": hierarchical,
        "working_set": ws,
        "headroom": None if effective is None else effective - ws,
    }


def _report(levels: list[dict[str, Any]]) -> dict[str, Any]:
    return {"hostname": "h", "boot_id": "b", "mem_available": 20 * GiB, "levels": levels}


def test_v1_inherited_limit_is_the_parents() -> None:
    # An unlimited child of a 4 GiB cgroup: v1 shows 4 GiB as the child's hierarchical
    # limit, but the parent sets it.
    report = _report(
        [
            _level("/p/child", None, 4 * GiB, 200 * MiB),
            _level("/p", 4 * GiB, 4 * GiB, GiB),
            _level("/", None, None, 5 * GiB),
        ]
    )
    f = facts_from_report("tcp://x", {}, report)
    assert (f.kernel_limit, f.kernel_limit_path) == (4 * GiB, "/p")
    assert [c.name for c in f.constraints] == ["host", "/p"]
    assert f.constraints[1].headroom == 3 * GiB
    # A limit of the child's own that is lower is the child's.
    report["levels"][0] = _level("/p/child", GiB, GiB, 200 * MiB)
    f = facts_from_report("tcp://x", {}, report)
    assert (f.kernel_limit, f.kernel_limit_path) == (GiB, "/p/child")
    assert [c.name for c in f.constraints] == ["host", "/p/child", "/p"]


def test_v1_limit_above_the_visible_root_is_kept() -> None:
    # In a container, the limit may sit on a host-side parent we cannot see.
    report = _report([_level("/", None, 2 * GiB, 500 * MiB)])
    f = facts_from_report("tcp://x", {}, report)
    assert f.kernel_limit == 2 * GiB
    assert f.kernel_limit_path == "above / (not visible here)"
    assert f.constraints[-1].headroom == 2 * GiB - 500 * MiB


@given(
    own=st.lists(st.one_of(st.none(), st.integers(1, 64 * GiB)), min_size=1, max_size=5),
    above=st.one_of(st.none(), st.integers(1, 64 * GiB)),
)
def test_kernel_limit_is_the_smallest_limit_any_level_sets(
    own: list[int | None], above: int | None
) -> None:
    # v1's hierarchical limit at each level: the smallest own limit there or above.
    levels = []
    for i, value in enumerate(own):
        candidates = [v for v in (*own[i:], above) if v is not None]
        levels.append(_level(f"/l{i}", value, min(candidates) if candidates else None, 0))
    f = facts_from_report("tcp://x", {}, _report(levels))
    every = [v for v in (*own, above) if v is not None]
    assert f.kernel_limit == (min(every) if every else None)
    if f.kernel_limit is not None:
        setter = next((i for i, v in enumerate(own) if v == f.kernel_limit), None)
        expected = (
            f"/l{setter}" if setter is not None else f"above /l{len(own) - 1} (not visible here)"
        )
        assert f.kernel_limit_path == expected
    # No cgroup is listed with a limit it only inherits.
    names = {c.name: c.limit for c in f.constraints if c.name != "host"}
    for i, value in enumerate(own):
        assert names.get(f"/l{i}") == value


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty"),
        ("  \n", "is empty"),
        ('{"address": "tcp://', "is not valid JSON"),
        ("[1, 2]", "holds JSON list, not an object"),
        ('{"id": "Scheduler-1"}', 'has no "address"'),
        ('{"address": 8786}', 'has no "address"'),
    ],
)
def test_scheduler_file_address_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        scheduler_file_address(text)
    assert scheduler_file_address('{"address": "tcp://127.0.0.1:1"}') == "tcp://127.0.0.1:1"


# --- what runs on the worker, run here in-process against the real /proc and /sys ----


def test_plan_file_env_is_the_one_the_entrypoint_exports() -> None:
    assert audit_remote.PLAN_FILE_ENV == options.PLAN_EXPORT_ENV
    assert audit_remote.LEGACY_PLAN_FILE_ENV == options.PLAN_FILE_ENV


def test_collect_reads_the_plan_file_and_measures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dry = subprocess.run(
        [*DSW, "--dry-run", "--cgroup-write", "never", "tcp://127.0.0.1:1", "--nthreads", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(dry.stdout)
    monkeypatch.setenv(audit_remote.PLAN_FILE_ENV, str(plan_file))
    report = audit_remote.collect(None)
    assert report["error"] is None
    assert report["plan"]["per_worker"] == json.loads(dry.stdout)["plan"]["per_worker"]
    assert "argv" not in report["plan"]
    assert 0 < report["available"] <= report["mem_available"] <= report["mem_total"]
    assert report["levels"] and all(lvl["key"] for lvl in report["levels"])
    json.dumps(report)  # plain data only

    f = facts_from_report("tcp://x", {"host": "127.0.0.1"}, report)
    assert f.managed and f.error is None
    assert f.constraints[0].name == "host"
    assert f.constraints[0].headroom == report["mem_available"]
    # No worker here: Dask's limit is unknown to `collect`, and that is a problem.
    assert judge([f])[0].verdict == AT_RISK


def test_a_followed_worker_is_judged_by_its_live_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dask_safe_worker.follow.live_limit import LIVE_FILE_ENV, LiveLimit, write_live_limit

    assert audit_remote.LIVE_FILE_ENV == LIVE_FILE_ENV
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"plan": {"effective_per_worker": 900, "budget": 2000}}))
    live = tmp_path / "live.json"
    write_live_limit(str(live), LiveLimit(3, 600, 1500, 1.0, 0.0))
    monkeypatch.setenv(audit_remote.PLAN_FILE_ENV, str(plan_file))
    monkeypatch.setenv(LIVE_FILE_ENV, str(live))
    _, plan, error = audit_remote._read_plan()
    assert error is None and plan is not None
    assert (plan["effective_per_worker"], plan["start_per_worker"]) == (600, 900)
    assert (plan["budget"], plan["follow_generation"]) == (1500, 3)
    live.write_text("garbage")
    _, plan, _ = audit_remote._read_plan()
    assert plan is not None and plan["effective_per_worker"] == 900


def test_collect_without_plan_file_and_unreadable_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(audit_remote.PLAN_FILE_ENV, raising=False)
    monkeypatch.delenv(audit_remote.LEGACY_PLAN_FILE_ENV, raising=False)
    report = audit_remote.collect(None)
    assert report["plan_file"] is None and report["plan"] is None
    assert not facts_from_report("tcp://x", {}, report).managed

    monkeypatch.setenv(audit_remote.PLAN_FILE_ENV, str(tmp_path / "gone.json"))
    report = audit_remote.collect(None)
    f = facts_from_report("tcp://x", {}, report)
    assert f.managed
    assert any("cannot read the plan file" in n for n in f.notes)

    # A worker started by an older release carries the option's variable instead.
    monkeypatch.delenv(audit_remote.PLAN_FILE_ENV)
    plan_file = tmp_path / "old.json"
    plan_file.write_text(json.dumps({"plan": {"effective_per_worker": 900}}))
    monkeypatch.setenv(audit_remote.LEGACY_PLAN_FILE_ENV, str(plan_file))
    report = audit_remote.collect(None)
    assert report["plan_file"] == str(plan_file) and report["plan"]["effective_per_worker"] == 900


class _OldWorker:
    """distributed before 2021.11 kept the limit on the worker itself."""

    memory_limit = 123 * MiB


def test_memory_limit_fallback_for_old_releases() -> None:
    assert audit_remote._dask_memory_limit(_OldWorker()) == (123 * MiB, "worker.memory_limit")
    assert audit_remote._dask_memory_limit(None) == (None, "unavailable")


def test_failed_worker_is_unknown_with_the_schedulers_view() -> None:
    f = facts_from_report("tcp://x", {"host": "10.0.0.1", "memory_limit": GiB}, OSError("gone"))
    assert f.error is not None and "OSError: gone" in f.error
    assert f.dask_limit == GiB
    rows = result_rows([f], judge([f]))
    assert rows[0]["verdict"] == UNKNOWN
    table = render_table(rows)
    assert "unknown" in table and "OSError: gone" in table and "1.00 GiB" in table


# --- the command line: usage and connection errors ------------------------------------


def run_audit(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    return subprocess.run(
        [AUDIT, *args], capture_output=True, text=True, timeout=timeout, env={**base, **(env or {})}
    )


def test_closed_port_exits_2_with_a_message() -> None:
    # Bound but not listening: connections to it are refused, and nobody can take it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        r = run_audit(f"tcp://127.0.0.1:{port}", "--connect-timeout", "2")
    assert r.returncode == EXIT_USAGE
    assert f"cannot connect to tcp://127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "give SCHEDULER_ADDRESS or --scheduler-file, or set DASK_SCHEDULER_ADDRESS"),
        (("--scheduler-file", "/nonexistent/scheduler.json"), "does not exist"),
        (("tcp://127.0.0.1:1", "--connect-timeout", "0"), "--connect-timeout"),
        *[
            (("tcp://127.0.0.1:1", option, value), f"'{value}' is not a finite number")
            for option in ("--timeout", "--connect-timeout")
            for value in ("nan", "inf", "-inf", "NaN")
        ],
        (("tcp://127.0.0.1:1", "--timeout", "soon"), "'soon' is not a number of seconds"),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...], message: str) -> None:
    r = run_audit(*args)
    assert r.returncode == EXIT_USAGE
    assert message in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("variable", ["DASK_SAFE_AUDIT_TIMEOUT", "DASK_SAFE_AUDIT_CONNECT_TIMEOUT"])
def test_nan_timeout_from_the_environment_exits_2(variable: str) -> None:
    r = run_audit("tcp://127.0.0.1:1", env={variable: "nan"})
    assert r.returncode == EXIT_USAGE
    assert "'nan' is not a finite number of seconds above 0" in r.stderr


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b'{"address": "tcp://127.0', "is not valid JSON (Unterminated string"),
        (b"\xff\xfe{", "is not valid JSON"),
        (b'"tcp://127.0.0.1:1"', "holds JSON str, not an object with an address"),
        (b"{}", 'has no "address"'),
    ],
    ids=["empty", "truncated", "binary", "string", "no-address"],
)
def test_bad_scheduler_file_exits_2_with_one_line(
    tmp_path: Path, content: bytes, message: str
) -> None:
    f = tmp_path / "scheduler.json"
    f.write_bytes(content)
    r = run_audit("--scheduler-file", str(f), "--connect-timeout", "2")
    assert r.returncode == EXIT_USAGE
    assert r.stderr.startswith(f"dask-safe-audit: --scheduler-file {f} {message}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""


def test_dask_scheduler_address_is_read_without_an_address() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        address = f"tcp://127.0.0.1:{port}"
        r = run_audit("--connect-timeout", "2", env={"DASK_SCHEDULER_ADDRESS": address})
    assert r.returncode == EXIT_USAGE
    assert f"cannot connect to {address} (from DASK_SCHEDULER_ADDRESS)" in r.stderr


def test_address_and_scheduler_file_together_is_a_usage_error(tmp_path: Path) -> None:
    f = tmp_path / "scheduler.json"
    f.write_text("{}")
    r = run_audit("tcp://127.0.0.1:1", "--scheduler-file", str(f))
    assert r.returncode == EXIT_USAGE
    assert "not both" in r.stderr


# --- a real cluster: safe, unmanaged and at-risk workers --------------------------------

AGENT = """
import sys
held = b"\\x01" * int(sys.argv[1])  # written, so every page is charged to the cgroup
print("ready", flush=True)
sys.stdin.read()
"""


class Cluster:
    """A scheduler on 127.0.0.1 and workers in test cgroups; everything ended by PID."""

    def __init__(self, tmp_path: Path, started: set[int]) -> None:
        self.tmp = tmp_path
        self.started = started
        self.procs: list[subprocess.Popen[str]] = []
        self.cgroups: list[KernelCgroup] = []
        self.scheduler_file = tmp_path / "scheduler.json"
        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        proc = self._spawn(
            scheduler_argv(port, "--scheduler-file", str(self.scheduler_file)), name="scheduler"
        )
        wait_listening(port, proc, timeout=90)

    def _spawn(self, argv: list[str], name: str, stdin: int | None = None) -> subprocess.Popen[str]:
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        self.started.add(proc.pid)
        self.procs.append(proc)
        return proc

    def _worker(
        self, cg: KernelCgroup, command: list[str], name: str, args: tuple[str, ...]
    ) -> None:
        worker_args = [self.address, "--name", name, "--host", "127.0.0.1", "--no-dashboard"]
        self._spawn(cg.enter_command([*command, *worker_args, *args]), name)

    def safe_worker(self, cg: KernelCgroup, name: str, *args: str) -> None:
        plan_file = str(self.tmp / f"{name}.plan.json")
        self._worker(cg, [*DSW, "--log-format", "json", "--plan-file", plan_file], name, args)

    def plain_worker(self, cg: KernelCgroup, name: str, *args: str) -> None:
        self._worker(cg, [sys.executable, "-m", "distributed.cli.dask_worker"], name, args)

    def agent(self, cg: KernelCgroup, nbytes: int) -> None:
        proc = self._spawn(
            cg.enter_command([sys.executable, "-c", AGENT, str(nbytes)]),
            "agent",
            stdin=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", "the agent did not allocate"

    def wait_for_workers(self, n: int) -> dict[str, int]:
        from distributed import Client

        with Client(self.address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(n, timeout=180)
            limits: dict[str, int] = client.run(
                lambda dask_worker: dask_worker.memory_manager.memory_limit
            )
        return limits

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        # Whatever is still inside the test cgroups descends from what we started
        # (a nanny's worker): the cgroup cleanup may end it.
        for cg in self.cgroups:
            with contextlib.suppress(OSError):
                self.started.update(cg.pids())


@pytest.fixture
def cluster(
    kernel_cgroup: KernelCgroup, tmp_path: Path, started_pids: set[int]
) -> Iterator[Cluster]:
    """Set up after (so ended before) the test cgroup that its workers run in."""
    c = Cluster(tmp_path, started_pids)
    try:
        yield c
    finally:
        c.close()


def audit_json(*args: str) -> tuple[int, dict[str, Any]]:
    r = run_audit(*args, "--json")
    assert r.returncode in (0, 1, 3), r.stderr
    return r.returncode, json.loads(r.stdout)


@pytest.mark.e2e
@pytest.mark.kernel
def test_real_cluster_safe_unmanaged_and_at_risk(
    kernel_cgroup: KernelCgroup, cluster: Cluster, tmp_path: Path
) -> None:
    safe_cg = kernel_cgroup.child("safe")
    plain_cg = kernel_cgroup.child("plain")
    m = kernel_cgroup.child("m")
    for cg in (safe_cg, plain_cg, m):
        cg.set_limit(GiB)
    w = m.child("w")
    cluster.cgroups.extend([safe_cg, plain_cg, w, m])

    # 1. Only the safe workers (--nworkers 2 in one cgroup, judged together): exit 0.
    cluster.safe_worker(safe_cg, "safe", "--nthreads", "1", "--nworkers", "2")
    limits = cluster.wait_for_workers(2)
    code, doc = audit_json(cluster.address)
    assert code == EXIT_SAFE, doc
    plan = json.loads((tmp_path / "safe.plan.json").read_text())
    assert sorted(r["name"] for r in doc["workers"]) == ["safe-0", "safe-1"]
    for row in doc["workers"]:
        assert (row["verdict"], row["managed"]) == (SAFE, True)
        assert row["dask_memory_limit"] == limits[row["worker"]]
        assert row["dask_memory_limit"] == plan["plan"]["effective_per_worker"]
        assert row["kernel_limit"] == plan["cgroup_write"]["outcome"]["read_back"] <= GiB
        assert row["kernel_limit_path"] == safe_cg.relative()
    # Both see the same cgroup, so both are counted against its limit.
    keys = [
        {c["key"] for c in r["constraints"] if c["name"] == safe_cg.relative()}
        for r in doc["workers"]
    ]
    assert keys[0] == keys[1] and len(keys[0]) == 1

    # 2. A plain `dask worker` in a 1 GiB cgroup (Dask sizes it from the host's RAM),
    #    and a dask-safe-worker in W below M, then an agent in M eats M's headroom.
    #    The worker keeps its start plan (--no-follow): following would lower its limit.
    cluster.plain_worker(plain_cg, "plain", "--nthreads", "1", "--no-nanny")
    cluster.safe_worker(w, "risky", "--nthreads", "2", "--no-nanny", "--no-follow")
    limits = cluster.wait_for_workers(4)
    risky_plan = json.loads((tmp_path / "risky.plan.json").read_text())["plan"]
    agent_bytes = m.limit() - m.usage() - 100 * MiB
    assert agent_bytes > 0
    # The agent leaves M less headroom than the worker's Dask limit.
    assert m.limit() - m.usage() - agent_bytes < risky_plan["effective_per_worker"]
    cluster.agent(m, agent_bytes)

    code, doc = audit_json("--scheduler-file", str(cluster.scheduler_file))
    rows = {r["name"]: r for r in doc["workers"]}
    assert code == EXIT_AT_RISK
    assert doc["summary"] == {SAFE: 2, AT_RISK: 1, UNMANAGED: 1, UNKNOWN: 0}
    assert {n: r["dask_memory_limit"] for n, r in rows.items()} == {
        n: limits[r["worker"]] for n, r in rows.items()
    }

    assert rows["safe-0"]["verdict"] == rows["safe-1"]["verdict"] == SAFE
    # The safe instance follows (the default), alone in its pool; both workers are its.
    safe_pool = json.loads((tmp_path / "safe.plan.json").read_text())["pool"]
    for name in ("safe-0", "safe-1"):
        assert rows[name]["following"] is True
        assert rows[name]["pool"]["key"] == safe_pool["key"]
        assert rows[name]["pool"]["members"] == [] and rows[name]["pool"]["weight"] == 2
    assert rows["safe-0"]["pool"]["instance"] == rows["safe-1"]["pool"]["instance"]

    plain = rows["plain"]
    assert (plain["verdict"], plain["risk"], plain["managed"]) == (UNMANAGED, AT_RISK, False)
    assert plain["kernel_limit"] == GiB and plain["dask_memory_limit"] > GiB
    assert any(
        f"kernel limit 1.00 GiB of cgroup {plain_cg.relative()}" in r for r in plain["reasons"]
    )

    risky = rows["risky"]
    assert risky["verdict"] == AT_RISK
    assert risky["dask_memory_limit"] == risky_plan["effective_per_worker"]
    assert risky["available"] < risky["dask_memory_limit"]
    assert any(f"available now in cgroup {m.relative()}" in r for r in risky["reasons"])
    assert risky["following"] is False
    assert risky["action"].startswith("the plan is made once at start")

    # The table says the same for people.
    r = run_audit(cluster.address)
    assert r.returncode == EXIT_AT_RISK
    lines = r.stdout.splitlines()
    header = ["WORKER", "HOST", "DASK", "LIMIT", "KERNEL", "LIMIT", "AVAILABLE", "NOW", "VERDICT"]
    assert lines[0].split() == header
    by_name = {line.split()[0]: line for line in lines[1:5]}
    assert by_name["safe-0"].endswith(SAFE) and by_name["safe-1"].endswith(SAFE)
    assert by_name["plain"].endswith("unmanaged (at risk)")
    assert by_name["risky"].endswith(AT_RISK)


@pytest.mark.e2e
@pytest.mark.kernel
def test_real_cluster_v1_inherited_limit_names_the_parent_the_neighbour_and_a_fix(
    kernel_cgroup: KernelCgroup, cluster: Cluster, tmp_path: Path
) -> None:
    """Issue 15.5 as reported: a plain worker in an unlimited child of a 4 GiB cgroup, and a
    dask-safe-worker beside it under the same parent."""
    parent = kernel_cgroup.child("p")
    parent.set_limit(4 * GiB)
    plain_cg = parent.child("plain")
    safe_cg = parent.child("safe")
    cluster.cgroups.extend([plain_cg, safe_cg, parent])
    assert plain_cg.limit() > 4 * GiB, "precondition: the child sets no limit of its own"

    cluster.plain_worker(plain_cg, "plain", "--nthreads", "1", "--no-nanny")
    cluster.safe_worker(safe_cg, "safe", "--nthreads", "1", "--no-nanny")
    cluster.wait_for_workers(2)
    plan = json.loads((tmp_path / "safe.plan.json").read_text())

    # Without an address, DASK_SCHEDULER_ADDRESS, as `dask worker` reads it.
    r = run_audit("--json", env={"DASK_SCHEDULER_ADDRESS": cluster.address})
    assert r.returncode == EXIT_AT_RISK, r.stderr
    doc = json.loads(r.stdout)
    (tmp_path / "audit.json").write_text(r.stdout)
    assert doc["schema"] == AUDIT_SCHEMA
    rows = {row["name"]: row for row in doc["workers"]}

    plain = rows["plain"]
    assert (plain["verdict"], plain["risk"]) == (UNMANAGED, AT_RISK)
    # The 4 GiB is the parent's: the child only inherits it.
    assert (plain["kernel_limit"], plain["kernel_limit_path"]) == (4 * GiB, parent.relative())
    names = [c["name"] for c in plain["constraints"]]
    assert parent.relative() in names and plain_cg.relative() not in names
    assert any(
        f"kernel limit 4.00 GiB of cgroup {parent.relative()}:" in x for x in plain["reasons"]
    )
    assert not any(plain_cg.relative() in x for x in plain["reasons"])
    assert "start this worker with dask-safe-worker" in plain["action"]

    safe = rows["safe"]
    assert safe["managed"] and safe["verdict"] == AT_RISK
    # Its own cgroup holds the limit it wrote, below the parent's.
    read_back = plan["cgroup_write"]["outcome"]["read_back"]
    assert (safe["kernel_limit"], safe["kernel_limit_path"]) == (read_back, safe_cg.relative())
    assert read_back < 4 * GiB
    neighbour = (
        f"sharing it: plain (unmanaged, Dask limit {format_bytes(plain['dask_memory_limit'])})"
    )
    assert any(neighbour in x and parent.relative() in x for x in safe["reasons"])
    assert safe["action"].startswith("fix the unmanaged worker(s) beside it (plain)")

    # The table says the same for people.
    r = run_audit(env={"DASK_SCHEDULER_ADDRESS": cluster.address})
    assert r.returncode == EXIT_AT_RISK
    assert "  what to do: fix the unmanaged worker(s) beside it (plain)" in r.stdout
    table = {line.split()[0]: line for line in r.stdout.splitlines()[1:3]}
    assert "4.00 GiB" in table["plain"]
    (tmp_path / "audit-table.txt").write_text(r.stdout)


@pytest.mark.e2e
@pytest.mark.kernel
def test_real_cluster_instances_of_one_pool_list_each_other_and_fit(
    kernel_cgroup: KernelCgroup, cluster: Cluster, tmp_path: Path
) -> None:
    """Issue 25, the audit: two following instances and one --no-follow instance in one
    2 GiB cgroup share its pool. Each worker's row names its pool, what its instance
    holds and the other instances; together they fit, so none is at risk for sharing."""
    pool_cg = kernel_cgroup.child("pool")
    pool_cg.set_limit(2 * GiB)
    cluster.cgroups.append(pool_cg)
    for n, name in enumerate(("a", "b")):
        cluster.safe_worker(pool_cg, name, "--nthreads", "1")
        cluster.wait_for_workers(n + 1)
    # Last, since a fixed commitment is what the followers share around.
    cluster.safe_worker(pool_cg, "c", "--nthreads", "1", "--no-follow")
    cluster.wait_for_workers(3)
    pids = {name: proc.pid for name, proc in zip("abc", cluster.procs[1:], strict=True)}
    plans = {n: json.loads((tmp_path / f"{n}.plan.json").read_text()) for n in pids}
    assert [plans[n]["following"] for n in "abc"] == [True, True, False]
    key = plans["a"]["pool"]["key"]
    assert key.endswith(pool_cg.relative())
    assert all(p["pool"]["key"] == key for p in plans.values())

    # The followers come down to their shares on their next ticks: audit until then.
    deadline = time.monotonic() + 60
    while True:
        code, doc = audit_json(cluster.address)
        rows = {r["name"]: r for r in doc["workers"]}
        listed = all(len((r["pool"] or {}).get("members", [])) == 2 for r in rows.values())
        if (code == EXIT_SAFE and listed) or time.monotonic() > deadline:
            break
        time.sleep(1)
    (tmp_path / "audit-pool.json").write_text(json.dumps(doc, indent=2))
    assert code == EXIT_SAFE, json.dumps(doc, indent=1)
    assert doc["schema"] == AUDIT_SCHEMA
    claims = {}
    for name, pid in pids.items():
        row = rows[name]
        assert row["verdict"] == SAFE and row["following"] is (name != "c")
        pool = row["pool"]
        assert (pool["key"], pool["instance"], pool["weight"], pool["error"]) == (key, pid, 1, None)
        assert pool["share"] == plans[name]["plan"]["share"]
        assert sorted(m["pid"] for m in pool["members"]) == sorted(set(pids.values()) - {pid})
        claims[pid] = (pool["committed"], pool["fixed"])
        # The pool's limit, or its instance's child's below it (the first instance,
        # alone at its start, keeps the pool's cgroup as its own).
        assert row["kernel_limit"] <= 2 * GiB
        assert (row["kernel_limit_path"] + "/").startswith(pool_cg.relative() + "/")
    # What every worker says of the others is what they say of themselves.
    for row in rows.values():
        for m in row["pool"]["members"]:
            assert m["weight"] == 1
            assert (m["committed"], m["fixed"]) == claims[m["pid"]]
    # The --no-follow instance keeps a fixed commitment; the followers share the rest.
    assert claims[pids["c"]][1] is not None
    assert claims[pids["a"]][1] is None and claims[pids["b"]][1] is None
    assert sum(committed for committed, _ in claims.values()) <= 2 * GiB

    # The table: one line per instance, with the others.
    r = run_audit(cluster.address)
    assert r.returncode == EXIT_SAFE
    lines = [line for line in r.stdout.splitlines() if line.startswith(f"pool {key}: ")]
    assert len(lines) == 3, r.stdout
    line = next(x for x in lines if x.startswith(f"pool {key}: a (pid {pids['a']}, weight 1,"))
    assert "following): holds " in line and f"pid {pids['c']} (weight 1): fixed " in line
    assert f"pid {pids['b']} (weight 1): holds " in line
    assert any(f"c (pid {pids['c']}, weight 1, not following): fixed " in x for x in lines)
    (tmp_path / "audit-pool.json").write_text(json.dumps(doc, indent=2))
    (tmp_path / "audit-pool.txt").write_text(r.stdout)


# --- TLS -------------------------------------------------------------------------------


def make_tls_files(directory: Path) -> list[str]:
    """A throwaway CA and one certificate for 127.0.0.1, as the --tls-* options."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=dask-safe-audit test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "req.csr",
        "-subj", "/CN=127.0.0.1",
    )  # fmt: skip
    (directory / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "authorityKeyIdentifier=keyid\n"
        "subjectKeyIdentifier=hash\n"
    )
    openssl(
        "x509", "-req", "-in", "req.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "cert.pem", "-days", "2", "-extfile", "ext.cnf",
    )  # fmt: skip
    return [
        "--tls-ca-file",
        str(directory / "ca.pem"),
        "--tls-cert",
        str(directory / "cert.pem"),
        "--tls-key",
        str(directory / "key.pem"),
    ]


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_cluster_with_a_worker_lacking_dask_safe_worker(tmp_path: Path) -> None:
    """TLS options reach the client; and a worker that cannot import dask-safe-worker
    still runs the audit function (sent by value) and says why it cannot measure."""
    tls = make_tls_files(tmp_path)
    hide = tmp_path / "hide_dsw.py"
    # As if not installed: any import of the package fails in that worker process.
    hide.write_text('import sys\nsys.modules["dask_safe_worker"] = None\n')
    port = free_port()
    address = f"tls://127.0.0.1:{port}"
    procs = []
    try:
        for argv in (
            [
                "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
                "--protocol", "tls", "--no-dashboard",
            ],
            [
                "distributed.cli.dask_worker", address, "--host", "127.0.0.1", "--nthreads",
                "1", "--no-nanny", "--no-dashboard", "--name", "tls-worker",
            ],
            [
                "distributed.cli.dask_worker", address, "--host", "127.0.0.1", "--nthreads",
                "1", "--no-nanny", "--no-dashboard", "--name", "blind-worker",
                "--preload", str(hide),
            ],
        ):  # fmt: skip
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", *argv, *tls],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + 180
        while True:
            code, doc = audit_json(address, *tls, "--connect-timeout", "5")
            if len(doc["workers"]) == 2 or time.monotonic() > deadline:
                break
            time.sleep(1)
        rows = {r["name"]: r for r in doc["workers"]}
        assert sorted(rows) == ["blind-worker", "tls-worker"]
        assert code == EXIT_UNVERIFIED
        row = rows["tls-worker"]
        assert row["worker"].startswith("tls://127.0.0.1:")
        assert (row["verdict"], row["managed"]) == (UNMANAGED, False)
        assert row["available"] is not None and row["dask_memory_limit"] > 0
        blind = rows["blind-worker"]
        assert blind["verdict"] == UNKNOWN
        assert "dask-safe-worker is not installed on this worker" in blind["reasons"][0]
        # The worker still reported the limit Dask uses, from inside.
        assert blind["dask_memory_limit"] == row["dask_memory_limit"]

        r = run_audit(address, "--connect-timeout", "5")
        assert r.returncode == EXIT_USAGE
        assert "needs --tls-ca-file, --tls-cert and --tls-key" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_oom_group_levels_are_collected_and_shown() -> None:
    # The kubelet's memory.oom.group=1 on the container's cgroup (v2): shown, named.
    container = {**_level("/", 2 * GiB, None, 500 * MiB), "oom_group": True}
    child = {**_level("/dask-safe-worker", GiB, None, 400 * MiB), "oom_group": False}
    f = facts_from_report("tcp://x", {}, _report([child, container]))
    assert f.oom_group == ("/",)
    rows = result_rows([f], judge([f]))
    assert rows[0]["oom_group"] == ["/"]
    table = render_table(rows)
    assert "memory.oom.group=1 at /: one kernel OOM kill" in table
    # Without the flag (v1, or 0 everywhere) nothing is said.
    plain = facts_from_report("tcp://x", {}, _report([_level("/", GiB, None, 0)]))
    assert plain.oom_group == ()
    assert "oom.group" not in render_table(result_rows([plain], judge([plain])))
