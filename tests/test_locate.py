"""Locating our memory cgroup (cgroup/locate.py) with cgroup namespaces, bind mounts and
several mounts of one hierarchy (issue 24 rows 1 and 2).

The property test builds a world (a cgroup tree, a cgroup-namespace root, a sequence of
mounts as a kernel would stack them), renders /proc/self/cgroup and mountinfo as the
kernel writes them for a process in that namespace, and checks what `locate` made of
them against the world: general paths only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_safe_worker.cgroup.locate import (
    BELOW,
    EXACT,
    OUTSIDE,
    covering_mount,
    locate_memory_cgroup,
    match_root,
    v2_mount,
)
from dask_safe_worker.dask_compat.release import installed_release
from dask_safe_worker.measure import measure
from dask_safe_worker.proc_parse import Mount, parse_mountinfo, parse_proc_cgroup

GiB, MiB = 2**30, 2**20


@pytest.mark.parametrize(
    ("path", "root", "expected"),
    [
        ("/a/b", "/", (EXACT, "a/b")),
        ("/a/b", "/a", (EXACT, "b")),
        ("/a/b", "/a/b", (EXACT, "")),
        ("/a/bc", "/a/b", (OUTSIDE, "")),
        ("/a", "/a/b", (OUTSIDE, "")),
        ("/b", "/a", (OUTSIDE, "")),
        # Both relative to the same cgroup-namespace root: components compare.
        ("/../../x", "/../..", (EXACT, "x")),
        ("/../../x/y", "/../../x", (EXACT, "y")),
        ("/../x", "/../y", (OUTSIDE, "")),
        # The root lies further above the namespace root than the path: surely an
        # ancestor, but the names between are not known.
        ("/../x", "/../..", (BELOW, "")),
        ("/x", "/..", (BELOW, "")),
        ("/", "/../../..", (BELOW, "")),
        # Not known either way.
        ("/../x", "/../../y", (OUTSIDE, "")),
        ("/../x", "/", (OUTSIDE, "")),
        ("/a/../b", "/", (OUTSIDE, "")),
        ("a/b", "/", (OUTSIDE, "")),
    ],
)
def test_match_root(path: str, root: str, expected: tuple[str, str]) -> None:
    assert match_root(path, root) == expected


def _mounts(text: str) -> list[Mount]:
    mounts, skipped = parse_mountinfo(text)
    assert not skipped
    return mounts


BASE = (
    "22 1 0:21 / /sys rw - sysfs sysfs rw\n"
    "31 22 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755\n"
    "35 31 0:32 {root} /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
)


def test_a_nested_namespace_path_is_located_below_its_mount_root() -> None:
    # The hierarchy mounted inside a cgroup namespace at `T`, then a second namespace at
    # T/A/N, then a move to T/B: the kernel writes `/../../B` under the root `/../..`.
    located = locate_memory_cgroup(
        parse_proc_cgroup("4:memory:/../../B\n"), _mounts(BASE.format(root="/../..")), None
    )
    loc = located.location
    assert located.problem is None and loc is not None and loc.exact
    assert loc.directory(Path("/")) == Path("/sys/fs/cgroup/memory/B")


def test_a_path_above_the_namespace_root_is_only_below_the_mount_root() -> None:
    # After `unshare -C` and a move to a sibling: `/../R`, the mount root `/../../../..`.
    located = locate_memory_cgroup(
        parse_proc_cgroup("4:memory:/../R\n"), _mounts(BASE.format(root="/../../../..")), None
    )
    loc = located.location
    assert loc is not None and not loc.exact and loc.relative == ""
    assert located.problem is not None and "outside our cgroup namespace" in located.problem


def test_a_bind_mount_over_the_controller_hides_our_cgroup() -> None:
    # Issue 24 row 1: a sibling R bound over the memory controller's mount point. Its
    # line comes after the original's; its parent is the original (stacked on it).
    text = BASE.format(root="/") + (
        "81 35 0:32 /user.slice/R /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    )
    mounts = _mounts(text)
    assert covering_mount(mounts[2], mounts, "user.slice/B") == mounts[3]
    located = locate_memory_cgroup(parse_proc_cgroup("4:memory:/user.slice/B\n"), mounts, None)
    assert located.location is None
    assert located.problem is not None and "covered by another mount" in located.problem


def test_a_tmpfs_over_our_cgroup_directory_hides_it() -> None:
    text = BASE.format(root="/") + (
        "90 35 0:50 / /sys/fs/cgroup/memory/user.slice rw - tmpfs tmpfs rw\n"
    )
    located = locate_memory_cgroup(
        parse_proc_cgroup("4:memory:/user.slice/B\n"), _mounts(text), None
    )
    assert located.location is None and located.problem is not None
    # A sibling directory's mount does not.
    text = BASE.format(root="/") + "90 35 0:50 / /sys/fs/cgroup/memory/other rw - tmpfs t rw\n"
    located = locate_memory_cgroup(
        parse_proc_cgroup("4:memory:/user.slice/B\n"), _mounts(text), None
    )
    assert located.location is not None and located.location.exact


def test_a_new_cgroup_tmpfs_over_the_old_one_hides_every_controller_below() -> None:
    text = BASE.format(root="/") + "95 31 0:60 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
    located = locate_memory_cgroup(
        parse_proc_cgroup("4:memory:/user.slice/B\n"), _mounts(text), None
    )
    assert located.location is None and located.problem is not None


def test_a_second_mount_that_holds_the_path_exactly_wins() -> None:
    text = BASE.format(root="/user.slice/R") + (
        "60 1 0:32 / /mnt/memory rw - cgroup cgroup rw,memory\n"
    )
    located = locate_memory_cgroup(
        parse_proc_cgroup("4:memory:/user.slice/B\n"), _mounts(text), None
    )
    loc = located.location
    assert loc is not None and loc.exact and loc.mount_point == "/mnt/memory"
    assert loc.relative == "user.slice/B"


SEVERAL_V2 = (
    "22 1 0:21 / /sys rw - sysfs sysfs rw\n"
    "31 22 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755\n"
    # A sandbox's own child cgroup, mounted before the root: memory is not delegated to it.
    "40 31 0:30 /sandbox.slice/job /sys/fs/cgroup/sandbox rw - cgroup2 cgroup2 rw\n"
    "41 31 0:30 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
)


def test_v2_controllers_are_read_at_the_mount_that_holds_our_cgroup() -> None:
    # Issue 24 row 2.
    entries = parse_proc_cgroup("0::/user.slice/worker.scope\n")
    mount = v2_mount(entries, _mounts(SEVERAL_V2))
    assert mount is not None and mount.mount_point == "/sys/fs/cgroup/unified"


def test_several_cgroup2_mounts_measure_at_ours(tmp_path: Path) -> None:
    # Issue 24 row 2, through `measure`: the first cgroup2 mount's cgroup.controllers
    # lacks memory; read there, v2 was dropped and no memory cgroup found.
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text("0::/user.slice/worker.scope\n")
    (tmp_path / "proc/self/mountinfo").write_text(SEVERAL_V2)
    (tmp_path / "proc/self/status").write_text("RssAnon:\t10240 kB\n")
    (tmp_path / "proc/meminfo").write_text(
        "MemTotal:       16777216 kB\nMemFree:         8388608 kB\nMemAvailable:   12582912 kB\n"
    )
    (tmp_path / "proc/2").mkdir()
    (tmp_path / "proc/2/stat").write_text("2 (kthreadd) S 0 0 0\n")
    sandbox = tmp_path / "sys/fs/cgroup/sandbox"
    sandbox.mkdir(parents=True)
    (sandbox / "cgroup.controllers").write_text("cpu pids\n")
    unified = tmp_path / "sys/fs/cgroup/unified"
    own = unified / "user.slice/worker.scope"
    own.mkdir(parents=True)
    (unified / "cgroup.controllers").write_text("cpu memory pids\n")
    for directory, limit in ((own, str(GiB)), (own.parent, "max")):
        (directory / "memory.max").write_text(limit + "\n")
        (directory / "memory.current").write_text(f"{100 * MiB}\n")
        (directory / "memory.stat").write_text("inactive_file 0\n")
    (own / "cgroup.procs").write_text("4242\n")
    m = measure(
        tmp_path / "proc",
        tmp_path,
        release=installed_release(),
        affinity=2,
        rlimit_rss=-1,
        own_pid=4242,
    )
    assert m.location is not None and m.location.version == 2
    assert m.location.mount_point == "/sys/fs/cgroup/unified"
    assert m.levels[0].limit == GiB and m.available == GiB - 100 * MiB
    assert m.unreadable == () and m.sole_occupant


# The property test's world. Names from a tiny alphabet so that paths share prefixes.
NAMES = st.sampled_from(["a", "b", "c"])
CGROUP = st.lists(NAMES, max_size=3).map(tuple)
POINTS = st.sampled_from(
    [
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/memory/a",
        "/sys/fs/cgroup/memory/a/b",
        "/sys/fs/cgroup",
        "/mnt/m",
    ]
)
# (a cgroup mount of the hierarchy, or a tmpfs; its mount point; a cgroup mount's root).
OPS = st.lists(st.tuples(st.booleans(), POINTS, CGROUP), min_size=1, max_size=5)


def _kernel_path(target: tuple[str, ...], ns_root: tuple[str, ...]) -> str:
    """`target` as the kernel writes it for a reader whose cgroup namespace is rooted at
    `ns_root`: up to the common ancestor, then down."""
    common = 0
    while common < min(len(target), len(ns_root)) and target[common] == ns_root[common]:
        common += 1
    parts = [".."] * (len(ns_root) - common) + list(target[common:])
    return "/" + "/".join(parts)


class World:
    """Mounts stacked as the kernel stacks them: a new mount's parent is the mount that
    path lookup of its mount point ends in."""

    def __init__(self, version: int) -> None:
        self.version = version
        # id -> (parent, mount point, cgroup root or None for a non-cgroup filesystem)
        self.mounts: dict[int, tuple[int, str, tuple[str, ...] | None]] = {
            1: (0, "/", None),
            2: (1, "/sys", None),
            3: (2, "/sys/fs/cgroup", None),
        }

    def resolve(self, path: str) -> tuple[int, tuple[str, ...]]:
        """(the mount path lookup of `path` ends in, the components below its point)."""
        comps = [c for c in path.split("/") if c]
        current = 1
        for depth in range(len(comps) + 1):
            prefix = "/" + "/".join(comps[:depth])
            while True:
                above = [
                    i
                    for i, (parent, point, _) in self.mounts.items()
                    if parent == current and point == prefix
                ]
                if not above:
                    break
                current = above[-1]
        point = self.mounts[current][1]
        below = tuple(comps[len([c for c in point.split("/") if c]) :])
        return current, below

    def mount(self, point: str, root: tuple[str, ...] | None) -> None:
        parent, _ = self.resolve(point)
        self.mounts[max(self.mounts) + 1] = (parent, point, root)

    def cgroup_at(self, path: str) -> tuple[str, ...] | None:
        """The cgroup a directory path really is, or None when it is not one."""
        mount_id, below = self.resolve(path)
        root = self.mounts[mount_id][2]
        return None if root is None else root + below

    def mountinfo(self, ns_root: tuple[str, ...]) -> str:
        out = []
        fs = "cgroup cgroup rw,memory" if self.version == 1 else "cgroup2 cgroup2 rw"
        for i, (parent, point, root) in self.mounts.items():
            if root is None:
                out.append(f"{i} {parent} 0:{i} / {point} rw - tmpfs tmpfs rw")
            else:
                out.append(f"{i} {parent} 0:99 {_kernel_path(root, ns_root)} {point} rw - {fs}")
        return "\n".join(out) + "\n"


@settings(max_examples=400, deadline=None)
@given(
    version=st.sampled_from([1, 2]),
    own=CGROUP,
    ns_root=CGROUP,
    ops=OPS,
    shuffle=st.randoms(use_true_random=False),
)
def test_located_is_our_cgroup_or_a_certain_ancestor_else_a_problem(
    version: int,
    own: tuple[str, ...],
    ns_root: tuple[str, ...],
    ops: list[tuple[bool, str, tuple[str, ...]]],
    shuffle: object,
) -> None:
    world = World(version)
    for is_cgroup, point, root in ops:
        world.mount(point, root if is_cgroup else None)
    lines = world.mountinfo(ns_root).splitlines(keepends=True)
    shuffle.shuffle(lines)  # type: ignore[attr-defined]
    mounts = _mounts("".join(lines))
    entry = f"4:memory:{_kernel_path(own, ns_root)}" if version == 1 else ""
    entries = parse_proc_cgroup(f"{entry}\n0::{_kernel_path(own, ns_root)}\n")
    located = locate_memory_cgroup(entries, mounts, frozenset({"memory"}))
    loc = located.location
    if loc is None:
        # Nothing is read or written; when the hierarchy is mounted at all, the level we
        # are in is one that exists and cannot be read.
        has_mount = any(root is not None for _, _, root in world.mounts.values())
        assert (located.problem is not None) == has_mount
        return
    levels = [world.cgroup_at(str(d)) for _, d in loc.level_paths(Path("/"))]
    # Every level read is our cgroup or one of its ancestors: what the plan counts is
    # certain. Writes go to the first level or below it, only when it is exact.
    for level in levels:
        assert level is not None and own[: len(level)] == level
    if loc.exact:
        assert located.problem is None
        assert world.cgroup_at(str(loc.directory(Path("/")))) == own
        child = world.cgroup_at(str(loc.directory(Path("/")) / "dask-safe-worker"))
        assert child == (*own, "dask-safe-worker")
    else:
        # Only an ancestor: never ours to write, and our own level is unreadable.
        assert located.problem is not None and loc.unlocated == located.problem
