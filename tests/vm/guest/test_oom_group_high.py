"""What Kubernetes and systemd set from outside on cgroup v2 (issue 11, section 2):
memory.oom.group, read at every level and turned off on the child we create, and an
external memory.high, a ceiling as real as memory.max. The real CLI, the real kernel."""

from __future__ import annotations

from pathlib import Path

from guest_cgroups import Cgroup, MiB, Processes, memory_hog, run_safe_worker


def _levels(run_events: list[dict[str, object]]) -> list[dict[str, object]]:
    done = [e for e in run_events if e.get("event") == "measure.done"]
    assert done, run_events
    levels = done[0]["cgroup_levels"]
    assert isinstance(levels, list)
    return levels


def test_kubelet_oom_group_is_read_and_off_on_our_child(
    base: Cgroup, procs: Processes, tmp_path: Path
) -> None:
    # The kubelet (1.28+) sets memory.oom.group=1 on a container's cgroup.
    container = base.child("container")
    container.write("memory.max", 700 * MiB)
    container.write("memory.oom.group", 1)
    run = run_safe_worker(procs, container, ["--reserve", "64MiB"], tmp_path, container=True)
    assert run.returncode == 0, run.explain()

    levels = _levels(run.events)
    assert levels[0]["path"] == "/" and levels[0]["oom_group"] is True
    assert run.outcome["strategy"] == "child" and run.outcome["written"] is True
    leaf = Cgroup(container.path / "dask-safe-worker")
    # A new cgroup starts at 0; we set it anyway and log it, so a kernel OOM inside our
    # limit takes one worker, not the container.
    assert leaf.read("memory.oom.group") == "0"
    (event,) = run.named("cgroup.oom_group")
    assert (event["target"], event["outcome"], event["read_back"]) == (
        "/dask-safe-worker",
        "written",
        "0",
    )
    # The container's own flag is the kubelet's, never ours to change.
    assert container.read("memory.oom.group") == "1"


def test_external_memory_high_is_a_ceiling(base: Cgroup, procs: Processes, tmp_path: Path) -> None:
    # systemd MemoryHigh= / Kubernetes Memory QoS on a parent, well below its memory.max.
    parent = base.child("slice")
    parent.write("memory.max", 900 * MiB)
    parent.write("memory.high", 500 * MiB)
    parent.enable_memory()
    neighbour = parent.child("neighbour")
    memory_hog(procs, neighbour, 100 * MiB)
    own = parent.child("own")
    run = run_safe_worker(procs, own, [], tmp_path)
    assert run.returncode == 0, run.explain()

    levels = _levels(run.events)
    slice_level = levels[1]
    assert slice_level["high"] == 500 * MiB
    working_set = slice_level["working_set"]
    assert isinstance(working_set, int)
    assert slice_level["headroom"] == 500 * MiB - working_set
    done = run.named("measure.done")[0]
    assert done["limiting"] == parent.cgroup_path
    assert done["available"] == 500 * MiB - working_set
    assert run.plan["budget"] <= 500 * MiB - 100 * MiB
