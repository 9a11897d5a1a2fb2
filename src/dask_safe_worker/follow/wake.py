"""Kernel signals that wake `--follow`'s watch before its next tick (the edge module).

The tick stays the floor; these only bring it forward. Each source is optional: one the
kernel does not offer (no `cgroup.event_control`, PSI off, no permission) is logged once
(`follow.wake.unavailable`) and the tick covers it.

- v1: eventfds registered through `cgroup.event_control` on `memory.usage_in_bytes`
  thresholds (where `follow.decide.wake_points` says a change could start) and on
  `memory.pressure_level` (`medium`: the kernel is reclaiming hard).
- v2: a PSI trigger on `memory.pressure` (POLLPRI when tasks stalled on memory for more
  than `PSI_STALL_US` of a `PSI_WINDOW_US` window) and `memory.events` (kernfs notifies a
  poller with POLLPRI on every change of its counters: `high`, `max`, `oom`, `oom_kill`).

The supervisor polls `fds()` along with its signals and calls `fired()` with the ready
ones. Sources are muted from a wake until the next tick re-arms them: a cgroup held at its
limit signals on every allocation, and the watch needs one tick for all of them.
"""

from __future__ import annotations

import contextlib
import os
import select

from ..event_line import errno_name
from .decide import WakePoints

TYPE_CHECKING = False  # typing costs ~2 ms (and `re`) in the supervisor; mypy knows this name
if TYPE_CHECKING:
    from collections.abc import Callable

# PSI: a trigger fires when some task stalled on memory for 100 ms within 1 s. Only
# privileged processes may use windows that are not a multiple of 2 s (Linux 6.5+), so the
# unprivileged form is the fallback.
PSI_TRIGGERS = (b"some 100000 1000000", b"some 200000 2000000")
PRESSURE_LEVEL = "medium"

POLL_IN = select.POLLIN
POLL_PRI = select.POLLPRI


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class Wake:
    """The registered sources of one watch, re-armed after each tick."""

    def __init__(self, version: int, audit: Callable[..., None]) -> None:
        self.version = version
        self.audit = audit
        # fd -> (source, directory, poll events); each fd is ours to close.
        self._sources: dict[int, tuple[str, str, int]] = {}
        # Kept open while registered: the kernel files an eventfd or trigger refers to.
        self._held: list[int] = []
        self._armed: WakePoints | None = None
        self._muted = False
        self._unavailable: set[str] = set()
        self.wakes: dict[str, int] = {}

    # -- the supervisor's side -------------------------------------------------------

    def fds(self) -> list[tuple[int, int]]:
        """(fd, poll events) to wait on; none while muted."""
        if self._muted:
            return []
        return [(fd, events) for fd, (_, _, events) in self._sources.items()]

    def fired(self, fds: list[int]) -> list[str]:
        """Consume what the ready fds signalled; the sources that fired. Mutes all."""
        names = []
        for fd in fds:
            source = self._sources.get(fd)
            if source is None:
                continue
            names.append(source[0])
            self.wakes[source[0]] = self.wakes.get(source[0], 0) + 1
            try:
                if source[0] == "memory.events":
                    # kernfs re-arms its poll once the file is read again.
                    os.pread(fd, 4096, 0)
                elif source[0] != "psi":
                    os.eventfd_read(fd)
            except OSError:
                pass
        if names:
            self._muted = True
        return names

    # -- the watch's side ------------------------------------------------------------

    def arm(self, points: WakePoints) -> None:
        """Register `points` (after a tick); unchanged sources stay as they are."""
        self._muted = False
        if points == self._armed:
            return
        self.close()
        self._armed = points
        if self.version == 1:
            for directory, threshold in points.thresholds:
                self._v1_event(directory, "memory.usage_in_bytes", str(threshold), "usage")
            for directory in points.pressure:
                self._v1_event(directory, "memory.pressure_level", PRESSURE_LEVEL, "pressure")
        else:
            for directory in points.pressure:
                self._v2_psi(directory)
                self._v2_events(directory)

    def close(self) -> None:
        for fd in self._sources:
            _close(fd)
        for fd in self._held:
            _close(fd)
        self._sources = {}
        self._held = []
        self._armed = None

    def _unavailable_once(self, source: str, directory: str, exc: OSError) -> None:
        if source in self._unavailable:
            return
        self._unavailable.add(source)
        self.audit(
            "follow.wake.unavailable",
            source=source,
            cgroup=directory,
            reason=errno_name(exc.errno),
            fallback="tick",
        )

    def _v1_event(self, directory: str, filename: str, argument: str, source: str) -> None:
        efd = target = -1
        try:
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            target = os.open(f"{directory}/{filename}", os.O_RDONLY | os.O_CLOEXEC)
            control = os.open(f"{directory}/cgroup.event_control", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(control, f"{efd} {target} {argument}".encode())
            finally:
                os.close(control)
        except OSError as exc:
            for fd in (efd, target):
                if fd >= 0:
                    _close(fd)
            self._unavailable_once(source, directory, exc)
            return
        # The kernel drops the registration when the eventfd is closed.
        self._sources[efd] = (source, directory, POLL_IN)
        self._held.append(target)

    def _v2_psi(self, directory: str) -> None:
        try:
            fd = os.open(f"{directory}/memory.pressure", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            self._unavailable_once("psi", directory, exc)
            return
        error: OSError | None = None
        for trigger in PSI_TRIGGERS:
            try:
                os.write(fd, trigger + b"\0")
            except OSError as exc:
                error = exc
                continue
            self._sources[fd] = ("psi", directory, POLL_PRI)
            return
        _close(fd)
        assert error is not None
        self._unavailable_once("psi", directory, error)

    def _v2_events(self, directory: str) -> None:
        try:
            fd = os.open(f"{directory}/memory.events", os.O_RDONLY | os.O_CLOEXEC)
            os.pread(fd, 4096, 0)  # the poll reports changes after this read
        except OSError as exc:
            self._unavailable_once("memory.events", directory, exc)
            return
        self._sources[fd] = ("memory.events", directory, POLL_PRI)
