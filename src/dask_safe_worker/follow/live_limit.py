"""The live-limit channel between the supervisor and the Dask processes (an edge module).

The supervisor rewrites one small JSON file, `live.json`, in a private directory; each
rewrite carries the next generation number and replaces the file with a rename, so a
reader sees the old or the new record, never half of one. Workers and nannies poll it with
a stat (the inode changes with every rename) and acknowledge a generation they hold by
writing `acks/<role>-<pid>-<slot>` (one process may hold several servers: `dask worker
--nworkers 2` runs two nannies in one process). The file outlives any worker, so a worker
that its nanny restarts reads the current limit when it starts.

Stdlib only: the supervisor imports this.
"""

from __future__ import annotations

import contextlib
import json
import os

from ..records import as_dict, record

LIVE_FILE_ENV = "DASK_SAFE_WORKER_LIVE_FILE"
# Set for the roles ("worker", "nanny") whose preloads the user gave only through dask's
# config: our --preload on the command line makes dask ignore them (follow/preload.py).
CONFIGURED_PRELOADS_ENV = "DASK_SAFE_WORKER_RUN_CONFIGURED_PRELOADS"
ACKS = "acks"
# The follow spec's file name in the channel directory: the start writes it (follow/setup),
# the supervisor's watch reads it. Here, so that the start need not import the watch
# (its cgroup readers, death watch and kernel wake-ups) before the worker is forked.
SPEC_FILE = "follow.json"


@record
class LiveLimit:
    generation: int
    # The per-worker Dask memory limit, bytes.
    per_worker: int
    budget: int
    # How often readers should look, seconds.
    interval: float
    # time.time() when the supervisor saw the change that led to this record.
    changed_at: float


def parse_live_limit(text: str) -> LiveLimit:
    """A record as `write_live_limit` wrote it; ValueError for anything else."""
    try:
        doc = json.loads(text)
        record = LiveLimit(
            generation=int(doc["generation"]),
            per_worker=int(doc["per_worker"]),
            budget=int(doc["budget"]),
            interval=float(doc["interval"]),
            changed_at=float(doc["changed_at"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not a live-limit record: {exc}") from exc
    if record.generation < 0 or record.per_worker <= 0 or not record.interval > 0:
        raise ValueError("not a live-limit record: out-of-range values")
    return record


def _write_atomically(path: str, data: bytes) -> None:
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    # O_EXCL|O_NOFOLLOW: a file or symlink planted at the temporary name is refused.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_live_limit(path: str, record: LiveLimit) -> None:
    """Replace the record at `path` (same directory, so the rename is atomic)."""
    _write_atomically(path, (json.dumps(as_dict(record)) + "\n").encode())


def read_live_limit(path: str) -> LiveLimit | None:
    """The current record; None if there is none or it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return parse_live_limit(f.read())
    except (OSError, ValueError):
        return None


def prepare_channel(directory: str) -> str:
    """Create `directory` (0700) with its acks folder; the path of the live file."""
    os.makedirs(os.path.join(directory, ACKS), mode=0o700, exist_ok=True)
    return os.path.join(directory, "live.json")


def acks_dir(live_file: str) -> str:
    return os.path.join(os.path.dirname(live_file), ACKS)


AckKey = tuple[str, int, int]


def write_ack(live_file: str, role: str, pid: int, generation: int, slot: int = 0) -> None:
    """Say that server `slot` of process `pid` (a "worker" or a "nanny") holds `generation`."""
    path = os.path.join(acks_dir(live_file), f"{role}-{pid}-{slot}")
    _write_atomically(path, f"{generation}\n".encode())


@record
class Ack:
    generation: int
    # When the server wrote it: the moment its limit moved (time.time() scale).
    at: float


def read_acks(live_file: str) -> dict[AckKey, Ack]:
    """{(role, pid, slot): Ack} for every acknowledgement on disk."""
    out: dict[AckKey, Ack] = {}
    try:
        names = os.listdir(acks_dir(live_file))
    except OSError:
        return out
    for name in names:
        parts = name.split("-")
        if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()):
            continue
        try:
            with open(os.path.join(acks_dir(live_file), name)) as f:
                generation = int(f.read().strip())
                at = os.fstat(f.fileno()).st_mtime
            out[(parts[0], int(parts[1]), int(parts[2]))] = Ack(generation, at)
        except (OSError, ValueError):
            continue
    return out


def remove_ack(live_file: str, key: AckKey) -> None:
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(acks_dir(live_file), "-".join(map(str, key))))


def remove_channel(live_file: str) -> None:
    """Remove the live file, the acks and the directory; what cannot go stays."""
    directory = os.path.dirname(live_file)
    acks = acks_dir(live_file)
    with contextlib.suppress(OSError):
        for name in os.listdir(acks):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(acks, name))
    for path in (live_file,):
        with contextlib.suppress(OSError):
            os.unlink(path)
    for d in (acks, directory):
        with contextlib.suppress(OSError):
            os.rmdir(d)
