"""dask-jobqueue's SLURMCluster on a real Slurm whose task/cgroup puts each job in a memory
cgroup of its own (tests/slurm_util.py: munged, slurmctld and slurmd from Debian's packages,
one node on 127.0.0.1, Slurm's cgroups below a test cgroup of our own).

Each job runs `python -m dask_safe_worker` as jobqueue writes it, with `memory="1GiB"`:
Slurm limits the job's cgroup to 1 GiB, and the tool must take every worker's budget from
that limit (not from the host's free memory), fit all the workers of one job in it, and
not count the workers of another job (another job cgroup) as siblings in its pool.
`cluster.close()` cancels the jobs (scancel): every process of a job ends, and Slurm removes
the job's cgroups, which it can do only when the tool left no child cgroup of its own.

The jobs inherit this pytest process's environment (sbatch's default `--export=ALL`), so
their plan files and pools are in the session's private runtime directory.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import dask
import pytest
from dask_jobqueue.slurm import SLURMCluster
from distributed import Client, KilledWorker

from cgroup_util import V1_ROOT
from slurm_util import (
    LOOPBACK_HEX,
    Slurm,
    cgroup_mounts,
    controller_slurm_dirs,
    listening,
    running_slurm,
    slurm_usable,
)

pytestmark = pytest.mark.e2e
# client.run sends _worker_facts to the jobs, which cannot import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

GiB = 2**30
MiB = 2**20
DEATH_TIMEOUT_S = 30
END_WAIT_S = 120
DOCS = Path(__file__).resolve().parent.parent / "docs" / "containers.md"
# Loopback only: the worker's and nanny's listeners and HTTP servers, and the scheduler's.
LOOPBACK_WORKER_ARGS = [
    "--no-dashboard",
    "--host",
    "127.0.0.1",
    "--dashboard-address",
    "127.0.0.1:0",
]
SCHEDULER_OPTIONS = {"host": "127.0.0.1", "dashboard": False, "dashboard_address": "127.0.0.1:0"}


@pytest.fixture(scope="module")
def slurm() -> Iterator[Slurm]:
    reason = slurm_usable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the Slurm tests cannot run in CI: {reason}")
        pytest.skip(reason)
    before = controller_slurm_dirs()
    mounts = cgroup_mounts()
    with running_slurm() as cluster:
        assert cgroup_mounts() == mounts  # slurmd's namespace changed only its own
        # slurmctld and slurmd listen on 127.0.0.1 only; munged on no TCP port.
        munged, slurmctld, slurmd = cluster.daemons
        assert listening(munged) == []
        for pid in (slurmctld, slurmd):
            addresses = listening(pid)
            assert addresses, pid
            assert {a.split(":")[0] for a in addresses} == {LOOPBACK_HEX}, addresses
        yield cluster
        assert cluster.jobs() == []
    # Nothing of Slurm's outside the test cgroup, which running_slurm removed.
    assert controller_slurm_dirs() == before
    assert cgroup_mounts() == mounts
    assert not cluster.cgroup.path.exists()


@pytest.fixture
def slurm_env(slurm: Slurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """jobqueue's sbatch, squeue and scancel find the test's Slurm; the jobs write their
    scratch space into the test's temporary directory. Returns the jobs' log directory."""
    for name, value in slurm.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DASK_SAFE_WORKER_LOG_FORMAT", "json")
    monkeypatch.delenv("DASK_SAFE_WORKER_CGROUP_WRITE", raising=False)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    logs = tmp_path / "logs"
    logs.mkdir()
    return logs


def _worker_facts(dask_worker: Any) -> dict[str, Any]:
    """What a worker knows about itself, run in the worker by client.run."""
    import os as os_

    cgroup = ""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                cgroup = path
    with open(f"/proc/{os_.getppid()}/stat") as f:
        supervisor = int(f.read().rsplit(")", 1)[1].split()[1])
    return {
        "pid": os_.getpid(),
        "nanny": os_.getppid(),
        "supervisor": supervisor,
        "cgroup": cgroup,
        "job": os_.environ.get("SLURM_JOB_ID"),
        "plan_file": os_.environ.get("DASK_SAFE_WORKER_PLAN"),
        "memory_limit": dask_worker.memory_manager.memory_limit,
        "nthreads": dask_worker.state.nthreads,
    }


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            alive.add(pid)
    return alive


def _wait_gone(slurm: Slurm, pids: set[int], job_logs: Path) -> None:
    """Every job ended, its processes and its cgroups gone."""
    deadline = time.monotonic() + END_WAIT_S
    while time.monotonic() < deadline:
        if not slurm.jobs() and not _alive(pids) and not slurm.job_cgroups():
            return
        time.sleep(0.5)
    logs = {p.name: p.read_text()[-3000:] for d in (slurm.logs, job_logs) for p in d.iterdir()}
    raise AssertionError(
        f"left behind: jobs {slurm.jobs()}, processes {_alive(pids)}, "
        f"cgroups {slurm.cgroups()}; logs {logs}"
    )


def _run_jobs(
    slurm: Slurm,
    logs: Path,
    jobs: int,
    during: Callable[[Client, dict[str, dict[str, Any]]], None] | None = None,
    **options: Any,
) -> tuple[str, dict[str, dict[str, Any]], set[int]]:
    """Start `jobs` jobs of SLURMCluster(**options), wait for every worker, run `during`,
    check what all jobs share, close the cluster and wait until the jobs left nothing
    behind. Returns the job script, each worker's facts by address, and the pids of the
    jobs' processes."""
    processes = int(options.get("processes", 1))
    extra = [*options.pop("worker_extra_args", []), *LOOPBACK_WORKER_ARGS]
    options.setdefault("python", f"exec {sys.executable}")
    with (
        SLURMCluster(
            **options,
            worker_command="dask_safe_worker",
            worker_extra_args=extra,
            scheduler_options=SCHEDULER_OPTIONS,
            death_timeout=DEATH_TIMEOUT_S,
            log_directory=str(logs),
            walltime="00:10:00",
        ) as cluster,
        Client(cluster, timeout=30) as client,
    ):
        script = cluster.job_script()
        cluster.scale(jobs=jobs)
        client.wait_for_workers(jobs * processes, timeout=180)
        facts: dict[str, dict[str, Any]] = client.run(_worker_facts)
        assert len(facts) == jobs * processes
        for f in facts.values():
            f["plan"] = json.loads(Path(f["plan_file"]).read_text())
        assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
        if during is not None:
            during(client, facts)
        cgroups_while_running = slurm.cgroups()
        job_cgroups = slurm.job_cgroups()
        cluster.close()
    pids = {f[p] for f in facts.values() for p in ("pid", "nanny", "supervisor")}
    # Per job the supervisor, one `dask worker` process with `processes` nannies in it,
    # and a process per worker.
    assert len(pids) == jobs * (processes + 2), facts
    _wait_gone(slurm, pids, logs)

    # Slurm made its cgroups below the test cgroup only: every worker's cgroup, seen from
    # the host, is there, and a job cgroup (with Slurm's 1 GiB limit) per job.
    test_cgroup = "/" + str(slurm.cgroup.path.relative_to(V1_ROOT))
    for f in facts.values():
        assert f["cgroup"].startswith(test_cgroup + f"/slurm_dswnode/uid_0/job_{f['job']}/"), f
    assert len(job_cgroups) == jobs, cgroups_while_running
    assert {p.name for p in job_cgroups} == {f"job_{f['job']}" for f in facts.values()}
    # After scancel only Slurm's node directory stays (removed with the test cgroup).
    assert [p.name for p in slurm.cgroups()] in ([], ["slurm_dswnode"])

    # Every job's supervisor saw its worker end and ended itself, nothing by SIGKILL
    # (Slurm kills what is left of a job once its main process is gone), and the tool
    # logged no error.
    errs = {p.name: p.read_text() for p in logs.glob("*.err")}
    assert len(errs) == jobs
    for name, text in errs.items():
        events = [json.loads(line) for line in text.splitlines() if line.startswith('{"')]
        ends = [e for e in events if e["event"] in ("init.child.exited", "init.exit")]
        assert [e["event"] for e in ends] == ["init.child.exited", "init.exit"], (name, text)
        assert all(e.get("signal") != "SIGKILL" for e in events), (name, text)
        assert [e for e in events if e["level"] in ("error", "critical")] == [], (name, text)
    return script, facts, pids


def _check_budgets(facts: dict[str, dict[str, Any]], processes: int) -> None:
    """Each job's workers took their budget from the job's 1 GiB and fit in it together;
    each job planned alone (its own pool, no sibling from the other job)."""
    by_job: dict[str, list[dict[str, Any]]] = {}
    for f in facts.values():
        by_job.setdefault(f["job"], []).append(f)
    pool_keys = set()
    for job, workers in by_job.items():
        assert len(workers) == processes, (job, workers)
        assert len({f["plan_file"] for f in workers}) == 1  # one dask-safe-worker per job
        plan = workers[0]["plan"]
        measurement, p = plan["measurement"], plan["plan"]
        job_level = [
            lvl for lvl in measurement["cgroup_levels"] if lvl["path"].endswith(f"/job_{job}")
        ]
        assert [lvl["limit"] for lvl in job_level] == [GiB], measurement["cgroup_levels"]
        # Seen through slurmd's mount, whose root is the test cgroup.
        assert measurement["limiting"] == f"/slurm_dswnode/uid_0/job_{job}", measurement
        assert p["n_workers"] == processes
        assert p["siblings"] == 0, p
        assert p["budget"] <= GiB
        assert p["budget"] + p["siblings_committed"] <= GiB
        pool_keys.add(p["pool_key"])
        limits = [f["memory_limit"] for f in workers]
        assert sum(limits) + p["overhead"] <= GiB, (limits, p)
        # The job's limit, not jobqueue's share of it, decides: jobqueue's --memory-limit
        # (1 GiB / processes) does not fit once the nannies and the supervisor are counted.
        assert all(limit < GiB // processes for limit in limits), limits
        assert all(limit >= 256 * MiB for limit in limits), limits
    assert len(pool_keys) == len(by_job), pool_keys


@pytest.mark.parametrize("processes", [1, 2], ids=lambda n: f"processes-{n}")
def test_slurm_jobs_take_their_budget_from_the_job_cgroup(
    processes: int, slurm: Slurm, slurm_env: Path
) -> None:
    jobs = 2
    script, facts, _ = _run_jobs(
        slurm,
        slurm_env,
        jobs,
        cores=processes,
        processes=processes,
        memory="1GiB",
        worker_extra_args=["--nworkers", str(processes), "--clamp-memory-limit"],
    )
    assert re.search(r"-m dask_safe_worker tcp://127\.0\.0\.1:\d+ ", script), script
    assert "#SBATCH --mem=1G" in script, script
    assert all(f["nthreads"] == 1 for f in facts.values())
    _check_budgets(facts, processes)


def _docs_example() -> dict[str, Any]:
    """The keyword arguments of the SLURMCluster call in docs/containers.md's jobqueue
    section, as written."""
    section = DOCS.read_text().split("## Batch schedulers: dask-jobqueue", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    tree = ast.parse(code)
    (call,) = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "SLURMCluster"
    ]
    example: dict[str, Any] = {}
    for keyword in call.keywords:
        assert keyword.arg is not None
        if keyword.arg == "python":
            # The one value that is not a literal: this interpreter, exec'd.
            assert ast.unparse(keyword.value) == "f'exec {sys.executable}'"
            example["python"] = f"exec {sys.executable}"
        else:
            example[keyword.arg] = ast.literal_eval(keyword.value)
    return example


def test_docs_jobqueue_example_runs_as_written(slurm: Slurm, slurm_env: Path) -> None:
    """The example's options, as written, give `processes` workers of cores / processes
    threads each, whose limits together fit the job's memory."""
    example = _docs_example()
    assert example["worker_command"] == "dask_safe_worker"
    processes, cores = example["processes"], example["cores"]
    assert processes > 1
    # The example's 16 GiB job would be limited by this shared machine's free memory
    # rather than by its cgroup: only the memory shrinks, every other option stays.
    options = {k: v for k, v in example.items() if k != "worker_command"}
    options["memory"] = "1GiB"
    script, facts, _ = _run_jobs(slurm, slurm_env, 1, **options)
    assert f"--nthreads {cores // processes} " in script, script
    assert len(facts) == processes
    assert all(f["nthreads"] == cores // processes for f in facts.values())
    _check_budgets(facts, processes)


def _oom_kills(cgroup: Path) -> int:
    for line in (cgroup / "memory.oom_control").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill":
            return int(value)
    return 0


def test_task_outgrowing_the_job_is_stopped_by_dask(slurm: Slurm, slurm_env: Path) -> None:
    """A task that would need 1.5 GiB in a 1 GiB job: the nanny restarts the worker at
    Dask's terminate threshold, below the job's limit, so that the kernel OOM-kills nothing
    in the job's cgroups (what Slurm would report as the job's OUT_OF_MEMORY) and the job
    runs on."""

    # Nested: distributed's pickle cannot send it by reference (the jobs cannot import
    # this module), so cloudpickle sends it by value.
    def grow(limit: int, step: int) -> int:
        """A task that holds ever more memory, a step every 20 ms, up to `limit` bytes."""
        import time as time_

        held: list[bytearray] = []
        while len(held) * step < limit:
            held.append(bytearray(step))
            # Touch every page: an untouched bytearray is charged to no cgroup.
            for i in range(0, step, 4096):
                held[-1][i] = 1
            time_.sleep(0.02)
        return len(held)

    def outgrow(client: Client, facts: dict[str, dict[str, Any]]) -> None:
        (fact,) = facts.values()
        job = slurm.cgroup.path / "slurm_dswnode" / "uid_0" / f"job_{fact['job']}"
        levels = [p for p in (job, *job.rglob("*")) if p.is_dir()]
        assert {p.name for p in levels} >= {job.name, "step_batch", "task_0"}, levels
        future = client.submit(grow, int(1.5 * GiB), 16 * MiB, pure=False)
        with pytest.raises(KilledWorker):
            future.result(timeout=120)
        # The nanny restarts the worker in the same job. (Not waited for: on this shared
        # machine a new worker's start has taken from seconds to minutes.)
        err = next(slurm_env.glob("*.err"))
        deadline = time.monotonic() + END_WAIT_S
        while "Restarting worker" not in err.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "exceeded 95% memory budget. Restarting" in err.read_text()
        assert {p: _oom_kills(p) for p in levels} == dict.fromkeys(levels, 0)
        assert slurm.run("squeue", "-h", "-j", fact["job"], "-o", "%T").split() == ["RUNNING"]

    # The scheduler (jobqueue's, in this process) reads it when it starts: the first
    # restart fails the task.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        _, facts, _ = _run_jobs(
            slurm,
            slurm_env,
            1,
            outgrow,
            cores=1,
            processes=1,
            memory="1GiB",
            worker_extra_args=["--nworkers", "1", "--clamp-memory-limit"],
        )
    (fact,) = facts.values()
    assert fact["memory_limit"] < GiB
    assert "oom" not in (slurm.logs / "slurmd.log").read_text().lower()
