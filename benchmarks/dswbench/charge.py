"""What the nanny costs the worker's cgroup: its charge, not its RSS (issue 14).

Pure functions over text read from /proc and the cgroup's memory.stat, so that the v1
host benchmark (benchmarks/nanny_charge.py) and the v2 guest (benchmarks/pressure_vm.py)
compute the same figures. Stdlib only: the guest imports it with the project's venv, but
without this package's siblings.

RSS counts file-backed pages (the interpreter, numpy's and distributed's shared objects)
that the kernel charges to whichever cgroup first read them, often not the worker's. What
the nanny adds to the worker's cgroup for certain is its private anonymous memory (and
that of the multiprocessing resource tracker it starts), plus page tables and other
kernel memory; both v1 and v2 count those against the limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

KiB = 1024


def parse_kv_kb(text: str) -> dict[str, int]:
    """`Name:   123 kB` lines (smaps_rollup, status) as bytes; other lines are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not parts or not parts[0].isdigit():
            continue
        unit = parts[1] if len(parts) > 1 else ""
        out[name.strip()] = int(parts[0]) * (KiB if unit == "kB" else 1)
    return out


def parse_stat(text: str) -> dict[str, int]:
    """memory.stat (`name value` lines) as a dict."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


def role(cmdline: str) -> str:
    """Which of the worker's processes this is, from its command line."""
    if "resource_tracker" in cmdline:
        return "tracker"
    if "spawn_main" in cmdline or "forkserver" in cmdline:
        return "worker"
    if "dask-safe-worker" in cmdline or "dask_safe_worker" in cmdline:
        return "supervisor"
    return "nanny"


@dataclass(frozen=True)
class Proc:
    pid: int
    role: str
    rss: int
    pss: int
    anonymous: int
    private_dirty: int
    private_clean: int
    shared_clean: int
    rss_file: int

    @classmethod
    def from_text(cls, pid: int, cmdline: str, smaps_rollup: str, status: str) -> Proc:
        sm = parse_kv_kb(smaps_rollup)
        st = parse_kv_kb(status)
        return cls(
            pid=pid,
            role=role(cmdline),
            rss=sm.get("Rss", 0),
            pss=sm.get("Pss", 0),
            anonymous=sm.get("Anonymous", 0),
            private_dirty=sm.get("Private_Dirty", 0),
            private_clean=sm.get("Private_Clean", 0),
            shared_clean=sm.get("Shared_Clean", 0),
            rss_file=st.get("RssFile", 0),
        )


@dataclass(frozen=True)
class Charge:
    """One snapshot of a worker cgroup holding one nanny, its tracker and one worker."""

    usage: int  # memory.usage_in_bytes (v1) or memory.current (v2)
    working_set: int  # usage - inactive file
    cgroup_anon: int  # v1 total_rss, v2 anon
    cgroup_file: int  # v1 total_cache, v2 file
    cgroup_kernel: int | None  # v1 memory.kmem.usage_in_bytes, v2 kernel (None: unknown)
    nanny_rss: int
    nanny_anon: int
    nanny_private: int  # Private_Dirty + Private_Clean: pages only the nanny maps
    tracker_anon: int
    worker_anon: int
    worker_rss: int
    # The two estimates of what the nanny side (nanny + tracker) costs the cgroup.
    by_cgroup: int  # working set - the worker's anonymous memory (includes kernel memory)
    by_smaps: int  # anonymous memory of the nanny and its tracker

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def charge(stat: Mapping[str, int], usage: int, kernel: int | None, procs: list[Proc]) -> Charge:
    """Estimates from a cgroup's memory.stat (v1 `total_*` or v2 keys) and its processes."""
    v1 = "total_rss" in stat
    anon = stat.get("total_rss" if v1 else "anon", 0)
    file = stat.get("total_cache" if v1 else "file", 0)
    inactive_file = stat.get("total_inactive_file" if v1 else "inactive_file", 0)
    working_set = max(0, usage - inactive_file)

    def total(r: str, attr: str) -> int:
        return sum(int(getattr(p, attr)) for p in procs if p.role == r)

    nanny_anon = total("nanny", "anonymous")
    tracker_anon = total("tracker", "anonymous")
    worker_anon = total("worker", "anonymous")
    return Charge(
        usage=usage,
        working_set=working_set,
        cgroup_anon=anon,
        cgroup_file=file,
        cgroup_kernel=kernel,
        nanny_rss=total("nanny", "rss"),
        nanny_anon=nanny_anon,
        nanny_private=total("nanny", "private_dirty") + total("nanny", "private_clean"),
        tracker_anon=tracker_anon,
        worker_anon=worker_anon,
        worker_rss=total("worker", "rss"),
        by_cgroup=max(0, working_set - worker_anon),
        by_smaps=nanny_anon + tracker_anon,
    )


def read_procs(pids: list[int], proc_root: str = "/proc") -> list[Proc]:
    """The processes of a cgroup; those that exited while being read are left out."""
    out = []
    for pid in pids:
        try:
            base = f"{proc_root}/{pid}"
            with open(f"{base}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"{base}/smaps_rollup") as f:
                smaps = f.read()
            with open(f"{base}/status") as f:
                status = f.read()
        except OSError:
            continue
        out.append(Proc.from_text(pid, cmd, smaps, status))
    return out
