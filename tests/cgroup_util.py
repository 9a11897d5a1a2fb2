"""Test cgroups on this host's real v1 memory hierarchy, only below our own cgroup.

The machine's rule: never change a limit of a cgroup that existed before the test. So
every cgroup here is created below the test process's own memory cgroup (read from
/proc/self/cgroup) and removed afterwards, by the fixture's finalizer.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from dask_safe_worker.measure import locate

V1_ROOT = Path("/sys/fs/cgroup/memory")


def own_memory_cgroup() -> Path | None:
    """The directory of this process's v1 memory cgroup, or None without one."""
    loc = locate(Path("/proc"), Path("/"))
    if loc is None or loc.version != 1:
        return None
    return loc.directory(Path("/"))


def kernel_cgroups_usable() -> str | None:
    """None if tests may create v1 memory cgroups here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    own = own_memory_cgroup()
    if own is None:
        return "no cgroup v1 memory hierarchy"
    if not os.access(own, os.W_OK):
        return f"own memory cgroup not writable: {own}"
    return None


class KernelCgroup:
    """A v1 memory cgroup that this test created."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def child(self, name: str) -> KernelCgroup:
        (self.path / name).mkdir()
        return KernelCgroup(self.path / name)

    def set_limit(self, value: int) -> None:
        (self.path / "memory.limit_in_bytes").write_text(str(value))

    def limit(self) -> int:
        return int((self.path / "memory.limit_in_bytes").read_text())

    def usage(self) -> int:
        return int((self.path / "memory.usage_in_bytes").read_text())

    def stat(self, key: str) -> int:
        """One counter of memory.stat (0 when absent)."""
        for line in (self.path / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
        return 0

    def working_set(self) -> int:
        """Usage minus the page cache the kernel can simply drop, as the product counts it."""
        return max(0, self.usage() - self.stat("total_inactive_file"))

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
        return 0

    def add_pid(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def enter_command(self, argv: list[str]) -> list[str]:
        """argv wrapped so that it starts inside this cgroup (the shell moves itself in,
        then execs: no window where the command runs outside)."""
        import shlex

        return [
            "sh",
            "-c",
            f'echo $$ > {shlex.quote(str(self.path))}/cgroup.procs && exec "$@"',
            "sh",
            *argv,
        ]

    def relative(self) -> str:
        return "/" + str(self.path.relative_to(V1_ROOT))


def _remove_tree(path: Path, parking: Path, started: set[int]) -> None:
    if not path.exists():
        return
    for sub in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        _remove_tree(sub, parking, started)
    for _ in range(50):
        pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        if not pids:
            break
        for pid in pids:
            # Processes the test started are ended; anything else (ourselves) is moved
            # back up so that the directory can go.
            if pid in started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            else:
                with contextlib.suppress(OSError):
                    (parking / "cgroup.procs").write_text(str(pid))
        time.sleep(0.1)
    with contextlib.suppress(OSError):
        path.rmdir()


@contextlib.contextmanager
def held_claim(directory: Path) -> Iterator[None]:
    """Hold the instance claim on a child cgroup (an flock on its directory, as
    dask_safe_worker.cgroup.claim takes it), as a running or starting instance does."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def claimed(directory: Path) -> bool:
    """Another process holds the instance claim on `directory`."""
    try:
        with held_claim(directory):
            return False
    except BlockingIOError:
        return True


@contextlib.contextmanager
def make_test_cgroup(
    started: set[int] | None = None, prefix: str = "dsw-test"
) -> Iterator[KernelCgroup]:
    """A fresh cgroup below our own, removed with everything below it on exit.

    `started` holds the pids the test started (they may be killed during cleanup);
    other pids found inside are moved back to our own cgroup, never killed.
    """
    own = own_memory_cgroup()
    assert own is not None
    path = own / f"{prefix}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield KernelCgroup(path)
    finally:
        _remove_tree(path, own, started if started is not None else set())
