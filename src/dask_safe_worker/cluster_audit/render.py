"""The audit's result as rows (JSON) and as a table for a terminal (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from ..sizes import format_bytes
from .verdicts import Verdict, WorkerFacts


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
            }
        )
    return rows


def _cell(value: int | None, none: str = "-") -> str:
    return none if value is None else format_bytes(value)


def render_table(rows: Sequence[Mapping[str, Any]]) -> str:
    header = ("WORKER", "HOST", "DASK LIMIT", "KERNEL LIMIT", "AVAILABLE NOW", "VERDICT")
    lines: list[tuple[str, ...]] = [header]
    for r in rows:
        verdict = r["verdict"] if r["risk"] is None else f"{r['verdict']} ({r['risk']})"
        lines.append(
            (
                str(r["name"] or r["worker"]),
                str(r["host"]),
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
    return "\n".join(out)
