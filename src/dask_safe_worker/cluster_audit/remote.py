"""The function `dask-safe-audit` runs on every worker (via `Client.run`).

It runs inside the worker process, so it must stay cheap: at module level only the
standard library; inside, only our measurement module and the pool's claim parser (dask
and distributed are already loaded in a worker). The client pickles this module by
value, so a worker without dask-safe-worker installed still answers, with the reason it
could not measure.

It returns plain data only (dicts, lists, numbers, strings): interpretation happens on
the client, in `cluster_audit.verdicts.judge`.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

# The plan file's path, as dask-safe-worker exports it to the worker (options.
# PLAN_EXPORT_ENV). Releases before it exported the --plan-file option's own variable,
# which their workers still carry.
PLAN_FILE_ENV = "DASK_SAFE_WORKER_PLAN"
LEGACY_PLAN_FILE_ENV = "DASK_SAFE_WORKER_PLAN_FILE"
# distributed.worker.memory.terminate's default: the nanny restarts a worker at this
# fraction of its memory limit.
DASK_TERMINATE_DEFAULT = 0.95
# Set by --follow (live_limit.LIVE_FILE_ENV): the per-worker limit in force now.
LIVE_FILE_ENV = "DASK_SAFE_WORKER_LIVE_FILE"
REMOTE_SCHEMA = 1


def _dask_memory_limit(dask_worker: Any) -> tuple[int | None, str]:
    """The limit Dask's memory manager enforces; older releases kept it on the worker."""
    manager = getattr(dask_worker, "memory_manager", None)
    if manager is not None and hasattr(manager, "memory_limit"):
        return manager.memory_limit or None, "memory_manager.memory_limit"
    if hasattr(dask_worker, "memory_limit"):
        return dask_worker.memory_limit or None, "worker.memory_limit"
    return None, "unavailable"


def _terminate_setting() -> Any:
    """distributed.worker.memory.terminate as the worker's config holds it, for the
    client to judge (`facts.terminate_fraction`): a number, False or None as they are,
    a string (an environment variable dask could not parse, ".nan") cut to 100
    characters, anything else as its repr. Converting here hid what the nanny compares
    against: ".nan" became 0.95."""
    try:
        import dask.config

        value = dask.config.get(
            "distributed.worker.memory.terminate", default=DASK_TERMINATE_DEFAULT
        )
    except Exception:
        return DASK_TERMINATE_DEFAULT
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return (value if isinstance(value, str) else repr(value))[:100]


def _boot_id() -> str:
    # Shared by every container on one kernel: with the cgroup's inode it names one
    # cgroup across all workers, whatever path each container sees.
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "host:" + socket.gethostname()


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _read_plan() -> tuple[str | None, dict[str, Any] | None, str | None]:
    path = os.environ.get(PLAN_FILE_ENV) or os.environ.get(LEGACY_PLAN_FILE_ENV)
    if not path:
        return None, None, None
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        return path, None, f"cannot read the plan file: {exc}"
    if not isinstance(doc, dict):
        return path, None, "the plan file does not hold a JSON object"
    plan, write = _dict(doc.get("plan")), _dict(doc.get("cgroup_write"))
    outcome = _dict(write.get("outcome"))
    # Only what the verdict needs: argv may name files the operator would rather not
    # spread around, and the measurement at start is superseded by ours.
    summary = {
        "schema": doc.get("schema"),
        "version": doc.get("version"),
        "budget": plan.get("budget"),
        "per_worker": plan.get("per_worker"),
        "effective_per_worker": plan.get("effective_per_worker"),
        "n_workers": plan.get("n_workers"),
        "nannies": plan.get("nannies"),
        "overhead": plan.get("overhead"),
        "limiting": plan.get("limiting"),
        "cgroup_write_mode": write.get("mode"),
        "enforced": outcome.get("enforced"),
        "written": outcome.get("written"),
        "target": outcome.get("target"),
        "read_back": outcome.get("read_back"),
        "write_reason": outcome.get("reason"),
        # The pool shared with other instances on the host (absent from plan files of
        # releases before pools): its key and our fair share or fixed commitment at start.
        "pool_key": plan.get("pool_key"),
        "pool_budget": plan.get("pool_budget"),
        "share": plan.get("share"),
        "fixed": plan.get("fixed"),
        "commitment": plan.get("commitment"),
        "share_per_worker": plan.get("share_per_worker"),
        # Whether a supervisor moves the limits live; None: the plan file does not say.
        "following": doc.get("following"),
        "pool": _pool_location(doc.get("pool")),
    }
    _apply_live_limit(summary)
    return path, summary, None


def _pool_location(value: Any) -> dict[str, str] | None:
    pool = _dict(value)
    key, directory = pool.get("key"), pool.get("directory")
    if isinstance(key, str) and isinstance(directory, str) and directory.startswith("/"):
        return {"key": key, "directory": directory}
    return None


def _apply_live_limit(summary: dict[str, Any]) -> None:
    """Under --follow the plan moves: the live record, not the start's, is planned now."""
    live = os.environ.get(LIVE_FILE_ENV)
    if not live:
        return
    try:
        with open(live) as f:
            record = _dict(json.load(f))
    except (OSError, ValueError):
        return
    per_worker, generation = record.get("per_worker"), record.get("generation")
    if isinstance(per_worker, int) and isinstance(generation, int) and per_worker > 0:
        summary["start_per_worker"] = summary.get("effective_per_worker")
        summary["effective_per_worker"] = per_worker
        summary["budget"] = record.get("budget", summary.get("budget"))
        summary["follow_generation"] = generation


# Bounds on what one worker sends back about its pool: a pool holds a few instances.
_MAX_CLAIMS = 256
_MAX_CLAIM_BYTES = 4096
_MAX_ANCESTORS = 64


def _held_flocks(proc_root: str) -> set[tuple[int, int, int]] | None:
    """(major, minor, inode) of every file with a granted flock, from /proc/locks; None
    when it cannot be read.

    Whether a claim's lock is held is read here rather than tried with flock: a lock
    taken, even for a moment, could make an instance that is claiming that very file
    fail to, and `Pool.members()` removes the claims it finds dead. The audit changes
    nothing in the pool."""
    try:
        with open(os.path.join(proc_root, "locks"), encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    held: set[tuple[int, int, int]] = set()
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK ADVISORY WRITE <pid> <maj>:<min>:<inode> 0 EOF"; "1: -> ..." waits.
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        parts = fields[5].split(":")
        if len(parts) != 3:
            continue
        try:
            held.add((int(parts[0], 16), int(parts[1], 16), int(parts[2])))
        except ValueError:
            continue
    return held


def _ancestors(proc_root: str, pid: int) -> list[int]:
    """This process and its parents, nearest first: one of them is the instance whose
    claim this worker's memory counts in (the worker itself, its nanny's supervisor...)."""
    chain: list[int] = []
    while pid > 0 and len(chain) < _MAX_ANCESTORS and pid not in chain:
        chain.append(pid)
        try:
            with open(os.path.join(proc_root, str(pid), "status"), errors="replace") as f:
                ppid = next((int(line.split()[1]) for line in f if line.startswith("PPid:")), 0)
        except (OSError, ValueError, IndexError):
            break
        pid = ppid
    return chain


def _lock_held(path: str, held: set[tuple[int, int, int]] | None, proc_root: str) -> bool:
    """Whether a live process holds the claim's lock; a lock file that cannot be
    examined counts as held, as for `Pool.members`."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    if held is not None:
        return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in held
    pid = os.path.basename(path).partition(".")[0]
    return os.path.exists(os.path.join(proc_root, pid))


def _child_cgroup(path: str | None) -> tuple[str | None, bool]:
    """A claim's child cgroup as "<dev>:<inode>" (what the worker's own cgroup level is
    keyed by), and whether it still holds a process: a worker whose supervisor was
    killed still uses what its claim promised."""
    if path is None:
        return None, False
    try:
        st = os.stat(path)
        with open(os.path.join(path, "cgroup.procs")) as f:
            return f"{st.st_dev}:{st.st_ino}", bool(f.read().split())
    except OSError:
        return None, False


def read_pool(directory: str, proc_root: str = "/proc") -> dict[str, Any]:
    """The live claims in a pool directory, read only: nothing is locked or removed.

    A claim is live, as for `Pool.members`, while its `<pid>.lock` is held (an flock in
    /proc/locks; without /proc/locks, while the pid exists) or while its child cgroup
    holds a process. Claims are parsed here, by the installed release's own parser (the
    one its instance wrote them with), and travel as plain numbers with their child
    cgroup's "<dev>:<inode>"; a claim that cannot be read or parsed (being written) is
    left out, as `Pool.members` does. `ancestors` and the cgroup tell the client which
    claim is this worker's instance.
    """
    result: dict[str, Any] = {
        "claims": [],
        "ancestors": _ancestors(proc_root, os.getpid()),
        "liveness": "locks",
        "error": None,
    }
    try:
        from dask_safe_worker.cgroup.pool import ClaimError, parse_claim
    except ImportError as exc:
        result["error"] = f"cannot read the pool's claims: {exc}"
        return result
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        result["error"] = f"cannot list the pool's claims: {exc.strerror or exc}"
        return result
    held = _held_flocks(proc_root)
    if held is None:
        result["liveness"] = "pid"
    for name in names:
        stem, _dot, ext = name.partition(".")
        if ext != "lock" or not stem.isdigit() or len(result["claims"]) >= _MAX_CLAIMS:
            continue
        try:
            path = os.path.join(directory, f"{stem}.claim")
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                data = os.read(fd, _MAX_CLAIM_BYTES + 1)
            finally:
                os.close(fd)
            if len(data) > _MAX_CLAIM_BYTES:
                continue
            member = parse_claim(data.decode("utf-8", "surrogateescape"))
        except (OSError, ClaimError):
            continue
        if member.pid != int(stem):
            continue
        cgroup, occupied = _child_cgroup(member.cgroup)
        if _lock_held(os.path.join(directory, name), held, proc_root) or occupied:
            # Not the cgroup's path: a host path, and the claim's key is enough.
            result["claims"].append(
                {
                    "pid": member.pid,
                    "weight": member.weight,
                    "fixed": member.fixed,
                    "committed": member.committed,
                    "working_set": member.working_set,
                    "cgroup": cgroup,
                }
            )
    return result


def collect(dask_worker: Any = None) -> dict[str, Any]:
    """Everything the client needs to judge this worker. Never raises."""
    report: dict[str, Any] = {
        "schema": REMOTE_SCHEMA,
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "boot_id": _boot_id(),
        "error": None,
    }
    limit, source = _dask_memory_limit(dask_worker)
    report["dask_memory_limit"] = limit
    report["memory_limit_source"] = source
    report["terminate_fraction"] = _terminate_setting()
    report["has_nanny"] = bool(getattr(dask_worker, "nanny", None))
    report["plan_file"], report["plan"], report["plan_error"] = _read_plan()
    pool = (report["plan"] or {}).get("pool")
    if pool is not None:
        try:
            report["pool"] = read_pool(pool["directory"])
        except Exception as exc:  # never raises: the rest of the report still counts
            report["pool"] = {"error": f"cannot read the pool: {type(exc).__name__}: {exc}"}
    try:
        from pathlib import Path

        from dask_safe_worker import __version__
        from dask_safe_worker.dask_compat.release import installed_release
        from dask_safe_worker.measure import measure
    except ImportError as exc:
        report["error"] = f"dask-safe-worker is not installed on this worker ({exc})"
        return report
    report["dsw_version"] = __version__
    try:
        m = measure(release=installed_release())
    except Exception as exc:
        report["error"] = f"cannot measure memory: {type(exc).__name__}: {exc}"
        return report
    levels: list[dict[str, Any]] = []
    directories = m.location.level_paths(Path("/")) if m.location is not None else []
    for i, lvl in enumerate(m.levels):
        key = None
        if i < len(directories):
            try:
                st = os.stat(directories[i][1])
                key = f"{report['boot_id']}:{st.st_dev}:{st.st_ino}"
            except OSError:
                key = None
        levels.append(
            {
                "path": lvl.path,
                "key": key,
                "limit": lvl.effective_limit,
                # The level's own limit file: on v1 an unlimited child reports its parent's
                # limit as `hierarchical_memory_limit`, but the parent is what sets it.
                "own_limit": lvl.limit,
                "hierarchical_limit": lvl.hierarchical_limit,
                "working_set": lvl.working_set,
                "headroom": lvl.headroom,
                # cgroup v2 only (None elsewhere): an external memory.high, and whether one
                # kernel OOM kill takes every process below this level.
                "high": lvl.high,
                "oom_group": lvl.oom_group,
                "error": lvl.error,
            }
        )
    report.update(
        {
            "rss": m.own_rss,
            "mem_total": m.host.total,
            "mem_available": m.host.available,
            "available": m.available,
            "limiting": m.limiting,
            "cgroup_version": m.location.version if m.location is not None else None,
            "cgroup_path": m.location.cgroup_path if m.location is not None else None,
            "levels": levels,
            "warnings": list(m.warnings),
        }
    )
    return report
