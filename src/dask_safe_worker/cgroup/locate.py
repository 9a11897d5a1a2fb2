"""Find this process's memory cgroup from /proc/<pid>/cgroup and mountinfo (pure).

Rule (docs/design.md, "Rules"): *locate only what the kernel says with certainty*. A path
that cannot be placed below a mount that is really visible at its mount point is not
guessed (no fall back to the mount root): nothing is written for it, no process moves,
and the levels we know exist but cannot read make the start fail closed.
"""

from __future__ import annotations

from pathlib import Path

from ..proc_parse import CgroupEntry, Mount
from ..records import record


@record
class CgroupLocation:
    version: int
    # The path /proc/<pid>/cgroup reports, relative to the hierarchy (or namespace) root.
    cgroup_path: str
    mount_point: str
    mount_root: str
    # Own cgroup below the mount point; "" when it is the mount point itself.
    relative: str
    warnings: tuple[str, ...] = ()
    # None when the own cgroup is `relative` below the mount point. Otherwise why it could
    # not be placed: the mount root is then only a certain *ancestor* of our cgroup
    # (`relative` is ""), whose levels may be read but which is never ours to write.
    unlocated: str | None = None

    @property
    def exact(self) -> bool:
        return self.unlocated is None

    def directory(self, root: Path) -> Path:
        return host_path(root, self.mount_point) / self.relative

    def root_directory(self, root: Path) -> Path:
        return host_path(root, self.mount_point)

    def level_paths(self, root: Path) -> list[tuple[str, Path]]:
        """(cgroup path, directory) of the own cgroup, then of each ancestor up to the
        visible root: the levels a `Measurement` reads, in the same order. Made once per
        location and root: the watch asks every tick, and the joins cost more than the
        reads of the small files at their ends."""
        key = (self, root)
        known = _LEVEL_PATHS.get(key)
        if known is None:
            if len(_LEVEL_PATHS) >= 64:
                _LEVEL_PATHS.clear()
            known = _LEVEL_PATHS[key] = tuple(self._level_paths(root))
        return list(known)

    def _level_paths(self, root: Path) -> list[tuple[str, Path]]:
        top = self.root_directory(root)
        parts = [p for p in self.relative.split("/") if p]
        out: list[tuple[str, Path]] = []
        for depth in range(len(parts), -1, -1):
            rel = "/".join(parts[:depth])
            out.append(("/" + rel, top / rel if rel else top))
        return out


# Few keys in a process: the watch's one location (and tests' roots).
_LEVEL_PATHS: dict[tuple[CgroupLocation, Path], tuple[tuple[str, Path], ...]] = {}


@record
class Located:
    """What `locate_memory_cgroup` found: the location (exact, or only a certain
    ancestor), and why a memory cgroup we are in could not be placed, if so."""

    location: CgroupLocation | None
    # Set when the kernel says we are in a memory cgroup that is not located exactly:
    # that level exists, and cannot be read.
    problem: str | None = None


def host_path(root: Path, mount_point: str) -> Path:
    """Mount points are absolute; place them below the filesystem root `root`.

    `root` is `/` on a host; tests point it at a fixture tree, so `/sys/fs/cgroup/memory`
    becomes `<fixture>/sys/fs/cgroup/memory`.
    """
    return root / mount_point.lstrip("/")


def _components(path: str) -> tuple[int, tuple[str, ...]] | None:
    """A cgroup path as the kernel writes it relative to our cgroup-namespace root:
    leading `..` (up from that root), then names. None for any other form."""
    if not path.startswith("/"):
        return None
    parts = [p for p in path.split("/") if p]
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    names = tuple(parts[ups:])
    if any(n in (".", "..") for n in names):
        return None
    return ups, names


EXACT, BELOW, OUTSIDE = "exact", "below", "outside"


def match_root(path: str, root: str) -> tuple[str, str]:
    """Where `path` lies relative to a mount `root`; both are what the kernel writes
    relative to the same cgroup-namespace root, so their components compare.

    (EXACT, relative) when the path is `relative` below the root; (BELOW, "") when it
    is surely somewhere below the root but the names between are not known (the root
    is further above the namespace root than the path: `/../x` under `/../..`);
    (OUTSIDE, "") for anything else, including what cannot be told.
    """
    p, r = _components(path), _components(root)
    if p is None or r is None:
        return OUTSIDE, ""
    (p_up, p_names), (r_up, r_names) = p, r
    if p_up == r_up:
        if p_names[: len(r_names)] == r_names:
            return EXACT, "/".join(p_names[len(r_names) :])
        return OUTSIDE, ""
    if p_up < r_up and not r_names:
        return BELOW, ""
    return OUTSIDE, ""


def _within(path: str, top: str) -> bool:
    """`path` is `top` or lies below it (mount points, as absolute paths)."""
    top = top.rstrip("/")
    return path == top or path.startswith(top + "/") or top == ""


def covering_mount(mount: Mount, mounts: list[Mount], relative: str) -> Mount | None:
    """Another mount that hides `mount`'s directory `relative` from path lookup, or None.

    Walking from `mount` up its parents (mount ids, not the order of the lines): another
    mount on a link of that chain, whose mount point is the next link's (or the target's)
    or lies on the way to it, is stacked over it: a bind mount of another cgroup over the
    controller's mount point, a tmpfs over a cgroup directory, a new /sys/fs/cgroup.
    """
    by_id = {m.mount_id: m for m in mounts}
    target = (mount.mount_point.rstrip("/") + ("/" + relative if relative else "")) or "/"
    current: Mount | None = mount
    previous: Mount | None = None
    seen: set[int] = set()
    while current is not None and current.mount_id not in seen:
        seen.add(current.mount_id)
        point = target if previous is None else previous.mount_point
        for other in mounts:
            if other is previous or other is current or other.parent_id != current.mount_id:
                continue
            if _within(point, other.mount_point) and _within(
                other.mount_point, current.mount_point
            ):
                return other
        previous, current = current, by_id.get(current.parent_id)
    return None


def _specificity(root: str) -> tuple[int, int]:
    c = _components(root)
    return (0, 0) if c is None else (-c[0], len(c[1]))


def place(
    path: str, candidates: list[Mount], mounts: list[Mount]
) -> tuple[Mount | None, str, str | None]:
    """(mount, relative, why not exact) for `path` among the `candidates` mounts of its
    hierarchy; the reason is None when the path is `relative` below the mount point.

    A container may see one hierarchy mounted more than once: the mount whose root holds
    the path most specifically, and that no other mount covers, wins. Without one that
    holds it exactly, a mount whose root is surely an ancestor of the path is returned
    with relative "" and the reason (its levels are certain, ours are not); without
    that either, (None, "", reason).
    """
    exact: list[tuple[Mount, str]] = []
    below: list[Mount] = []
    notes: list[str] = []
    for mount in candidates:
        kind, rel = match_root(path, mount.root)
        where = f"the mount at {mount.mount_point!r} (root {mount.root!r})"
        if kind == OUTSIDE:
            notes.append(f"it is not below {where}")
            continue
        cover = covering_mount(mount, mounts, rel)
        if cover is not None:
            notes.append(f"{where} is covered by another mount at {cover.mount_point!r}")
            continue
        if kind == EXACT:
            exact.append((mount, rel))
        else:
            notes.append(
                f"it lies below {where}, but the cgroups between are outside our cgroup namespace"
            )
            below.append(mount)
    if exact:
        mount, rel = max(exact, key=lambda e: _specificity(e[0].root))
        return mount, rel, None
    reason = f"our cgroup {path!r} cannot be located: " + "; ".join(notes or ["no mount"])
    if below:
        return max(below, key=lambda m: _specificity(m.root)), "", reason
    return None, "", reason


def _ordered(mounts: list[Mount]) -> list[Mount]:
    return sorted(mounts, key=lambda m: (not m.mount_point.startswith("/sys/fs/cgroup"),))


def _v2_entry(entries: list[CgroupEntry]) -> CgroupEntry | None:
    return next((e for e in entries if e.hierarchy_id == 0 and not e.controllers), None)


def v2_mount(entries: list[CgroupEntry], mounts: list[Mount]) -> Mount | None:
    """The cgroup2 mount that holds our v2 cgroup (its `cgroup.controllers` says whether
    memory is on v2), else the first cgroup2 mount: with several (a child cgroup mounted
    before the root, as some sandboxes do), the first need not be ours."""
    v2_mounts = _ordered([m for m in mounts if m.fstype == "cgroup2"])
    entry = _v2_entry(entries)
    if entry is not None and v2_mounts:
        mount, _, _ = place(entry.path, v2_mounts, mounts)
        if mount is not None:
            return mount
    return v2_mounts[0] if v2_mounts else None


def _location(version: int, path: str, candidates: list[Mount], mounts: list[Mount]) -> Located:
    mount, rel, reason = place(path, candidates, mounts)
    if mount is None:
        return Located(None, reason)
    warnings = () if reason is None else (reason,)
    location = CgroupLocation(
        version, path, mount.mount_point, mount.root, rel, warnings=warnings, unlocated=reason
    )
    return Located(location, reason)


def locate_memory_cgroup(
    entries: list[CgroupEntry],
    mounts: list[Mount],
    v2_controllers: frozenset[str] | None,
) -> Located:
    """The memory cgroup of the process, with why it is not located exactly if so.

    `v2_controllers` is the content of `cgroup.controllers` at the cgroup2 mount that
    holds our cgroup (`v2_mount`). On a hybrid host a cgroup2 mount exists without the
    memory controller, which lives on v1; so v2 is used only when its controllers list
    memory.
    """
    v2_entry = _v2_entry(entries)
    v2_mounts = _ordered([m for m in mounts if m.fstype == "cgroup2"])
    if v2_entry and v2_mounts and v2_controllers is not None and "memory" in v2_controllers:
        return _location(2, v2_entry.path, v2_mounts, mounts)

    v1_entry = next((e for e in entries if "memory" in e.controllers), None)
    v1_mounts = _ordered(
        [m for m in mounts if m.fstype == "cgroup" and m.has_super_option("memory")]
    )
    if v1_entry and v1_mounts:
        return _location(1, v1_entry.path, v1_mounts, mounts)
    return Located(None)
