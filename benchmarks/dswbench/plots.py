# ruff: noqa: RUF001
"""Plots of memory against time: the v1 scenario per workload, and the v2 small VM."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import CONTENDERS, M_LIMIT, GiB, fmt_bytes
from .harness import RunResult

COLOURS = {"plain": "tab:brown", "safe": "tab:blue", "seed": "tab:green"}
LABELS = {
    "plain": "(a) plain dask worker",
    "safe": "(b) dask-safe-worker",
    "seed": "(c) seed: W limit = headroom, --memory-limit = headroom",
}


def plot_workload(workload: str, runs: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contenders = [c for c in CONTENDERS if any(r.contender == c for r in runs)]
    fig, axes = plt.subplots(
        len(contenders), 1, figsize=(12.5, 3.1 * len(contenders)), sharex=True, squeeze=False
    )
    top = M_LIMIT / GiB * 1.12
    for ax, contender in zip(axes[:, 0], contenders, strict=True):
        mine = [r for r in runs if r.contender == contender]
        first = mine[0]
        for r in mine:
            s = r.series
            if not s.t:
                continue
            alpha, width = (1.0, 1.6) if r is first else (0.25, 0.8)
            ax.plot(s.t, [v / GiB for v in s.m_usage], color="black", alpha=alpha, lw=width,
                    label="M usage (VM: agent + worker)" if r is first else None)  # fmt: skip
            if r is first:
                ax.plot(s.t, [v / GiB for v in s.m_working_set], color="grey", lw=0.9,
                        label="M working set (usage − inactive file)")  # fmt: skip
            ax.plot(s.t, [v / GiB for v in s.w_usage], color=COLOURS[contender], alpha=alpha,
                    lw=width, label="W usage (worker + nanny)" if r is first else None)  # fmt: skip
            for k in s.oom_kill_times if r is first else []:
                ax.axvline(k, color="red", alpha=0.5, lw=0.8, ls=":")
        ax.axhline(M_LIMIT / GiB, color="red", lw=1.2, label="M limit (3 GiB, kernel)")
        if first.w_kernel_limit:
            ax.axhline(first.w_kernel_limit / GiB, color="orange", lw=1.2, ls="--",
                       label=f"W kernel limit ({fmt_bytes(first.w_kernel_limit)})")  # fmt: skip
        if first.dask_memory_limit:
            dl = first.dask_memory_limit / GiB
            if dl < top:
                ax.axhline(dl, color="purple", lw=1, ls="-.",
                           label=f"Dask memory limit ({fmt_bytes(dl * GiB)})")  # fmt: skip
                ax.axhline(0.95 * dl, color="purple", lw=0.8, ls=":",
                           label="Dask terminate (95%)")  # fmt: skip
                ax.axhline(0.6 * dl, color="grey", lw=0.8, ls=":", label="Dask spill target (60%)")
            else:
                ax.annotate(
                    f"Dask memory limit {fmt_bytes(first.dask_memory_limit)}: off the chart",
                    xy=(0.01, 0.93),
                    xycoords="axes fraction",
                    color="purple",
                    fontsize=9,
                )
        ax.set_title(
            f"{LABELS[contender]} — {first.outcome}, wall {first.wall_s or 0:.1f} s, "
            f"kernel OOM kills W/M: {first.oom_kills_w}/{first.oom_kills_m}, "
            f"nanny memory restarts: {first.memory_restarts}",
            fontsize=9,
        )
        ax.set_ylim(0, top)
        ax.set_ylabel("GiB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel(
        "seconds since the worker was launched (dotted red: kernel OOM kills; faint: repeats)"
    )
    fig.suptitle(f"'VM with agents' on cgroup v1 — workload: {workload}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


VM_LABELS = {
    "plain": "(a) plain dask worker",
    "safe": "(b) dask-safe-worker",
    "seed": "(c) seed: W memory.max = MemAvailable, dask reads it in a private cgroupns",
}


def vm_figure(
    docs: Sequence[dict[str, Any]],
) -> tuple[Any, Any, list[dict[str, Any]]] | None:
    """A panel per small-VM run that has samples: (figure, axes, those runs), or None."""
    runs = [d for d in docs if d.get("series", {}).get("t")]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(12.5, 3.1 * len(runs)), squeeze=False)
    return fig, axes, runs


def plot_vm_usage(ax: Any, run: dict[str, Any], colour: str) -> None:
    """The VM's used memory and W's charge against time."""
    s = run["series"]
    ax.plot(s["t"], [v / GiB for v in s["used"]], color="black",
            label="VM used (MemTotal − MemAvailable)")  # fmt: skip
    ax.plot(s["t"], [v / GiB for v in s["w"]], color=colour,
            label="W memory.current (worker + nanny)")  # fmt: skip


def plot_vm(docs: list[dict[str, Any]], path: Path) -> bool:
    made = vm_figure(docs)
    if made is None:
        return False
    fig, axes, docs = made
    for ax, d in zip(axes[:, 0], docs, strict=True):
        total = d.get("mem_total") or 0
        plot_vm_usage(ax, d, COLOURS.get(d["contender"], "tab:blue"))
        if total:
            ax.axhline(total / GiB, color="red", lw=1.2, label="MemTotal")
        if d.get("w_memory_max") not in (None, "max"):
            ax.axhline(int(d["w_memory_max"]) / GiB, color="orange", ls="--",
                       label="W memory.max")  # fmt: skip
        if d.get("dask_memory_limit"):
            dl = d["dask_memory_limit"] / GiB
            ax.axhline(dl, color="purple", ls="-.", lw=1, label="Dask memory limit")
            ax.axhline(0.95 * dl, color="purple", ls=":", lw=0.8, label="Dask terminate (95%)")
        style_vm_axis(
            ax,
            total,
            f"{VM_LABELS.get(d['contender'], d['contender'])} — {d.get('outcome')}, "
            f"global OOM kills {d.get('global_oom_kills')}, wall {d.get('wall_s') or 0:.0f} s",
        )
    save_vm_figure(
        fig, axes, "'small VM' on cgroup v2 (virtme-ng, software-emulated) — spill", path
    )
    return True


def style_vm_axis(ax: Any, total: int, title: str) -> None:
    """A small-VM panel's scale (up to MemTotal and a bit), title, grid and legend."""
    ax.set_ylim(0, (total / GiB if total else 2) * 1.12)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("GiB")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def save_vm_figure(
    fig: Any,
    axes: Any,
    title: str,
    path: Path,
    xlabel: str = "seconds since the worker was launched (in the VM)",
) -> None:
    import matplotlib.pyplot as plt

    axes[-1, 0].set_xlabel(xlabel)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
