"""What the cgroup v2 kernel answers: the facts the delegation-aware write policy is built
on (docs/cgroup-v2.md). If a kernel changes one of these, the policy must be revisited."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from guest_cgroups import (
    CGROUP2,
    PYTHON,
    RUN_TIMEOUT,
    Cgroup,
    MiB,
    Processes,
    enter_container,
    try_write,
)

NS_PROBE = Path(__file__).with_name("ns_probe.py")


def _memtotal() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def _vm_memory() -> int:
    text = os.environ["DSW_VM_MEMORY"].upper()
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    if text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def test_cgroup2_at_sys_fs_cgroup_with_memory_controller() -> None:
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    assert any(m[1] == str(CGROUP2) and m[2] == "cgroup2" for m in mounts), mounts
    assert "memory" in (CGROUP2 / "cgroup.controllers").read_text().split()
    assert Path("/proc/self/cgroup").read_text().strip() == "0::/"


def test_memtotal_is_the_vms_ram() -> None:
    # The kernel keeps some RAM for itself, so MemTotal is a little below what QEMU gave.
    assert 0.8 * _vm_memory() < _memtotal() <= _vm_memory()


def test_nsdelegate_remount_is_in_effect(cgroup2_root: Cgroup) -> None:
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, mount_point, fstype, options, *_ = line.split()
        if mount_point == str(CGROUP2) and fstype == "cgroup2":
            assert "nsdelegate" in options.split(","), options
            return
    raise AssertionError("cgroup2 is not mounted at /sys/fs/cgroup")


def test_container_namespace_root_under_nsdelegate(base: Cgroup, procs: Processes) -> None:
    container = base.child("container")
    container.write("memory.max", 512 * MiB)
    probe = procs.popen(
        enter_container(container, [PYTHON, str(NS_PROBE)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = probe.communicate(timeout=RUN_TIMEOUT)
    assert probe.returncode == 0, err
    facts = json.loads(out)

    # The namespace's root is the container's cgroup; its memory.max is readable ...
    assert facts["cgroup"] == "0::/"
    assert facts["root_memory_max"] == str(512 * MiB)
    # ... but not writable from inside: nsdelegate makes it the delegation boundary.
    assert facts["write_root_memory_max"] == "EPERM"
    # Creating a child and moving ourselves into it is allowed.
    assert facts["mkdir_child"] == "ok"
    assert facts["move_self_to_child"] == "ok"
    assert facts["cgroup_after_move"] == "0::/leaf"
    # The no-internal-process rule: +memory for the children is refused while any
    # process is still in the root, and allowed once the root is empty.
    assert facts["subtree_control_with_sibling_in_root"] == "EBUSY"
    assert facts["move_sibling_to_child"] == "ok"
    assert facts["subtree_control_with_root_empty"] == "ok"
    # Then the child takes a limit from inside the namespace.
    assert facts["write_child_memory_max"] == "ok"
    assert facts["child_memory_max"] == str(64 * MiB)

    # The same memory.max is writable from the initial namespace: the EPERM above came
    # from the delegation boundary, not from file permissions.
    assert try_write(container.path / "memory.max", str(512 * MiB)) == "ok"
    assert container.limit() == str(512 * MiB)
    assert (container.path / "leaf" / "memory.max").read_text().strip() == str(64 * MiB)
