"""distributed's own CLI tests pass the same with dask-safe-worker as with `dask worker`.

The drop-in check of scripts/distributed_cli_suite.py (whose docstring has the details):
`distributed/cli/tests/test_dask_worker.py` of the installed release runs twice, as
written and with each `dask worker` it starts replaced by `dask-safe-worker` (a
sitecustomize on the runs' PYTHONPATH execs the tool in the started process, since
distributed's popen() starts `<python> -m dask worker`, never a `dask` from PATH). The
set of passing test ids must be the same; the failure lists each id that passed in one
run only, with an excerpt of its failure.

- The test file comes from $DSW_DISTRIBUTED_SOURCE (+ $DSW_DISTRIBUTED_REF for a git
  directory) when set, else from the PyPI sdist of the installed version (cached per
  user), else from Debian's python3-distributed (apt-get download, cached per user),
  run with that package's release of distributed and dask in a uv venv of its own (made
  once for both tests). Only when apt-get cannot fetch it do the tests skip, saying why.
- The first test runs in this session's cgroup with DASK_SAFE_WORKER_CGROUP_WRITE=never:
  no test may write that cgroup; planning, --memory-limit and the exec of the worker,
  what distributed's tests see, are unchanged by it. The second runs inside a test
  cgroup of its own with the tool's default `auto`, so that instances also make child
  cgroups and see each other's, as they do on a host. For CI's time they split the
  file: the second runs SHARED_HOST, the first the rest but ELSEWHERE.
- Tests that dial outside loopback (192.168.1.100, the host's outward address), start a
  scheduler without --host, or put a worker on every interface are deselected in both
  runs, each listed with its reason in the report.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cgroup_util import KernelCgroup

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is made.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_suite() -> Any:
    return load("distributed_cli_suite", SCRIPTS / "distributed_cli_suite.py")


PY = "/venv/bin/python"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([PY, "-m", "dask", "worker", "tcp://127.0.0.1:1", "--nworkers", "2"],
         ([], ["tcp://127.0.0.1:1", "--nworkers", "2"])),
        ([PY, "-X", "dev", "-u", "-m", "dask", "worker"], (["-X", "dev", "-u"], [])),
        ([PY, "/venv/bin/dask", "worker", "--no-nanny"], ([], ["--no-nanny"])),
        ([PY, "-m", "dask", "scheduler", "--host", "127.0.0.1"], None),
        ([PY, "-m", "distributed.cli.dask_worker", "tcp://127.0.0.1:1"], None),
        ([PY, "-m", "dask_safe_worker", "tcp://127.0.0.1:1"], None),
        ([PY, "/venv/bin/dask", "scheduler"], None),
        ([PY, "-c", "from multiprocessing.spawn import spawn_main", "-m", "dask", "worker"],
         None),
        ([PY], None),
    ],
)  # fmt: skip
def test_the_shim_replaces_dask_worker_starts_only(
    argv: list[str], expected: tuple[list[str], list[str]] | None
) -> None:
    """Only `dask worker` becomes dask-safe-worker: the tool's own exec of
    `python -m distributed.cli.dask_worker`, schedulers and spawned children pass."""
    shim = load("dsw_cli_shim", SCRIPTS / "distributed_cli_shim" / "sitecustomize.py")
    assert shim.dask_worker_args(argv) == expected


RISKY_TESTS = """
def test_loopback():
    popen(["dask", "worker", "tcp://127.0.0.2:1"])

def test_far(p):
    main(["192.168.1.100:7777"])

def test_outward():
    w_host = get_ip()

async def test_scheduler_everywhere():
    popen([sys.executable, "-m", "dask", "scheduler", "--port", "1"])

def test_scheduler_on_loopback():
    popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1"])
"""


def test_tests_that_may_leave_loopback_are_refused_unless_deselected() -> None:
    suite = load_suite()
    ids = [
        f"{suite.TEST_FILE}::{t}"
        for t in (
            "test_loopback",
            "test_far[1]",
            "test_far[2]",
            "test_outward",
            "test_scheduler_everywhere",
            "test_scheduler_on_loopback",
        )
    ]
    assert suite.unreviewed(RISKY_TESTS, ids) == [
        "test_far[1]",
        "test_far[2]",
        "test_outward",
        "test_scheduler_everywhere",
    ]
    suite.NETWORK_DESELECTED.update({"test_far[1]": "x", "test_far[2]": "x", "test_outward": "x"})
    assert suite.unreviewed(RISKY_TESTS, ids) == ["test_scheduler_everywhere"]


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("python3-distributed_2022.12.1+ds.1-3_all.deb", "2022.12.1+ds.1-3"),
        ("python3-distributed_1%3a2024.12.1+ds-1_all.deb", "1:2024.12.1+ds-1"),
    ],
)
def test_deb_version_is_read_from_the_name_apt_get_download_writes(name: str, version: str) -> None:
    assert load_suite().deb_version(name) == version


@pytest.mark.parametrize(
    "name", ["python3-dask_2022.12.1+dfsg-2_all.deb", "python3-distributed_all.deb", "x.deb"]
)
def test_other_debs_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        load_suite().deb_version(name)


@given(
    release=st.lists(st.integers(0, 3000), min_size=2, max_size=4).map(
        lambda parts: ".".join(map(str, parts))
    ),
    epoch=st.sampled_from(["", "1:", "12:"]),
    repack=st.sampled_from(["", "+ds", "+ds.1", "+dfsg", "~rc1"]),
    revision=st.sampled_from(["-1", "-3", "-1~bpo11+1", "-2+deb12u1"]),
)
def test_the_upstream_release_is_the_debian_version_without_epoch_repack_and_revision(
    release: str, epoch: str, repack: str, revision: str
) -> None:
    assert load_suite().upstream_release(f"{epoch}{release}{repack}{revision}") == release


@pytest.mark.parametrize("version", ["", "-1", "ds-1", "2022-1", "1:x.y-1"])
def test_a_debian_version_without_a_release_is_refused(version: str) -> None:
    with pytest.raises(ValueError):
        load_suite().upstream_release(version)


def test_debian_files_are_the_installed_test_package_and_the_stand_ins() -> None:
    suite = load_suite()
    installed = f"{suite.DIST_PACKAGES}/distributed/cli/tests"
    package = {
        f"{installed}/test_dask_worker.py": b"def test_x(): pass\n",
        f"{installed}/__init__.py": b"",
        f"{installed}/test_dask_scheduler.py": b"",
    }
    files = suite.debian_files(package)
    assert files == {
        suite.TEST_FILE: b"def test_x(): pass\n",
        "distributed/cli/tests/__init__.py": b"",
        **suite.STAND_IN,
    }
    # Everything resolve_source asks of a source is there: the required files and a config.
    assert set(suite.REQUIRED) <= set(files) and set(suite.CONFIG) & set(files)


def test_the_venv_gets_the_project_and_one_release_of_distributed_and_dask() -> None:
    suite = load_suite()
    argv = suite.venv_install("/v/bin/python", "2022.12.1")
    assert argv[:3] == ["uv", "pip", "install"]
    assert argv[argv.index("--python") + 1] == "/v/bin/python"
    assert argv[argv.index("-e") + 1] == str(SCRIPTS.parent)
    assert {"distributed==2022.12.1", "dask==2022.12.1", "pytest"} <= set(argv)


def test_a_failing_step_of_the_debian_source_says_which_and_why(tmp_path: Path) -> None:
    """apt-get download without package lists, or a tool that is not there: one line
    that the tests skip with."""
    suite = load_suite()
    with pytest.raises(suite.SourceUnavailable, match=r"fetching: `sh -c .*` exited 100: E: no"):
        suite.tool(["sh", "-c", "echo E: no >&2; exit 100"], "fetching", cwd=tmp_path)
    with pytest.raises(suite.SourceUnavailable, match="unpacking: no-such-tool-here is not on"):
        suite.tool(["no-such-tool-here"], "unpacking")


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """The suite module and what it runs: a given source, else the installed release's
    sdist, else Debian's python3-distributed in a venv of its own (made once for both
    tests)."""
    suite = load_suite()
    try:
        return suite, suite.resolve_suite(
            os.environ.get("DSW_DISTRIBUTED_SOURCE"),
            os.environ.get("DSW_DISTRIBUTED_REF"),
            tmp_path_factory.mktemp("distributed-cli-suite"),
        )
    except suite.SourceUnavailable as e:
        pytest.skip(str(e))


def assert_alike(suite: Any, comparison: Any, work: Path) -> None:
    print(suite.report(comparison))
    # Without these the comparison would be empty: nothing passed, or nothing was replaced.
    assert comparison.plain.passed(), f"nothing passed with plain `dask worker`: see {work}"
    assert comparison.substituted(), "no test started dask-safe-worker: the shim did not run"
    assert comparison.safe.passed() == comparison.plain.passed(), suite.differences(comparison)


@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_distributed_cli_tests_pass_alike_with_dask_safe_worker(
    resolved: tuple[Any, Any], tmp_path: Path
) -> None:
    """In this session's cgroup, with the tool's cgroup writing off; without the tests
    that the test-cgroup comparison runs and those that start no `dask worker` but cost
    time (ELSEWHERE)."""
    suite, what = resolved
    comparison = suite.compare(what, tmp_path, without=suite.ELSEWHERE)
    assert_alike(suite, comparison, tmp_path)


@pytest.mark.e2e
@pytest.mark.kernel
@pytest.mark.timeout(1800)
def test_distributed_cli_tests_pass_alike_in_a_test_cgroup(
    resolved: tuple[Any, Any], kernel_cgroup: KernelCgroup, started_pids: set[int], tmp_path: Path
) -> None:
    """Both runs inside a test cgroup (8 GiB) with the tool's default `--cgroup-write
    auto`: instances make and limit child cgroups below it and see each other's, as on a
    host. Every cgroup the tool may write is below this test's own, removed afterwards.
    Only the tests where several workers share the host (SHARED_HOST): the others ran
    above already, and CI's time is short."""
    suite, what = resolved
    kernel_cgroup.set_limit(8 * 2**30)
    place = suite.Placement("auto", kernel_cgroup.enter_command, started_pids)
    comparison = suite.compare(what, tmp_path, place=place, only=suite.SHARED_HOST)
    assert_alike(suite, comparison, tmp_path)


def test_a_test_passes_in_a_mode_if_it_passed_in_either_of_its_runs(tmp_path: Path) -> None:
    suite = load_suite()
    ok, bad = suite.Outcome("passed"), suite.Outcome("failed", "TimeoutError: 30 s")
    first = suite.Run("safe", 10.0, {"a": ok, "b": bad, "c": bad}, {"b": 1}, tmp_path)
    again = suite.Run("safe", 4.0, {"b": ok, "c": bad}, {"b": 1, "c": 2}, tmp_path)
    merged = suite.with_retry(first, again)
    assert merged.passed() == {"a", "b"}
    assert merged.outcomes["c"] is bad
    assert merged.starts == {"b": 2, "c": 2}
    assert merged.seconds == 14.0


def test_a_comparison_leaves_out_what_is_not_in_its_subset_or_left_out() -> None:
    suite = load_suite()
    names = ["test_a[1]", "test_a[2]", "test_b", "test_c[x]"]
    assert suite.left_out(names, None, {}) == {}
    assert suite.left_out(names, ("test_a",), {}) == {
        "test_b": "not in this comparison's subset",
        "test_c[x]": "not in this comparison's subset",
    }
    assert suite.left_out(names, None, {"test_a": "elsewhere"}) == {
        "test_a[1]": "elsewhere",
        "test_a[2]": "elsewhere",
    }
