"""The audit's result as rows (JSON) and as a table for a terminal (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from ..sizes import format_bytes
from .deaths import death_lines
from .verdicts import PoolFacts, Verdict, WorkerFacts


def _pool_row(pool: PoolFacts | None) -> dict[str, Any] | None:
    if pool is None:
        return None
    row = asdict(pool)
    row["members"] = [asdict(m) for m in pool.members]
    return row


def result_rows(facts: Sequence[WorkerFacts], verdicts: Sequence[Verdict]) -> list[dict[str, Any]]:
    rows = []
    for f, v in zip(facts, verdicts, strict=True):
        rows.append(
            {
                "worker": f.address,
                "name": f.name,
                "host": f.host,
                "dask_memory_limit": f.dask_limit,
                "kernel_limit": f.kernel_limit,
                "kernel_limit_path": f.kernel_limit_path,
                "available": f.available,
                "rss": f.rss if f.error is None else None,
                "managed": f.managed,
                "verdict": v.verdict,
                "risk": v.risk,
                "reasons": list(v.reasons),
                "action": v.action,
                "constraints": [asdict(c) for c in f.constraints],
                "oom_group": list(f.oom_group),
                "following": f.following,
                "pool": _pool_row(f.pool),
            }
        )
    return rows


def _cell(value: int | None, none: str = "-") -> str:
    return none if value is None else format_bytes(value)


def printable(text: str) -> str:
    """`text` with every character a terminal would act on, or could not print, escaped
    as in a Python literal (\\x1b, \\n, a lone surrogate from a path's odd byte): names,
    paths and pool keys come from the workers."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _holds(committed: Any, fixed: Any) -> str:
    if isinstance(fixed, int):
        return f"fixed {format_bytes(fixed)}"
    return "holds -" if committed is None else f"holds {format_bytes(committed)}"


def _pool_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per instance that shares its pool (or whose pool could not be read):
    its workers, what it holds, and the other instances with what they hold."""
    instances: dict[tuple[str, str, Any], list[Mapping[str, Any]]] = {}
    for r in rows:
        pool = r.get("pool")
        if pool and (pool["members"] or pool["error"]):
            instances.setdefault((str(r["host"]), pool["key"], pool["instance"]), []).append(r)
    lines: list[str] = []
    for (_host, key, pid), members in instances.items():
        pool = members[0]["pool"]
        names = ", ".join(str(r["name"] or r["worker"]) for r in members)
        how = "following" if members[0].get("following") else "not following"
        share = "" if pool["share"] is None else f", share at start {format_bytes(pool['share'])}"
        if pid is None:
            own = f"{names} ({how}{share})"
        else:
            own = (
                f"{names} (pid {pid}, weight {pool['weight']}, {how}): "
                f"{_holds(pool['committed'], pool['fixed'])}{share}"
            )
        others = "; ".join(
            f"pid {m['pid']} (weight {m['weight']}): {_holds(m['committed'], m['fixed'])}"
            for m in pool["members"]
        )
        line = f"pool {key}: {own}" + (f"; beside it: {others}" if others else "")
        if pool["error"]:
            line += f" ({pool['error']})"
        lines.append(line)
    return lines


def render_table(rows: Sequence[Mapping[str, Any]], gone: Sequence[Mapping[str, Any]] = ()) -> str:
    header = ("WORKER", "HOST", "DASK LIMIT", "KERNEL LIMIT", "AVAILABLE NOW", "VERDICT")
    lines: list[tuple[str, ...]] = [header]
    for r in rows:
        verdict = r["verdict"] if r["risk"] is None else f"{r['verdict']} ({r['risk']})"
        lines.append(
            (
                printable(str(r["name"] or r["worker"])),
                printable(str(r["host"])),
                _cell(r["dask_memory_limit"], "none"),
                _cell(r["kernel_limit"], "none"),
                _cell(r["available"]),
                verdict,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]
    for r in rows:
        if r["reasons"]:
            out.append("")
            out.append(f"{r['name'] or r['worker']} ({r['worker']}): {r['verdict']}")
            out.extend(f"  - {reason}" for reason in r["reasons"])
            if r.get("action"):
                out.append(f"  what to do: {r['action']}")
    for r in rows:
        for path in r.get("oom_group") or []:
            out.append(
                f"{r['name'] or r['worker']}: memory.oom.group=1 at {path}: one kernel OOM "
                "kill there takes every process below it, not one worker"
            )
    pools = _pool_lines(rows)
    if pools:
        out.append("")
        out.extend(pools)
    out.extend(death_lines(rows, gone))
    return "\n".join(printable(line) for line in out)
