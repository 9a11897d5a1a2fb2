"""The v2 kernel wake-ups of --follow's watch (follow/wake.py): a PSI trigger on
memory.pressure and memory.events, registered on a real cgroup2 tree and fired by a process
that goes over the cgroup's memory.high."""

from __future__ import annotations

import select
from typing import Any

from guest_cgroups import PYTHON, Cgroup, MiB, Processes, enter

from dask_safe_worker.follow.decide import WakePoints
from dask_safe_worker.follow.wake import Wake

# A guard against a hang in the emulated guest, not a measurement.
WAIT_MS = 120_000


def test_v2_wake_sources_register_and_fire(base: Cgroup, procs: Processes) -> None:
    m = base.child("m")
    m.write("memory.high", 32 * MiB)
    log: list[tuple[str, dict[str, Any]]] = []
    wake = Wake(2, lambda e, **f: log.append((e, f)))
    wake.arm(WakePoints((), (str(m.path),)))
    try:
        # Both sources are offered by this kernel, as root: nothing falls back.
        assert log == []
        assert sorted(events for _, events in wake.fds()) == [select.POLLPRI] * 2
        poller = select.poll()
        for fd, events in wake.fds():
            poller.register(fd, events)
        assert poller.poll(0) == []
        # Over memory.high: the kernel counts `high` in memory.events (and throttles it).
        code = "b = bytearray(64 * 2**20); b[::4096] = b'x' * len(b[::4096])\nimport time\n"
        procs.popen(enter(m, [PYTHON, "-c", code + "time.sleep(3600)"]))
        ready = [fd for fd, _ in poller.poll(WAIT_MS)]
        assert ready, "neither memory.events nor PSI signalled"
        fired = wake.fired(ready)
        assert set(fired) <= {"memory.events", "psi"} and fired
        assert m.events()["high"] > 0
        assert wake.fds() == []  # muted until the next tick re-arms
    finally:
        procs.end_all()
        wake.close()
