"""Pure interpretation of memory-cgroup file contents, for v1 and v2."""

from __future__ import annotations

from ..proc_parse import ParseError, lines, lines_with

# str.strip() would also take Unicode spaces and the \x1c-\x1f separators for blanks.
_BLANK = " \t\n"

# v1 writes "no limit" as PAGE_COUNTER_MAX * PAGE_SIZE, which depends on the page size
# and kernel; anything this large cannot be a real limit.
V1_UNLIMITED_FLOOR = 2**62


def _is_integer(s: str) -> bool:
    """What the kernel writes for a number, `-?[0-9]+`. int() alone would also take
    "1_000", " ١٢ " or "+5". (No `re`: the --print-limit path does not import it.)"""
    digits = s[1:] if s.startswith("-") else s
    return bool(digits) and not digits.strip("0123456789")


def parse_int(text: str, what: str = "value") -> int:
    s = text.strip(_BLANK)
    # ASCII digits alone: `_is_integer` at once, without its call (the watch's reads).
    if s.isdigit() and s.isascii():
        return int(s)
    if not _is_integer(s):
        raise ParseError(f"{what} is not an integer: {s[:40]!r}")
    return int(s)


def v1_limit(value: int, mem_total: int) -> int | None:
    """A v1 `memory.limit_in_bytes` value; None is the single 'no limit' sentinel.

    A limit at or above the host's RAM can never be reached before the host itself
    runs out, so it constrains nothing and is treated as no limit too.
    """
    if value < 0 or value >= V1_UNLIMITED_FLOOR or value >= mem_total:
        return None
    return value


def parse_v2_limit(text: str, what: str = "memory.max") -> int | None:
    """`memory.max` / `memory.high`: "max" or a byte count; None means no limit."""
    s = text.strip(_BLANK)
    if s == "max":
        return None
    value = parse_int(s, what)
    if value < 0:
        raise ParseError(f"{what} is negative: {value}")
    return value


def parse_oom_group(text: str) -> bool:
    """`memory.oom.group`: "0" or "1". With 1 the kernel's OOM killer takes every
    process of the cgroup (and its descendants) at once, not just the largest one."""
    s = text.strip(_BLANK)
    if s not in ("0", "1"):
        raise ParseError(f"memory.oom.group is not 0 or 1: {s[:40]!r}")
    return s == "1"


def parse_memory_stat(text: str) -> dict[str, int]:
    """`memory.stat`: one `name value` pair per line. Lines that don't fit are skipped."""
    stat: dict[str, int] = {}
    for line in lines(text):
        parts = [p for p in line.split(" ") if p]
        if len(parts) == 2 and _is_integer(parts[1]):
            stat[parts[0]] = int(parts[1])
    return stat


def memory_stat_value(text: str, name: str) -> int | None:
    """`parse_memory_stat(text).get(name)` without parsing the other lines: the watch
    wants two of v1's ~40 counters at every level on every tick."""
    value = None
    for line in lines_with(text, name):
        parts = [p for p in line.split(" ") if p]
        if len(parts) == 2 and parts[0] == name:
            number = parts[1]
            if (number.isdigit() and number.isascii()) or _is_integer(number):
                value = int(number)
    return value


def parse_pids(text: str) -> list[int]:
    """`cgroup.procs`: one pid per line."""
    return [parse_int(line, "cgroup.procs entry") for line in lines(text) if line.strip(_BLANK)]


def parse_controllers(text: str) -> frozenset[str]:
    """`cgroup.controllers` / `cgroup.subtree_control`: space-separated names."""
    return frozenset(text.split())


def working_set(usage: int, inactive_file: int) -> int:
    """What the kernel cannot simply drop: usage minus the inactive page cache."""
    return max(0, usage - inactive_file)


# Our own memory.high needs the throttling fixes of Linux 5.9: before them a cgroup held
# above memory.high could stall for very long (kubernetes/kubernetes#118699).
MEMORY_HIGH_MIN_KERNEL = (5, 9)


def parse_kernel_release(text: str) -> tuple[int, int]:
    """(major, minor) of a release such as "5.4.0-150-generic" or "6.1.0-18-amd64"."""
    import re  # only the full command checks the kernel release

    match = re.match(r"([0-9]+)\.([0-9]+)", text.strip(_BLANK))
    if match is None:
        raise ParseError(f"kernel release is not major.minor...: {text[:40]!r}")
    return int(match.group(1)), int(match.group(2))
