"""Measure what memory is really free for this process: host and every cgroup level.

Read-only. Every path is below `proc_root` or the filesystem root `root` (cgroup mount
points, and `root/sys`), so tests point the whole measurement at a fixture tree.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .cgroup.files import V2MemoryCgroup, open_memory_cgroup, read_kernel_text
from .cgroup.locate import CgroupLocation, host_path, locate_memory_cgroup, v2_mount
from .cgroup.parse import parse_controllers, working_set
from .dask_compat.dask_system import cpu_count
from .dask_compat.distributed_system import memory_limit
from .dask_compat.release import Release
from .proc_parse import (
    HostMemory,
    ParseError,
    parse_meminfo,
    parse_mountinfo,
    parse_proc_cgroup,
    parse_stat,
)
from .records import field, record

TYPE_CHECKING = False  # typing costs ~2 ms to import on the fast path; mypy knows this name
if TYPE_CHECKING:
    from typing_extensions import TypedDict, Unpack

    from .cgroup.files import MemoryCgroupFiles

    class Pins(TypedDict, total=False):
        """What a test pins instead of asking this process: the CPU affinity,
        RLIMIT_RSS and `os.getpid()`."""

        affinity: int | None
        rlimit_rss: int | None
        own_pid: int | None


@record
class LevelReading:
    """One cgroup on the way from our own up to the visible root."""

    path: str
    limit: int | None
    hierarchical_limit: int | None
    usage: int | None
    inactive_file: int | None
    error: str | None = None
    # v2 only. memory.high, set from outside (Kubernetes Memory QoS, systemd MemoryHigh=):
    # above it the kernel throttles the cgroup, so it is as much a ceiling as the limit.
    high: int | None = None
    # memory.oom.group; None where the file does not exist (v1, the v2 root, kernels < 4.19).
    oom_group: bool | None = None

    @property
    def working_set(self) -> int | None:
        if self.usage is None:
            return None
        return working_set(self.usage, self.inactive_file or 0)

    @property
    def effective_limit(self) -> int | None:
        limit, hierarchical = self.limit, self.hierarchical_limit
        if limit is None:
            return hierarchical
        return limit if hierarchical is None else min(limit, hierarchical)

    @property
    def ceiling(self) -> int | None:
        """The lower of the hard limit and memory.high: above either the worker stalls."""
        limit, high = self.effective_limit, self.high
        if limit is None:
            return high
        return limit if high is None else min(limit, high)

    @property
    def headroom(self) -> int | None:
        """ceiling - working set; None when this level sets no limit and no memory.high."""
        # Kept beside the fields (the record is frozen; equality and `replace` see only
        # the fields): the watch asks each level's headroom some thirty times a tick.
        try:
            return self.__dict__["_headroom"]  # type: ignore[no-any-return]
        except KeyError:
            pass
        limit = self.ceiling
        value = None if limit is None else max(0, limit - (self.working_set or 0))
        self.__dict__["_headroom"] = value
        return value

    def as_dict(self) -> dict[str, object]:
        """The reading; `error` only when there is one.

        Launchers and log alerting scan output for failure words: dask-jobqueue's local
        runner fails a worker on any line with "error" before it registers. A routine
        line must not carry one, even as `"error": null`.
        """
        out: dict[str, object] = {
            "path": self.path,
            "limit": self.limit,
            "hierarchical_limit": self.hierarchical_limit,
            "usage": self.usage,
            "inactive_file": self.inactive_file,
            "working_set": self.working_set,
            "headroom": self.headroom,
        }
        # Only where the kernel has the files (v2), so v1 lines stay as they were.
        if self.high is not None:
            out["high"] = self.high
        if self.oom_group is not None:
            out["oom_group"] = self.oom_group
        if self.error is not None:
            out["error"] = self.error
        return out


@record
class Measurement:
    host: HostMemory
    location: CgroupLocation | None
    # Own cgroup first, the visible root last; empty without a memory cgroup.
    levels: tuple[LevelReading, ...]
    own_procs: tuple[int, ...] | None
    pid: int
    own_rss: int
    cpu_count: int
    dask_memory_limit: int
    warnings: tuple[str, ...] = field(default=())
    # Other pids that count as ours: a supervisor's worker tree (--follow re-measures
    # with the workers running, and their memory is the budget's, not a neighbour's).
    ours: frozenset[int] = field(default=frozenset())
    # Those of `ours` that have exited and wait to be reaped.
    zombies: frozenset[int] = field(default=frozenset())
    # When our cgroup could not be located exactly: the mount root that is surely an
    # ancestor of it. Its levels are read (they are certain); nothing is written there.
    ancestor: CgroupLocation | None = None
    # Levels we know exist but could not read (or not locate), each with the reason.
    # Never "no limit": a start refuses them unless told to go on (fail closed).
    unreadable: tuple[str, ...] = field(default=())
    # Why other processes of our cgroup may be invisible to us (a PID namespace), if so:
    # then we are never its sole occupant.
    hidden_neighbours: str | None = None

    @property
    def available(self) -> int:
        """min(MemAvailable, each limited level's limit - working set)."""
        return self._limited()[0]

    @property
    def limiting(self) -> str:
        """What sets `available`: "host" or the cgroup path that does."""
        return self._limited()[1]

    def _limited(self) -> tuple[int, str]:
        # Kept beside the fields, as a level's headroom: asked several times a tick.
        try:
            return self.__dict__["_limited_by"]  # type: ignore[no-any-return]
        except KeyError:
            pass
        best, name = self.host.available, "host"
        for lvl in self.levels:
            headroom = lvl.headroom
            if headroom is not None and headroom < best:
                best, name = headroom, lvl.path
        self.__dict__["_limited_by"] = (best, name)
        return best, name

    @property
    def sole_occupant(self) -> bool:
        if self.own_procs is None or self.pid not in self.own_procs:
            return False
        if self.hidden_neighbours is not None:
            return False
        return set(self.own_procs) <= {self.pid} | self.ours

    @property
    def own_working_set(self) -> int:
        """What we already use inside our own cgroup, and so may keep using.

        The cgroup's working set counts only when we are alone in it; otherwise it holds
        other processes' memory, and only our own RSS is ours.
        """
        if self.sole_occupant and self.levels and self.levels[0].working_set is not None:
            return self.levels[0].working_set
        return self.own_rss

    def as_dict(self) -> dict[str, object]:
        return {
            "mem_total": self.host.total,
            "mem_available": self.host.available,
            "mem_available_estimated": self.host.available_estimated,
            "cgroup_version": self._located.version if self._located else None,
            "cgroup_path": self._located.cgroup_path if self._located else None,
            "cgroup_levels": [lvl.as_dict() for lvl in self.levels],
            "sole_occupant": self.sole_occupant,
            "own_procs_count": None if self.own_procs is None else len(self.own_procs),
            "own_rss": self.own_rss,
            "own_working_set": self.own_working_set,
            "available": self.available,
            "limiting": self.limiting,
            "cpu_count": self.cpu_count,
            "dask_memory_limit": self.dask_memory_limit,
            "warnings": list(self.warnings),
            # Only when there is something to say, so routine lines stay as they were.
            **({"cgroup_located": False} if self.ancestor is not None else {}),
            **({"unreadable": list(self.unreadable)} if self.unreadable else {}),
            **(
                {"hidden_neighbours": self.hidden_neighbours}
                if self.hidden_neighbours is not None
                else {}
            ),
        }

    @property
    def _located(self) -> CgroupLocation | None:
        return self.location or self.ancestor


# What a level's ceiling and headroom come from: one of them unread is a level we cannot
# count (fail closed). inactive_file and memory.oom.group only refine or annotate.
_CEILING_READS = ("limit", "hierarchical_limit", "usage", "high")
_LEVEL_READS = ("limit", "hierarchical_limit", "usage", "inactive_file")


def _bare_level(path: str) -> LevelReading:
    """A level known to set no limit, whose usage counts for nothing (no headroom): one
    record per path, as records never change."""
    try:
        return _BARE[path]
    except KeyError:
        if len(_BARE) >= 64:
            _BARE.clear()
        reading = _BARE[path] = LevelReading(path, None, None, None, None)
        return reading


_BARE: dict[str, LevelReading] = {}


def _ceiling_reads(
    version: int, directory: Path, mem_total: int, is_root: bool
) -> tuple[MemoryCgroupFiles, bool, tuple[int | None, int | None] | None]:
    """Whether a level above our own surely sets no ceiling (the watch's `lean`
    reading), from the files that decide it: v1, its hierarchical limit (the lowest of
    its own limit and every ancestor's that the kernel applies to it: none means its own
    is none too); v2, memory.max and memory.high (the v2 root has neither). The cgroup
    (v1 keeps its memory.stat for the rest of the level), the answer, and v2's two values
    as read. A failed read answers False: the level is then read as always."""
    cg = open_memory_cgroup(version, directory)
    try:
        if isinstance(cg, V2MemoryCgroup):
            ceiling = (_optional(cg.limit, mem_total, is_root), _optional(cg.high, mem_total, True))
            return cg, ceiling == (None, None), ceiling
        return cg, cg.hierarchical_limit(mem_total) is None, None
    except (OSError, ParseError):
        return cg, False, None


def _optional(read: Callable[[int], int | None], mem_total: int, absent_ok: bool) -> int | None:
    try:
        return read(mem_total)
    except FileNotFoundError:
        if absent_ok:
            return None
        raise


def hierarchy_inherited(version: int, directories: Sequence[str]) -> bool:
    """Whether each level's v1 `hierarchical_memory_limit` covers every level above it:
    every level above our own (`directories[1:]`) has `memory.use_hierarchy` 1.

    A v1 child's limits count against its parent only when the parent had
    use_hierarchy set as the child was made, and a cgroup with children cannot change
    it (EBUSY; Linux 5.11 on always has it set): read once, it holds for as long as the
    levels exist. False for v2 and for anything unreadable."""
    if version != 1 or not directories:
        return False
    for directory in directories[1:]:
        try:
            if read_kernel_text(f"{directory}/memory.use_hierarchy").strip() != "1":
                return False
        except OSError:
            return False
    return True


def _read_level(
    version: int,
    path: str,
    directory: Path,
    mem_total: int,
    is_root: bool,
    cg: MemoryCgroupFiles | None = None,
    v2_ceiling: tuple[int | None, int | None] | None = None,
) -> tuple[LevelReading, list[str]]:
    """The level, and the errors of the reads its ceiling and headroom need. `cg`: the
    level's files as read so far; `v2_ceiling`: its memory.max and memory.high as read."""
    if cg is None:
        cg = open_memory_cgroup(version, directory)
    values: list[int | None] = []
    errors: list[str] = []
    blind: list[str] = []
    # No closure per read: the watch reads every level on every tick.
    for name in _LEVEL_READS:
        try:
            if name == "limit" and v2_ceiling is not None:
                values.append(v2_ceiling[0])
            elif name == "limit":
                values.append(cg.limit(mem_total))
            elif name == "hierarchical_limit":
                values.append(cg.hierarchical_limit(mem_total))
            elif name == "usage":
                values.append(cg.usage())
            else:
                values.append(cg.inactive_file())
        except (OSError, ParseError) as exc:
            values.append(None)
            # The v2 root has no memory.max or memory.current: that is not an error.
            if not (version == 2 and is_root and isinstance(exc, FileNotFoundError)):
                errors.append(f"{name}: {_describe(exc)}")
                if name in _CEILING_READS:
                    blind.append(f"{name}: {_describe(exc)}")
    high: int | None = None
    oom_group: bool | None = None
    if isinstance(cg, V2MemoryCgroup):
        # Optional files: the v2 root has neither, and memory.oom.group is new in 4.19.
        # A missing one is an absent setting, not an error.
        try:
            high = cg.high(mem_total) if v2_ceiling is None else v2_ceiling[1]
        except FileNotFoundError:
            pass
        except (OSError, ParseError) as exc:
            errors.append(f"high: {_describe(exc)}")
            blind.append(f"high: {_describe(exc)}")
        try:
            oom_group = cg.oom_group()
        except FileNotFoundError:
            pass
        except (OSError, ParseError) as exc:
            errors.append(f"oom_group: {_describe(exc)}")
    limit, hierarchical, usage, inactive = values
    # Positional: the records' quick path (fields in order).
    reading = LevelReading(
        path, limit, hierarchical, usage, inactive, "; ".join(errors) or None, high, oom_group
    )
    return reading, blind


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        from .event_line import errno_name

        return f"{errno_name(exc.errno)} {exc.strerror or ''}".strip()
    return str(exc)


def read_own_rss(proc_root: Path, pid: str) -> int:
    """The memory a process surely holds of its own: anonymous and shmem pages
    (RssAnon + RssShmem). VmRSS also counts shared file pages (the interpreter, its
    libraries) that the kernel charges to whichever cgroup read them first, usually not
    ours: counted as ours, a budget would promise ~16 MB that another process holds.
    Kernels before 4.5 have only VmRSS."""
    fields: dict[str, int] = {}
    try:
        for line in read_kernel_text(f"{proc_root}/{pid}/status").split("\n"):
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssShmem"):
                fields[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    if "RssAnon" in fields:
        return fields["RssAnon"] + fields.get("RssShmem", 0)
    return fields.get("VmRSS", 0)


def unreadable_problem(m: Measurement, memory_limit_given: bool, allowed: bool) -> str | None:
    """Why a start must stop (exit 1) on levels it knows exist but cannot read, or None.

    Rule (docs/design.md): *fail closed*. Such a level is never "no limit": a worker in a
    512 MiB cgroup behind a bind mount would get the host's RAM. The user may go on with
    an explicit --memory-limit (their number, not ours) or --allow-unreadable-cgroup.
    """
    if not m.unreadable or memory_limit_given or allowed:
        return None
    return (
        "cannot read every memory cgroup level we are in, so the free memory is not known: "
        + "; ".join(m.unreadable)
        + " (give --memory-limit, or --allow-unreadable-cgroup to plan from what can be read)"
    )


def locate(proc_root: Path, root: Path, pid: str = "self") -> CgroupLocation | None:
    """The memory cgroup: exact, or (`exact` False) only a certain ancestor of it."""
    return _locate(proc_root, root, pid)[0]


def _locate(
    proc_root: Path, root: Path, pid: str
) -> tuple[CgroupLocation | None, list[str], str | None]:
    """The memory cgroup, a warning for each mountinfo line that had to be skipped, and
    why a memory cgroup the kernel says we are in cannot be located, if so."""
    entries = parse_proc_cgroup(read_kernel_text(proc_root / pid / "cgroup"))
    mounts, skipped = parse_mountinfo(read_kernel_text(proc_root / pid / "mountinfo"))
    warnings = [f"skipped a line of mountinfo: {note}" for note in skipped]
    controllers: frozenset[str] | None = None
    unknown: str | None = None
    # cgroup.controllers of the cgroup2 mount that holds our cgroup (issue 24 row 2).
    v2 = v2_mount(entries, mounts)
    if v2 is not None:
        try:
            controllers = parse_controllers(
                read_kernel_text(host_path(root, v2.mount_point) / "cgroup.controllers")
            )
        except OSError as exc:
            warnings.append(f"cannot read cgroup.controllers of cgroup2: {_describe(exc)}")
            unknown = f"cannot read cgroup.controllers at {v2.mount_point!r} ({_describe(exc)})"
            controllers = None
    located = locate_memory_cgroup(entries, mounts, controllers)
    problem = located.problem
    # Without a v1 memory hierarchy, memory can only be on this v2 one: whether it limits
    # us is not known, which is not "no limit" (fail closed).
    v1_memory = any("memory" in e.controllers for e in entries)
    if located.location is None and problem is None and unknown is not None and not v1_memory:
        problem = unknown + ": whether the memory controller limits our cgroup is unknown"
    return located.location, warnings, problem


def initial_pid_namespace(proc_root: Path) -> bool:
    """Whether `proc_root` shows the initial PID namespace: there pid 2 is kthreadd, whose
    parent is 0. In any other namespace only its pid 1 has the parent 0."""
    stat = _stat(proc_root, 2)
    return stat is not None and stat[1] == 0


def _threads(proc_root: Path, pid: int) -> int:
    try:
        for line in read_kernel_text(proc_root / str(pid) / "status").split("\n"):
            name, _, rest = line.partition(":")
            if name == "Threads":
                return int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def hidden_neighbours(
    location: CgroupLocation,
    procs: Sequence[int],
    proc_root: Path,
    root: Path,
    count: bool,
    initial_ns: bool | None = None,
) -> str | None:
    """Why our PID namespace may not show every process of our cgroup, or None.

    Rule (docs/design.md): *never claim a cgroup we may not see whole*. Inside a PID
    namespace cgroup.procs leaves out the processes outside it (v1 drops them, v2 lists
    them as 0), so a shared cgroup can look like ours alone. `count` also compares v2's
    pids.current with the tasks of the processes we see (at the start only: a live
    worker's threads come and go between the two reads). `initial_ns`:
    `initial_pid_namespace(proc_root)` as asked before (a process never leaves its PID
    namespace).
    """
    if 0 in procs:
        return "cgroup.procs lists pid 0: processes outside our PID namespace share our cgroup"
    if initial_ns is None and location.relative != "":
        initial_ns = initial_pid_namespace(proc_root)
    if location.relative != "" and not initial_ns:
        return (
            "we are in a PID namespace, and our cgroup is not the root of our cgroup view "
            "(no cgroup namespace or container mount made for it): processes outside the "
            "PID namespace may share it"
        )
    if count and location.version == 2:
        try:
            current = int(read_kernel_text(location.directory(root) / "pids.current").strip())
        except (OSError, ValueError):
            return None
        seen = sum(_threads(proc_root, p) for p in procs)
        if current > seen:
            return (
                f"pids.current counts {current} tasks, our PID namespace shows {seen}: "
                "processes we cannot see share our cgroup"
            )
    return None


def _stat(proc_root: Path, pid: int) -> tuple[str, int] | None:
    try:
        return parse_stat(read_kernel_text(f"{proc_root}/{pid}/stat"))
    except (OSError, ParseError):
        return None


def descendants_among(
    proc_root: Path, candidates: Sequence[int], root: int
) -> tuple[frozenset[int], frozenset[int]]:
    """(the candidates whose parent chain reaches `root`, which of them are zombies).

    A few /proc/<pid>/stat reads: only the members of our own cgroup are asked, never the
    whole /proc. A zombie is still ours (it stays in cgroup.procs until reaped, and must
    not make a stranger of our own cgroup) but it is gone: a worker the kernel killed
    stays one until its nanny reaps it."""
    ours: set[int] = set()
    zombies: set[int] = set()
    known: dict[int, bool] = {root: True, 0: False, 1: root == 1}
    for pid in candidates:
        chain: list[int] = []
        current: int | None = pid
        zombie = False
        while current is not None and current not in known and len(chain) < 64:
            chain.append(current)
            stat = _stat(proc_root, current)
            if stat is not None and current == pid:
                zombie = stat[0] == "Z"
            current = None if stat is None else stat[1]
        verdict = known.get(current, False) if current is not None else False
        for member in chain:
            known[member] = verdict
        if verdict and pid != root:
            ours.add(pid)
            if zombie:
                zombies.add(pid)
    return frozenset(ours), frozenset(zombies)


def remeasure(
    location: CgroupLocation | None,
    proc_root: Path = Path("/proc"),
    root: Path = Path("/"),
    *,
    release: Release,
    affinity: int | None = None,
    rlimit_rss: int | None = None,
    own_pid: int | None = None,
    tree_root: int | None = None,
    warnings: Sequence[str] = (),
    unreadable: Sequence[str] = (),
    known: tuple[int, int] | None = None,
    rss_when_alone: bool = True,
    lean: bool = False,
    inherited: bool = False,
    initial_ns: bool | None = None,
) -> Measurement:
    """`measure` for a cgroup located before: only /proc/meminfo and the level files.

    Locating parses /proc/self/mountinfo (~9 µs a line, so 186 ms with 20,000 mounts);
    a watch that ticks every second locates once and calls this. With `tree_root`, the
    processes of our cgroup that descend from it count as ours, and `own_rss` is their
    sum. `known`: CPU_COUNT and MEMORY_LIMIT as measured before, not read again (the
    running worker computed both once, when it imported dask). Without
    `rss_when_alone`, `own_rss` stays 0 where `own_working_set` does not use it (we are
    alone in our cgroup, whose working set is then ours): four /proc reads less a tick
    for the watch. `lean` (the watch): a level above our own that surely sets no
    ceiling (`_ceiling_reads`) is not read further, as its usage and page cache count for
    nothing in any plan (its headroom is none), and with `inherited`
    (`hierarchy_inherited`) such a v1 level ends the reads: no level above it sets a
    limit either. Such levels carry no usage then, nor an unreadable file's error (the
    start's `measure` reads every file: it alone refuses unreadable levels).
    `initial_ns`: whether `proc_root` shows the initial PID namespace, as asked
    before (`hidden_neighbours`). Raises
    OSError/ParseError only for /proc/meminfo.
    """
    host = parse_meminfo(read_kernel_text(f"{proc_root}/meminfo"))
    notes: list[str] = list(warnings)
    blind: list[str] = list(unreadable)
    levels: list[LevelReading] = []
    own_procs: tuple[int, ...] | None = None
    hidden: str | None = None
    exact = location if location is not None and location.exact else None
    if location is not None:
        if location.unlocated is not None:
            blind.append(location.unlocated)
        paths = location.level_paths(root)
        unlimited_above = False
        for i, (path, directory) in enumerate(paths):
            if unlimited_above:
                levels.append(_bare_level(path))
                continue
            is_root = i == len(paths) - 1
            cg: MemoryCgroupFiles | None = None
            v2_ceiling: tuple[int | None, int | None] | None = None
            if lean and i > 0:
                cg, bare, v2_ceiling = _ceiling_reads(
                    location.version, directory, host.total, is_root
                )
                if bare:
                    levels.append(_bare_level(path))
                    unlimited_above = inherited
                    continue
            level, errors = _read_level(
                location.version, path, directory, host.total, is_root, cg, v2_ceiling
            )
            levels.append(level)
            if errors:
                blind.append(f"cgroup {path}: " + "; ".join(errors))
            # Our own level is read whole (its working set is ours), and ends the reads
            # the same way.
            if inherited and lean and level.hierarchical_limit is None and not errors:
                unlimited_above = True
    if exact is not None:
        # Only an exact location's first level is ours: a mere ancestor's processes are not.
        try:
            own_procs = tuple(open_memory_cgroup(exact.version, paths[0][1]).procs())
        except (OSError, ParseError) as exc:
            notes.append(f"cannot list the own cgroup's processes: {_describe(exc)}")
        else:
            hidden = hidden_neighbours(
                exact, own_procs, proc_root, root, tree_root is None, initial_ns
            )
    me = os.getpid() if own_pid is None else own_pid
    ours: frozenset[int] = frozenset()
    zombies: frozenset[int] = frozenset()
    own_rss = 0
    if tree_root is not None and own_procs is not None:
        ours, zombies = descendants_among(proc_root, own_procs, tree_root)
    # As `Measurement.sole_occupant` decides it.
    alone = (
        own_procs is not None
        and me in own_procs
        and hidden is None
        and set(own_procs) <= {me} | ours
        and bool(levels)
        and levels[0].usage is not None
    )
    if rss_when_alone or not alone:
        own_rss = read_own_rss(proc_root, "self")
        own_rss += sum(read_own_rss(proc_root, str(p)) for p in ours if p != me)
    if known is None:
        # distributed reads /sys/fs/cgroup literally, whatever the mount table says.
        known = (
            cpu_count(proc_root, root / "sys", affinity, dask=release.dask),
            memory_limit(host.total, root / "sys", rlimit_rss, distributed=release.distributed),
        )
    return Measurement(
        host=host,
        location=exact,
        levels=tuple(levels),
        own_procs=own_procs,
        # cgroup.procs lists pids as seen in our pid namespace, as getpid() does.
        pid=me,
        own_rss=own_rss,
        cpu_count=known[0],
        dask_memory_limit=known[1],
        warnings=tuple(notes),
        ours=ours,
        zombies=zombies,
        ancestor=location if exact is None else None,
        unreadable=tuple(blind),
        hidden_neighbours=hidden,
    )


def measure(
    proc_root: Path = Path("/proc"),
    root: Path = Path("/"),
    *,
    release: Release,
    **pins: Unpack[Pins],
) -> Measurement:
    """Everything the plan needs: locate the memory cgroup, then `remeasure` it; CPU_COUNT
    and MEMORY_LIMIT as `release` computes them.
    Raises OSError/ParseError only for /proc/meminfo."""
    warnings: list[str] = []
    unreadable: list[str] = []
    try:
        location, locate_warnings, problem = _locate(proc_root, root, "self")
        warnings.extend(locate_warnings)
        if problem is not None and location is None:
            # Not even a certain ancestor: the level exists, and cannot be read.
            warnings.append(problem)
            unreadable.append(problem)
    except (OSError, ParseError) as exc:
        location = None
        warnings.append(f"cannot locate the memory cgroup: {_describe(exc)}")
    if location is not None:
        warnings.extend(location.warnings)
    return remeasure(
        location,
        proc_root,
        root,
        release=release,
        warnings=warnings,
        unreadable=unreadable,
        **pins,
    )
