"""Worker deaths between the nanny preload and the supervisor (an edge module).

The route, in the channel's private directory (`deaths/`):

1. the nanny preload writes `<pid>.worker` when its worker process has started (address,
   name, its slot) and `<pid>.exit` when the process ended unasked (`ExitNote`: the exit
   code, and the RSS at which the nanny's memory monitor terminated it, if it did);
2. the supervisor's watch samples the RSS of every `<pid>.worker` on its ticks; for each
   `<pid>.exit` it reads the kernel's counters, attributes the death (`follow.death`),
   logs `worker.died` and writes the record to `<slot>-<pid>.death`;
3. the nanny of that slot sends the record to the scheduler (the event topic
   `follow.death.TOPIC` and the scheduler's log) and removes the file.

The note is listed before the counters are read: the kernel counts a kill before the
victim exits, and the nanny writes the note after, so a kill behind a note is counted by
then. Stdlib only: the supervisor imports this.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from ..cgroup.files import read_kernel_text, settled_version
from ..cgroup.parse import V1_UNLIMITED_FLOOR, parse_int, parse_memory_stat, parse_v2_limit
from ..records import as_dict
from .death import (
    KERNEL_OOM_GLOBAL,
    KERNEL_OOM_LIMIT,
    ExitNote,
    Readings,
    attribute,
    own_kills,
    sentence,
)
from .live_limit import _write_atomically

TYPE_CHECKING = False  # typing costs ~2 ms (and `re`) in the supervisor; mypy knows this name
if TYPE_CHECKING:
    from typing import Any

DEATHS = "deaths"
KERNEL_CAUSES = (KERNEL_OOM_LIMIT, KERNEL_OOM_GLOBAL)
# RSS samples kept per worker: "the last samples" before it died.
SAMPLES = 5
# Records no nanny took (its process died too) are dropped after this long.
RECORD_TTL_S = 600.0
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def deaths_dir(live_file: str) -> str:
    return os.path.join(os.path.dirname(live_file), DEATHS)


def _write_json(path: str, doc: dict[str, Any]) -> None:
    _write_atomically(path, (json.dumps(doc) + "\n").encode())


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


# -- the nanny's side ------------------------------------------------------------------


def note_started(live_file: str, pid: int, worker: str | None, name: str | None, slot: int) -> None:
    directory = deaths_dir(live_file)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    doc = {"pid": pid, "worker": worker, "name": name, "slot": slot}
    _write_json(os.path.join(directory, f"{pid}.worker"), doc)


def note_exit(live_file: str, note: ExitNote, slot: int) -> None:
    directory = deaths_dir(live_file)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    _write_json(os.path.join(directory, f"{note.pid}.exit"), {**as_dict(note), "slot": slot})


def forget_started(live_file: str, pid: int) -> None:
    """A worker the nanny stopped on purpose (restart, close): no death to explain."""
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(deaths_dir(live_file), f"{pid}.worker"))


def pending_records(live_file: str, slot: int) -> list[tuple[str, dict[str, Any]]]:
    """(path, record) for this nanny slot, oldest first; `remove_record` once sent."""
    directory = deaths_dir(live_file)
    try:
        names = [n for n in os.listdir(directory) if n.startswith(f"{slot}-")]
    except OSError:
        return []
    out = []
    for name in names:
        if name.endswith(".death"):
            path = os.path.join(directory, name)
            doc = _read_json(path)
            if doc is not None:
                out.append((path, doc))
    return sorted(out, key=lambda item: float(item[1].get("at") or 0))


def remove_record(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def parse_note(doc: dict[str, Any]) -> tuple[ExitNote, int]:
    """(the note, the nanny's slot); ValueError for anything else."""
    try:
        note = ExitNote(
            pid=int(doc["pid"]),
            exitcode=int(doc["exitcode"]),
            at=float(doc["at"]),
            worker=None if doc.get("worker") is None else str(doc["worker"]),
            name=None if doc.get("name") is None else str(doc["name"]),
            nanny=None if doc.get("nanny") is None else str(doc["nanny"]),
            restart_rss=None if doc.get("restart_rss") is None else int(doc["restart_rss"]),
            dask_limit=None if doc.get("dask_limit") is None else int(doc["dask_limit"]),
            terminate_fraction=(
                None if doc.get("terminate_fraction") is None else float(doc["terminate_fraction"])
            ),
        )
        return note, int(doc.get("slot", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not an exit note: {exc}") from exc


# -- the supervisor's side ---------------------------------------------------------------


def read_rss(proc_root: Path, pid: int) -> int | None:
    """Resident bytes of `pid` (statm's second field), None once it is gone."""
    try:
        # Through the watch's kept descriptors when it ticks (a worker's, every tick).
        fields = read_kernel_text(f"{proc_root}/{pid}/statm").split()
        return int(fields[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def read_global_oom_kills(proc_root: Path) -> int | None:
    try:
        text = (proc_root / "vmstat").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("oom_kill "):
            with contextlib.suppress(ValueError):
                return int(line.split()[1])
    return None


def read_event_counters(version: int, directory: str) -> dict[str, int] | None:
    """(oom_kill, limit hits) counters of one cgroup, under the names `oom_kill` and
    `hits`. v2: `oom_kill` of memory.events (hierarchical: a kill in any cgroup below
    counts), `oom` of memory.events.local (Linux 5.2+) where it exists, since
    memory.events counts a child's hits in every ancestor too; v1: memory.oom_control
    and memory.failcnt, both the cgroup's own (v1 has no OOM count per limit)."""
    d = Path(directory)
    try:
        if version == 2:
            counts = parse_memory_stat((d / "memory.events").read_text())
            try:
                local = parse_memory_stat((d / "memory.events.local").read_text())
            except FileNotFoundError:
                local = counts
            hits = local.get("oom")
        else:
            counts = parse_memory_stat((d / "memory.oom_control").read_text())
            hits = int((d / "memory.failcnt").read_text().strip())
    except (OSError, ValueError):
        return None
    out = {"hits": hits} if hits is not None else {}
    if "oom_kill" in counts:
        out["oom_kill"] = counts["oom_kill"]
    return out


def read_limit(version: int, directory: str) -> int | None:
    """A cgroup's memory limit in bytes (v2 memory.max, v1 memory.limit_in_bytes);
    None for none or unreadable."""
    name = "memory.max" if version == 2 else "memory.limit_in_bytes"
    try:
        text = (Path(directory) / name).read_text()
        value = parse_v2_limit(text, name) if version == 2 else parse_int(text, name)
    except (OSError, ValueError):
        return None
    return None if value is None or value >= V1_UNLIMITED_FLOOR else value


Counters = dict[str, dict[str, int]]


def _delta(
    new: dict[str, dict[str, int]], old: dict[str, dict[str, int]], key: str
) -> dict[str, int]:
    out = {}
    for d, counts in new.items():
        if key in counts and key in old.get(d, {}):
            out[d] = counts[key] - old[d][key]
    return out


class DeathWatch:
    """Run by the watch on every tick: samples the workers, explains their deaths."""

    def __init__(
        self,
        live_file: str,
        audit: Callable[..., None],
        version: int | None,
        directories: Sequence[str],
        proc_root: Path = Path("/proc"),
    ) -> None:
        self.live_file = live_file
        self.directory = deaths_dir(live_file)
        self.audit = audit
        self.version = version
        # Every cgroup whose counters tell where a limit was hit: ours, the one we made
        # for the worker, and each ancestor up to the visible root.
        self.directories = list(dict.fromkeys(directories))
        self.proc_root = proc_root
        self.samples: dict[int, list[tuple[float, int]]] = {}
        self.workers: dict[int, dict[str, Any]] = {}
        self.counters = self._read_counters()
        self.global_oom_kills = read_global_oom_kills(proc_root)
        # Deaths explained so far, per nanny slot and cause (the metrics count them).
        self.died: dict[int, dict[str, int]] = {}
        # The directory's (inode, mtime) and its names, as last listed (`_names`).
        self._listed: tuple[tuple[int, int], list[str]] | None = None

    def _names(self) -> list[str] | None:
        """The notes in the directory; None when it cannot be read. A note is only ever
        made by rename and removed by unlink, both of which change the directory's mtime:
        while it stands, so do the names, and the tick asks one stat instead of a
        listing."""
        try:
            st = os.stat(self.directory)
        except OSError:
            return None
        version = (st.st_ino, st.st_mtime_ns)
        if self._listed is not None and self._listed[0] == version:
            return self._listed[1]
        try:
            names = os.listdir(self.directory)
        except OSError:
            return None
        settled = settled_version(st, time.time_ns()) is not None
        self._listed = (version, names) if settled else None
        return names

    def _read_counters(self) -> dict[str, dict[str, int]]:
        if self.version is None:
            return {}
        out = {}
        for d in self.directories:
            counts = read_event_counters(self.version, d)
            if counts is not None:
                out[d] = counts
        return out

    def tick(
        self,
        kernel_limit: Callable[[], tuple[int | None, str | None]],
        pool_users: Callable[[], Iterable[tuple[str, int]]],
    ) -> None:
        names = self._names()
        if names is None:
            return
        now = time.time()
        exits: list[str] = []
        for name in names:
            stem, _, kind = name.partition(".")
            if kind == "exit" and stem.isdigit():
                exits.append(name)
            elif kind == "worker" and stem.isdigit():
                self._sample(int(stem), name, now)
            elif kind == "death" and self._stale(name, now):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, name))
        for name in sorted(exits):
            self._explain(name, kernel_limit, pool_users)

    def _stale(self, name: str, now: float) -> bool:
        try:
            return now - os.stat(os.path.join(self.directory, name)).st_mtime > RECORD_TTL_S
        except OSError:
            return False

    def _sample(self, pid: int, name: str, now: float) -> None:
        if pid not in self.workers:
            doc = _read_json(os.path.join(self.directory, name))
            if doc is None:
                return
            self.workers[pid] = doc
        rss = read_rss(self.proc_root, pid)
        # 0: the process is exiting (its memory is gone already), not a reading.
        if rss:
            kept = self.samples.setdefault(pid, [])
            kept.append((now, rss))
            del kept[:-SAMPLES]

    def _explain(
        self,
        name: str,
        kernel_limit: Callable[[], tuple[int | None, str | None]],
        pool_users: Callable[[], Iterable[tuple[str, int]]],
    ) -> None:
        path = os.path.join(self.directory, name)
        doc = _read_json(path)
        with contextlib.suppress(OSError):
            os.unlink(path)
        try:
            note, slot = parse_note(doc or {})
        except ValueError as exc:
            self.audit("worker.death.failed", stage="note", file=path, reason=str(exc))
            return
        self._attribute(note, slot, kernel_limit, pool_users)

    def last_look(
        self,
        kernel_limit: Callable[[], tuple[int | None, str | None]],
        pool_users: Callable[[], Iterable[tuple[str, int]]],
        reaped: Mapping[int, int],
    ) -> None:
        """The supervisor is about to exit: explain the notes still here, then every
        started worker that ended with no note. Its nanny died first (the kernel may kill
        the nanny with its worker: both live in the cgroup whose limit we write), so the
        worker was reparented to us and `reaped` holds its exit code (multiprocessing's
        convention: -N for signal N)."""
        self.tick(kernel_limit, pool_users)
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return
        for name in names:
            stem, _, kind = name.partition(".")
            if kind != "worker" or not stem.isdigit():
                continue
            pid = int(stem)
            doc = self.workers.get(pid) or _read_json(os.path.join(self.directory, name)) or {}
            if pid not in reaped:
                self.audit(
                    "worker.death.failed",
                    stage="close",
                    worker_pid=pid,
                    reason="the worker ended with no note, and not as our child",
                )
                continue
            note = ExitNote(
                pid=pid,
                exitcode=reaped[pid],
                at=time.time(),
                worker=None if doc.get("worker") is None else str(doc["worker"]),
                name=None if doc.get("name") is None else str(doc["name"]),
            )
            slot = doc.get("slot", 0)
            self._attribute(note, slot if isinstance(slot, int) else 0, kernel_limit, pool_users)

    def _attribute(
        self,
        note: ExitNote,
        slot: int,
        kernel_limit: Callable[[], tuple[int | None, str | None]],
        pool_users: Callable[[], Iterable[tuple[str, int]]],
    ) -> None:
        counters = self._read_counters()
        vmstat = read_global_oom_kills(self.proc_root)
        limit, cgroup = kernel_limit()
        others = [
            (f"worker {w.get('worker') or ''} (pid {pid})".replace("  ", " "), s[-1][1])
            for pid, w in self.workers.items()
            if pid != note.pid
            and (s := self.samples.get(pid))
            and os.path.exists(self.proc_root / str(pid))
        ]
        others += list(pool_users())
        kills = _delta(counters, self.counters, "oom_kill")
        hits = _delta(counters, self.counters, "hits")
        version = self.version
        limits = [
            (d, value)
            for d, n in hits.items()
            if n > 0 and version is not None and (value := read_limit(version, d)) is not None
        ]
        readings = Readings(
            note=note,
            oom_kills=kills,
            limit_hits=hits,
            global_oom_kills=(
                None
                if vmstat is None or self.global_oom_kills is None
                else vmstat - self.global_oom_kills
            ),
            rss_samples=tuple(self.samples.pop(note.pid, ())),
            kernel_limit=limit,
            cgroup=cgroup,
            top_users=tuple(sorted(others, key=lambda u: -u[1])[:5]),
            cgroup_limits=tuple(limits),
        )
        record = attribute(readings)
        self._consume(counters, vmstat, kills, record["cause"] in KERNEL_CAUSES)
        self.workers.pop(note.pid, None)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.directory, f"{note.pid}.worker"))
        counts = self.died.setdefault(slot, {})
        counts[record["cause"]] = counts.get(record["cause"], 0) + 1
        self.audit("worker.died", **record, sentence=sentence(record))
        try:
            _write_json(os.path.join(self.directory, f"{slot}-{note.pid}.death"), record)
        except OSError as exc:
            self.audit("worker.death.failed", stage="record", worker_pid=note.pid, reason=str(exc))

    def _consume(
        self,
        counters: Counters,
        vmstat: int | None,
        kills: dict[str, int],
        kernel: bool,
    ) -> None:
        """A kernel kill explains one death: the next death is measured from one kill
        later, so two kills between two ticks explain two deaths. Once no kill is left
        over in the worker's cgroup (others' kills, counted in an ancestor, are never
        ours to explain), everything (the limit hits too) is measured from now."""
        if kernel:
            for d, n in kills.items():
                if n > 0:
                    self.counters[d] = {
                        **self.counters[d],
                        "oom_kill": self.counters[d]["oom_kill"] + 1,
                    }
            if vmstat is not None and self.global_oom_kills is not None:
                self.global_oom_kills = min(vmstat, self.global_oom_kills + 1)
        left = _delta(counters, self.counters, "oom_kill")
        if left:
            done = own_kills(left) <= 0
        else:
            # No cgroup counts kills (v1 before Linux 4.13): the host's count decides.
            done = not kernel or vmstat is None or (self.global_oom_kills or 0) >= vmstat
        if done:
            self.counters = {**self.counters, **counters}
            self.global_oom_kills = vmstat

    def close(self) -> None:
        """The channel goes: nobody is left to send what is still here."""
        with contextlib.suppress(OSError):
            for name in os.listdir(self.directory):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, name))
            os.rmdir(self.directory)
