"""Where our cgroup is found on a real cgroup v2 kernel (issue 24 row 2).

Some sandboxes mount a child cgroup before the hierarchy's root. The controllers must be
read at the mount that holds our cgroup: read at the first cgroup2 mount (a child without
the memory controller), v2 was dropped and no memory cgroup found, so the worker got the
host's memory and no kernel limit.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from guest_cgroups import CGROUP2, Cgroup, MiB, Processes, page_floor, run_safe_worker


def test_a_child_cgroup_mounted_before_the_root_does_not_hide_our_controllers(
    base: Cgroup, procs: Processes, tmp_path: Path
) -> None:
    limited = base.child("limited")
    limited.write("memory.max", 640 * MiB)
    # A cgroup whose parent does not hand the memory controller down.
    plain = base.child("plain")
    bare = plain.child("bare")
    assert "memory" not in bare.read("cgroup.controllers").split()
    early = tmp_path / "early"
    early.mkdir()
    # In a mount namespace of its own, a hybrid-style layout: a tmpfs at /sys/fs/cgroup
    # with the bare child mounted first (at `sandbox`), then the hierarchy's root (at
    # `unified`), so that both sort first as cgroup mounts and mountinfo lists the
    # bare child's before the one that holds us.
    top = shlex.quote(str(CGROUP2))
    # The same hierarchy options as the mount we cover: a cgroup2 mount from the initial
    # cgroup namespace applies its options to the whole hierarchy, and one without
    # nsdelegate would turn it off for every later test (container roots then accept
    # writes that must be refused).
    options = _root_options()
    script = " && ".join(
        [
            f"mount --bind {shlex.quote(str(bare.path))} {shlex.quote(str(early))}",
            f"umount -l {top}",
            f"mount -t tmpfs tmpfs {top}",
            f"mkdir {top}/sandbox {top}/unified",
            f"mount --move {shlex.quote(str(early))} {top}/sandbox",
            f"mount -t cgroup2 {options} cgroup2 {top}/unified",
            'exec "$@"',
        ]
    )
    prefix = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"]
    run = run_safe_worker(procs, limited, [], tmp_path, prefix=prefix)
    assert run.returncode == 0, run.explain()
    assert run.plan["budget"] <= 640 * MiB, run.plan
    outcome = run.outcome
    assert (outcome["strategy"], outcome["enforced"]) == ("own", True), outcome
    assert outcome["target"] == limited.cgroup_path
    assert int(limited.limit()) == page_floor(run.plan["budget"])


def _root_options() -> str:
    """`-o ...` with the hierarchy-wide options of the cgroup2 mount at CGROUP2."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(CGROUP2):
            super_options = line.split(" - ", 1)[1].split()[2].split(",")
            wanted = [o for o in super_options if o not in ("rw", "ro")]
            return f"-o {','.join(wanted)}" if wanted else ""
    return ""
