"""The start's audit lines are held until the worker has been started (structlog's import
is then off the worker's way), and every other way out of the start writes them first:
the same lines, in the same order, stamped when each decision was made.

The runs use `--cgroup-write never` and a private runtime directory: nothing is written
to a cgroup, and the pool is the test's own.
"""

from __future__ import annotations

import calendar
import io
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dask_safe_worker.cgroup.pool import Member, Pool, find_pool
from dask_safe_worker.dask_compat.release import installed_release
from dask_safe_worker.events import StartAudit
from dask_safe_worker.measure import measure

# What the planning process writes, in this order, before it execs the supervisor or the
# worker (the supervisor's own lines follow in a following start).
PLANNING = [
    "cli.started",
    "dask.release",
    "worker.args.checked",
    "measure.done",
    "plan.made",
    "cgroup.write.skipped",
    "cgroup.write.outcome",
    "pool.claimed",
]
AFTER_CLAIM = ["plan.file.written", "start.summary", "worker.argv"]
FOLLOWING = [*PLANNING, "follow.dask_side_off", *AFTER_CLAIM, "init.exec"]
NOT_FOLLOWING = [*PLANNING, *AFTER_CLAIM, "worker.exec"]
SUPERVISOR_FIRST = ("follow.started", "init.start")

BASE_ARGS = ["--cgroup-write", "never", "--log-format", "json"]
# A worker that ends at once; the scheduler address is never dialled.
WORKER = ["--worker-command", "true", "tcp://127.0.0.1:1"]


@pytest.fixture
def runtime(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path


def _env(runtime: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DASK_SAFE_WORKER")}
    return {**base, "XDG_RUNTIME_DIR": str(runtime)}


def _start(args: list[str], runtime: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dask_safe_worker", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(runtime),
        check=False,
    )


def _lines(stderr: str) -> list[dict[str, object]]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def _events(stderr: str) -> list[str]:
    return [str(rec["event"]) for rec in _lines(stderr)]


def _in_time_order(records: list[dict[str, object]]) -> bool:
    stamps = [str(rec["timestamp"]) for rec in records]
    return stamps == sorted(stamps)


def test_a_following_start_writes_its_lines_in_order_before_the_supervisor(
    runtime: Path,
) -> None:
    proc = _start([*BASE_ARGS, *WORKER], runtime)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = _events(proc.stderr)
    assert events[: len(FOLLOWING)] == FOLLOWING, events
    # The supervisor's lines come after all of the start's.
    assert events[len(FOLLOWING)] in SUPERVISOR_FIRST, events
    assert _in_time_order(_lines(proc.stderr))


def test_a_start_without_following_writes_its_lines_before_the_workers_exec(
    runtime: Path,
) -> None:
    proc = _start(["--no-follow", *BASE_ARGS, *WORKER], runtime)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _events(proc.stderr) == NOT_FOLLOWING
    assert _in_time_order(_lines(proc.stderr))


def test_a_refusal_writes_its_lines_before_its_message(runtime: Path) -> None:
    """Exit 3 (the plan) and exit 2 (the worker's arguments): every line, then the one
    line for people, last."""
    too_small = _start(["--min-worker-memory", "1PiB", *BASE_ARGS, *WORKER], runtime)
    assert too_small.returncode == 3, too_small.stderr[-3000:]
    assert _events(too_small.stderr) == [*PLANNING[:4], "plan.refused"]
    assert too_small.stderr.splitlines()[-1].startswith("dask-safe-worker: ")

    # Dask's own worker, refused by its click options before anything is measured.
    bad = _start([*BASE_ARGS, "tcp://127.0.0.1:1", "--nthreads", "many"], runtime)
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert _events(bad.stderr) == ["cli.started", "dask.release", "cli.usage.error"]
    assert bad.stderr.splitlines()[-1].startswith("dask-safe-worker: invalid dask worker")


def test_a_cancelled_start_writes_its_lines() -> None:
    """A stop pending at the worker's exec cancels the start (exit 128 + signal): the
    held lines and the cancellation are written before the exit."""
    program = (
        "import os, signal, sys\n"
        "from dask_safe_worker.cli import main\n"
        "from dask_safe_worker import supervise\n"
        "defer = supervise.defer_signals\n"
        "def defer_and_stop():\n"
        "    defer()\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "supervise.defer_signals = defer_and_stop\n"
        f"main({['--no-follow', *BASE_ARGS, *WORKER]!r})\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 128 + 15, proc.stderr[-3000:]
    events = _events(proc.stderr)
    assert events == [*NOT_FOLLOWING[:-1], "worker.exec.cancelled"], events


def test_a_held_line_keeps_the_moment_of_its_decision() -> None:
    out = io.StringIO()
    audit = StartAudit("json", out, worker_name="w-1")
    audit.hold()
    before = time.time()
    audit("plan.made", budget=1)
    after = time.time()
    while time.time() < after + 0.002:  # the clock moves on before the write
        pass
    assert out.getvalue() == ""
    audit("pool.claimed", pool="k")
    audit.flush()
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert [first["event"], second["event"]] == ["plan.made", "pool.claimed"]
    text = str(first["timestamp"])
    whole = calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    stamp = whole + int(text[20:26]) / 1e6
    assert int(before) <= stamp <= after + 1e-6
    assert first["worker_name"] == "w-1" and first["budget"] == 1
    # Not held: written at once.
    live = io.StringIO()
    StartAudit("json", live)("cli.started")
    assert json.loads(live.getvalue())["event"] == "cli.started"


# Prints, at the fork of the worker, whether structlog had been imported by then; the
# start then goes on (the supervisor is exec'd and adopts the worker).
AT_FORK = """
import os, sys
def hook(event, args):
    if event == "os.fork" and not getattr(hook, "seen", False):
        hook.seen = True
        os.write(1, ("at fork: " + str("structlog" in sys.modules) + "\\n").encode())
sys.addaudithook(hook)
from dask_safe_worker.cli import main
main(sys.argv[1:])
"""


def test_a_following_start_imports_structlog_after_the_worker_is_started(
    runtime: Path,
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", AT_FORK, *BASE_ARGS, *WORKER],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(runtime),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0] == "at fork: False", proc.stdout
    # ... and it wrote the start's lines with it.
    assert _events(proc.stderr)[: len(FOLLOWING)] == FOLLOWING


@pytest.fixture
def busy_pool(runtime: Path) -> Iterator[Pool]:
    """Our pool (this test's runtime directory), with a claim of this test's process
    that holds more than there is."""
    pool = find_pool(measure(release=installed_release()), {"XDG_RUNTIME_DIR": str(runtime)})
    assert pool is not None
    fd = pool.claim(Member(pid=os.getpid(), weight=1, fixed=None, committed=2**60, working_set=0))
    try:
        yield pool
    finally:
        pool.leave(os.getpid())
        os.close(fd)


class _Stderr:
    """The start's stderr, read line by line in a thread, so that a line that is never
    written fails the test (after `BOUND` seconds) instead of hanging it."""

    BOUND = 90.0

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        self._queue: queue.Queue[str | None] = queue.Queue()
        stream = proc.stderr

        def read() -> None:
            for line in stream:
                self._queue.put(line)
            self._queue.put(None)

        threading.Thread(target=read, daemon=True).start()

    def until(self, event: str) -> list[str]:
        """The events up to `event`."""
        seen: list[str] = []
        while True:
            try:
                line = self._queue.get(timeout=self.BOUND)
            except queue.Empty:
                raise AssertionError(f"{event} not written within {self.BOUND} s: {seen}") from None
            if line is None:
                raise AssertionError(f"{event} never written: {seen}")
            if line.startswith("{"):
                seen.append(str(json.loads(line)["event"]))
                if seen[-1] == event:
                    return seen


def _popen(args: list[str], runtime: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dask_safe_worker", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=_env(runtime),
    )


def test_a_wait_for_the_pool_is_shown_while_it_lasts(runtime: Path, busy_pool: Pool) -> None:
    """`pool.waiting` is written when the wait begins: it ends only when the claim that
    fills the pool goes, which the test does after it has read the line."""
    proc = _popen(["--no-follow", *BASE_ARGS, *WORKER], runtime)
    try:
        stderr = _Stderr(proc)
        seen = stderr.until("pool.waiting")
        assert seen == [*PLANNING[:4], "pool.waiting"]
        assert proc.poll() is None  # still waiting
        busy_pool.leave(os.getpid())
        rest = stderr.until("worker.exec")
        assert rest[0] == "plan.made", rest
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_wait_for_the_pools_lock_shows_the_start_so_far(runtime: Path) -> None:
    """Another instance holds the pool's lock: the lines up to the wait are written
    before the lock is given up (the start goes on only after that)."""
    pool = find_pool(measure(release=installed_release()), {"XDG_RUNTIME_DIR": str(runtime)})
    assert pool is not None
    held = pool.acquire()
    assert held is not None
    lock = held
    proc = _popen(["--no-follow", *BASE_ARGS, *WORKER], runtime)
    try:
        stderr = _Stderr(proc)
        seen = stderr.until("measure.done")
        assert seen == PLANNING[:4]
        assert proc.poll() is None  # waiting for the lock
        os.close(lock)
        lock = -1
        assert stderr.until("worker.exec")[0] == "plan.made"
        assert proc.wait(timeout=120) == 0
    finally:
        if lock >= 0:
            os.close(lock)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
