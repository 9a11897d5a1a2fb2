# ruff: noqa: RUF001
"""Scenario "notebook pod" (issue 23): plain `distributed.LocalCluster` against
`dask_safe_worker.LocalCluster` in a 2 GiB cgroup, where the notebook kernel grows.

    uv run python benchmarks/notebook_pod.py --repeat 3 --json /tmp/notebook-pod.json
    uv run python benchmarks/notebook_pod.py --render   # from benchmarks/data/notebook-pod.json

A test cgroup M (2 GiB, below the benchmark's own memory cgroup) plays the pod. Its only
process at start plays the notebook kernel: it starts `LocalCluster(n_workers=2,
threads_per_worker=1)` (plain or ours, defaults otherwise), then runs the spill workload
(random arrays of 1.5 x M's limit less the grown kernel, persisted and summed) and,
GROW_AFTER seconds into it, grows itself to KERNEL_BYTES (every page touched): a result
pulled to the client. The driver samples M every 100 ms (usage, the workers' child,
the kernel's RSS, its processes) and counts the kernel's OOM kills in M and below; a
pid that vanished when a counter moved was a victim. Contenders interleave, run by run.
Only processes the benchmark started are ended.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dswbench.common import CHUNK_BYTES, REPO, MiB, fmt_bytes
from dswbench.report import NOTES_DIR, refresh_appendix
from dswbench.support import KernelCgroup, kernel_cgroups_usable, make_test_cgroup

POD_LIMIT = 2048 * MiB
KERNEL_BYTES = 700 * MiB
GROW_AFTER = 3.0
SHARE = 1.5
TIMEOUT = 240.0
CONTENDERS = ("plain", "safe")
DATA = REPO / "benchmarks" / "data" / "notebook-pod.json"
NOTE = NOTES_DIR / "notebook_pod.md"
IMG = REPO / "docs" / "img" / "notebook-pod.png"
REPORT = REPO / "docs" / "benchmarks.md"


# -- the kernel (a subprocess inside M) ---------------------------------------------------


def rss_anon(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def kernel_main(contender: str) -> None:
    import distributed
    from distributed import Client

    sys.path.insert(0, str(Path(__file__).parent))
    from dswbench.workloads import persist_and_sum, pickle_by_value, spill_bytes

    import dask_safe_worker

    pickle_by_value()
    cls: Any = distributed.LocalCluster if contender == "plain" else dask_safe_worker.LocalCluster
    kwargs: dict[str, Any] = {"n_workers": 2, "threads_per_worker": 1, "dashboard_address": None}
    if contender == "safe":
        kwargs["log_format"] = "json"
    out: dict[str, Any] = {"contender": contender, "kernel_pid": os.getpid()}
    held: list[bytearray] = []

    def grow() -> None:
        time.sleep(GROW_AFTER)
        out["grow_started"] = time.time()
        need = max(0, KERNEL_BYTES - rss_anon())
        block = bytearray(need)
        block[::4096] = b"\x01" * len(range(0, need, 4096))
        held.append(block)
        out["grown_at"] = time.time()
        out["kernel_rss_after_growth"] = rss_anon()

    with cls(**kwargs) as cluster, Client(cluster) as client:

        def limit(dask_worker: Any) -> int:
            return int(dask_worker.memory_manager.memory_limit)

        out["limits_at_start"] = sorted(client.run(limit).values())
        out["worker_pids_at_start"] = sorted(client.run(os.getpid).values())
        print(json.dumps({"ready": True, **out}), flush=True)
        nbytes = spill_bytes(POD_LIMIT - KERNEL_BYTES, SHARE, CHUNK_BYTES)
        out["workload_bytes"] = nbytes
        grower = threading.Thread(target=grow, daemon=True)
        start = time.time()
        out["workload_started"] = start
        grower.start()
        try:
            persist_and_sum(client, nbytes, CHUNK_BYTES, TIMEOUT)
            out["outcome"] = "completed"
        except Exception as exc:
            out["outcome"] = type(exc).__name__
            out["error"] = str(exc)[:300]
        out["wall_s"] = round(time.time() - start, 2)
        grower.join()
        try:
            out["limits_at_end"] = sorted(client.run(limit).values())
            out["worker_pids_at_end"] = sorted(client.run(os.getpid).values())
        except Exception as exc:
            out["limits_at_end_error"] = type(exc).__name__
    print(json.dumps(out), flush=True)


# -- the driver ---------------------------------------------------------------------------


def tree(cg: KernelCgroup) -> list[Path]:
    """M and its children (the workers' child comes and goes while we look)."""
    try:
        names = sorted(os.listdir(cg.path))
    except OSError:
        names = []
    return [cg.path, *(cg.path / n for n in names if (cg.path / n).is_dir())]


def oom_kills(cg: KernelCgroup) -> int:
    total = 0
    for d in tree(cg):
        with contextlib.suppress(OSError, ValueError):
            total += KernelCgroup(d).oom_kills()
    return total


def all_pids(cg: KernelCgroup) -> set[int]:
    pids: set[int] = set()
    for d in tree(cg):
        with contextlib.suppress(OSError, ValueError):
            pids.update(KernelCgroup(d).pids())
    return pids


def run_once(contender: str) -> dict[str, Any]:
    started: set[int] = set()
    with make_test_cgroup(started, prefix="dsw-bench-nbpod") as cg:
        cg.set_limit(POD_LIMIT)
        argv = [sys.executable, str(Path(__file__).resolve()), "--kernel", contender]
        proc = subprocess.Popen(
            cg.enter_command(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/tmp",
        )
        started.add(proc.pid)
        t0 = time.time()
        samples: list[dict[str, Any]] = []
        kills: list[dict[str, Any]] = []
        seen: set[int] = set()
        last_kills = 0
        last_pids: set[int] = set()
        stderr_lines: list[str] = []
        reader = threading.Thread(
            target=lambda: stderr_lines.extend(proc.stderr or []), daemon=True
        )
        reader.start()
        while proc.poll() is None and time.time() - t0 < TIMEOUT + 120:
            now = time.time() - t0
            pids = all_pids(cg)
            seen |= pids
            started |= pids
            count = oom_kills(cg)
            if count > last_kills:
                kills.append({"t": round(now, 2), "count": count - last_kills, "gone": []})
                last_kills = count
            gone = last_pids - pids
            if gone and kills and now - kills[-1]["t"] < 2.0:
                kills[-1]["gone"] += sorted(gone)
            last_pids = pids
            child = [d for d in tree(cg)[1:] if d.name.startswith("dask-safe-worker")]
            child_ws: int | None = None
            with contextlib.suppress(OSError, ValueError, IndexError):
                child_ws = KernelCgroup(child[0]).working_set()
            samples.append(
                {
                    "t": round(now, 2),
                    "pod": cg.working_set(),
                    "child": child_ws,
                    "kernel": safe_rss(proc.pid),
                }
            )
            time.sleep(0.1)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        out_text = proc.stdout.read() if proc.stdout else ""
        proc.wait()
        reader.join(timeout=5)
        started |= all_pids(cg)
        lines = [json.loads(x) for x in out_text.splitlines() if x.startswith("{")]
        ready: dict[str, Any] = next((x for x in lines if x.get("ready")), {})
        report: dict[str, Any] = next((x for x in lines if not x.get("ready")), {})
        kernel_pid = ready.get("kernel_pid", proc.pid)
    events = [json.loads(x) for x in stderr_lines if x.startswith('{"')]
    follow = [
        {"t": round(_ts(e) - t0, 2), "action": e["action"], "reason": e["reason"]}
        for e in events
        if e.get("event") == "follow.changed"
    ]
    return {
        "contender": contender,
        "returncode": proc.returncode,
        "kernel_alive": proc.returncode == 0,
        "kernel_killed": proc.returncode in (-9, 137),
        "kernel_pid": kernel_pid,
        "ready": ready,
        "report": report,
        "oom_kills": sum(k["count"] for k in kills),
        "kills": kills,
        "follow_changed": follow,
        "samples": samples[::5],
        "peak_pod": max((s["pod"] for s in samples), default=0),
        "t0": t0,
    }


def _ts(event: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def safe_rss(pid: int) -> int | None:
    # The kernel is the shell's exec'd child: the same pid.
    try:
        return rss_anon(pid)
    except OSError:
        return None


# -- the report ---------------------------------------------------------------------------


def workload_bytes() -> int:
    from dswbench.workloads import spill_bytes

    return spill_bytes(POD_LIMIT - KERNEL_BYTES, SHARE, CHUNK_BYTES)


def victims(r: dict[str, Any]) -> str:
    """Who the kernel's OOM killer took: the kernel (its exit by SIGKILL), and the other
    processes of the pod that vanished within 2 s of a kill."""
    gone = {p for k in r["kills"] for p in k["gone"]} - {r["kernel_pid"]}
    who = ["kernel"] if r["kernel_killed"] else []
    if gone:
        who.append(f"{len(gone)} worker process(es)")
    return ", ".join(who) or "–"


def note_lines(doc: dict[str, Any]) -> list[str]:
    runs = doc["runs"]
    lines = [
        "## Notebook pod: LocalCluster beside a growing kernel (issue 23)",
        "",
        f"`benchmarks/notebook_pod.py --repeat {doc['repeat']}` (cgroup v1, this host; "
        f"{doc['when']}). A 2 GiB test cgroup plays the pod; a process in it plays the "
        "notebook kernel: it starts `LocalCluster(n_workers=2, threads_per_worker=1)`, runs "
        "the spill workload "
        f"({fmt_bytes(workload_bytes())} of random arrays, "
        "persisted and summed) and, "
        f"{GROW_AFTER:g} s into it, grows to {KERNEL_BYTES // MiB} MiB (a result pulled to "
        "the client). Plain is `distributed.LocalCluster`, safe is "
        "`dask_safe_worker.LocalCluster` with its defaults; runs interleaved.",
        "",
        "| contender | run | outcome | kernel OOM kills | kernel alive | who the kernel killed "
        "| Dask limit per worker at start → end | wall | peak pod working set |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs):
        rep, ready = r["report"], r["ready"]
        run = sum(1 for x in runs[:i] if x["contender"] == r["contender"])
        start = ready.get("limits_at_start") or []
        end = rep.get("limits_at_end") or []
        limits = f"{fmt_bytes(start[0]) if start else '–'} → {fmt_bytes(end[0]) if end else '–'}"
        outcome = rep.get("outcome") or ("kernel killed" if r["kernel_killed"] else "–")
        wall = f"{rep['wall_s']:.1f} s" if "wall_s" in rep else "–"
        lines.append(
            f"| {r['contender']} | {run} | {outcome} | {r['oom_kills']} | "
            f"{'yes' if r['kernel_alive'] else 'no'} | {victims(r)} | "
            f"{limits} | {wall} | {fmt_bytes(r['peak_pod'])} |"
        )
    lines += ["", "![the pod's working set against time](img/notebook-pod.png)", ""]
    for contender in CONTENDERS:
        mine = [r for r in runs if r["contender"] == contender]
        done = sum(1 for r in mine if r["report"].get("outcome") == "completed")
        alive = sum(1 for r in mine if r["kernel_alive"])
        kills = [r["oom_kills"] for r in mine]
        lines.append(
            f"- **{contender}**: completed {done}/{len(mine)}, kernel alive {alive}/"
            f"{len(mine)}, kernel OOM kills {kills} (median "
            f"{statistics.median(kills) if kills else 0:g})."
        )
    safe = [r for r in runs if r["contender"] == "safe"]
    reasons = sorted({f["reason"] for r in safe for f in r["follow_changed"]})
    if reasons:
        lines.append(
            "- safe's `follow.changed` reasons during the runs: "
            + ", ".join(f"`{x}`" for x in reasons)
            + "."
        )
    return [*lines, ""]


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for ax, contender in zip(axes, CONTENDERS, strict=True):
        for r in (x for x in doc["runs"] if x["contender"] == contender):
            t = [s["t"] for s in r["samples"]]
            ax.plot(t, [s["pod"] / MiB for s in r["samples"]], color="tab:blue", lw=1)
            kern = [(s["t"], s["kernel"] / MiB) for s in r["samples"] if s["kernel"]]
            if kern:
                ax.plot(*zip(*kern, strict=True), color="tab:orange", lw=1)
            for k in r["kills"]:
                ax.axvline(k["t"], color="tab:red", lw=0.8, ls=":")
        ax.axhline(POD_LIMIT / MiB, color="black", lw=0.8, ls="--")
        ax.set_title(f"{contender}: pod working set (blue), kernel RSS (orange), kills (red)")
        ax.set_xlabel("s since the kernel started")
        ax.title.set_fontsize(8)
    axes[0].set_ylabel("MiB")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(doc: dict[str, Any]) -> None:
    NOTE.write_text("\n".join(note_lines(doc)))
    plot(doc, IMG)
    refresh_appendix(REPORT)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernel", choices=CONTENDERS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    if args.kernel:
        kernel_main(args.kernel)
        return 0
    if args.render:
        render(json.loads(DATA.read_text()))
        return 0
    problem = kernel_cgroups_usable()
    if problem:
        print(f"notebook_pod: {problem}", file=sys.stderr)
        return 2
    runs = []
    for i in range(args.repeat):
        for contender in CONTENDERS:
            print(f"run {i} {contender}", file=sys.stderr, flush=True)
            r = run_once(contender)
            print(
                json.dumps({k: r[k] for k in ("contender", "returncode", "oom_kills")}
                           | {"outcome": r["report"].get("outcome")}),
                file=sys.stderr,
                flush=True,
            )  # fmt: skip
            runs.append(r)
    doc = {
        "repeat": args.repeat,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": runs,
    }
    text = json.dumps(doc, indent=1)
    if args.json:
        args.json.write_text(text)
    DATA.write_text(text)
    render(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
