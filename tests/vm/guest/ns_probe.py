"""Run as PID 1's tree of a container would be: inside a cgroup namespace rooted at a
cgroup with memory.max, with cgroup2 remounted at /sys/fs/cgroup. Tries the operations a
delegation-aware writer needs and prints what the kernel answered, as JSON.

Standard library only; started by test_kernel_facts.py through `enter_container`.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def attempt(path: Path, text: str) -> str:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def main() -> None:
    facts: dict[str, object] = {"cgroup": Path("/proc/self/cgroup").read_text().strip()}
    facts["root_memory_max"] = (ROOT / "memory.max").read_text().strip()
    facts["write_root_memory_max"] = attempt(ROOT / "memory.max", str(64 * 2**20))
    # Another process in the namespace root, as a container's shell or sidecar would be.
    sibling = subprocess.Popen(["sleep", "3600"])
    try:
        leaf = ROOT / "leaf"
        try:
            leaf.mkdir()
            facts["mkdir_child"] = "ok"
        except OSError as exc:
            facts["mkdir_child"] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        facts["move_self_to_child"] = attempt(leaf / "cgroup.procs", str(os.getpid()))
        facts["cgroup_after_move"] = Path("/proc/self/cgroup").read_text().strip()
        facts["subtree_control_with_sibling_in_root"] = attempt(
            ROOT / "cgroup.subtree_control", "+memory"
        )
        facts["move_sibling_to_child"] = attempt(leaf / "cgroup.procs", str(sibling.pid))
        facts["subtree_control_with_root_empty"] = attempt(
            ROOT / "cgroup.subtree_control", "+memory"
        )
        facts["write_child_memory_max"] = attempt(leaf / "memory.max", str(64 * 2**20))
        facts["child_memory_max"] = (
            (leaf / "memory.max").read_text().strip() if (leaf / "memory.max").exists() else None
        )
    finally:
        sibling.kill()
        sibling.wait()
    json.dump(facts, sys.stdout)


if __name__ == "__main__":
    main()
