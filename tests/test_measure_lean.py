"""The watch's lean reading (`remeasure(lean=True)`): levels above our own that set no
ceiling are not read further, and on v1 with `memory.use_hierarchy` all the way up a
level whose hierarchical limit is none ends the reads. Whatever the layout, the plan's
inputs come out as from the full reading; the files it skips are really not read.

File trees built from generated layouts (general paths, not this host's)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dask_safe_worker.dask_compat.release import installed_release
from dask_safe_worker.measure import Measurement, hierarchy_inherited, locate, remeasure

MiB = 2**20
MEM_TOTAL = 16 * 1024 * MiB
V1_UNLIMITED = 9223372036854771712
RELEASE = installed_release()
OWN = 4242
NAMES = ("a.slice", "b.slice", "job", "step")

# One level, own cgroup first: (limit, memory.high (v2), usage, inactive_file); None: no
# limit. Limits at or above the host's RAM count as none too.
Level = tuple[int | None, int | None, int, int]
sizes = st.integers(min_value=1, max_value=40 * 1024).map(lambda n: n * MiB)
cache = st.integers(0, 512).map(lambda n: n * MiB)
levels = st.lists(
    st.tuples(st.none() | sizes, st.none() | sizes, sizes, cache),
    min_size=1,
    max_size=len(NAMES) + 1,
)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def build(root: Path, version: int, layout: list[Level], use_hierarchy: str = "1") -> list[Path]:
    """The tree; the directories, own cgroup first, the mount root last."""
    depth = len(layout) - 1
    rel = "/" + "/".join(NAMES[:depth])
    mount = root / ("sys/fs/cgroup/memory" if version == 1 else "sys/fs/cgroup")
    if version == 1:
        mountinfo = (
            "22 1 0:21 / /sys rw - sysfs sysfs rw\n"
            "31 22 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
            "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        )
        own_line = f"5:memory:{rel}\n0::/\n"
    else:
        mountinfo = (
            "22 1 0:21 / /sys rw - sysfs sysfs rw\n"
            "26 22 0:23 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"
        )
        own_line = f"0::{rel}\n"
        _write(mount / "cgroup.controllers", "cpu io memory pids\n")
    _write(root / "proc/self/mountinfo", mountinfo)
    _write(root / "proc/self/cgroup", own_line)
    _write(root / "proc/self/status", "VmRSS:\t  51200 kB\nRssAnon:\t  40960 kB\n")
    _write(root / "proc/2/stat", "2 (kthreadd) S 0 0 0 0\n")
    _write(
        root / "proc/meminfo",
        f"MemTotal: {MEM_TOTAL // 1024} kB\nMemFree: 4194304 kB\nMemAvailable: 9437184 kB\n",
    )
    dirs = [mount / "/".join(NAMES[:d]) if d else mount for d in range(depth, -1, -1)]
    lowest = None
    for i in range(len(dirs) - 1, -1, -1):
        limit, high, usage, inactive = layout[i]
        d = dirs[i]
        is_root = i == len(dirs) - 1
        if version == 1:
            # The kernel's rule: the lowest of the level's own limit and its ancestors'.
            own = V1_UNLIMITED if limit is None or is_root else limit
            lowest = own if lowest is None else min(lowest, own)
            _write(d / "memory.limit_in_bytes", f"{own}\n")
            _write(d / "memory.usage_in_bytes", f"{usage}\n")
            _write(
                d / "memory.stat",
                f"cache 0\nrss 0\nhierarchical_memory_limit {lowest}\n"
                f"total_cache {inactive}\ntotal_inactive_file {inactive}\n",
            )
            _write(d / "memory.use_hierarchy", f"{use_hierarchy}\n")
        elif not is_root:
            _write(d / "memory.max", f"{'max' if limit is None else limit}\n")
            _write(d / "memory.high", f"{'max' if high is None else high}\n")
            _write(d / "memory.current", f"{usage}\n")
            _write(d / "memory.stat", f"anon 0\ninactive_file {inactive}\n")
        else:
            _write(d / "memory.stat", f"anon 0\ninactive_file {inactive}\n")
        _write(d / "cgroup.procs", f"{OWN}\n" if i == 0 else "")
    return dirs


def reading(root: Path, lean: bool) -> Measurement:
    loc = locate(root / "proc", root)
    assert loc is not None
    dirs = [str(d) for _, d in loc.level_paths(root)]
    return remeasure(
        loc,
        root / "proc",
        root,
        release=RELEASE,
        affinity=4,
        rlimit_rss=-1,
        own_pid=OWN,
        lean=lean,
        inherited=lean and hierarchy_inherited(loc.version, dirs),
    )


def plan_inputs(m: Measurement) -> object:
    """Everything of a measurement that a plan, a wake-up or a follow.changed line uses."""
    return (
        m.available,
        m.limiting,
        m.own_working_set,
        m.sole_occupant,
        [(lvl.path, lvl.effective_limit, lvl.ceiling, lvl.headroom) for lvl in m.levels],
        m.levels[0],
        [lvl for lvl in m.levels if lvl.ceiling is not None],
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(version=st.sampled_from([1, 2]), layout=levels)
def test_lean_reading_gives_the_plan_the_same_inputs(version: int, layout: list[Level]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = build(root, version, layout)
        full = reading(root, lean=False)
        assert plan_inputs(reading(root, lean=True)) == plan_inputs(full)
        # What the lean reading may skip, removed: above the first level past our own
        # without a ceiling, nothing (v1: its hierarchical limit covers them) or only the
        # usage files (v2: each level's own memory.max and memory.high decide).
        bare = [i for i, lvl in enumerate(full.levels) if i > 0 and lvl.ceiling is None]
        if not bare:
            return
        for i in range(bare[0], len(dirs)):
            if version == 1 and i > bare[0]:
                # memory.use_hierarchy stays: the watch reads it once, at its start.
                for name in os.listdir(dirs[i]):
                    if (dirs[i] / name).is_file() and name != "memory.use_hierarchy":
                        os.unlink(dirs[i] / name)
            elif version == 1 or i in bare:
                for name in ("memory.usage_in_bytes", "memory.limit_in_bytes", "memory.current"):
                    with_name = dirs[i] / name
                    if with_name.exists():
                        os.unlink(with_name)
                if version == 2:
                    os.unlink(dirs[i] / "memory.stat")
        lean = reading(root, lean=True)
        assert plan_inputs(lean) == plan_inputs(full)
        assert all(lvl.error is None for lvl in lean.levels), lean.levels


def test_without_use_hierarchy_every_level_is_asked(tmp_path: Path) -> None:
    # A v1 level made under a parent without use_hierarchy is not limited by what is
    # above that parent, so its hierarchical limit says nothing about the levels there:
    # each is asked for its own (here the top level below the root sets 1 GiB).
    layout: list[Level] = [(None, None, 100 * MiB, 0)] * 3 + [(1024 * MiB, None, 300 * MiB, 0)]
    layout += [(None, None, 400 * MiB, 0)]
    dirs = build(tmp_path, 1, layout, use_hierarchy="0")
    # The kernel without use_hierarchy: every level's hierarchical limit is its own.
    for d, (limit, _, _, _) in zip(dirs, layout, strict=True):
        stat = (d / "memory.stat").read_text().splitlines()
        stat[2] = f"hierarchical_memory_limit {limit or V1_UNLIMITED}"
        (d / "memory.stat").write_text("\n".join(stat) + "\n")
    assert not hierarchy_inherited(1, [str(d) for d in dirs])
    lean = reading(tmp_path, lean=True)
    assert lean.limiting == "/a.slice" and lean.available == 724 * MiB
    assert plan_inputs(lean) == plan_inputs(reading(tmp_path, lean=False))


def test_a_limit_set_above_an_unlimited_level_is_seen_at_once(tmp_path: Path) -> None:
    # An operator limits an ancestor between two ticks: the kernel's hierarchical limits
    # of every level below it move at once, so the next lean reading sees it.
    layout: list[Level] = [(2048 * MiB, None, 100 * MiB, 0), (None, None, 300 * MiB, 0)]
    layout += [(None, None, 500 * MiB, 0)] * 2
    build(tmp_path, 1, layout)
    assert reading(tmp_path, lean=True).limiting == "/a.slice/b.slice/job"
    layout[2] = (1024 * MiB, None, 500 * MiB, 0)
    build(tmp_path, 1, layout)
    lean = reading(tmp_path, lean=True)
    assert lean.limiting == "/a.slice" and lean.available == 524 * MiB
    assert plan_inputs(lean) == plan_inputs(reading(tmp_path, lean=False))
