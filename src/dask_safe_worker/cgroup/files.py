"""File access to one memory cgroup, the same small interface for v1 and v2.

Both read their files directly, through the parsers of `cgroup_parse` (the same for v1
and v2, and no cgroupspy import on the `--print-limit` path). v1's limit is written
through cgroupspy's `MemoryController` on a directory we resolved ourselves; cgroupspy's
`Tree()` walk is never used because it walks the whole hierarchy and creates missing
directories.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import parse as cp

# A directory's (inode, mtime) stands for its names only once the mtime is older than
# this: a change within the file system's clock step after a listing could leave it as it was.
SETTLED_NS = 1_000_000_000


def settled_version(st: os.stat_result, now_ns: int) -> tuple[int, int] | None:
    """The directory's (inode, mtime) to compare later stats with, so that a listing can
    be reused while it stands (only a rename, create or unlink changes the names, and
    each moves the mtime); None when the mtime is too recent to stand for them."""
    return (st.st_ino, st.st_mtime_ns) if now_ns - st.st_mtime_ns > SETTLED_NS else None


TYPE_CHECKING = False  # typing costs ~2 ms to import on the fast path; mypy knows this name
if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object  # the protocol is for the type checker only


def read_kernel_text(path: Path | str) -> str:
    """A kernel file as text, whatever its bytes.

    Paths and names in kernel files are bytes, not UTF-8 (any program may create a mount
    point or cgroup with an odd byte). `surrogateescape` keeps every byte: a path decoded
    this way encodes back to the same bytes when Python opens it, and a garbled number
    fails our parsers with a ParseError instead of a UnicodeDecodeError.

    Plain descriptors, not `open()`: the watch reads some twenty of these files every
    second in each instance, and a buffered file object costs four more system calls
    (fstat, ioctl, lseek, a second read) and its Python layers on every one.
    """
    if _kept is not None:
        return _kept.read(os.fspath(path)).decode("utf-8", "surrogateescape")
    return _read_fresh(os.fspath(path)).decode("utf-8", "surrogateescape")


def _read_fresh(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _read_from(fd, path)
    finally:
        os.close(fd)


# Never kept open: cgroup v1 builds a pid list at an open file's first read and hands the
# same list out again to every later read of that file while it is re-read within a
# second of the last (unless someone opens the file afresh meanwhile), so a watch ticking
# every second never saw a new worker, nor lost its OOM victim.
_PID_LISTS = ("cgroup.procs", "cgroup.threads", "/tasks")


# Whole files in one read (memory.stat, meminfo: a few KiB); mountinfo may take several.
_READ_SIZE = 65536
# Files the kernel generates one record at a time (a mount, a pid): seq_file hands out at
# most its buffer's page of whole records per read, so a short read is not their end (a
# container's mountinfo over 4 KiB came back cut after its first page, without the
# memory mount). Every other file we read is one record, generated whole.
_RECORD_FILES = ("mountinfo", "/mounts", "cgroup.procs", "cgroup.threads", "/tasks")


def _read_from(fd: int, path: str) -> bytes:
    """The whole file from its start: the kernel generates it anew at offset 0.

    A one-record file (a cgroup's memory files, meminfo, /proc/<pid>/cgroup) comes whole
    in a read shorter than asked for: seq_file grows its buffer until the record fits, so
    the end-of-file read that would follow (half of the watch's reads) is skipped. Record
    files (`_RECORD_FILES`) and a full buffer are read on to the end."""
    return _read_on(fd, path, os.pread(fd, _READ_SIZE, 0))


def _read_on(fd: int, path: str, first: bytes) -> bytes:
    """The whole file, given its first read: that read alone where it is whole."""
    if len(first) < _READ_SIZE and not path.endswith(_RECORD_FILES):
        return first
    chunks = [first]
    offset = len(first)
    while chunk := os.pread(fd, _READ_SIZE, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


class KeptFiles:
    """Kernel files read again on every tick of the watch, kept open between ticks.

    Opening and closing cost more than the read itself (a cgroup's usage file: 15 µs
    opened afresh, 2.4 µs read again at offset 0, where the kernel generates it anew).
    A descriptor whose file went away (a removed cgroup: ENODEV; an exited process:
    ESRCH) fails its read and is opened afresh, which then fails as a fresh open would;
    one not read during a whole tick is closed by `sweep`.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._used: set[str] = set()

    def read(self, path: str) -> bytes:
        fd = self._fds.get(path)
        if fd is not None:
            # A kept file is never a pid list; the first read goes on from where it ended
            # (`_read_on`), not again from the start.
            try:
                data = os.pread(fd, _READ_SIZE, 0)
                # `_read_on`'s test inline: a call less on each of the tick's reads.
                if len(data) >= _READ_SIZE or path.endswith(_RECORD_FILES):
                    data = _read_on(fd, path, data)
            except OSError:
                del self._fds[path]
                os.close(fd)
            else:
                self._used.add(path)
                return data
        if path.endswith(_PID_LISTS):
            return _read_fresh(path)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = _read_from(fd, path)
        except OSError:
            os.close(fd)
            raise
        self._fds[path] = fd
        self._used.add(path)
        return data

    def __enter__(self) -> KeptFiles:
        global _kept
        _kept = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _kept
        _kept = None
        self.sweep()

    def sweep(self) -> None:
        """Close what was not read since the last sweep (a member that left, a pid)."""
        for path in set(self._fds) - self._used:
            os.close(self._fds.pop(path))
        self._used.clear()

    def close(self) -> None:
        self._used.clear()
        self.sweep()


# The files kept open while the watch ticks (`with KeptFiles():`); None elsewhere.
_kept: KeptFiles | None = None


class MemoryCgroupFiles(Protocol):
    version: int

    @property
    def directory(self) -> Path: ...

    def limit(self, mem_total: int) -> int | None:
        """The hard limit; None is the one sentinel for 'no limit'."""

    def hierarchical_limit(self, mem_total: int) -> int | None:
        """v1's effective limit over all ancestors, from memory.stat; v2 has none."""

    def usage(self) -> int: ...

    def inactive_file(self) -> int: ...

    def procs(self) -> list[int]: ...

    def write_limit(self, value: int) -> None: ...

    def raw_limit(self) -> int | None:
        """The limit file as the kernel now holds it (pages rounded); None for 'max'."""


class _NodePath:
    """The one attribute cgroupspy's controllers read from a node."""

    def __init__(self, directory: Path) -> None:
        self.full_path = bytes(directory)


class V1MemoryCgroup:
    """One reading of a v1 memory cgroup: memory.stat, which both the hierarchical limit
    and the inactive page cache come from, is read once per instance (every caller opens
    the cgroup afresh for each reading)."""

    version = 1

    def __init__(self, directory: Path | str) -> None:
        self._directory = directory
        # Joined as text: a Path per file read costs more than the read on every tick.
        self._prefix = f"{directory}/"
        self._stat_text: str | None = None

    @property
    def directory(self) -> Path:
        # A Path only where one is needed (a write): the watch's reads join text.
        return Path(self._directory)

    def _int(self, filename: str) -> int:
        return cp.parse_int(read_kernel_text(self._prefix + filename), filename)

    def _stat(self, name: str) -> int | None:
        if self._stat_text is None:
            self._stat_text = read_kernel_text(self._prefix + "memory.stat")
        return cp.memory_stat_value(self._stat_text, name)

    def limit(self, mem_total: int) -> int | None:
        return cp.v1_limit(self._int("memory.limit_in_bytes"), mem_total)

    def hierarchical_limit(self, mem_total: int) -> int | None:
        value = self._stat("hierarchical_memory_limit")
        return None if value is None else cp.v1_limit(value, mem_total)

    def usage(self) -> int:
        return self._int("memory.usage_in_bytes")

    def inactive_file(self) -> int:
        return self._stat("total_inactive_file") or 0

    def procs(self) -> list[int]:
        return cp.parse_pids(read_kernel_text(self._prefix + "cgroup.procs"))

    def write_limit(self, value: int) -> None:
        # Imported here: only a v1 write needs cgroupspy.
        from cgroupspy.controllers import MemoryController

        MemoryController(_NodePath(self.directory)).limit_in_bytes = value

    def raw_limit(self) -> int | None:
        return self._int("memory.limit_in_bytes")


class V2MemoryCgroup:
    version = 2

    def __init__(self, directory: Path | str) -> None:
        self._directory = directory
        self._prefix = f"{directory}/"

    @property
    def directory(self) -> Path:
        return Path(self._directory)

    def _read(self, name: str) -> str:
        return read_kernel_text(self._prefix + name)

    def limit(self, mem_total: int) -> int | None:
        value = cp.parse_v2_limit(self._read("memory.max"))
        return None if value is None or value >= mem_total else value

    def hierarchical_limit(self, mem_total: int) -> int | None:
        return None

    def usage(self) -> int:
        return cp.parse_int(self._read("memory.current"), "memory.current")

    def inactive_file(self) -> int:
        return cp.memory_stat_value(self._read("memory.stat"), "inactive_file") or 0

    def procs(self) -> list[int]:
        return cp.parse_pids(self._read("cgroup.procs"))

    def write_limit(self, value: int) -> None:
        self.write("memory.max", str(value))

    def raw_limit(self) -> int | None:
        return cp.parse_v2_limit(self._read("memory.max"))

    def high(self, mem_total: int) -> int | None:
        """`memory.high`, the throttling ceiling; None for "max" or beyond the host's RAM."""
        value = cp.parse_v2_limit(self._read("memory.high"), "memory.high")
        return None if value is None or value >= mem_total else value

    def oom_group(self) -> bool:
        return cp.parse_oom_group(self._read("memory.oom.group"))

    def write(self, name: str, text: str) -> None:
        with open(self.directory / name, "w") as f:
            f.write(text)

    def read(self, name: str) -> str:
        return self._read(name)


def open_memory_cgroup(version: int, directory: Path | str) -> MemoryCgroupFiles:
    return V1MemoryCgroup(directory) if version == 1 else V2MemoryCgroup(directory)
