"""Find this process's memory cgroup from /proc/<pid>/cgroup and mountinfo (pure)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

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

    def directory(self, root: Path) -> Path:
        return host_path(root, self.mount_point) / self.relative

    def root_directory(self, root: Path) -> Path:
        return host_path(root, self.mount_point)

    def level_paths(self, root: Path) -> list[tuple[str, Path]]:
        """(cgroup path, directory) of the own cgroup, then of each ancestor up to the
        visible root: the levels a `Measurement` reads, in the same order."""
        top = self.root_directory(root)
        parts = [p for p in self.relative.split("/") if p]
        out: list[tuple[str, Path]] = []
        for depth in range(len(parts), -1, -1):
            rel = "/".join(parts[:depth])
            out.append(("/" + rel, top / rel if rel else top))
        return out


def host_path(root: Path, mount_point: str) -> Path:
    """Mount points are absolute; place them below the filesystem root `root`.

    `root` is `/` on a host; tests point it at a fixture tree, so `/sys/fs/cgroup/memory`
    becomes `<fixture>/sys/fs/cgroup/memory`.
    """
    return root / mount_point.lstrip("/")


def _relative_to_root(path: str, root: str) -> str | None:
    parts = PurePosixPath(path).parts
    if ".." in parts:
        return None
    if root in ("", "/"):
        return path.strip("/")
    r = root.rstrip("/")
    if path == r:
        return ""
    if path.startswith(r + "/"):
        return path[len(r) + 1 :].strip("/")
    return None


def _choose_mount(candidates: list[Mount], path: str) -> tuple[Mount, str, tuple[str, ...]]:
    # Prefer the mount whose root holds our path most specifically: a container may
    # see the same hierarchy mounted more than once.
    best: tuple[Mount, str] | None = None
    for mount in candidates:
        rel = _relative_to_root(path, mount.root)
        if rel is not None and (best is None or len(mount.root) > len(best[0].root)):
            best = (mount, rel)
    if best is not None:
        return best[0], best[1], ()
    mount = candidates[0]
    warning = (
        f"cgroup path {path!r} lies outside the mount root {mount.root!r}; "
        "using the mount root instead"
    )
    return mount, "", (warning,)


def _ordered(mounts: list[Mount]) -> list[Mount]:
    return sorted(mounts, key=lambda m: (not m.mount_point.startswith("/sys/fs/cgroup"),))


def locate_memory_cgroup(
    entries: list[CgroupEntry],
    mounts: list[Mount],
    v2_controllers: frozenset[str] | None,
) -> CgroupLocation | None:
    """The memory cgroup of the process, or None when there is no memory controller.

    `v2_controllers` is the content of the cgroup2 mount's `cgroup.controllers`. On a
    hybrid host a cgroup2 mount exists without the memory controller, which lives on v1;
    so v2 is used only when its controllers list memory.
    """
    v2_entry = next((e for e in entries if e.hierarchy_id == 0 and not e.controllers), None)
    v2_mounts = _ordered([m for m in mounts if m.fstype == "cgroup2"])
    if v2_entry and v2_mounts and v2_controllers is not None and "memory" in v2_controllers:
        mount, rel, warnings = _choose_mount(v2_mounts, v2_entry.path)
        return CgroupLocation(2, v2_entry.path, mount.mount_point, mount.root, rel, warnings)

    v1_entry = next((e for e in entries if "memory" in e.controllers), None)
    v1_mounts = _ordered(
        [m for m in mounts if m.fstype == "cgroup" and m.has_super_option("memory")]
    )
    if v1_entry and v1_mounts:
        mount, rel, warnings = _choose_mount(v1_mounts, v1_entry.path)
        return CgroupLocation(1, v1_entry.path, mount.mount_point, mount.root, rel, warnings)
    return None


def cgroup2_mount(mounts: list[Mount]) -> Mount | None:
    ordered = _ordered([m for m in mounts if m.fstype == "cgroup2"])
    return ordered[0] if ordered else None
