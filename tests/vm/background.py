"""The guest suite's one boot, started as soon as pytest has collected it.

The emulated guest needs about 1.4 cores for ten minutes, while the host tests mostly wait
on the schedulers, workers and containers they started (under half a core on average). Run
after them, as the last tests in path order, the boot added its whole length to CI; run
beside them from the start of the session, most of it disappears. test_v2_suite's fixture
takes the result, and falls back to booting itself when nothing was started (a run that
collected the VM tests some other way).
"""

from __future__ import annotations

import threading
from pathlib import Path

from vmrun import GuestSuiteResult, run_guest_suite


class BackgroundSuite:
    """One run_guest_suite in a thread; `result` waits for it, `cancel` kills the VM."""

    def __init__(self, results_dir: Path, timeout: float) -> None:
        self.results_dir = results_dir
        self._timeout = timeout
        self._stop = threading.Event()
        self._result: GuestSuiteResult | None = None
        self._error: BaseException | None = None
        # Waited on instead of Thread.join: on Python 3.11 a join that a KeyboardInterrupt
        # cut short leaves the thread looking stopped, and a second join returns at once
        # with the VM still running.
        self._finished = threading.Event()
        # A daemon, so that an interpreter that exits without the session's end (a crash)
        # is not held by it; the VM itself is then ended by the stop event or its timeout.
        self._thread = threading.Thread(target=self._run, name="guest-suite", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = run_guest_suite(self.results_dir, timeout=self._timeout, stop=self._stop)
        except BaseException as exc:  # handed to the test that waits, whatever it is
            self._error = exc
        finally:
            self._finished.set()

    def result(self) -> GuestSuiteResult:
        """The suite's result, once the boot has ended; what it raised, raised here."""
        self._finished.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """Kill the VM if it still runs (a session that ended before the VM tests)."""
        self._stop.set()
        self._finished.wait()


_started: list[BackgroundSuite] = []


def start(results_dir: Path, timeout: float) -> BackgroundSuite:
    """Start the one background boot of this session."""
    if not _started:
        _started.append(BackgroundSuite(results_dir, timeout))
    return _started[0]


def started() -> BackgroundSuite | None:
    """This session's background boot, if `start` was called."""
    return _started[0] if _started else None
