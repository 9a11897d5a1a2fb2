"""Fail closed (issue 24 row 4): a memory cgroup level that exists but cannot be read
never counts as "no limit". The start stops with exit 1 and the reason, unless the user
said how to go on (an explicit --memory-limit, or --allow-unreadable-cgroup).

The property test generates fixture trees whose level files are missing or garbled; the
kernel test binds a sibling cgroup over this host's v1 memory controller inside a private
mount namespace (`unshare -m`), so that every level of our path is ENOENT.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cgroup_util import KernelCgroup
from dask_safe_worker.dask_compat.release import installed_release
from dask_safe_worker.measure import measure, unreadable_problem
from scheduler_util import closed_port
from start_util import cgroup_state, dsw_command, run_script

GiB, MiB = 2**30, 2**20
MEMORY = Path("/sys/fs/cgroup/memory")
SCHEDULER = f"tcp://127.0.0.1:{closed_port()}"


# Each level: what its limit and usage files hold (None: missing).
LEVEL_FILES = st.tuples(
    st.sampled_from([None, "max", str(GiB), "garbage", str(2 * GiB)]),
    st.sampled_from([None, str(100 * MiB), "x"]),
)


@settings(max_examples=150, deadline=None)
@given(
    depth=st.integers(min_value=0, max_value=3),
    files=st.lists(LEVEL_FILES, min_size=4, max_size=4),
    version=st.sampled_from([1, 2]),
)
def test_a_level_that_exists_but_cannot_be_read_never_counts_as_unlimited(
    depth: int, files: list[tuple[str | None, str | None]], version: int
) -> None:
    """Issue 24 row 4: a level whose limit or usage cannot be read makes the start stop
    (unless told to go on); a start that goes on never counts it as no limit."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "proc/self").mkdir(parents=True)
        (base / "proc/2").mkdir()
        (base / "proc/2/stat").write_text("2 (kthreadd) S 0 0 0\n")
        (base / "proc/meminfo").write_text(
            "MemTotal:       16777216 kB\nMemFree:         8388608 kB\n"
            "MemAvailable:   12582912 kB\n"
        )
        own = "/" + "/".join(["s"] * depth) if depth else "/"
        if version == 1:
            (base / "proc/self/cgroup").write_text(f"4:memory:{own}\n")
            (base / "proc/self/mountinfo").write_text(
                "35 31 0:32 / /cg rw - cgroup cgroup rw,memory\n"
            )
            limit_file, usage_file = "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            (base / "proc/self/cgroup").write_text(f"0::{own}\n")
            (base / "proc/self/mountinfo").write_text("35 31 0:32 / /cg rw - cgroup2 cgroup2 rw\n")
            limit_file, usage_file = "memory.max", "memory.current"
        top = base / "cg"
        top.mkdir()
        (top / "cgroup.controllers").write_text("memory\n")
        unreadable_expected = False
        for level in range(depth + 1):
            directory = top.joinpath(*(["s"] * level))
            directory.mkdir(exist_ok=True)
            limit, usage = files[level]
            (directory / "memory.stat").write_text("inactive_file 0\ntotal_inactive_file 0\n")
            (directory / "cgroup.procs").write_text("4242\n")
            is_v2_root = version == 2 and level == 0
            if limit is not None:
                (directory / limit_file).write_text(limit + "\n")
            if usage is not None:
                (directory / usage_file).write_text(usage + "\n")
            # The v2 root has neither file; anything else unreadable is a blind level.
            bad = {"garbage", *(["max"] if version == 1 else [])}
            if limit in bad or usage == "x" or (not is_v2_root and None in (limit, usage)):
                unreadable_expected = True
        m = measure(
            base / "proc",
            base,
            release=installed_release(),
            affinity=2,
            rlimit_rss=-1,
            own_pid=4242,
        )
        assert bool(m.unreadable) == unreadable_expected, (m.unreadable, files)
        assert (unreadable_problem(m, False, False) is not None) == unreadable_expected
        assert unreadable_problem(m, True, False) is None
        assert unreadable_problem(m, False, True) is None


def test_unreadable_v2_controllers_without_a_v1_memory_hierarchy_is_not_no_limit(
    tmp_path: Path,
) -> None:
    # Memory can only be on the v2 hierarchy then: not knowing whether it is there is not
    # knowing our limit.
    root = tmp_path / "v2"
    shutil.copytree(Path(__file__).parent / "fixtures" / "unlimited-v2", root)
    (root / "sys/fs/cgroup/cgroup.controllers").unlink()
    m = measure(
        root / "proc",
        root,
        release=installed_release(),
        affinity=2,
        rlimit_rss=-1,
        own_pid=4242,
    )
    assert m.location is None
    assert len(m.unreadable) == 1 and "cgroup.controllers" in m.unreadable[0]
    assert unreadable_problem(m, False, False) is not None


@pytest.fixture
def siblings(kernel_cgroup: KernelCgroup) -> tuple[KernelCgroup, KernelCgroup]:
    """B limited to 512 MiB, its sibling R without a limit: both below the test cgroup."""
    b = kernel_cgroup.child("B")
    b.set_limit(512 * MiB)
    return b, kernel_cgroup.child("R")


@pytest.mark.kernel
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_an_unreadable_level_stops_the_start_unless_told_to_go_on(
    kernel_cgroup: KernelCgroup, siblings: tuple[KernelCgroup, KernelCgroup], tmp_path: Path
) -> None:
    # Issue 24 row 4: the sibling R bound over the controller, no cgroup namespace: our
    # path names directories that do not exist under R (ENOENT on every level). They
    # used to count as "no limit": the host's RAM for a worker in a 512 MiB cgroup.
    b, r = siblings
    before = cgroup_state(kernel_cgroup.path)
    enter = f"echo $$ > {shlex.quote(str(b.path))}/cgroup.procs"
    inner = "; ".join(
        [
            f"mount --bind {shlex.quote(str(r.path))} {MEMORY}",
            f"{dsw_command('--dry-run', SCHEDULER)} >/dev/null 2>dry.err; echo $? > dry.rc",
            f"{dsw_command('--print-limit', SCHEDULER)} >print.out 2>print.err; echo $? > print.rc",
            f"{dsw_command('--dry-run', '--memory-limit', '300MiB', SCHEDULER)}"
            " >/dev/null 2>mem.err; echo $? > mem.rc",
        ]
    )
    proc = run_script(f"{enter} && exec unshare -m sh -c {shlex.quote(inner)}", tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("dry", "print"):
        err = (tmp_path / f"{name}.err").read_text()
        assert (tmp_path / f"{name}.rc").read_text().strip() == "1", err
        assert "--allow-unreadable-cgroup" in err and "Traceback" not in err
    assert (tmp_path / "print.out").read_text() == ""
    mem = (tmp_path / "mem.err").read_text()
    assert (tmp_path / "mem.rc").read_text().strip() == "0", mem
    assert "warning: planning without" in mem
    assert cgroup_state(kernel_cgroup.path) == before


NOTEBOOK_QUERY = """
from dask_safe_worker import memory_limit
from dask_safe_worker.plan import PlanError
try:
    print("limit", memory_limit(n_workers=2))
except PlanError as exc:
    print("refused", exc)
"""


@pytest.mark.kernel
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_the_notebook_api_fails_closed_too(
    kernel_cgroup: KernelCgroup, siblings: tuple[KernelCgroup, KernelCgroup], tmp_path: Path
) -> None:
    # `dask_safe_worker.memory_limit()` planned the host's RAM where the start stops.
    b, r = siblings
    enter = f"echo $$ > {shlex.quote(str(b.path))}/cgroup.procs"
    query = shlex.join([sys.executable, "-c", NOTEBOOK_QUERY])
    inner = f"mount --bind {shlex.quote(str(r.path))} {MEMORY} && exec {query}"
    proc = run_script(f"{enter} && exec unshare -m sh -c {shlex.quote(inner)}", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("refused cannot read every memory cgroup level"), proc.stdout
    assert "memory_limit=" in proc.stdout
