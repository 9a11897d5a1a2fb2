"""Unit tests for the per-release rules in dask_compat (no dask or distributed import)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_safe_worker import dask_compat as dc
from dask_safe_worker.dask_compat import Version
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
    dc.check_supported(V(text))


@pytest.mark.parametrize("text", ["2022.9.1", "2022.9.0", "2022.8.1", "2.30.1"])
def test_old_releases_fail_naming_the_range(text: str) -> None:
    with pytest.raises(dc.UnsupportedDistributedError) as info:
        dc.check_supported(V(text))
    message = str(info.value)
    assert text in message or str(V(text)) in message
    assert str(dc.OLDEST_SUPPORTED) in message
    assert str(dc.NEWEST_TESTED) in message


def test_missing_distributed_fails_naming_the_range() -> None:
    with pytest.raises(dc.UnsupportedDistributedError, match="not installed") as info:
        dc.check_supported(None)
    assert str(dc.OLDEST_SUPPORTED) in str(info.value)


def test_is_tested() -> None:
    assert dc.is_tested(dc.NEWEST_TESTED)
    assert dc.is_tested(dc.OLDEST_SUPPORTED)
    assert not dc.is_tested(Version(2099, 1, 0))


def test_installed_versions_come_from_metadata_without_importing_dask() -> None:
    code = (
        "import sys; from dask_safe_worker import dask_compat as dc; "
        "v = dc.installed_distributed_version(); k = dc.installed_dask_version(); "
        "dc.release_features(); dc.worker_options(); "
        "assert 'distributed' not in sys.modules and 'dask' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith(('dask', 'distributed'))); "
        "print(v, k)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    from importlib import metadata

    assert out == [
        str(V(metadata.version("distributed"))),
        str(V(metadata.version("dask"))),
    ]


# --- options -------------------------------------------------------------------------------


def test_option_tables_per_release() -> None:
    old, new = dc.worker_options(V("2022.9.2")), dc.worker_options(V("2022.10.0"))
    assert {"--nprocs", "--bokeh-port"} <= old.values
    assert {"--bokeh", "--no-bokeh", "--reconnect", "--no-reconnect"} <= old.flags
    assert "--scheduler-sni" not in old.all
    assert "--nprocs" not in new.all and "--bokeh-port" not in new.all
    assert "--scheduler-sni" in new.values
    assert dc.worker_options(V("2026.8.0")) == new
    for table in (old, new):
        assert not table.values & table.flags
        assert "--help" in table.flags
        assert table.multiple <= table.values
        assert table.takes_value("--memory-limit") and not table.takes_value("--no-nanny")
        assert table.all <= (dc.WORKER_VALUE_OPTIONS | dc.WORKER_FLAG_OPTIONS)
        assert table.values <= dc.WORKER_VALUE_OPTIONS
        assert table.flags <= dc.WORKER_FLAG_OPTIONS
    assert old.all | new.all == (dc.WORKER_VALUE_OPTIONS | dc.WORKER_FLAG_OPTIONS)


def test_nworkers_options() -> None:
    assert dc.nworkers_options(V("2022.9.2")) == ("--nworkers", "--nprocs")
    assert dc.nworkers_options(V("2022.10.0")) == ("--nworkers",)


def test_release_features() -> None:
    old = dc.release_features(V("2022.9.2"), V("2022.9.2"))
    assert old.nprocs_alias and not old.dask_cli_worker and not old.cpu_quota_reads_v2
    assert old.dask_worker_script and old.worker_memory_limit_alias
    assert "fs/cgroup/memory.low" not in old.memory_limit_paths
    new = dc.release_features(V("2026.8.0"), V("2026.8.0"))
    assert not new.nprocs_alias and new.dask_cli_worker and new.cpu_quota_reads_v2
    assert not new.dask_worker_script and not new.worker_memory_limit_alias
    assert new.memory_limit_paths == dc.DASK_MEMORY_LIMIT_PATHS
    last_alias = dc.release_features(V("2026.3.0"), V("2026.3.0"))
    assert last_alias.worker_memory_limit_alias and last_alias.dask_worker_script
    d = new.as_dict()
    assert d["distributed"] == "2026.8.0" and isinstance(d["memory_limit_paths"], list)


def test_worker_command_needs_nothing_on_path() -> None:
    assert dc.worker_command("/x/python") == ["/x/python", "-m", "distributed.cli.dask_worker"]


# --- nworkers / nthreads --------------------------------------------------------------------


def test_nprocesses_nthreads_known_values() -> None:
    # The examples in distributed's own docstring.
    assert dc.nprocesses_nthreads(4) == (4, 1)
    assert dc.nprocesses_nthreads(32) == (8, 4)
    assert dc.nprocesses_nthreads(7) == (7, 1)
    assert dc.nprocesses_nthreads(12) == (4, 3)


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
        n, t = dc.resolve_nworkers_nthreads(nworkers, nthreads, cpu)
    except dc.WorkerArgsError:
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
        assert (n, t) == dc.nprocesses_nthreads(cpu)
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
    assert dc.resolve_nworkers_nthreads(nworkers, nthreads, cpu) == expected


@pytest.mark.parametrize("bad", ["0", "-9", "two", "1.5", ""])
def test_resolve_nworkers_rejects(bad: str) -> None:
    with pytest.raises(dc.WorkerArgsError):
        dc.resolve_nworkers_nthreads(bad, None, 8)


def test_nprocs_alias() -> None:
    old = dc.nworkers_options(dc.Version(2022, 9, 2))
    assert parse_worker_args(["--nprocs", "4"], old).nworkers == "4"
    with pytest.raises(dc.WorkerArgsError, match="both --nprocs and --nworkers"):
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
        assert dc.cpu_count(proc, sys_, affinity=8, dask_version=version) == 2
        assert dc.cpu_count(proc, sys_, affinity=1, dask_version=version) == 1


def test_cpu_count_v1_unlimited(tmp_path: Path) -> None:
    proc, sys_ = make_roots(tmp_path)
    put(sys_, "fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    put(sys_, "fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    put(sys_, "fs/cgroup/cpu.max", "100000 100000\n")  # never reached: v1 answered
    assert dc.cpu_count(proc, sys_, affinity=8, dask_version=NEW) == 8


def test_cpu_count_v2_from_the_last_line_only_since_2022_10(tmp_path: Path) -> None:
    proc, sys_ = make_roots(tmp_path, "1:cpu:/a\n0::/kubepods/pod1/c1\n")
    put(sys_, "fs/cgroup/kubepods/pod1/c1/cpu.max", "250000 100000\n")
    assert dc.cpu_count(proc, sys_, affinity=8, dask_version=NEW) == 3
    assert dc.cpu_count(proc, sys_, affinity=8, dask_version=V("2022.10.0")) == 3
    # dask 2022.9.x had no v2 branch.
    assert dc.cpu_count(proc, sys_, affinity=8, dask_version=OLD) == 8


@pytest.mark.parametrize("content", ["max 100000\n", "garbage", "", "0 100000", "1 2 3"])
def test_cpu_count_v2_no_quota(tmp_path: Path, content: str) -> None:
    proc, sys_ = make_roots(tmp_path)
    put(sys_, "fs/cgroup/cpu.max", content)
    assert dc.cpu_count(proc, sys_, affinity=4, dask_version=NEW) == 4


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
        got = dc.cpu_count(proc, sys_, affinity=affinity, dask_version=NEW)
    cap = math.ceil(quota / period)
    assert got == (min(affinity, cap) if cap > 0 else affinity)


# --- MEMORY_LIMIT --------------------------------------------------------------------------

GiB = 2**30


def test_memory_limit_paths_per_release() -> None:
    assert dc.memory_limit_paths(V("2022.9.1")) == ("fs/cgroup/memory/memory.limit_in_bytes",)
    four = dc.memory_limit_paths(V("2022.9.2"))
    assert len(four) == 4 and "fs/cgroup/memory.max" in four
    assert dc.memory_limit_paths(V("2023.9.3")) == four
    assert dc.memory_limit_paths(V("2023.10.0")) == (*four, "fs/cgroup/memory.low")
    assert dc.memory_limit_paths(V("2026.8.0")) == dc.DASK_MEMORY_LIMIT_PATHS


def test_memory_low_counts_from_2023_10(tmp_path: Path) -> None:
    _, sys_ = make_roots(tmp_path)
    put(sys_, "fs/cgroup/memory.max", "max\n")
    put(sys_, "fs/cgroup/memory.low", f"{GiB}\n")
    total = 16 * GiB
    assert dc.dask_system_memory_limit(total, sys_, -1, V("2023.9.3")) == total
    assert dc.dask_system_memory_limit(total, sys_, -1, V("2023.10.0")) == GiB


def test_v2_is_invisible_before_2022_9_2(tmp_path: Path) -> None:
    _, sys_ = make_roots(tmp_path)
    put(sys_, "fs/cgroup/memory.max", f"{GiB}\n")
    assert dc.dask_system_memory_limit(8 * GiB, sys_, -1, V("2022.9.1")) == 8 * GiB
    assert dc.dask_system_memory_limit(8 * GiB, sys_, -1, V("2022.9.2")) == GiB


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
        read = dc.memory_limit_paths(V(version))
        for rel, content in zip(dc.DASK_MEMORY_LIMIT_PATHS, contents, strict=True):
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
        got = dc.dask_system_memory_limit(total, sys_, rlimit, V(version))
    assert got == expected
    assert 0 < got <= total
