"""A tini-like supervisor: fork the worker, forward signals, reap zombies, pass the exit code.

As PID 1 in a container nobody else reaps orphans, and a process without a SIGTERM handler
ignores SIGTERM, so a plain exec of the worker would neither clean up nor stop gracefully.

This module is stdlib only on purpose: as PID 1 it lives as long as the container, and every
imported module stays resident. Run it as ``python -m dask_safe_worker.supervise`` to get a
supervisor whose RSS is the bare interpreter's.

Call :func:`supervise` from the main thread of a single-threaded process: blocked signals
are per thread, and a signal delivered to another thread would bypass the forwarding loop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from .cgroup.leave import leave_and_remove
from .event_line import Stamp, console_line, errno_name, json_line, record

TYPE_CHECKING = False  # typing costs ~2 ms (and `re`) before the worker starts
if TYPE_CHECKING:
    from typing import Any, Protocol

    class Waker(Protocol):
        """Kernel fds that wake the loop before the ticker is due (follow/wake.py)."""

        def fds(self) -> list[tuple[int, int]]: ...  # (fd, poll events)

        def fired(self, fds: list[int]) -> None: ...


__all__ = [
    "FORWARDED_SIGNALS",
    "defer_signals",
    "is_pid1",
    "main",
    "release_signals_for_exec",
    "remove_child_cgroup",
    "start_worker",
    "supervise",
]

FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)

# A signal pending before the worker starts means "do not start it" for these.
STOPPING_SIGNALS: frozenset[int] = frozenset(
    {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP}
)

# The terminal sends these to its whole foreground process group (si_code SI_KERNEL): a
# worker in our group has had its own copy. HUP is not here: on hangup the kernel may
# signal only the session leader.
_TERMINAL_GROUP_SIGNALS: frozenset[int] = frozenset(
    {signal.SIGINT, signal.SIGQUIT, signal.SIGWINCH}
)
_SI_KERNEL = 0x80  # Linux's si_code for a signal the kernel itself sent (not in `signal`)

# Python ignores these at start-up; exec keeps SIG_IGN, so the worker would inherit them.
_PYTHON_IGNORED = (signal.SIGPIPE, signal.SIGXFSZ)

_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_PDEATHSIG = 1

# A safety net only: SIGCHLD wakes the loop, but a periodic reap costs nothing.
_WAIT_TIMEOUT_S = 1.0

EXEC_FAILED = 127


def no_audit(event: str, **fields: object) -> None:
    """Records nothing: the default for library use, and `--log-format none`."""
    return None


def is_pid1() -> bool:
    """Whether this process is the init of its PID namespace."""
    return os.getpid() == 1


def defer_signals() -> None:
    """Block the forwarded signals from now on, so that none is lost or acted on too early.

    The planning process calls this before it creates a child cgroup and execs the
    supervisor: the mask and the pending signals survive exec, so a SIGTERM that arrives
    in between waits for the supervisor, which then removes the child instead of dying
    with it in place (issue 13, row 4).
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)


def release_signals_for_exec() -> int | None:
    """Before this process execs the worker itself (no supervisor): the stopping signal
    that arrived while the forwarded signals were deferred (consumed; do not start the
    worker), else None with them unblocked, since the worker would inherit the mask."""
    stop = _pending_stop()
    if stop is None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    return stop


def _set_child_subreaper() -> str | None:
    """Become the reaper of orphaned descendants; returns an error reason or None."""
    # ctypes only here, so that importing this module stays cheap when we are PID 1 anyway.
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return errno_name(ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        return type(exc).__name__
    return None


def _die_with_parent(parent: int) -> None:
    """In the forked child: be killed when the supervisor dies, as the worker's own
    nanny would be if it had been started without us. Launchers end a job by SIGKILL to
    the pid they started (dask-jobqueue's local runner does): without this, the nanny
    and its worker would run on, registered, holding their memory."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the supervisor died before the prctl
        os._exit(128 + int(signal.SIGKILL))


def _exec_child(
    argv: Sequence[str], env: Mapping[str, str], process_group: bool, parent: int
) -> None:
    """Runs in the forked child; never returns."""
    try:
        _die_with_parent(parent)
        if process_group:
            os.setpgid(0, 0)
            # With `-g` semantics the worker's group must own the terminal, or a shell-like
            # worker reading the TTY would be stopped by SIGTTIN.
            if os.isatty(0):
                previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
                with contextlib.suppress(OSError):
                    os.tcsetpgrp(0, os.getpgrp())
                signal.signal(signal.SIGTTOU, previous)
        # Default actions before unblocking: a signal still pending for the child (or
        # Python's SIGINT handler) must act as it will on the exec'd worker, not raise
        # KeyboardInterrupt here.
        for signum in (*_PYTHON_IGNORED, *FORWARDED_SIGNALS):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.execvpe(argv[0], list(argv), dict(env))
    except BaseException as exc:  # whatever happens, the forked child must not return
        try:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
            os.write(2, f"dask-safe-worker: cannot exec {argv[0]!r}: {reason}\n".encode())
        finally:
            os._exit(EXEC_FAILED)


def start_worker(argv: Sequence[str], env: Mapping[str, str], process_group: bool) -> int:
    """Fork and exec the worker before the supervisor exists; its pid.

    The planning process calls this right before it execs the supervisor, which then
    adopts the child (``--adopt``): the supervisor's interpreter start, its imports and
    the watch's set-up run beside the worker's start instead of before it. The exec keeps
    our pid, so the worker stays our child; made a subreaper here (the flag survives
    exec), orphans of its start are ours too. SIGCHLD is blocked first, so that a worker
    which ends before the supervisor waits stays pending across the exec; the forwarded
    signals are blocked already (`defer_signals`) and wait for the supervisor's loop.
    """
    if not is_pid1():
        _set_child_subreaper()  # reported by the supervisor, which sets it again
    signal.pthread_sigmask(signal.SIG_BLOCK, {*FORWARDED_SIGNALS, signal.SIGCHLD})
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    return _fork_child(argv, env, process_group)


def _fork_child(argv: Sequence[str], env: Mapping[str, str], process_group: bool) -> int:
    """Fork, exec `argv` in the child; the child's pid."""
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        _exec_child(argv, env, process_group, parent)
    if process_group:
        # Both sides call setpgid so that no signal can arrive before the group exists.
        # EACCES (already exec'd) or ESRCH (already gone) means the child's own call won.
        with contextlib.suppress(OSError):
            os.setpgid(child, child)
    return child


def _status_fields(status: int) -> tuple[int, dict[str, Any]]:
    """Exit code as a shell reports it, plus audit fields."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        return 128 + signum, {"signal": signal_name(signum), "code": 128 + signum}
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        return code, {"code": code}
    return 128 + signal.SIGKILL, {"raw_status": status}


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _reap(main_pid: int, audit: Callable[..., None]) -> tuple[int | None, bool]:
    """Reap every exited child without blocking.

    Returns (exit code of the main child if it was reaped now, whether any child remains).
    """
    main_code: int | None = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return main_code, False
        if pid == 0:
            return main_code, True
        code, fields = _status_fields(status)
        if pid == main_pid:
            main_code = code
            audit("init.child.exited", child_pid=pid, **fields)
        else:
            audit("init.orphan.reaped", child_pid=pid, **fields)


def _worker_has_it(info: signal.struct_siginfo, child: int, process_group: bool) -> bool:
    """Whether the terminal sent this signal to a process group the worker is in.

    Ctrl-C reaches the terminal's whole foreground group. Without `-g` the worker shares
    our group, so it got its own SIGINT already; forwarding a second would turn one
    intent into two (distributed treats the second as "stop now", exit 1). tini puts
    its child in a group of its own for the same reason.
    """
    if process_group or info.si_signo not in _TERMINAL_GROUP_SIGNALS:
        return False
    if info.si_code != _SI_KERNEL:
        return False
    try:
        return os.getpgid(child) == os.getpgrp()
    except OSError:
        return False


def _forward(signum: int, child: int, process_group: bool, audit: Callable[..., None]) -> None:
    name = signal_name(signum)
    target: dict[str, int] = {"target_pgid": child} if process_group else {"target_pid": child}
    try:
        if process_group:
            os.killpg(child, signum)
        else:
            os.kill(child, signum)
    except ProcessLookupError:
        # The child exited between the signal and now; its exit is reported by the reaper.
        audit("init.signal.forwarded", signal=name, delivered=False, reason="ESRCH", **target)
        return
    audit("init.signal.forwarded", signal=name, delivered=True, **target)


def supervise(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    process_group: bool = False,
    audit: Callable[..., None] = no_audit,
    on_child_exit: Callable[[], None] | None = None,
    reap_grace: float = 1.0,
    restore_signal_mask: bool = True,
    ticker: Callable[[], float] | None = None,
    adopted: int | None = None,
    waker: Waker | None = None,
) -> int:
    """Run ``argv`` as a supervised child and return its exit code (128+N if killed by N).

    Forwards TERM, INT, QUIT, HUP, USR1, USR2 and WINCH to the child (to its process group
    if ``process_group``), except a terminal's INT, QUIT or WINCH that the child already
    received with our process group; reaps every zombie (as a subreaper when not PID 1),
    and after the child is gone reaps lingering orphans for up to ``reap_grace`` seconds.
    ``on_child_exit`` runs on every way out, signals and errors included, while signals
    are still blocked. A TERM, INT, QUIT or HUP already pending when this is called (see
    :func:`defer_signals`) means the worker is not started: the result is 128+N. A failed
    exec gives 127. ``restore_signal_mask=False`` is for a process that exits right
    after: a late signal then cannot change its exit code. ``ticker`` (--follow's watch)
    is called on every wake-up and returns the seconds until it wants to be called again;
    ``waker``'s fds (the kernel's memory signals) wake the loop as a signal does.
    ``adopted``: the pid of a child already running ``argv`` (`start_worker`), supervised
    as if it had been started here; a stop that arrives now is forwarded to it.
    """
    if not argv:
        raise ValueError("supervise() needs a command to run")
    pid1 = is_pid1()
    subreaper_error = None if pid1 else _set_child_subreaper()
    wait_set = {*FORWARDED_SIGNALS, signal.SIGCHLD}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, wait_set)
    try:
        try:
            code = _start_and_wait(
                argv,
                env,
                process_group,
                audit,
                reap_grace,
                pid1,
                subreaper_error,
                ticker,
                adopted,
                waker,
            )
        finally:
            if on_child_exit is not None:
                try:
                    on_child_exit()
                except Exception as exc:  # the worker's exit code matters more than cleanup
                    audit("init.cleanup.failed", error=repr(exc))
        audit("init.exit", code=code)
    finally:
        if restore_signal_mask:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return code


def _start_and_wait(
    argv: Sequence[str],
    env: Mapping[str, str] | None,
    process_group: bool,
    audit: Callable[..., None],
    reap_grace: float,
    pid1: bool,
    subreaper_error: str | None,
    ticker: Callable[[], float] | None = None,
    adopted: int | None = None,
    waker: Waker | None = None,
) -> int:
    start_fields: dict[str, Any] = {
        "argv": list(argv),
        "pid1": pid1,
        "process_group": process_group,
        "subreaper": pid1 or subreaper_error is None,
        **({"subreaper_error": subreaper_error} if subreaper_error else {}),
    }
    if adopted is not None:
        audit("init.start", **start_fields, adopted=adopted)
        code = _wait_for_main(adopted, process_group, audit, ticker, waker)
        _drain_orphans(adopted, process_group, audit, reap_grace)
        return code
    stop = _pending_stop()
    if stop is None:
        audit("init.start", **start_fields)
        # Buffered output would otherwise be written twice or out of order around the fork.
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        # Once more, as close to the fork as possible: a child does not inherit pending
        # signals, so a Ctrl-C from just before the fork would reach nobody.
        stop = _pending_stop()
    if stop is not None:
        audit("init.start.cancelled", signal=signal_name(stop), code=128 + stop)
        return 128 + stop
    child = _fork_child(argv, os.environ if env is None else env, process_group)
    code = _wait_for_main(child, process_group, audit, ticker, waker)
    _drain_orphans(child, process_group, audit, reap_grace)
    return code


def _pending_stop() -> int | None:
    """A stopping signal that arrived before the worker was started (consumed), or None."""
    pending = signal.sigpending() & STOPPING_SIGNALS
    if not pending:
        return None
    info = signal.sigtimedwait(pending, 0)
    return None if info is None else info.si_signo


def _wait_for_main(
    child: int,
    process_group: bool,
    audit: Callable[..., None],
    ticker: Callable[[], float] | None = None,
    waker: Waker | None = None,
) -> int:
    wait_set = {*FORWARDED_SIGNALS, signal.SIGCHLD}
    signals = None if waker is None else _signal_fd(wait_set, audit)
    try:
        return _wait_loop(child, process_group, audit, ticker, waker, signals)
    finally:
        if signals is not None:
            os.close(signals)


def _signal_fd(wait_set: set[signal.Signals], audit: Callable[..., None]) -> int | None:
    """A signalfd for the blocked `wait_set`: readable while one of them is pending, so
    that one poll waits for signals and the kernel's memory fds together. Python has no
    signalfd; ctypes is loaded already (the subreaper's prctl). None (logged) without one:
    then the loop waits for signals alone, and following keeps to its tick."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mask = ctypes.create_string_buffer(128)  # sizeof(sigset_t) in glibc and musl
        libc.sigemptyset(mask)
        for signum in wait_set:
            libc.sigaddset(mask, int(signum))
        fd = int(libc.signalfd(-1, mask, os.O_NONBLOCK | os.O_CLOEXEC))
        error = None if fd >= 0 else errno_name(ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        fd, error = -1, type(exc).__name__
    if fd < 0:
        audit("follow.wake.unavailable", source="signalfd", reason=error, fallback="tick")
        return None
    return fd


class _Poll:
    """One poll object for the whole wait: its fds registered anew only when they change
    (the watch re-arms its wake-ups far less often than the loop wakes up)."""

    def __init__(self) -> None:
        import select

        self.poller = select.poll()
        self.registered: list[tuple[int, int]] = []

    def poll(self, fds: list[tuple[int, int]], timeout_ms: float) -> list[tuple[int, int]]:
        if fds != self.registered:
            for fd, _ in self.registered:
                self.poller.unregister(fd)
            self.registered = []
            for fd, events in fds:
                self.poller.register(fd, events)
                self.registered.append((fd, events))
        return self.poller.poll(timeout_ms)


def _next_signal(
    wait_set: set[signal.Signals],
    timeout: float,
    waker: Waker | None,
    signals: int | None,
    poller: _Poll | None = None,
) -> signal.struct_siginfo | None:
    """The next signal within `timeout` s; a ready fd of `waker`'s ends the wait too.
    `poller`: the wait's poll object, kept between calls."""
    fds = [] if waker is None or signals is None else waker.fds()
    if not fds or signals is None:
        return signal.sigtimedwait(wait_set, timeout)
    import select

    if poller is None:
        poller = _Poll()
    # Rounded up: a wait rounded down to 0 ms would spin until the tick is due.
    ready = poller.poll([(signals, select.POLLIN), *fds], -(-timeout * 1000 // 1))
    woke = [fd for fd, _ in ready if fd != signals]
    if woke and waker is not None:
        waker.fired(woke)
    # The signalfd only says that one is pending: take it as sigtimedwait always did.
    return signal.sigtimedwait(wait_set, 0)


def _wait_loop(
    child: int,
    process_group: bool,
    audit: Callable[..., None],
    ticker: Callable[[], float] | None,
    waker: Waker | None,
    signals: int | None,
) -> int:
    status = _KeptStatus(child)
    try:
        return _wait_loop_on(child, process_group, audit, ticker, waker, signals, status)
    finally:
        status.close()


def _wait_loop_on(
    child: int,
    process_group: bool,
    audit: Callable[..., None],
    ticker: Callable[[], float] | None,
    waker: Waker | None,
    signals: int | None,
    status: _KeptStatus,
) -> int:
    wait_set = {*FORWARDED_SIGNALS, signal.SIGCHLD}
    timeout = _WAIT_TIMEOUT_S
    # A signal we forwarded once is a deliberate repeat when it comes again: forwarded.
    forwarded: set[int] = set()
    earlier: int | None = None
    poller = _Poll()
    while True:
        # The handlers seen at this wake-up and the one before: a launcher's copy that
        # reached the worker first may have been handled (its handler reset) just
        # before this wake-up, whose reading then no longer shows the handler.
        now = status_mask(status.read(), b"SigCgt")
        caught = now if earlier is None or now is None else now | earlier
        earlier = now
        info = _next_signal(wait_set, timeout, waker, signals, poller)
        if info is not None and info.si_signo != signal.SIGCHLD:
            # Before the watch's tick: a stop must not wait for a measurement.
            if _worker_has_it(info, child, process_group):
                audit(
                    "init.signal.shared",
                    signal=signal_name(info.si_signo),
                    target_pgid=os.getpgrp(),
                )
            elif info.si_signo not in forwarded and _got_own_copy(info.si_signo, child, caught):
                audit(
                    "init.signal.shared",
                    signal=signal_name(info.si_signo),
                    target_pid=child,
                    reason="the worker handled its own copy",
                )
            else:
                _forward(info.si_signo, child, process_group, audit)
                forwarded.add(info.si_signo)
        # --follow: the watch ticks between signals (watch.py).
        timeout = _WAIT_TIMEOUT_S if ticker is None else min(_WAIT_TIMEOUT_S, ticker())
        main_code, _ = _reap(child, audit)
        if main_code is not None:
            return main_code


# How long a signal may stay pending in the worker, not yet handled, before ours goes
# too; and how long a handler that has taken it may take to run (Python runs it at its
# next instruction, on a busy host later).
_OWN_COPY_PENDING_S = 1.0
_OWN_COPY_GRACE_S = 0.05


class _KeptStatus:
    """The worker's /proc/<pid>/status, read on every wake-up through one descriptor kept
    for the wait (read again at offset 0, the kernel makes it anew). The worker is our
    child: its pid is not reused before we reap it, and a descriptor of an exited
    process fails its read rather than show another's."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd: int | None = None

    def read(self) -> bytes | None:
        if self.fd is None:
            try:
                self.fd = os.open(f"/proc/{self.pid}/status", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
        try:
            return os.pread(self.fd, 65536, 0)
        except OSError:
            self.close()
            return None

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def _status(pid: int, proc_root: str = "/proc") -> bytes | None:
    # Read on every wake-up: one descriptor read, not a buffered file's lines.
    try:
        fd = os.open(f"{proc_root}/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.read(fd, 65536)
        finally:
            os.close(fd)
    except OSError:
        return None


def status_mask(text: bytes | None, field: bytes) -> int | None:
    """A signal mask of /proc/<pid>/status (`SigCgt`, `SigPnd`, `ShdPnd`), or None."""
    if text is None:
        return None
    at = text.find(b"\n" + field + b":")
    if at < 0:
        return None
    end = text.find(b"\n", at + 1)
    try:
        return int(text[at + len(field) + 2 : end if end >= 0 else len(text)], 16)
    except ValueError:
        return None


def own_copy_pending(signum: int, text: bytes | None) -> bool:
    """Whether `signum` waits in the process (its thread's or the whole process's)."""
    bit = 1 << (signum - 1)
    return any((status_mask(text, f) or 0) & bit for f in (b"SigPnd", b"ShdPnd"))


def _got_own_copy(signum: int, child: int, before: int | None) -> bool:
    """Whether the worker got a copy of `signum` from the same sender (a launcher that
    signals the whole job): handled already, or still pending and then handled. A
    worker without a handler then gets ours at once; with one, after a short grace."""
    import time

    if before is None or not before & (1 << (signum - 1)):
        return False
    start = time.monotonic()
    while True:
        text = _status(child)
        if handled_own_copy(signum, before, status_mask(text, b"SigCgt")):
            return True
        waited = time.monotonic() - start
        limit = _OWN_COPY_PENDING_S if own_copy_pending(signum, text) else _OWN_COPY_GRACE_S
        if text is None or waited >= limit:
            return False
        time.sleep(0.005)


def handled_own_copy(signum: int, before: int | None, now: int | None) -> bool:
    """Whether the worker handled a copy of `signum` since `before`: it had a handler
    then and has none now.

    A launcher that signals a whole job (Slurm's scancel signals every process of the
    step; systemd's KillMode=control-group every process of the unit) reaches the worker
    too. distributed restores the default action once it has handled SIGTERM or SIGINT,
    so that a second one stops it at once: forwarding ours as well would turn a graceful
    close into an abrupt one (exit 143, leaked semaphores). A worker that had no handler
    before gets ours, as always.
    """
    if before is None or now is None:
        return False
    bit = 1 << (signum - 1)
    return bool(before & bit) and not now & bit


def _drain_orphans(
    child: int, process_group: bool, audit: Callable[..., None], grace: float
) -> None:
    """Reap orphans that are exiting along with the worker, but do not wait for stayers."""
    wait_set = {*FORWARDED_SIGNALS, signal.SIGCHLD}
    deadline = time.monotonic() + grace
    while True:
        _, remaining = _reap(child, audit)
        left = deadline - time.monotonic()
        if not remaining or left <= 0:
            return
        info = signal.sigtimedwait(wait_set, left)
        if info is None or info.si_signo == signal.SIGCHLD:
            continue
        if not process_group:
            # Nobody left to forward to; whoever signals us wants us gone, not to wait.
            return
        # The group outlives its leader while members remain; they still get signals.
        _forward(info.si_signo, child, process_group, audit)


def stderr_audit(fmt: str, stamp: Stamp) -> Callable[..., None]:
    """Audit lines on fd 2 in the log's shape (event_line), JSON or console, no structlog.

    os.write, not sys.stderr: one write per line, nothing buffered across the fork.
    """
    if fmt == "none":
        return no_audit
    if fmt == "auto":
        fmt = "console" if os.isatty(2) else "json"
    colors = fmt == "console" and os.isatty(2)

    def audit(event: str, **fields: Any) -> None:
        rec = record(event, fields, stamp)
        line = json_line(rec) if fmt == "json" else console_line(rec, colors)
        os.write(2, (line + "\n").encode("utf-8", "backslashreplace"))

    return audit


def _own_cgroup_path(directory: str) -> str:
    """The cgroup path of `directory` as /proc/self/cgroup names it (the style of every
    other cgroup event), while we are still in it; the directory itself otherwise."""
    name = os.path.basename(directory.rstrip("/"))
    try:
        with open("/proc/self/cgroup", "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape")
    except OSError:
        return directory
    paths = {}
    for line in text.split("\n"):
        parts = line.split(":", 2)
        if len(parts) == 3:
            controllers = parts[1].split(",")
            if "memory" in controllers or parts[:2] == ["0", ""]:
                paths["memory" if "memory" in controllers else "v2"] = parts[2]
    for key in ("memory", "v2"):
        path = paths.get(key)
        if path is not None and os.path.basename(path.rstrip("/")) == name:
            return path
    return directory


def remove_child_cgroup(child: str, parent: str, audit: Callable[..., None]) -> None:
    """Leave the child cgroup made for the worker, then remove it; same event as the CLI."""
    error = None
    target = _own_cgroup_path(child)
    try:
        leave_and_remove(child, parent, os.getpid())
    except OSError as exc:
        error = errno_name(exc.errno)
    audit("cgroup.child.removed", target=target, **({"error": error} if error else {}))


USAGE = (
    "usage: python -m dask_safe_worker.supervise [-g] [--log-format json|console|auto|none]\n"
    "       [--start-id ID] [--worker-name NAME]\n"
    "       [--remove-cgroup CHILD_DIR --parent-cgroup PARENT_DIR] [--follow SPEC_FILE]\n"
    "       [--adopt PID] [--] CMD [ARGS...]\n"
)

_VALUE_OPTIONS = (
    "--log-format",
    "--start-id",
    "--worker-name",
    "--remove-cgroup",
    "--parent-cgroup",
    "--adopt",
)


def _telling(audit: Callable[..., None], reaped: Callable[[int, int], None]) -> Callable[..., None]:
    """`audit`, which also tells the watch each exit code it logs: a worker whose nanny
    died first is reaped here, and only its exit code says how it ended."""

    def telling(event: str, **fields: Any) -> None:
        if event in ("init.child.exited", "init.orphan.reaped") and "code" in fields:
            signum = fields["code"] - 128 if "signal" in fields else None
            reaped(int(fields["child_pid"]), fields["code"] if signum is None else -signum)
        audit(event, **fields)

    return telling


def main(args: Sequence[str] | None = None) -> int:
    """A bare supervisor, for a launcher that execs it to shed its own imports.

    ``--remove-cgroup``/``--parent-cgroup`` hand over the cleanup that the caller's
    ``on_child_exit`` would otherwise do: move back to the parent, then rmdir the child.
    ``--start-id`` and ``--worker-name`` stamp its audit lines like the caller's.
    ``--adopt PID``: the caller already started CMD as PID (`start_worker`), our child.
    """
    rest = list(sys.argv[1:] if args is None else args)
    process_group = False
    values: dict[str, str] = {}
    follow_spec: str | None = None
    while rest and rest[0].startswith("-"):
        opt = rest.pop(0)
        if opt == "--":
            break
        if opt in ("-g", "--process-group"):
            process_group = True
        elif opt == "--follow" and rest:
            follow_spec = rest.pop(0)
        elif opt in _VALUE_OPTIONS and rest:
            values[opt] = rest.pop(0)
        else:
            rest = []
            break
    fmt = values.get("--log-format", "json")
    if fmt not in ("json", "console", "auto", "none"):
        rest = []
    adopted: int | None = None
    if "--adopt" in values:
        adopted = int(values["--adopt"]) if values["--adopt"].isdigit() else None
        if adopted is None:
            rest = []
    stamp = Stamp.here(values.get("--start-id"), values.get("--worker-name"))
    audit = stderr_audit(fmt if rest else "json", stamp)
    cgroup = {k: v for k, v in values.items() if k in ("--remove-cgroup", "--parent-cgroup")}
    cleanups: list[Callable[[], None]] = []
    if len(cgroup) == 2:
        child, parent = cgroup["--remove-cgroup"], cgroup["--parent-cgroup"]
        cleanups.append(lambda: remove_child_cgroup(child, parent, audit))

    def on_child_exit() -> None:
        for cleanup in cleanups:
            cleanup()

    if not rest or len(cgroup) == 1:
        os.write(2, USAGE.encode())
        # The child cgroup was made for us: a usage error must not leave it behind either.
        on_child_exit()
        return 2
    ticker = None
    if follow_spec is not None:
        # Imported only with --follow: the bare supervisor stays stdlib only.
        from .follow.watch import start_watch

        ticker = start_watch(follow_spec, audit)
        if ticker is not None:
            cleanups.insert(0, ticker.close)
    return supervise(
        rest,
        process_group=process_group,
        audit=audit if ticker is None else _telling(audit, ticker.reaped),
        on_child_exit=on_child_exit if cleanups else None,
        restore_signal_mask=False,
        ticker=ticker,
        adopted=adopted,
        waker=None if ticker is None or ticker.wake is None else ticker,
    )


if __name__ == "__main__":
    sys.exit(main())
