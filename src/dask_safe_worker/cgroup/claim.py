"""Claim a child cgroup for as long as this instance runs: an flock on its directory.

A child's name says nothing about whether its instance still runs: the plain `<name>`
carries no pid, and an exec'd worker cannot remove its child when it ends. The claim is
an exclusive flock on an open descriptor of the child's directory, made inheritable, so
that it passes through the exec of the worker or the supervisor and is released by the
kernel when the last process holding it ends. A child nobody claims and that holds no
process is a leftover, and the next start removes it. flock never stops an rmdir, so the
supervisor still removes its own child.
"""

from __future__ import annotations

import os
from pathlib import Path


def _open_locked(directory: Path) -> tuple[int, bool | None]:
    """A descriptor of `directory` and whether it holds the lock: False when another
    process holds it, None when this filesystem refuses flock. FileNotFoundError when
    the directory is gone."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return fd, False
    except OSError:
        return fd, None
    return fd, True


def claim_new(directory: Path) -> int | None:
    """Claim the child this process has just created; None when it lost it to another
    start that found it unclaimed and removed it (that start then uses the name itself).

    The descriptor stays open, inheritable, for the life of the instance. Where flock is
    refused the child is used unclaimed: a later start then keeps it as if claimed."""
    try:
        fd, held = _open_locked(directory)
    except FileNotFoundError:
        return None
    if held is False:
        os.close(fd)
        return None
    try:
        now, mine = os.stat(directory), os.fstat(fd)
    except FileNotFoundError:
        os.close(fd)
        return None
    if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
        os.close(fd)  # removed and created again by another start in between
        return None
    os.set_inheritable(fd, True)
    return fd


def remove_if_unclaimed(directory: Path) -> bool:
    """rmdir `directory` when no running instance claims it and it holds no process (the
    kernel refuses rmdir then). False when it was kept or is already gone; kept, too,
    where flock is refused and a claim cannot be seen."""
    try:
        fd, held = _open_locked(directory)
    except OSError:
        return False
    try:
        if held:
            os.rmdir(directory)
        return bool(held)
    except OSError:
        return False
    finally:
        os.close(fd)
