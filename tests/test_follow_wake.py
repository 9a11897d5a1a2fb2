"""Kernel wake-ups of `--follow`'s watch: where they sit (pure), that the kernel fires them
(real v1 cgroups below our own), and that the supervisor's wait ends on them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from cgroup_util import kernel_cgroups_usable, make_test_cgroup
from dask_safe_worker.follow.decide import (
    WAKE_STEP_FLOOR,
    FollowSpec,
    WakePoints,
    decide,
    replan,
    wake_points,
)
from dask_safe_worker.follow.wake import Wake
from dask_safe_worker.measure import LevelReading, Measurement
from dask_safe_worker.plan import Settings
from dask_safe_worker.proc_parse import HostMemory
from dask_safe_worker.records import replace
from dask_safe_worker.sizes import Amount
from dask_safe_worker.supervise import _next_signal
from dask_safe_worker.worker_args import WorkerArgs

MiB, GiB = 2**20, 2**30
DIRS = ["/c/m/w", "/c/m"]


def spec(nworkers: int, reserve: int) -> FollowSpec:
    return FollowSpec(
        settings=Settings(reserve=Amount(bytes=reserve), supervised=True),
        args=WorkerArgs(nworkers=str(nworkers), nthreads=1),
        first_budget=2 * GiB,
        first_per_worker=900 * MiB,
        interval=1.0,
        channel="/run/x/live.json",
    )


def measurement(limit: int, own: int, neighbours: int) -> Measurement:
    """W (ours, no limit) inside M (`limit`), which also holds `neighbours` bytes."""
    return Measurement(
        host=HostMemory(64 * GiB, 60 * GiB, False),
        location=None,
        levels=(
            LevelReading("/m/w", None, None, own, 0),
            LevelReading("/m", limit, limit, own + neighbours, 0),
        ),
        own_procs=(10, 11),
        pid=10,
        own_rss=20 * MiB,
        cpu_count=2,
        dask_memory_limit=64 * GiB,
        ours=frozenset({11}),
    )


def grown(m: Measurement, delta: int) -> Measurement:
    w, lvl = m.levels
    assert lvl.usage is not None
    return replace(m, levels=(w, replace(lvl, usage=lvl.usage + delta)))


scenario = st.fixed_dictionaries(
    {
        "limit": st.integers(2 * GiB, 32 * GiB),
        "own": st.integers(0, GiB),
        "neighbours": st.integers(0, GiB),
        "nworkers": st.integers(1, 8),
        "reserve": st.integers(0, 256 * MiB),
        "offset": st.floats(-1.0, 1.0),
        "ceiling_extra": st.integers(0, 4 * GiB),
    }
)


@given(s=scenario, fraction=st.floats(0.0, 0.999))
@example(
    s={
        "limit": 2 * GiB,
        "own": 0,
        "neighbours": 0,
        "nworkers": 1,
        "reserve": 0,
        "offset": 1.0,
        "ceiling_extra": 0,
    },
    fraction=0.875,
)
def test_no_change_needed_before_a_threshold(s: dict[str, Any], fraction: float) -> None:
    """A neighbour's growth or shrinkage that stays between the thresholds never moves
    the limit: the watch may sleep until the kernel says one was crossed. Except within
    WAKE_STEP_FLOOR of the usage: a limit already near its band's edge then waits for
    the tick, so that our own workers' page churn does not wake the watch 10 times a
    second (hypothesis found that case: 1 worker, the limit at the band's top)."""
    sp = spec(s["nworkers"], s["reserve"])
    m = measurement(s["limit"], s["own"], s["neighbours"])
    proposed = replan(sp, m).effective_per_worker
    assume(proposed is not None and proposed > 64 * MiB)
    assert proposed is not None
    # The limit in force somewhere in its band around the proposal (a tick decided "keep").
    band = max(32 * MiB, int(proposed * 0.02))
    current = max(1, proposed + int(s["offset"] * band * 0.9))
    ceiling = current + s["ceiling_extra"]
    assume(decide(current, proposed, ceiling).action == "keep")
    points = wake_points(m, DIRS, current, proposed, ceiling)
    usage = m.levels[1].usage
    assert usage is not None
    ups = [t for d, t in points.thresholds if d == "/c/m" and t > usage]
    downs = [t for d, t in points.thresholds if d == "/c/m" and t < usage]
    assert len(ups) == 1 and ups[0] - usage >= WAKE_STEP_FLOOR
    floored_up = ups[0] - usage == WAKE_STEP_FLOOR
    up = int((ups[0] - usage) * fraction)
    after = replan(sp, grown(m, up)).effective_per_worker
    assert after is not None
    assert decide(current, after, ceiling).action == "keep" or floored_up
    if downs:
        assert usage - downs[0] >= WAKE_STEP_FLOOR
        floored_down = usage - downs[0] == WAKE_STEP_FLOOR
        down = min(s["neighbours"], int((usage - downs[0]) * fraction))
        after = replan(sp, grown(m, -down)).effective_per_worker
        assert after is not None
        assert decide(current, after, ceiling).action == "keep" or floored_down
    else:
        # No threshold below: no fall in usage could raise the limit.
        after = replan(sp, grown(m, -s["neighbours"])).effective_per_worker
        assert after is not None
        assert decide(current, after, ceiling).action != "raise"
    assert points.pressure[0] == "/c/m"


def test_a_crossing_needs_the_plan_to_move() -> None:
    """Past the upper threshold by a band the limit moves: the thresholds are not so far
    out that a real change would go unsignalled (one worker with every CPU's threads: the
    pool is its limit)."""
    sp = replace(spec(1, 0), args=WorkerArgs(nworkers="1", nthreads=2))
    m = measurement(4 * GiB, 500 * MiB, 500 * MiB)
    proposed = replan(sp, m).effective_per_worker
    assert proposed is not None
    points = wake_points(m, DIRS, proposed, proposed, proposed)
    usage = m.levels[1].usage
    assert usage is not None
    (up,) = [t for _, t in points.thresholds]
    after = replan(sp, grown(m, up - usage + 1 * MiB)).effective_per_worker
    assert after is not None
    assert decide(proposed, after, proposed).action == "lower"


def test_the_host_limiting_leaves_only_pressure() -> None:
    m = measurement(64 * GiB, 0, 0)
    m = replace(m, host=HostMemory(64 * GiB, 1 * GiB, False))
    assert m.limiting == "host"
    assert wake_points(m, DIRS, 500 * MiB, 500 * MiB, 900 * MiB) == WakePoints((), ("/c/m/w",))


# --- the kernel (v1, cgroups below our own) --------------------------------------------

needs_kernel = pytest.mark.skipif(
    kernel_cgroups_usable() is not None, reason=str(kernel_cgroups_usable())
)

ALLOCATE = (
    "import sys; b = bytearray(int(sys.argv[1])); b[::4096] = b'x' * len(b[::4096]); "
    "sys.stdin.read()"
)


def _wait_ready(wake: Wake, timeout_ms: int) -> list[int]:
    import select

    poller = select.poll()
    for fd, events in wake.fds():
        poller.register(fd, events)
    return [fd for fd, _ in poller.poll(timeout_ms)]


@needs_kernel
def test_v1_usage_threshold_fires_when_a_process_grows_past_it() -> None:
    started: set[int] = set()
    log: list[tuple[str, dict[str, Any]]] = []
    with make_test_cgroup(started, prefix="dsw-wake") as cg:
        usage = cg.usage()
        wake = Wake(1, lambda e, **f: log.append((e, f)))
        wake.arm(WakePoints(((str(cg.path), usage + 64 * MiB),), (str(cg.path),)))
        try:
            assert log == []
            assert len(wake.fds()) == 2
            assert _wait_ready(wake, 0) == []
            proc = subprocess.Popen(
                cg.enter_command([sys.executable, "-c", ALLOCATE, str(128 * MiB)]),
                stdin=subprocess.PIPE,
            )
            started.add(proc.pid)
            ready = _wait_ready(wake, 60_000)
            assert ready, "the kernel did not signal the crossing"
            assert "usage" in wake.fired(ready)
            # Muted until the watch re-arms after its tick.
            assert wake.fds() == []
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait()
        finally:
            wake.close()
    assert wake.fds() == []


@needs_kernel
def test_v1_missing_sources_fall_back_to_the_tick_logged_once(tmp_path: Path) -> None:
    log: list[tuple[str, dict[str, Any]]] = []
    wake = Wake(1, lambda e, **f: log.append((e, f)))
    gone = str(tmp_path / "no-such-cgroup")
    wake.arm(WakePoints(((gone, GiB), (gone, 2 * GiB)), (gone,)))
    wake.arm(WakePoints(((gone, 3 * GiB),), (gone,)))
    assert wake.fds() == []
    assert sorted(f["source"] for _, f in log) == ["pressure", "usage"]
    assert all(e == "follow.wake.unavailable" and f["fallback"] == "tick" for e, f in log)
    wake.close()


# --- the supervisor's wait ---------------------------------------------------------------


class EventWaker:
    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.got: list[list[int]] = []

    def fds(self) -> list[tuple[int, int]]:
        import select

        return [(self.fd, select.POLLIN)]

    def fired(self, fds: list[int]) -> None:
        self.got.append(fds)
        os.eventfd_read(self.fd)


def test_the_wait_ends_on_a_kernel_fd_and_still_takes_signals() -> None:
    from dask_safe_worker.supervise import _signal_fd

    wait_set = {signal.SIGUSR2, signal.SIGCHLD}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, wait_set)
    signals = _signal_fd(wait_set, lambda e, **f: None)
    assert signals is not None
    waker = EventWaker()
    try:
        os.eventfd_write(waker.fd, 1)
        # Long enough that a wait not ended by the fd would be seen by nobody: the
        # assertion is that the fd was reported and no signal invented.
        assert _next_signal(wait_set, 600.0, waker, signals) is None
        assert waker.got == [[waker.fd]]
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)
        info = _next_signal(wait_set, 600.0, waker, signals)
        assert info is not None and info.si_signo == signal.SIGUSR2
        assert waker.got == [[waker.fd]]
    finally:
        os.close(signals)
        os.close(waker.fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
