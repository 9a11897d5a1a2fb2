"""Fixtures of the guest suite, which runs as root inside a throwaway virtme-ng VM.

These tests remount the cgroup2 hierarchy with nsdelegate and write its root's
subtree_control: acceptable in a VM that is discarded after the run, never on a host.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from guest_cgroups import CGROUP2, Cgroup, Processes, make_cgroup_tree


def _inside_test_vm() -> bool:
    # virtme-ng puts this on the guest kernel's command line; the harness sets the env.
    cmdline = Path("/proc/cmdline").read_text()
    return "virtme_hostname=virtme-ng" in cmdline and bool(os.environ.get("DSW_VM_RESULTS"))


def pytest_configure(config: pytest.Config) -> None:
    if not _inside_test_vm():
        pytest.exit(
            "tests/vm/guest runs only inside the test VM: use tests/vm/test_v2_suite.py "
            "or scripts/vm_suite.py",
            returncode=4,
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """Each test's outcome in the results directory as soon as it is known: junit XML is
    written only at the end, which a VM killed at its timeout never reaches."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" or report.outcome != "passed":
        line = f"{report.nodeid} {report.when} {report.outcome} {report.duration:.1f}s\n"
        with open(Path(os.environ["DSW_VM_RESULTS"]) / "outcomes.log", "a") as log:
            log.write(line)


def _mount_options() -> list[str]:
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, mount_point, fstype, options, *_ = line.split()
        if mount_point == str(CGROUP2) and fstype == "cgroup2":
            return options.split(",")
    return []


@pytest.fixture(scope="session")
def cgroup2_root() -> Cgroup:
    """The guest's cgroup2 root, remounted with nsdelegate (as systemd and container
    hosts mount it) and with the memory controller enabled for its children."""
    if "nsdelegate" not in _mount_options():
        subprocess.run(["mount", "-o", "remount,nsdelegate", str(CGROUP2)], check=True)
    root = Cgroup(CGROUP2)
    if "memory" not in root.read("cgroup.subtree_control").split():
        root.enable_memory()
    return root


@pytest.fixture
def procs() -> Iterator[Processes]:
    started = Processes()
    try:
        yield started
    finally:
        started.end_all()


@pytest.fixture
def base(
    cgroup2_root: Cgroup, procs: Processes, request: pytest.FixtureRequest
) -> Iterator[Cgroup]:
    """A fresh test cgroup (memory enabled for its children), removed afterwards."""
    label = request.node.name.split("[")[0].removeprefix("test_")[:24]
    with make_cgroup_tree(procs, label) as cg:
        yield cg
