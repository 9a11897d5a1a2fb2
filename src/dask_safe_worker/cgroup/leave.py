"""Leave a child cgroup and remove it: move a process back to the parent, then rmdir.

Shared by `cgroup_write` (undoing a failed start) and the stdlib-only supervisor
(removing the worker's child when it is gone), so it imports nothing but the stdlib.
rmdir fails while any process is still in the child.
"""

from __future__ import annotations

import os


def move_pid(directory: str | os.PathLike[str], pid: int) -> None:
    """Move `pid` into the cgroup at `directory`."""
    with open(os.path.join(directory, "cgroup.procs"), "w") as procs:
        procs.write(str(pid))


def leave_and_remove(
    child: str | os.PathLike[str],
    parent: str | os.PathLike[str],
    pid: int,
    *,
    moved: bool = True,
    created: bool = True,
) -> None:
    """`pid` back into `parent` (if it was `moved` into the child), then the child removed
    (if we `created` it). OSError as the kernel gives it."""
    if moved:
        move_pid(parent, pid)
    if created:
        os.rmdir(child)
