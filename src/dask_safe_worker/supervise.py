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
import errno
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .audit import no_audit

__all__ = ["FORWARDED_SIGNALS", "is_pid1", "main", "supervise"]

FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)

# Python ignores these at start-up; exec keeps SIG_IGN, so the worker would inherit them.
_PYTHON_IGNORED = (signal.SIGPIPE, signal.SIGXFSZ)

_PR_SET_CHILD_SUBREAPER = 36

# A safety net only: SIGCHLD wakes the loop, but a periodic reap costs nothing.
_WAIT_TIMEOUT_S = 1.0

EXEC_FAILED = 127

# Matches dask_safe_worker.audit.SCHEMA_VERSION; not imported from there to stay stdlib-only.
AUDIT_SCHEMA_VERSION = 1


def is_pid1() -> bool:
    """Whether this process is the init of its PID namespace."""
    return os.getpid() == 1


def _set_child_subreaper() -> str | None:
    """Become the reaper of orphaned descendants; returns an error reason or None."""
    # ctypes only here, so that importing this module stays cheap when we are PID 1 anyway.
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            return errno.errorcode.get(err, str(err))
    except (OSError, AttributeError) as exc:
        return type(exc).__name__
    return None


def _exec_child(argv: Sequence[str], env: Mapping[str, str], process_group: bool) -> None:
    """Runs in the forked child; never returns."""
    try:
        if process_group:
            os.setpgid(0, 0)
            # With `-g` semantics the worker's group must own the terminal, or a shell-like
            # worker reading the TTY would be stopped by SIGTTIN.
            if os.isatty(0):
                previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
                with contextlib.suppress(OSError):
                    os.tcsetpgrp(0, os.getpgrp())
                signal.signal(signal.SIGTTOU, previous)
        for signum in _PYTHON_IGNORED:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.execvpe(argv[0], list(argv), dict(env))
    except BaseException as exc:  # whatever happens, the forked child must not return
        try:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
            os.write(2, f"dask-safe-worker: cannot exec {argv[0]!r}: {reason}\n".encode())
        finally:
            os._exit(EXEC_FAILED)


def _status_fields(status: int) -> tuple[int, dict[str, Any]]:
    """Exit code as a shell reports it, plus audit fields."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        return 128 + signum, {"signal": _signal_name(signum), "code": 128 + signum}
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        return code, {"code": code}
    return 128 + signal.SIGKILL, {"raw_status": status}


def _signal_name(signum: int) -> str:
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


def _forward(signum: int, child: int, process_group: bool, audit: Callable[..., None]) -> None:
    name = _signal_name(signum)
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
    ticker: Callable[[], float] | None = None,
) -> int:
    """Run ``argv`` as a supervised child and return its exit code (128+N if killed by N).

    Forwards TERM, INT, QUIT, HUP, USR1, USR2 and WINCH to the child (to its process group
    if ``process_group``), reaps every zombie (as a subreaper when not PID 1), and after
    the child is gone reaps lingering orphans for up to ``reap_grace`` seconds before
    calling ``on_child_exit``. A failed exec gives 127. ``ticker`` (--follow's watch) is
    called on every wake-up and returns the seconds until it wants to be called again.
    """
    if not argv:
        raise ValueError("supervise() needs a command to run")
    pid1 = is_pid1()
    subreaper_error = None if pid1 else _set_child_subreaper()
    wait_set = {*FORWARDED_SIGNALS, signal.SIGCHLD}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, wait_set)
    try:
        audit(
            "init.start",
            argv=list(argv),
            pid1=pid1,
            process_group=process_group,
            subreaper=pid1 or subreaper_error is None,
            **({"subreaper_error": subreaper_error} if subreaper_error else {}),
        )
        # Buffered output would otherwise be written twice or out of order around the fork.
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        child_env = os.environ if env is None else env
        child = os.fork()
        if child == 0:
            _exec_child(argv, child_env, process_group)
        if process_group:
            # Both sides call setpgid so that no signal can arrive before the group exists.
            # EACCES (already exec'd) or ESRCH (already gone) means the child's own call won.
            with contextlib.suppress(OSError):
                os.setpgid(child, child)
        code = _wait_for_main(child, process_group, audit, ticker)
        _drain_orphans(child, process_group, audit, reap_grace)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    if on_child_exit is not None:
        try:
            on_child_exit()
        except Exception as exc:  # the worker's exit code matters more than cleanup
            audit("init.cleanup.failed", error=repr(exc))
    audit("init.exit", code=code)
    return code


def _wait_for_main(
    child: int,
    process_group: bool,
    audit: Callable[..., None],
    ticker: Callable[[], float] | None = None,
) -> int:
    wait_set = {*FORWARDED_SIGNALS, signal.SIGCHLD}
    timeout = _WAIT_TIMEOUT_S
    while True:
        info = signal.sigtimedwait(wait_set, timeout)
        # --follow: the watch ticks between signals (watch.py).
        timeout = _WAIT_TIMEOUT_S if ticker is None else min(_WAIT_TIMEOUT_S, ticker())
        if info is not None and info.si_signo != signal.SIGCHLD:
            _forward(info.si_signo, child, process_group, audit)
        main_code, _ = _reap(child, audit)
        if main_code is not None:
            return main_code


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


def _json_audit(event: str, **fields: Any) -> None:
    """The audit log's JSON line shape (docs/audit-log.md), without importing structlog."""
    import json
    from datetime import datetime, timezone

    failed = event.endswith((".failed", ".refused", ".error"))
    record = {
        **fields,
        "event": event,
        "schema": AUDIT_SCHEMA_VERSION,
        "pid": os.getpid(),
        "level": "warning" if failed else "info",
        "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
    }
    os.write(2, (json.dumps(record, default=str) + "\n").encode())


def _remove_cgroup(child: str, parent: str, audit: Callable[..., None]) -> None:
    """Leave the child cgroup made for the worker, then remove it; same event as the CLI."""
    error = None
    try:
        with open(os.path.join(parent, "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))
        os.rmdir(child)
    except OSError as exc:
        error = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    audit("cgroup.child.removed", target=child, error=error)


USAGE = (
    "usage: python -m dask_safe_worker.supervise [-g] [--log-format json|none]\n"
    "       [--remove-cgroup CHILD_DIR --parent-cgroup PARENT_DIR] [--follow SPEC_FILE]\n"
    "       [--] CMD [ARGS...]\n"
)


def main(args: Sequence[str] | None = None) -> int:
    """A bare supervisor, for a launcher that execs it to shed its own imports.

    ``--remove-cgroup``/``--parent-cgroup`` hand over the cleanup that the caller's
    ``on_child_exit`` would otherwise do: move back to the parent, then rmdir the child.
    """
    rest = list(sys.argv[1:] if args is None else args)
    process_group = False
    audit: Callable[..., None] = _json_audit
    cgroup: dict[str, str] = {}
    follow_spec: str | None = None
    while rest and rest[0].startswith("-"):
        opt = rest.pop(0)
        if opt == "--":
            break
        if opt in ("-g", "--process-group"):
            process_group = True
        elif opt == "--follow" and rest:
            follow_spec = rest.pop(0)
        elif opt in ("--log-format", "--remove-cgroup", "--parent-cgroup") and rest:
            value = rest.pop(0)
            if opt != "--log-format":
                cgroup[opt] = value
            elif value in ("json", "none"):
                audit = _json_audit if value == "json" else no_audit
            else:
                rest = []
                break
        else:
            rest = []
            break
    if not rest or len(cgroup) == 1:
        os.write(2, USAGE.encode())
        return 2
    cleanups: list[Callable[[], None]] = []
    if cgroup:
        child, parent = cgroup["--remove-cgroup"], cgroup["--parent-cgroup"]
        cleanups.append(lambda: _remove_cgroup(child, parent, audit))
    ticker = None
    if follow_spec is not None:
        # Imported only with --follow: the bare supervisor stays stdlib only.
        from .watch import start_watch

        ticker = start_watch(follow_spec, audit)
        if ticker is not None:
            cleanups.insert(0, ticker.close)

    def on_child_exit() -> None:
        for cleanup in cleanups:
            cleanup()

    return supervise(
        rest,
        process_group=process_group,
        audit=audit,
        on_child_exit=on_child_exit if cleanups else None,
        ticker=ticker,
    )


if __name__ == "__main__":
    sys.exit(main())
