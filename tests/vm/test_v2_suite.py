"""The cgroup v2 suite: one VM boot runs every test in tests/vm/guest; each guest test is
reported here as a host test, with the guest's failure text.

In CI (CI set) the VM must boot, and these tests fail loudly if it cannot. Elsewhere they
are skipped, with the packages to install, when qemu, a kernel or busybox is missing.
"""

from __future__ import annotations

import ast
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import background
import pytest
from vmrun import (
    GUEST_TESTS,
    VM_TIMEOUT,
    GuestSuiteResult,
    VMBootError,
    VMUnavailable,
    default_workdir,
    run_guest_suite,
)

# The first test also pays for the boot and the whole guest suite (~5-6 min here), more
# than the suite-wide per-test timeout allows for on a slower machine.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(VM_TIMEOUT + 300)]


def _guest_tests() -> list[str]:
    """`module::function` of every guest test CI's boot runs (not the `extended` ones),
    read without importing the guest code (which only works inside the VM)."""
    found = []
    for path in sorted(GUEST_TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        found += [
            f"{path.stem}::{node.name}"
            for node in tree.body
            if isinstance(node, ast.FunctionDef)
            and node.name.startswith("test_")
            and "pytest.mark.extended" not in map(ast.unparse, node.decorator_list)
        ]
    return found


@dataclass(frozen=True)
class Case:
    outcome: str  # passed | failed | error | skipped
    text: str


def _cases(xml: str) -> dict[str, Case]:
    """junit testcases by `module::name` (parametrized ids included)."""
    cases: dict[str, Case] = {}
    for tc in ET.fromstring(xml).iter("testcase"):
        key = f"{tc.get('classname', '').rsplit('.', 1)[-1]}::{tc.get('name')}"
        outcome, text = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = tc.find(tag)
            if element is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                text = f"{element.get('message', '')}\n{element.text or ''}"
                break
        cases[key] = Case(outcome, text)
    return cases


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


@pytest.fixture(scope="session")
def guest_suite() -> GuestSuiteResult:
    """The whole guest suite in one boot, started by conftest.py beside the host tests (or
    here, if it was not); every test below reads its results."""
    running = background.started()
    try:
        if running is not None:
            return running.result()
        # Results come back through a directory shared with the guest (gitignored
        # .tmp/vm); it is kept after the run for the guest's logs.
        return run_guest_suite(default_workdir() / f"results-{os.getpid()}", timeout=VM_TIMEOUT)
    except VMUnavailable as exc:
        if _in_ci():
            pytest.fail(f"CI must run the cgroup v2 VM suite, but {exc}", pytrace=False)
        pytest.skip(str(exc))
    except VMBootError as exc:
        pytest.fail(f"the cgroup v2 test VM did not run the suite: {exc}", pytrace=False)


def test_guest_suite_ran_every_test(guest_suite: GuestSuiteResult) -> None:
    out = guest_suite.completed
    assert guest_suite.junit_xml, (
        f"the guest pytest wrote no results (exit {out.returncode})\n"
        f"--- stdout\n{out.stdout[-6000:]}\n--- stderr\n{out.stderr[-3000:]}"
    )
    ran = {key.split("[")[0] for key in _cases(guest_suite.junit_xml)}
    expected = set(_guest_tests())
    # A guest module that fails to import shows up as an error case of its own.
    assert ran == expected, (
        f"missing: {sorted(expected - ran)}; unexpected: {sorted(ran - expected)}"
    )
    assert out.returncode == 0, f"guest pytest exit {out.returncode}\n{out.stdout[-6000:]}"


@pytest.mark.parametrize("guest_test", _guest_tests())
def test_guest(guest_suite: GuestSuiteResult, guest_test: str) -> None:
    cases = {
        key: case
        for key, case in _cases(guest_suite.junit_xml).items()
        if key == guest_test or key.startswith(f"{guest_test}[")
    }
    assert cases, f"{guest_test} did not run in the VM (see test_guest_suite_ran_every_test)"
    bad = {key: case for key, case in cases.items() if case.outcome != "passed"}
    if bad and all(case.outcome == "skipped" for case in bad.values()) and not _in_ci():
        pytest.skip("; ".join(case.text.strip() for case in bad.values()))
    assert not bad, (
        "\n\n".join(f"{key} {case.outcome} in the VM:\n{case.text}" for key, case in bad.items())
        + f"\n(guest logs: {guest_suite.results_dir})"
    )
