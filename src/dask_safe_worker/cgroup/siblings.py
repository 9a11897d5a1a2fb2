"""Other instances' child cgroups next to ours: memory already promised (read-only).

Instances started one after another in one shared cgroup each measure the parent's
headroom before the others have grown into their limits; without this, N instances
promise Dask about N times the memory there is. A `dask-safe-worker*` child of our own
cgroup that holds processes and a kernel limit has that limit committed, used or not:
only its unused part (limit - working set) is still in the headroom we measured, so that
part is taken off, and no budget goes above a level's limit minus the siblings' limits.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..measure import Measurement
from ..proc_parse import ParseError
from ..records import record, replace
from .files import open_memory_cgroup
from .parse import working_set


@record
class Sibling:
    name: str
    limit: int
    working_set: int
    pids: tuple[int, ...]

    @property
    def unused(self) -> int:
        return max(0, self.limit - self.working_set)


def is_instance_child(name: str, base: str) -> bool:
    """Names an instance gives its child: `<base>`, `<base>-<pid>`, `<base>-<pid>-<hex>`."""
    return name == base or name.startswith(base + "-")


def read_siblings(m: Measurement, base: str, root: Path = Path("/")) -> tuple[Sibling, ...]:
    """The limited, occupied instance children of our own cgroup. Unreadable ones are
    skipped: a sibling we cannot read is one we cannot count either way."""
    if m.location is None:
        return ()
    own_dir = m.location.directory(root)
    try:
        names = sorted(os.listdir(own_dir))
    except OSError:
        return ()
    found: list[Sibling] = []
    for name in names:
        directory = own_dir / name
        if not (is_instance_child(name, base) and directory.is_dir()):
            continue
        try:
            cg = open_memory_cgroup(m.location.version, directory)
            pids = tuple(cg.procs())
            limit = cg.limit(m.host.total)
            used = working_set(cg.usage(), cg.inactive_file())
        except (OSError, ParseError, ValueError):
            continue
        if pids and limit is not None:
            found.append(Sibling(name, limit, used, pids))
    return tuple(found)


def with_siblings(m: Measurement, siblings: tuple[Sibling, ...]) -> Measurement:
    """`m` with the siblings' processes counted as occupants of our own cgroup: its
    subtree is shared, so its limit is not ours alone to set and its working set is
    not ours alone to keep."""
    if not siblings or m.own_procs is None:
        return m
    pids = tuple(p for s in siblings for p in s.pids)
    return replace(m, own_procs=(*m.own_procs, *pids))
