"""Unit tests for the per-release rules of the dask_compat modules (no dask or distributed
import): one section per module, and the import cost of each."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_safe_worker.dask_compat.dask_system import cpu_count
from dask_safe_worker.dask_compat.dask_worker import (
    WORKER_FLAG_OPTIONS,
    WORKER_VALUE_OPTIONS,
    WorkerArgsError,
    nprocesses_nthreads,
    nworkers_options,
    resolve_nworkers_nthreads,
    worker_command,
    worker_options,
)
from dask_safe_worker.dask_compat.distributed_system import (
    DASK_MEMORY_LIMIT_PATHS,
    memory_limit,
    memory_limit_paths,
)
from dask_safe_worker.dask_compat.features import release_features
from dask_safe_worker.dask_compat.release import (
    NEWEST_TESTED,
    OLDEST_SUPPORTED,
    Release,
    UnsupportedDistributedError,
    Version,
    check_supported,
    installed_release,
    is_tested,
)
from dask_safe_worker.worker_args import parse_worker_args

V = Version.parse

# --- Version -------------------------------------------------------------------------------

parts = st.integers(min_value=0, max_value=10**6)


@given(parts, parts, parts)
def test_version_parse_round_trips(a: int, b: int, c: int) -> None:
    v = Version(a, b, c)
    assert V(str(v)) == v
    assert V(f"{a}.{b}.{c}.1") == v  # 2023.3.2.1 style
    assert V(f"{a}.{b}.{c}rc1") == v
    assert V(f"{a}.{b}.{c}.post2") == v
    assert V(f"{a}.{b}.{c}+local.9") == v


@given(st.tuples(parts, parts, parts), st.tuples(parts, parts, parts))
def test_version_order_is_tuple_order(x: tuple[int, int, int], y: tuple[int, int, int]) -> None:
    assert (Version(*x) < Version(*y)) == (x < y)
    assert (Version(*x).major, Version(*x).minor, Version(*x).patch) == x


@given(st.text(max_size=30))
def test_version_parse_never_raises(text: str) -> None:
    v = V(text)
    assert min(v.major, v.minor, v.patch) >= 0


def test_version_parse_short_and_prerelease() -> None:
    assert V("2024") == Version(2024, 0, 0)
    assert V("2024.1") == Version(2024, 1, 0)
    # The pre-release digits are not part of the patch number.
    assert V("2024.1.0rc1") == Version(2024, 1, 0)
    assert V("2022.9.2") > V("2022.9.1")


# --- supported range -------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["2022.9.2", "2022.10.0", "2024.12.1", "2026.8.0", "2031.1.0"])
def test_supported_releases_pass(text: str) -> None:
    check_supported(V(text))


@pytest.mark.parametrize("text", ["2022.9.1", "2022.9.0", "2022.8.1", "2.30.1"])
def test_old_releases_fail_naming_the_range(text: str) -> None:
    with pytest.raises(UnsupportedDistributedError) as info:
        check_supported(V(text))
    message = str(info.value)
    assert text in message or str(V(text)) in message
    assert str(OLDEST_SUPPORTED) in message
    assert str(NEWEST_TESTED) in message


def test_missing_distributed_fails_naming_the_range() -> None:
    with pytest.raises(UnsupportedDistributedError, match="not installed") as info:
        check_supported(None)
    assert str(OLDEST_SUPPORTED) in str(info.value)


def test_is_tested() -> None:
    assert is_tested(NEWEST_TESTED)
    assert is_tested(OLDEST_SUPPORTED)
    assert not is_tested(Version(2099, 1, 0))


def test_installed_versions_come_from_metadata_without_importing_dask() -> None:
    code = (
        "import sys; from dask_safe_worker.dask_compat import dask_worker, features, release; "
        "r = release.installed_release(); "
        "features.release_features(r); dask_worker.worker_options(r.distributed); "
        "assert 'distributed' not in sys.modules and 'dask' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith(('dask', 'distributed'))); "
        "print(r.distributed, r.dask)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    from importlib import metadata

    assert out == [
        str(V(metadata.version("distributed"))),
        str(V(metadata.version("dask"))),
    ]
    assert installed_release() == Release(V(out[0]), V(out[1]))


# The siblings each module may load: an importer pays only for the rules it uses
# (`--print-limit`'s start-up time is a goal), and nothing loads dask or distributed.
SIBLINGS: dict[str, set[str]] = {
    "release": set(),
    "dask_worker": {"release"},
    "distributed_system": {"release"},
    "dask_system": {"release"},
    "features": {"release", "dask_worker", "distributed_system", "dask_system"},
}


@pytest.mark.parametrize("module", sorted(SIBLINGS))
def test_each_module_loads_only_what_it_needs(module: str) -> None:
    code = (
        f"import sys, dask_safe_worker.dask_compat.{module}; print(' '.join(sorted(sys.modules)))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    package = "dask_safe_worker.dask_compat."
    ours = {name[len(package) :] for name in loaded if name.startswith(package)}
    assert ours == SIBLINGS[module] | {module}
    assert not loaded & {"dask", "distributed", "dataclasses", "inspect", "importlib.metadata"}


# --- options -------------------------------------------------------------------------------


def test_option_tables_per_release() -> None:
    old, new = worker_options(V("2022.9.2")), worker_options(V("2022.10.0"))
    assert {"--nprocs", "--bokeh-port"} <= old.values
    assert {"--bokeh", "--no-bokeh", "--reconnect", "--no-reconnect"} <= old.flags
    assert "--scheduler-sni" not in old.all
    assert "--nprocs" not in new.all and "--bokeh-port" not in new.all
    assert "--scheduler-sni" in new.values
    assert worker_options(V("2026.8.0")) == new
    for table in (old, new):
        assert not table.values & table.flags
        assert "--help" in table.flags
        assert table.multiple <= table.values
        assert table.takes_value("--memory-limit") and not table.takes_value("--no-nanny")
        assert table.all <= (WORKER_VALUE_OPTIONS | WORKER_FLAG_OPTIONS)
        assert table.values <= WORKER_VALUE_OPTIONS
        assert table.flags <= WORKER_FLAG_OPTIONS
    assert old.all | new.all == (WORKER_VALUE_OPTIONS | WORKER_FLAG_OPTIONS)


def test_nworkers_options() -> None:
    assert nworkers_options(V("2022.9.2")) == ("--nworkers", "--nprocs")
    assert nworkers_options(V("2022.10.0")) == ("--nworkers",)


def test_release_features() -> None:
    old = release_features(Release(V("2022.9.2"), V("2022.9.2")))
    assert old.nprocs_alias and not old.dask_cli_worker and not old.cpu_quota_reads_v2
    assert old.dask_worker_script and old.worker_memory_limit_alias
    assert "fs/cgroup/memory.low" not in old.memory_limit_paths
    new = release_features(Release(V("2026.8.0"), V("2026.8.0")))
    assert not new.nprocs_alias and new.dask_cli_worker and new.cpu_quota_reads_v2
    assert not new.dask_worker_script and not new.worker_memory_limit_alias
    assert new.memory_limit_paths == DASK_MEMORY_LIMIT_PATHS
    last_alias = release_features(Release(V("2026.3.0"), V("2026.3.0")))
    assert last_alias.worker_memory_limit_alias and last_alias.dask_worker_script
    d = new.as_dict()
    assert d["distributed"] == "2026.8.0" and isinstance(d["memory_limit_paths"], list)


def test_worker_command_needs_nothing_on_path() -> None:
    assert worker_command("/x/python") == ["/x/python", "-m", "distributed.cli.dask_worker"]


# --- nworkers / nthreads --------------------------------------------------------------------


def test_nprocesses_nthreads_known_values() -> None:
    # The examples in distributed's own docstring.
    assert nprocesses_nthreads(4) == (4, 1)
    assert nprocesses_nthreads(32) == (8, 4)
    assert nprocesses_nthreads(7) == (7, 1)
    assert nprocesses_nthreads(12) == (4, 3)


cpus = st.integers(min_value=1, max_value=512)
nworkers_text = st.one_of(
    st.none(),
    st.just("auto"),
    st.integers(min_value=-600, max_value=600).map(str),
    st.text(max_size=5),
)


@given(nworkers_text, st.one_of(st.none(), st.integers(0, 64)), cpus)
def test_resolve_nworkers_nthreads_invariants(
    nworkers: str | None, nthreads: int | None, cpu: int
) -> None:
    try:
        n, t = resolve_nworkers_nthreads(nworkers, nthreads, cpu)
    except WorkerArgsError:
        if nworkers in (None, "auto"):
            raise
        try:
            value = int(nworkers)
        except ValueError:
            return
        assert (value if value >= 0 else cpu + 1 + value) <= 0
        return
    assert n >= 1 and t >= 1
    if nworkers == "auto":
        assert (n, t) == nprocesses_nthreads(cpu)
        assert n * t <= cpu
    elif nthreads:
        assert t == nthreads
    elif n <= cpu:
        assert t == cpu // n
    else:
        assert t == cpu  # dask passes 0 threads and the worker falls back to CPU_COUNT


@pytest.mark.parametrize(
    ("nworkers", "nthreads", "cpu", "expected"),
    [
        (None, None, 8, (1, 8)),
        ("2", None, 8, (2, 4)),
        ("-1", None, 8, (8, 1)),
        ("-2", 3, 8, (7, 3)),
        ("auto", 5, 8, (4, 2)),  # auto overrides --nthreads
        ("3", None, 2, (3, 2)),
        (" 2", None, 4, (2, 2)),  # int() strips, as dask's does
    ],
)
def test_resolve_nworkers_nthreads_examples(
    nworkers: str | None, nthreads: int | None, cpu: int, expected: tuple[int, int]
) -> None:
    assert resolve_nworkers_nthreads(nworkers, nthreads, cpu) == expected


@pytest.mark.parametrize("bad", ["0", "-9", "two", "1.5", ""])
def test_resolve_nworkers_rejects(bad: str) -> None:
    with pytest.raises(WorkerArgsError):
        resolve_nworkers_nthreads(bad, None, 8)


def test_nprocs_alias() -> None:
    old = nworkers_options(Version(2022, 9, 2))
    assert parse_worker_args(["--nprocs", "4"], old).nworkers == "4"
    with pytest.raises(WorkerArgsError, match="both --nprocs and --nworkers"):
        parse_worker_args(["--nprocs", "4", "--nworkers", "2"], old)


# --- CPU_COUNT -----------------------------------------------------------------------------


def make_roots(tmp: Path, self_cgroup: str = "0::/\n") -> tuple[Path, Path]:
    proc, sys_ = tmp / "proc", tmp / "sys"
    (proc / "self").mkdir(parents=True)
    (proc / "self/cgroup").write_text(self_cgroup)
    (sys_ / "fs/cgroup").mkdir(parents=True)
    return proc, sys_


def put(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


NEW, OLD = V("2026.8.0"), V("2022.9.2")


@pytest.mark.parametrize("dirname", ["cpu,cpuacct", "cpuacct,cpu"])
def test_cpu_count_v1_quota(tmp_path: Path, dirname: str) -> None:
    proc, sys_ = make_roots(tmp_path)
    put(sys_, f"fs/cgroup/{dirname}/cpu.cfs_quota_us", "150000\n")
    put(sys_, f"fs/cgroup/{dirname}/cpu.cfs_period_us", "100000\n")
    for version in (OLD, NEW):
        assert cpu_count(proc, sys_, affinity=8, dask=version) == 2
        assert cpu_count(proc, sys_, affinity=1, dask=version) == 1


def test_cpu_count_v1_unlimited(tmp_path: Path) -> None:
    proc, sys_ = make_roots(tmp_path)
    put(sys_, "fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    put(sys_, "fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    put(sys_, "fs/cgroup/cpu.max", "100000 100000\n")  # never reached: v1 answered
    assert cpu_count(proc, sys_, affinity=8, dask=NEW) == 8


def test_cpu_count_v2_from_the_last_line_only_since_2022_10(tmp_path: Path) -> None:
    proc, sys_ = make_roots(tmp_path, "1:cpu:/a\n0::/kubepods/pod1/c1\n")
    put(sys_, "fs/cgroup/kubepods/pod1/c1/cpu.max", "250000 100000\n")
    assert cpu_count(proc, sys_, affinity=8, dask=NEW) == 3
    assert cpu_count(proc, sys_, affinity=8, dask=V("2022.10.0")) == 3
    # dask 2022.9.x had no v2 branch.
    assert cpu_count(proc, sys_, affinity=8, dask=OLD) == 8


@pytest.mark.parametrize("content", ["max 100000\n", "garbage", "", "0 100000", "1 2 3"])
def test_cpu_count_v2_no_quota(tmp_path: Path, content: str) -> None:
    proc, sys_ = make_roots(tmp_path)
    put(sys_, "fs/cgroup/cpu.max", content)
    assert cpu_count(proc, sys_, affinity=4, dask=NEW) == 4


@given(
    st.integers(min_value=1, max_value=256),
    st.integers(min_value=-1, max_value=10**7),
    st.integers(min_value=1, max_value=10**6),
)
def test_cpu_count_v2_property(affinity: int, quota: int, period: int) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        proc, sys_ = make_roots(Path(tmp))
        put(sys_, "fs/cgroup/cpu.max", f"{quota} {period}\n")
        got = cpu_count(proc, sys_, affinity=affinity, dask=NEW)
    cap = math.ceil(quota / period)
    assert got == (min(affinity, cap) if cap > 0 else affinity)


# --- MEMORY_LIMIT --------------------------------------------------------------------------

GiB = 2**30


def test_memory_limit_paths_per_release() -> None:
    assert memory_limit_paths(V("2022.9.1")) == ("fs/cgroup/memory/memory.limit_in_bytes",)
    four = memory_limit_paths(V("2022.9.2"))
    assert len(four) == 4 and "fs/cgroup/memory.max" in four
    assert memory_limit_paths(V("2023.9.3")) == four
    assert memory_limit_paths(V("2023.10.0")) == (*four, "fs/cgroup/memory.low")
    assert memory_limit_paths(V("2026.8.0")) == DASK_MEMORY_LIMIT_PATHS


def test_memory_low_counts_from_2023_10(tmp_path: Path) -> None:
    _, sys_ = make_roots(tmp_path)
    put(sys_, "fs/cgroup/memory.max", "max\n")
    put(sys_, "fs/cgroup/memory.low", f"{GiB}\n")
    total = 16 * GiB
    assert memory_limit(total, sys_, -1, distributed=V("2023.9.3")) == total
    assert memory_limit(total, sys_, -1, distributed=V("2023.10.0")) == GiB


def test_v2_is_invisible_before_2022_9_2(tmp_path: Path) -> None:
    _, sys_ = make_roots(tmp_path)
    put(sys_, "fs/cgroup/memory.max", f"{GiB}\n")
    assert memory_limit(8 * GiB, sys_, -1, distributed=V("2022.9.1")) == 8 * GiB
    assert memory_limit(8 * GiB, sys_, -1, distributed=V("2022.9.2")) == GiB


file_content = st.one_of(
    st.none(),  # missing
    st.integers(min_value=-(2**63), max_value=2**63).map(lambda i: f"{i}\n"),
    st.sampled_from(["max\n", "", "garbage", "9223372036854771712\n"]),
)


@given(
    st.lists(file_content, min_size=5, max_size=5),
    st.integers(min_value=1, max_value=2**50),
    st.integers(min_value=-1, max_value=2**50),
    st.sampled_from(["2022.9.2", "2023.9.3", "2023.10.0", "2026.8.0"]),
)
def test_dask_memory_limit_property(
    contents: list[str | None], total: int, rlimit: int, version: str
) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _, sys_ = make_roots(Path(tmp))
        expected = total
        read = memory_limit_paths(V(version))
        for rel, content in zip(DASK_MEMORY_LIMIT_PATHS, contents, strict=True):
            if content is None:
                continue
            put(sys_, rel, content)
            if rel in read:
                try:
                    value = int(content)
                except ValueError:
                    continue
                if value > 0:
                    expected = min(expected, value)
        if 0 < rlimit < expected:
            expected = rlimit
        got = memory_limit(total, sys_, rlimit, distributed=V(version))
    assert got == expected
    assert 0 < got <= total
