"""The function `dask-safe-audit` runs on every worker (via `Client.run`).

It runs inside the worker process, so it must stay cheap: at module level only the
standard library; inside, only our measurement module (dask and distributed are already
loaded in a worker). The client pickles this module by value, so a worker without
dask-safe-worker installed still answers, with the reason it could not measure.

It returns plain data only (dicts, lists, numbers, strings): interpretation happens on
the client, in `cluster_audit.verdicts.judge`.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

PLAN_FILE_ENV = "DASK_SAFE_WORKER_PLAN_FILE"
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


def _terminate_fraction() -> float | None:
    """distributed.worker.memory.terminate; None when Dask never restarts the worker."""
    try:
        import dask.config

        value = dask.config.get(
            "distributed.worker.memory.terminate", default=DASK_TERMINATE_DEFAULT
        )
    except Exception:
        return DASK_TERMINATE_DEFAULT
    if value is False or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return DASK_TERMINATE_DEFAULT


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
    path = os.environ.get(PLAN_FILE_ENV)
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
    }
    _apply_live_limit(summary)
    return path, summary, None


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
    report["terminate_fraction"] = _terminate_fraction()
    report["has_nanny"] = bool(getattr(dask_worker, "nanny", None))
    report["plan_file"], report["plan"], report["plan_error"] = _read_plan()
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
