"""Pure parsers for the /proc files we read: meminfo, mountinfo and <pid>/cgroup.

They take text decoded with `surrogateescape` (cgroup_files.read_kernel_text), so a path
holds exactly the kernel's bytes, and split lines on "\n" only: the kernel escapes
nothing but space, tab, newline and backslash, so a path may contain any other byte,
including those `str.splitlines` would take for a line break.
"""

from __future__ import annotations

from collections.abc import Iterator

from .records import record


@record
class HostMemory:
    total: int
    available: int
    # True when the kernel gave no MemAvailable (before 3.14) and we estimated it.
    available_estimated: bool


class ParseError(ValueError):
    """A /proc or cgroup file whose content we cannot interpret."""


def lines(text: str) -> list[str]:
    """The file's lines, split where the kernel ends one."""
    return text.split("\n")


def lines_with(text: str, name: str) -> Iterator[str]:
    """The lines (as `lines` splits them) that `name` occurs in, each once, in order.

    Found with `str.find`, the others never split: for a file read on every tick of the
    watch (meminfo, v1's memory.stat) that asks for one or two of its many lines."""
    at = text.find(name)
    while at != -1:
        start = text.rfind("\n", 0, at) + 1
        end = text.find("\n", at)
        end = len(text) if end == -1 else end
        yield text[start:end]
        at = text.find(name, end)


def _meminfo_field(text: str, name: str) -> int | None:
    """The value of the last line whose name is `name`, in bytes; None without one.

    Only the lines `name` occurs in are looked at (`lines_with`): the watch reads meminfo
    every tick, and splitting its ~55 lines cost more than the read."""
    value = None
    for line in lines_with(text, name):
        parsed = _meminfo_line(line, name)
        if parsed is not None:
            value = parsed
    return value


def _meminfo_line(line: str, wanted: str) -> int | None:
    name, sep, rest = line.partition(":")
    if not sep or name.strip() != wanted:
        return None
    parts = rest.split()
    if not parts:
        return None
    try:
        value = int(parts[0])
    except ValueError:
        return None
    unit = parts[1] if len(parts) > 1 else ""
    return value * 1024 if unit.lower() == "kb" else value


def parse_meminfo(text: str) -> HostMemory:
    """MemTotal and MemAvailable in bytes (the file says kB and means KiB)."""
    total = _meminfo_field(text, "MemTotal")
    if total is None:
        raise ParseError("meminfo has no MemTotal")
    available = _meminfo_field(text, "MemAvailable")
    if available is not None:
        return HostMemory(total, min(available, total), False)
    # Old kernels: free memory plus the page cache and slab the kernel can reclaim.
    estimate = sum(
        _meminfo_field(text, name) or 0
        for name in ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable")
    )
    return HostMemory(total, min(estimate, total), True)


@record
class Mount:
    mount_id: int
    parent_id: int
    root: str
    mount_point: str
    fstype: str
    source: str
    super_options: str

    def has_super_option(self, option: str) -> bool:
        return option in self.super_options.split(",")


def unescape_octal(field: str) -> str:
    r"""The kernel writes space, tab, newline and backslash in paths as \040 etc.

    An escape stands for one byte, decoded as `read_kernel_text` decodes the rest.
    """
    if "\\" not in field:
        return field  # the usual case, answered without importing `re`
    import re

    # Three octal digits up to \377: one byte. re caches the compiled pattern.
    return re.sub(
        r"\\([0-3][0-7]{2})",
        lambda m: bytes([int(m.group(1), 8)]).decode("utf-8", "surrogateescape"),
        field,
    )


def parse_mountinfo_line(line: str) -> Mount:
    """One line of /proc/<pid>/mountinfo (proc(5)).

    `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
    Optional fields run until a lone "-"; super options are everything after the
    source and, for some filesystems, contain spaces.
    """
    parts = line.split(" ")
    try:
        sep = parts.index("-", 6)
    except ValueError as exc:
        raise ParseError(f"mountinfo line without separator: {line!r}") from exc
    if len(parts) < sep + 3:
        raise ParseError(f"mountinfo line too short: {line!r}")
    try:
        mount_id, parent_id = int(parts[0]), int(parts[1])
    except ValueError as exc:
        raise ParseError(f"mountinfo ids are not numbers: {line!r}") from exc
    return Mount(
        mount_id=mount_id,
        parent_id=parent_id,
        root=unescape_octal(parts[3]),
        mount_point=unescape_octal(parts[4]),
        fstype=parts[sep + 1],
        source=unescape_octal(parts[sep + 2]),
        super_options=" ".join(parts[sep + 3 :]),
    )


def parse_mountinfo(text: str) -> tuple[list[Mount], list[str]]:
    """All parseable mounts, plus a note for each line skipped."""
    mounts: list[Mount] = []
    skipped: list[str] = []
    for line in lines(text):
        if not line:
            continue
        try:
            mounts.append(parse_mountinfo_line(line))
        except ParseError as exc:
            skipped.append(str(exc))
    return mounts, skipped


@record
class CgroupEntry:
    hierarchy_id: int
    controllers: tuple[str, ...]
    path: str


def parse_proc_cgroup(text: str) -> list[CgroupEntry]:
    """/proc/<pid>/cgroup: `hierarchy-ID:controller-list:cgroup-path` per line.

    The path is everything after the second colon, since it may itself hold colons.
    """
    entries: list[CgroupEntry] = []
    for line in lines(text):
        if not line.strip():
            continue
        pieces = line.split(":", 2)
        if len(pieces) != 3:
            raise ParseError(f"/proc/self/cgroup line not in id:controllers:path form: {line!r}")
        hid, controllers, path = pieces
        try:
            hierarchy_id = int(hid)
        except ValueError as exc:
            raise ParseError(f"/proc/self/cgroup hierarchy id is not a number: {line!r}") from exc
        names = tuple(c for c in controllers.split(",") if c)
        entries.append(CgroupEntry(hierarchy_id, names, path))
    return entries


def parse_stat(text: str) -> tuple[str, int]:
    """(state, parent pid) from /proc/<pid>/stat; state "Z" is a zombie.

    The second field (comm) is in parentheses and may itself hold spaces and ")", so the
    fields are counted from the last ")".
    """
    _, paren, rest = text.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 2:
        raise ParseError("stat has no ppid field")
    try:
        return fields[0], int(fields[1])
    except ValueError as exc:
        raise ParseError(f"stat ppid is not an integer: {fields[1][:20]!r}") from exc


def parse_stat_ppid(text: str) -> int:
    """The parent pid from /proc/<pid>/stat."""
    return parse_stat(text)[1]
