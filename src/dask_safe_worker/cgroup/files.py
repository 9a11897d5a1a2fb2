"""File access to one memory cgroup, the same small interface for v1 and v2.

Both read their files directly, through the parsers of `cgroup_parse` (the same for v1
and v2, and no cgroupspy import on the `--print-limit` path). v1's limit is written
through cgroupspy's `MemoryController` on a directory we resolved ourselves; cgroupspy's
`Tree()` walk is never used because it walks the whole hierarchy and creates missing
directories.
"""

from __future__ import annotations

from pathlib import Path

from . import parse as cp

TYPE_CHECKING = False  # typing costs ~2 ms to import on the fast path; mypy knows this name
if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object  # the protocol is for the type checker only


def read_kernel_text(path: Path) -> str:
    """A kernel file as text, whatever its bytes.

    Paths and names in kernel files are bytes, not UTF-8 (any program may create a mount
    point or cgroup with an odd byte). `surrogateescape` keeps every byte: a path decoded
    this way encodes back to the same bytes when Python opens it, and a garbled number
    fails our parsers with a ParseError instead of a UnicodeDecodeError.
    """
    return path.read_bytes().decode("utf-8", "surrogateescape")


class MemoryCgroupFiles(Protocol):
    version: int
    directory: Path

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
    version = 1

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _int(self, filename: str) -> int:
        return cp.parse_int(read_kernel_text(self.directory / filename), filename)

    def _stat(self) -> dict[str, int]:
        return cp.parse_memory_stat(read_kernel_text(self.directory / "memory.stat"))

    def limit(self, mem_total: int) -> int | None:
        return cp.v1_limit(self._int("memory.limit_in_bytes"), mem_total)

    def hierarchical_limit(self, mem_total: int) -> int | None:
        value = self._stat().get("hierarchical_memory_limit")
        return None if value is None else cp.v1_limit(value, mem_total)

    def usage(self) -> int:
        return self._int("memory.usage_in_bytes")

    def inactive_file(self) -> int:
        return self._stat().get("total_inactive_file", 0)

    def procs(self) -> list[int]:
        return cp.parse_pids(read_kernel_text(self.directory / "cgroup.procs"))

    def write_limit(self, value: int) -> None:
        # Imported here: only a v1 write needs cgroupspy.
        from cgroupspy.controllers import MemoryController

        MemoryController(_NodePath(self.directory)).limit_in_bytes = value

    def raw_limit(self) -> int | None:
        return self._int("memory.limit_in_bytes")


class V2MemoryCgroup:
    version = 2

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _read(self, name: str) -> str:
        return read_kernel_text(self.directory / name)

    def limit(self, mem_total: int) -> int | None:
        value = cp.parse_v2_limit(self._read("memory.max"))
        return None if value is None or value >= mem_total else value

    def hierarchical_limit(self, mem_total: int) -> int | None:
        return None

    def usage(self) -> int:
        return cp.parse_int(self._read("memory.current"), "memory.current")

    def inactive_file(self) -> int:
        return cp.parse_memory_stat(self._read("memory.stat")).get("inactive_file", 0)

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


def open_memory_cgroup(version: int, directory: Path) -> MemoryCgroupFiles:
    return V1MemoryCgroup(directory) if version == 1 else V2MemoryCgroup(directory)
