"""`dask-safe-audit` and the pool that instances on one host share (issue 25, the audit):
the worker side reads the live claims without changing them; facts, verdicts and output
over reports; the documented JSON is what the audit prints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_safe_worker.cgroup.pool import Member, Pool, claim_text
from dask_safe_worker.cluster_audit import remote
from dask_safe_worker.cluster_audit.deaths import death_rows
from dask_safe_worker.cluster_audit.facts import facts_from_report
from dask_safe_worker.cluster_audit.render import printable, render_table, result_rows
from dask_safe_worker.cluster_audit.verdicts import (
    AT_RISK,
    AUDIT_SCHEMA,
    SAFE,
    Constraint,
    PoolFacts,
    PoolMember,
    WorkerFacts,
    judge,
)

GiB, MiB = 2**30, 2**20
ROOT = Path(__file__).resolve().parent.parent
HOST = Constraint("host:boot", "host", None, 20 * GiB)
POOL = Constraint("cg:pool", "/pool", 2 * GiB, 2 * GiB - 300 * MiB)
KEY = "v1:/pool"


def child(name: str, limit: int, headroom: int | None = None) -> Constraint:
    return Constraint(
        f"cg:{name}", f"/pool/{name}", limit, limit - 100 * MiB if headroom is None else headroom
    )


def follower(
    address: str,
    own: Constraint,
    *,
    dask_limit: int = 800 * MiB,
    following: bool | None = True,
    fixed_limit: bool = False,
    pool: PoolFacts | None = None,
    outer: Constraint = POOL,
    managed: bool = True,
) -> WorkerFacts:
    return WorkerFacts(
        address,
        "h",
        address.rsplit("/", 1)[-1],
        dask_limit=dask_limit,
        rss=100 * MiB,
        nanny_room=56 * MiB,
        managed=managed,
        kernel_limit=own.limit,
        constraints=(HOST, own, outer),
        following=following,
        memory_limit_fixed=fixed_limit,
        pool=pool,
    )


# --- the rule: what a worker may ask of a constraint is capped below it ---------------


def test_instances_that_fit_their_pool_are_not_at_risk_for_sharing_it() -> None:
    # Two instances' children under a 2 GiB pool, 1 GiB each: the kernel limits fit.
    # One asks Dask for 1.5 GiB inside its 1 GiB child: that instance is at risk at its
    # own child, and its demand on the pool is its kernel limit, not its Dask limit.
    a = follower("tcp://a", child("a", GiB), dask_limit=800 * MiB)
    b = follower("tcp://b", child("b", GiB), dask_limit=1536 * MiB)
    va, vb = judge([a, b])
    assert va.verdict == SAFE, va.reasons
    assert vb.verdict == AT_RISK
    assert all("/pool/b" in r for r in vb.reasons if "kernel limit" in r)
    assert not any("cgroup /pool:" in r or "cgroup /pool;" in r for r in vb.reasons)
    # Summed without the cap, the two Dask thresholds (2.16 GiB) exceed the pool.
    assert 0.95 * (800 + 1536) * MiB > 2 * GiB


def test_children_that_together_overfill_the_pool_are_at_risk() -> None:
    # Kernel limits of 1.25 GiB each in a 2 GiB pool: the pool is too small for them.
    a = follower("tcp://a", child("a", 1280 * MiB), dask_limit=1100 * MiB)
    b = follower("tcp://b", child("b", 1280 * MiB), dask_limit=1100 * MiB)
    va, vb = judge([a, b])
    assert va.verdict == vb.verdict == AT_RISK
    assert any("above the kernel limit 2.00 GiB of cgroup /pool" in r for r in va.reasons)


def test_what_may_still_grow_is_capped_by_the_childs_headroom() -> None:
    # Each may grow by 660 MiB to Dask's threshold, but a's child has only 200 MiB left:
    # a is at risk there, and asks at most 200 MiB of the pool; with b's 660 MiB that
    # fits the pool's 900 MiB.
    pool = Constraint("cg:pool", "/pool", 2 * GiB, 900 * MiB)
    a = follower("tcp://a", child("a", GiB, 200 * MiB), outer=pool)
    b = follower("tcp://b", child("b", GiB), outer=pool)
    va, vb = judge([a, b])
    assert (va.verdict, vb.verdict) == (AT_RISK, SAFE)
    assert next(r for r in va.reasons if "available now" in r).endswith("in cgroup /pool/a")
    # With room in the children, the pool's headroom is what is short.
    a = follower("tcp://a", child("a", GiB), outer=pool)
    b = follower("tcp://b", child("b", GiB), outer=pool)
    verdicts = judge([a, b])
    assert [v.verdict for v in verdicts] == [AT_RISK, AT_RISK]
    assert any("available now in cgroup /pool" in r for r in verdicts[0].reasons)


# --- what to do: a worker that follows is not told to restart --------------------------


def test_a_following_worker_is_told_it_follows_and_what_is_left() -> None:
    squeezed = Constraint("cg:pool", "/pool", 2 * GiB, 100 * MiB)
    [v] = judge([follower("tcp://a", child("a", GiB), outer=squeezed)])
    assert v.verdict == AT_RISK and v.action is not None
    assert v.action.startswith("it follows live")
    assert "a restart changes nothing" in v.action
    assert "the pool is too small for its instances" in v.action
    assert "give the pool more memory, or start fewer instances" in v.action
    assert "plan is made once at start" not in v.action
    assert "re-plan" not in v.action


def test_old_plan_files_and_no_follow_keep_the_restart_advice() -> None:
    squeezed = Constraint("cg:pool", "/pool", 2 * GiB, 100 * MiB)
    for following in (None, False):
        [v] = judge([follower("tcp://a", child("a", GiB), outer=squeezed, following=following)])
        assert v.action is not None
        assert v.action.startswith("the plan is made once at start and other processes")
    pair = judge(
        [
            follower("tcp://a", child("a", 1280 * MiB), dask_limit=1100 * MiB, following=None),
            follower("tcp://b", child("b", 1280 * MiB), dask_limit=1100 * MiB, following=None),
        ]
    )
    assert all(v.action and "planned separately" in v.action for v in pair)


def test_a_following_worker_names_what_cannot_move_beside_it() -> None:
    squeezed = Constraint("cg:pool", "/pool", 2 * GiB, 100 * MiB)
    a = follower("tcp://a", child("a", GiB), outer=squeezed)
    static = follower("tcp://static", child("s", GiB), outer=squeezed, following=False)
    plain = follower("tcp://plain", child("p", GiB), outer=squeezed, managed=False)
    va, vs = judge([a, static])
    assert va.action is not None and va.action.startswith("it follows live")
    assert "the worker(s) beside it (static) keep a fixed plan" in va.action
    assert vs.action is not None and "plan is made once at start" in vs.action
    va, _ = judge([a, plain])
    assert va.action is not None
    assert va.action.startswith("fix the unmanaged worker(s) beside it (plain)")
    assert va.action.endswith("a restart changes nothing")
    # An instance whose claim keeps a fixed commitment does not move either.
    fixed_claim = PoolFacts(KEY, instance=7, weight=1, committed=GiB, fixed=GiB)
    held = replace(static, following=True, pool=fixed_claim)
    va, _ = judge([a, held])
    assert va.action is not None and "(static) keep a fixed plan" in va.action


def test_an_explicit_memory_limit_that_follows_is_told_so() -> None:
    squeezed = Constraint("cg:pool", "/pool", 2 * GiB, 100 * MiB)
    [v] = judge([follower("tcp://a", child("a", GiB), outer=squeezed, fixed_limit=True)])
    assert v.action is not None
    assert v.action.startswith("its explicit --memory-limit is a fixed commitment")


workers = st.builds(
    follower,
    address=st.sampled_from(["tcp://a", "tcp://b", "tcp://c"]),
    own=st.builds(
        child,
        name=st.sampled_from(["a", "b"]),
        limit=st.integers(256 * MiB, 3 * GiB),
        headroom=st.one_of(st.none(), st.integers(0, 3 * GiB)),
    ),
    dask_limit=st.integers(64 * MiB, 4 * GiB),
    following=st.sampled_from([None, False, True]),
    fixed_limit=st.booleans(),
    outer=st.builds(
        Constraint,
        key=st.just("cg:pool"),
        name=st.just("/pool"),
        limit=st.integers(GiB, 4 * GiB),
        headroom=st.integers(0, 4 * GiB),
    ),
    managed=st.booleans(),
)


@given(st.lists(workers, min_size=1, max_size=4))
def test_a_worker_that_moves_live_is_never_told_to_restart_itself(ws: list[WorkerFacts]) -> None:
    for w, v in zip(ws, judge(ws), strict=True):
        if w.managed and w.moves_live and v.action is not None:
            assert "follows live" in v.action
            assert "restart the worker" not in v.action
            assert "restart this worker" not in v.action
            assert "restart them one after another" not in v.action


@given(st.lists(workers, min_size=1, max_size=4), workers)
def test_another_instance_in_the_pool_never_makes_one_safer(
    ws: list[WorkerFacts], extra: WorkerFacts
) -> None:
    before = judge(ws)
    after = judge([*ws, extra])[: len(ws)]
    for b, a in zip(before, after, strict=True):
        if b.at_risk:
            assert a.at_risk


# --- facts from reports: the plan file's keys and the claims the worker read ------------


def _claim(pid: int, weight: int, committed: int, fixed: int | None = None) -> dict[str, Any]:
    """A claim as the worker side sends it."""
    return {
        "pid": pid, "weight": weight, "fixed": fixed, "committed": committed,
        "working_set": 300 * MiB, "cgroup": None,
    }  # fmt: skip


def _report(plan: dict[str, Any] | None, pool: dict[str, Any] | None = None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "hostname": "h",
        "boot_id": "b",
        "mem_available": 20 * GiB,
        "dask_memory_limit": 700 * MiB,
        "terminate_fraction": 0.95,
        "rss": 100 * MiB,
        "plan_file": "/run/x/plan.json" if plan is not None else None,
        "plan": plan,
        "levels": [
            {"path": "/pool/a", "key": "k:a", "own_limit": GiB, "working_set": 200 * MiB},
            {"path": "/pool", "key": "k:pool", "own_limit": 2 * GiB, "working_set": GiB},
        ],
    }
    if pool is not None:
        report["pool"] = pool
    return report


PLAN = {
    "effective_per_worker": 700 * MiB,
    "overhead": 56 * MiB,
    "n_workers": 1,
    "share": GiB,
    "fixed": False,
    "commitment": GiB,
    "following": True,
    "pool": {"key": KEY, "directory": "/run/dask-safe-worker/pool-x"},
}


def test_pool_facts_from_the_claims_the_worker_read() -> None:
    claims = [
        _claim(11, 1, 900 * MiB),
        _claim(20, 2, GiB - 200 * MiB),
        _claim(30, 1, 300 * MiB, fixed=300 * MiB),
        {**_claim(40, 1, MiB), "committed": "many"},  # not what read_pool sends
        {**_claim(41, 1, MiB), "weight": 0},
        {**_claim(42, 1, MiB), "fixed": True},
    ]
    raw: dict[str, Any] = {"claims": claims, "ancestors": [99, 20, 1], "error": None}
    f = facts_from_report("tcp://a", {}, _report(PLAN, raw))
    assert f.following is True and not f.memory_limit_fixed and f.moves_live
    assert f.pool == PoolFacts(
        key=KEY,
        instance=20,
        weight=2,
        committed=GiB - 200 * MiB,
        fixed=None,
        share=GiB,
        members=(
            PoolMember(11, 1, 900 * MiB, None, 300 * MiB),
            PoolMember(30, 1, 300 * MiB, 300 * MiB, 300 * MiB),
        ),
    )
    [row] = result_rows([f], judge([f]))
    assert row["following"] is True
    assert row["pool"]["instance"] == 20
    assert row["pool"]["members"][1] == {
        "pid": 30, "weight": 1, "committed": 300 * MiB, "fixed": 300 * MiB,
        "working_set": 300 * MiB,
    }  # fmt: skip
    json.dumps(row)
    # No claim of this worker's or its parents': the others are listed, and why.
    raw["ancestors"] = [99, 1]
    f = facts_from_report("tcp://a", {}, _report(PLAN, raw))
    assert f.pool is not None and f.pool.instance is None and len(f.pool.members) == 3
    assert f.pool.error is not None and "no live claim" in f.pool.error
    # Its supervisor killed, the worker lives on (the claim too, by its child cgroup):
    # the claim whose child cgroup is the worker's own is its instance's.
    report = _report(PLAN, raw)
    report["levels"][0]["key"] = "b:5:77"
    raw["claims"][1] = {**raw["claims"][1], "cgroup": "5:77"}
    f = facts_from_report("tcp://a", {}, report)
    assert f.pool is not None and (f.pool.instance, f.pool.error) == (20, None)
    # A fixed claim: the instance does not move, whatever the plan file says.
    raw["ancestors"] = [30]
    f = facts_from_report("tcp://a", {}, _report(PLAN, raw))
    assert f.following is True and not f.moves_live


def test_a_fixed_memory_limit_shows_its_commitment_as_the_share() -> None:
    plan = {**PLAN, "fixed": True, "commitment": 600 * MiB}
    raw = {"claims": [_claim(5, 1, 600 * MiB, 600 * MiB)], "ancestors": [5], "error": None}
    f = facts_from_report("tcp://a", {}, _report(plan, raw))
    assert f.memory_limit_fixed and not f.moves_live
    assert f.pool is not None and (f.pool.share, f.pool.fixed) == (600 * MiB, 600 * MiB)


def test_old_plan_files_are_audited_as_before() -> None:
    # A plan file of a release before pools: no `following`, no `pool`, no share.
    old = {"effective_per_worker": 700 * MiB, "overhead": 56 * MiB, "n_workers": 1}
    f = facts_from_report("tcp://a", {}, _report(old))
    assert (f.following, f.pool, f.memory_limit_fixed, f.moves_live) == (None, None, False, False)
    [row] = result_rows([f], judge([f]))
    assert row["following"] is None and row["pool"] is None
    # Unmanaged workers carry neither.
    f = facts_from_report("tcp://a", {}, _report(None))
    assert (f.following, f.pool) == (None, None)


def test_an_unreadable_pool_is_said_so() -> None:
    raw = {"error": "cannot list the pool's claims: Permission denied"}
    f = facts_from_report("tcp://a", {"name": "a"}, _report(PLAN, raw))
    assert f.pool is not None and f.pool.error == raw["error"] and f.pool.members == ()
    table = render_table(result_rows([f], judge([f])))
    assert f"pool {KEY}: a (following, share at start 1.00 GiB) ({raw['error']})" in table


# --- the table --------------------------------------------------------------------------


def test_the_table_lists_each_instance_and_the_others_in_its_pool() -> None:
    others = (PoolMember(11, 1, 900 * MiB, None, 0), PoolMember(30, 1, 300 * MiB, 300 * MiB, 0))
    pool = PoolFacts(KEY, 20, 2, GiB, None, GiB, others)
    a0 = follower("tcp://a-0", child("a", 2 * GiB), pool=pool, dask_limit=400 * MiB)
    a1 = follower("tcp://a-1", child("a", 2 * GiB), pool=pool, dask_limit=400 * MiB)
    alone = follower("tcp://z", child("z", GiB), pool=PoolFacts("host", 3, 1, GiB, share=GiB))
    table = render_table(result_rows([a0, a1, alone], judge([a0, a1, alone])))
    assert (
        f"pool {KEY}: a-0, a-1 (pid 20, weight 2, following): holds 1.00 GiB, share at start "
        "1.00 GiB; beside it: pid 11 (weight 1): holds 900.00 MiB; pid 30 (weight 1): "
        "fixed 300.00 MiB"
    ) in table.splitlines()
    # An instance alone in its pool adds no line.
    assert "pool host" not in table


def test_worker_supplied_strings_are_escaped_in_the_table() -> None:
    # A cgroup path may hold any byte (decoded with surrogateescape), a name anything.
    key = "v2:/evil\x1b[31m/\udcff\n"
    pool = PoolFacts(key, 20, 1, GiB, None, GiB, (PoolMember(11, 1, GiB, None, 0),))
    w = replace(
        follower("tcp://a", child("a", GiB), pool=pool, dask_limit=4 * GiB),
        name="bad\x1b]0;title\x07name",
    )
    rows = result_rows([w], judge([w]))
    table = render_table(rows)
    assert "\x1b" not in table and "\x07" not in table and "\udcff" not in table
    assert "pool v2:/evil\\x1b[31m/\\udcff\\n: bad\\x1b]0;title\\x07name (pid 20" in table
    assert table.splitlines()[1].startswith("bad\\x1b]0;title\\x07name  ")
    table.encode("utf-8")  # printable on any UTF-8 terminal
    # JSON keeps the strings as they are, escaped by json.
    assert json.loads(json.dumps(rows))[0]["pool"]["key"] == key
    assert "\x1b" not in json.dumps(rows)
    assert printable("plain é ü") == "plain é ü"


# --- the worker side: the live claims, read only ----------------------------------------


HOLD = """
import os, sys
from pathlib import Path
from dask_safe_worker.cgroup.pool import Member, Pool
fd = Pool(Path(sys.argv[1]), "k").claim(Member(os.getpid(), 2, None, 5 << 20, 1 << 20))
print("ready", flush=True)
sys.stdin.read()
"""


def test_read_pool_lists_live_claims_and_changes_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "pool"
    directory.mkdir(mode=0o700)
    pool = Pool(directory, KEY)
    own = pool.claim(Member(os.getpid(), 1, None, 3 * MiB, MiB))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        # A dead instance's claim: its lock file is held by nobody, and its child cgroup
        # (a stand-in directory here) is empty.
        dead, orphan = 2**22 + 1, 2**22 + 2
        empty, busy = tmp_path / "empty", tmp_path / "busy"
        # The busy one lists a live process (a zombie or a pid gone keeps no claim).
        for cgroup, procs in ((empty, ""), (busy, f"{holder.pid}\n")):
            cgroup.mkdir()
            (cgroup / "cgroup.procs").write_text(procs)
        # An orphan: its supervisor is gone (no lock), but its worker still runs in its
        # child cgroup, so its claim still holds what it promised.
        for pid, cgroup in ((dead, empty), (orphan, busy)):
            (directory / f"{pid}.lock").touch()
            member = Member(pid, 1, None, MiB, 0, str(cgroup))
            (directory / f"{pid}.claim").write_text(claim_text(member))
        before = sorted(os.listdir(directory))

        result = remote.read_pool(str(directory))
        assert result["error"] is None and result["liveness"] == "locks"
        live = sorted([os.getpid(), holder.pid, orphan])
        assert sorted(c["pid"] for c in result["claims"]) == live
        # Parsed, with the child cgroup keyed as the worker's own cgroup level is (not
        # its path).
        st = os.stat(busy)
        claims = {c["pid"]: c for c in result["claims"]}
        assert claims[holder.pid] == {
            "pid": holder.pid, "weight": 2, "fixed": None, "committed": 5 * MiB,
            "working_set": MiB, "cgroup": None,
        }  # fmt: skip
        assert claims[orphan]["cgroup"] == f"{st.st_dev}:{st.st_ino}"
        assert result["ancestors"][:2] == [os.getpid(), os.getppid()]
        json.dumps(result)
        # Read only: the dead claim is still there, and the live ones are still held.
        assert sorted(os.listdir(directory)) == before
        assert {m.pid for m in pool.members()} == set(live)
        assert not (directory / f"{dead}.claim").exists()  # members() removes it; we did not

        # Without /proc/locks, a claim is live while its pid exists.
        proc = tmp_path / "proc"
        (proc / str(holder.pid)).mkdir(parents=True)
        result = remote.read_pool(str(directory), proc_root=str(proc))
        assert result["liveness"] == "pid"
        assert sorted(c["pid"] for c in result["claims"]) == sorted([holder.pid, orphan])
        assert result["ancestors"] == [os.getpid()]
    finally:
        holder.kill()
        holder.wait()
        os.close(own)
    assert remote.read_pool(str(tmp_path / "gone"))["error"].startswith(
        "cannot list the pool's claims"
    )


def test_collect_reads_the_pool_the_plan_file_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "pool"
    directory.mkdir(mode=0o700)
    fd = Pool(directory, KEY).claim(Member(os.getpid(), 1, None, GiB, MiB))
    try:
        doc = {
            "plan": {"effective_per_worker": 700 * MiB, "share": GiB, "pool_key": KEY},
            "following": True,
            "pool": {"key": KEY, "directory": str(directory)},
            "argv": ["--secret"],
        }
        plan_file = tmp_path / "plan.json"
        plan_file.write_text(json.dumps(doc))
        monkeypatch.setenv(remote.PLAN_FILE_ENV, str(plan_file))
        monkeypatch.delenv(remote.LIVE_FILE_ENV, raising=False)
        report = remote.collect(None)
        json.dumps(report)
        assert report["plan"]["following"] is True and report["plan"]["share"] == GiB
        assert report["plan"]["pool"] == {"key": KEY, "directory": str(directory)}
        assert [c["pid"] for c in report["pool"]["claims"]] == [os.getpid()]
        f = facts_from_report("tcp://x", {}, report)
        assert f.pool is not None and (f.pool.instance, f.pool.committed) == (os.getpid(), GiB)
    finally:
        os.close(fd)
    # A plan file without a pool: no pool read.
    plan_file.write_text(json.dumps({"plan": {}, "pool": None}))
    assert "pool" not in remote.collect(None)


# --- docs/audit-cluster.md --------------------------------------------------------------


def test_the_documented_json_is_what_the_audit_prints() -> None:
    text = (ROOT / "docs" / "audit-cluster.md").read_text()
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)\n```", text, flags=re.S)]
    docs = [b for b in blocks if "workers" in b]
    assert docs
    w = follower(
        "tcp://a", child("a", GiB), pool=PoolFacts(KEY, members=(PoolMember(1, 1, 1, None, 1),))
    )
    # The rows as the audit prints them: with each worker's deaths.
    [printed], _ = death_rows(result_rows([w], judge([w])), {}, [])
    pool_keys = {f.name for f in fields(PoolFacts)}
    member_keys = {f.name for f in fields(PoolMember)}
    for doc in docs:
        assert doc["schema"] == AUDIT_SCHEMA
        assert set(doc) == {
            "schema",
            "scheduler",
            "workers",
            "deaths_of_workers_gone",
            "summary",
            "exit_code",
        }
        for row in doc["workers"]:
            assert set(row) == set(printed), set(row) ^ set(printed)
            if row["pool"] is not None:
                assert set(row["pool"]) == pool_keys
                for member in row["pool"]["members"]:
                    assert set(member) == member_keys
    assert any(row["pool"] and row["pool"]["members"] for doc in docs for row in doc["workers"]), (
        "an example with a shared pool"
    )
    assert f"Schema {AUDIT_SCHEMA} added" in text
