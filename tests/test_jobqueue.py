"""dask-jobqueue as a real launcher: its local job runner starts dask-safe-worker.

dask-jobqueue's `LocalCluster` (from `dask_jobqueue.local`) runs `python -m <worker_command>`
for every job and reads the job's stderr until "Registered to:"; any earlier line that
contains "error" fails the job ("Worker failed"). So routine audit lines must carry no
failure words (issue 15, item 11). Several jobs on one host are several instances in one
pool (docs/follow.md, "Several instances, one pool"): each must start, keep the
`--memory-limit` that jobqueue gives it (an explicit limit is a fixed commitment), and
leave no process and no live claim behind when the cluster closes, although jobqueue
closes a job by SIGKILL to the job's pid, which is our supervisor: the nanny and worker
below it end by themselves once the scheduler is gone (issue 25, "real clients").

The scheduler is jobqueue's own; it and the workers listen on 127.0.0.1. The jobs
inherit the environment of this pytest process, which runs in the session's own cgroup:
the tool must not write a limit there (DEVELOPERS.md), so
`DASK_SAFE_WORKER_CGROUP_WRITE=never`. Pools and claims live in the runtime directory and
the follow channels in TMPDIR: the test points both at its own tmp directory to inspect
them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dask_jobqueue.local import LocalCluster
from distributed import Client

from dask_safe_worker.cgroup.pool import parse_claim

pytestmark = pytest.mark.e2e

GiB = 2**30
DEATH_TIMEOUT_S = 30
# A job's processes end within seconds of the close; a worker that outlived its supervisor
# would stop at the latest when it noticed the scheduler gone for --death-timeout.
END_WAIT_S = DEATH_TIMEOUT_S + 30


@contextmanager
def error_records(*loggers: str) -> Iterator[list[logging.LogRecord]]:
    """Records of ERROR and above from these loggers; distributed's do not propagate to the
    root logger (and so not to caplog)."""
    found: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(record)

    handler = Collect(logging.ERROR)
    for name in loggers:
        logging.getLogger(name).addHandler(handler)
    try:
        yield found
    finally:
        for name in loggers:
            logging.getLogger(name).removeHandler(handler)


def _stat(pid: int) -> tuple[str, int] | None:
    """State and start time (clock ticks after boot) of a process; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = [int(kid) for kid in children.read_text().split()]
        except OSError:
            continue
        for kid in kids:
            found += [kid, *_descendants(kid)]
    return found


def _job_processes(pid: int) -> dict[int, int]:
    """The job's process and all its descendants (supervisor, nanny, worker, multiprocessing's
    resource tracker), each with its start time, so that a reused pid is not mistaken for it."""
    found: dict[int, int] = {}
    for p in (pid, *_descendants(pid)):
        stat = _stat(p)
        if stat is not None:
            found[p] = stat[1]
    return found


def _alive(processes: dict[int, int]) -> dict[int, str]:
    """Those still running, with their command lines; a zombie has ended."""
    alive: dict[int, str] = {}
    for pid, start in processes.items():
        stat = _stat(pid)
        if stat is None or stat[1] != start or stat[0] in ("Z", "X"):
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        alive[pid] = cmdline
    return alive


def _held(lock: Path) -> bool:
    """Whether a live instance holds this claim's flock (the pool's own test of liveness)."""
    fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _claims(runtime: Path) -> tuple[list[Path], dict[int, bool], dict[int, Path]]:
    """The pool directories; every `<pid>.lock` in them with whether it is held; the other
    `<pid>.*` files, the claims' records (whatever their format)."""
    pools = sorted((runtime / "dask-safe-worker").glob("pool-*"))
    files = [p for pool in pools for p in pool.iterdir() if p.stem.isdigit()]
    locks = {int(p.stem): _held(p) for p in files if p.suffix == ".lock"}
    records = {int(p.stem): p for p in files if p.suffix != ".lock"}
    return pools, locks, records


@pytest.mark.parametrize("jobs", [2, 4], ids=lambda n: f"{n}-jobs")
def test_jobqueue_local_cluster_starts_safe_workers(
    jobs: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DASK_SAFE_WORKER_CGROUP_WRITE", "never")
    monkeypatch.setenv("DASK_SAFE_WORKER_LOG_FORMAT", "json")
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    with (
        error_records("distributed", "dask_jobqueue", "asyncio") as errors,
        LocalCluster(
            cores=1,
            processes=1,
            memory="1GiB",
            worker_command="dask_safe_worker",
            # Loopback only: without --host the nanny's worker, and without an address
            # its HTTP server, listen on every interface (as under plain `dask worker`).
            worker_extra_args=[
                "--no-dashboard",
                "--host",
                "127.0.0.1",
                "--dashboard-address",
                "127.0.0.1:0",
            ],
            # The scheduler's HTTP server (metrics, even without the dashboard) too.
            scheduler_options={
                "host": "127.0.0.1",
                "dashboard": False,
                "dashboard_address": "127.0.0.1:0",
            },
            death_timeout=DEATH_TIMEOUT_S,
        ) as cluster,
    ):
        assert "-m dask_safe_worker tcp://127.0.0.1:" in cluster.job_script()
        with Client(cluster, timeout=30) as client:
            cluster.scale(jobs=jobs)
            client.wait_for_workers(jobs, timeout=120)
            names = {w["name"] for w in client.scheduler_info()["workers"].values()}
            assert names == set(cluster.workers)
            assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
            # jobqueue's --memory-limit (1 GiB per job, one process) is a fixed commitment
            # that fits here: every instance keeps it, however many arrived after it.
            limits = client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
            assert sorted(limits.values()) == [GiB] * jobs

            # Only pids: jobqueue's Job.close never marks a job closed, and distributed's
            # close asserts that every job object still alive is.
            job_pids = {job.process.pid for job in cluster.workers.values()}
            processes = {p: t for pid in job_pids for p, t in _job_processes(pid).items()}
            assert len(job_pids) == jobs
            assert set(_alive(processes)) == set(processes)

            pools, locks, records = _claims(runtime)
            assert len(pools) == 1, pools  # one cgroup, one host: one pool
            assert locks == dict.fromkeys(job_pids, True)
            assert set(records) == job_pids
            for pid, record in records.items():
                member = parse_claim(record.read_text())
                assert (member.pid, member.weight) == (pid, 1)
                assert member.fixed is not None and member.fixed >= GiB, member
        cluster.close()
    assert [r.getMessage() for r in errors] == []

    deadline = time.monotonic() + END_WAIT_S
    while _alive(processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _alive(processes) == {}

    # The SIGKILLed supervisors could not withdraw their claims: the files of our dead
    # instances may stay until the next instance reads the pool. Nobody holds them.
    _, locks, records = _claims(runtime)
    assert not any(locks.values()), locks
    assert set(locks) <= job_pids and set(records) <= job_pids, (locks, records)
    # Nor remove their follow channels (in TMPDIR): at most one per job may stay.
    assert len(list(tmp.glob("dask-safe-worker-follow-*"))) <= jobs
