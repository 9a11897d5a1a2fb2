"""Parity with the installed dask/distributed release: our replicas against the real thing.

dask and distributed are imported inside the tests only, so that these also run in the
compatibility matrix (scripts/matrix.py) against each release. The scenarios that depend
on files at the root of /sys/fs/cgroup run the real dask in a private mount namespace
with a fixture tree bind-mounted over /sys/fs/cgroup: nothing of the host's cgroups is
read or written.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
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
from dask_safe_worker.dask_compat.distributed_system import memory_limit
from dask_safe_worker.dask_compat.features import release_features
from dask_safe_worker.dask_compat.release import check_supported, installed_release
from dask_safe_worker.plan import resolve_user_memory_limit
from dask_safe_worker.worker_args import parse_worker_args

# Resolved once, as a start does.
RELEASE = installed_release()
INSTALLED = RELEASE.distributed
NWORKERS = nworkers_options(INSTALLED)
GiB, MiB = 2**30, 2**20


def test_installed_release_is_supported() -> None:
    check_supported(INSTALLED)


# --- the option table --------------------------------------------------------------------


def click_option_table() -> tuple[set[str], set[str], set[str]]:
    import click
    from distributed.cli.dask_worker import main

    values: set[str] = set()
    flags: set[str] = set()
    multiple: set[str] = set()
    for param in main.params:
        if not isinstance(param, click.Option):
            continue
        names = [*param.opts, *param.secondary_opts]
        (flags if param.is_flag else values).update(names)
        if param.multiple:
            multiple.update(names)
    return values, flags, multiple


def test_option_table_matches_click() -> None:
    values, flags, multiple = click_option_table()
    table = worker_options(INSTALLED)
    assert set(table.values) == values
    assert set(table.flags) == flags | {"--help"}
    assert set(table.multiple) == multiple
    # With the release unknown, the union must still cover this release.
    assert values <= WORKER_VALUE_OPTIONS
    assert flags <= WORKER_FLAG_OPTIONS


def test_worker_argv_table_read_from_source_matches_click() -> None:
    """worker_cli reads the click command from source with ast (issue 13 row 3): in every
    matrix cell it must see the same options as the imported command."""
    from dask_safe_worker import worker_cli

    values, flags, multiple = click_option_table()
    table = worker_cli.option_table()
    assert table.source == "ast"
    options = [p for p in table.params if p.kind == "option"]
    assert {n for p in options if not p.is_flag for n in p.opts} == values
    assert {n for p in options if p.is_flag for n in (*p.opts, *p.secondary_opts)} == flags
    assert {n for p in options if p.multiple for n in p.opts} == multiple


def test_nworkers_options_match_click() -> None:
    values, _, _ = click_option_table()
    assert set(nworkers_options(INSTALLED)) == values & {"--nworkers", "--nprocs"}


def test_unknown_options_are_rejected_by_dask_worker() -> None:
    """Why an option missing from the table matters: `dask worker` refuses it (through
    its preload-argv check), so `--nprocs` after 2022.10 is an error, not an alias."""
    import click
    from distributed.cli.dask_worker import main

    for name in sorted(WORKER_VALUE_OPTIONS - worker_options(INSTALLED).values):
        with pytest.raises(click.UsageError):
            main.make_context("dask-worker", ["tcp://127.0.0.1:1", name, "2"])


def test_worker_command_runs_this_release() -> None:
    out = subprocess.run(
        [*worker_command(sys.executable), "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(INSTALLED).rsplit(".", 1)[0] in out.stdout + out.stderr


def test_release_features_match_the_installed_release() -> None:
    import distributed
    from distributed import Worker

    features = release_features(RELEASE)
    assert features.worker_memory_limit_alias == ("memory_limit" in vars(Worker))
    scripts = {
        e.name
        for e in __import__("importlib.metadata").metadata.distribution("distributed").entry_points
        if e.group == "console_scripts"
    }
    assert features.dask_worker_script == ("dask-worker" in scripts)
    worker_cli = Path(distributed.__file__).parent / "cli/dask_worker.py"
    named = 'name="worker"' in worker_cli.read_text()
    assert features.dask_cli_worker == named


# --- nworkers / nthreads ---------------------------------------------------------------------


def test_nprocesses_nthreads_matches_distributed() -> None:
    from distributed.deploy.utils import nprocesses_nthreads as theirs

    for n in range(1, 257):
        assert nprocesses_nthreads(n) == theirs(n), n


def click_params(args: list[str]) -> dict[str, Any] | None:
    """What `dask worker` itself parses from `args`; None if it rejects them."""
    import click
    from distributed.cli.dask_worker import main

    try:
        return dict(main.make_context("dask-worker", list(args)).params)
    except click.UsageError:
        return None


values_nworkers = st.sampled_from(["1", "2", "-1", "auto", "3", "0", " 2"])
values_nthreads = st.sampled_from(["0", "1", "4", "16"])
values_memory = st.sampled_from(["auto", "2GiB", "0.5", "0", "300MiB", "1e9"])


def option(name: str, values: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    return st.tuples(values, st.booleans()).map(
        lambda vb: [f"{name}={vb[0]}"] if vb[1] else [name, vb[0]]
    )


def argv_strategy() -> st.SearchStrategy[list[str]]:
    names = nworkers_options(INSTALLED)
    pieces = st.one_of(
        st.sampled_from(names).flatmap(lambda n: option(n, values_nworkers)),
        option("--nthreads", values_nthreads),
        option("--memory-limit", values_memory),
        st.sampled_from([["--nanny"], ["--no-nanny"], ["--no-dashboard"]]),
        # An option value that looks like an option: it must stay a value.
        st.sampled_from([["--name", "--nworkers"], ["--name", "--memory-limit"]]),
    )
    return st.lists(pieces, max_size=6).map(
        lambda ps: ["tcp://127.0.0.1:1", *[t for p in ps for t in p]]
    )


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(argv_strategy())
def test_worker_args_and_resolution_match_click(args: list[str]) -> None:
    """parse_worker_args + resolve_nworkers_nthreads against click's parse of the real
    `dask worker` command and dask's documented rule (dask_worker.main)."""
    from dask.system import CPU_COUNT

    params = click_params(args)
    if params is None:
        return
    nprocs = params.get("nprocs")
    if nprocs is not None and params["n_workers"] is not None:
        # dask itself exits: "Both --nprocs and --nworkers were specified"; so do we.
        with pytest.raises(WorkerArgsError, match="both"):
            parse_worker_args(args, NWORKERS)
        return
    ours = parse_worker_args(args, NWORKERS)
    theirs_nworkers = nprocs if nprocs is not None else params["n_workers"]
    assert ours.nworkers == theirs_nworkers
    assert (ours.nthreads or 0) == params["nthreads"]
    assert (ours.memory_limit if ours.memory_limit is not None else "auto") == params[
        "memory_limit"
    ]
    assert ours.nanny == params["nanny"]

    # dask_worker.main's rule, step by step, from click's values.
    n_workers: Any = theirs_nworkers
    nthreads = params["nthreads"]
    if n_workers == "auto":
        from distributed.deploy.utils import nprocesses_nthreads

        n_workers, nthreads = nprocesses_nthreads(CPU_COUNT)
    elif n_workers is None:
        n_workers = 1
    else:
        n_workers = int(n_workers)
    if n_workers < 0:
        n_workers = CPU_COUNT + 1 + n_workers
    if n_workers <= 0:
        with pytest.raises(WorkerArgsError):
            resolve_nworkers_nthreads(ours.nworkers, ours.nthreads, CPU_COUNT)
        return
    if not nthreads:
        nthreads = CPU_COUNT // n_workers
    nthreads = nthreads or CPU_COUNT  # Nanny and Worker: `nthreads or CPU_COUNT`
    assert resolve_nworkers_nthreads(ours.nworkers, ours.nthreads, CPU_COUNT) == (
        n_workers,
        nthreads,
    )


def test_scanner_ignores_nprocs_where_dask_worker_rejects_it() -> None:
    if "--nprocs" in worker_options(INSTALLED).values:
        pytest.skip("--nprocs is an alias of --nworkers in this release")
    args = ["tcp://127.0.0.1:1", "--nprocs", "2"]
    assert click_params(args) is None
    try:
        parsed = parse_worker_args(args, NWORKERS)
    except WorkerArgsError:
        return  # refusing up front, as dask worker would, is right too
    assert parsed.nworkers is None


def test_nanny_and_worker_fall_back_to_cpu_count() -> None:
    """The `nthreads or CPU_COUNT` step that resolve_nworkers_nthreads relies on."""
    import distributed

    root = Path(distributed.__file__).parent
    assert "nthreads or CPU_COUNT" in (root / "nanny.py").read_text()


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args",
    # auto overrides --nthreads; more processes than CPUs get 0 threads from dask_worker
    # and then CPU_COUNT from Nanny/Worker. The simpler rules are covered through click.
    [["--nworkers", "auto", "--nthreads", "3"], ["--nworkers", "+{cpus_plus_one}"]],
    ids=["auto", "more-than-cpus"],
)
def test_real_dask_worker_processes_and_threads(args: list[str]) -> None:
    """The real `dask worker` starts the processes and threads we predict."""
    from dask.system import CPU_COUNT
    from distributed import Client

    from scheduler_util import scheduler

    args = [a.format(cpus_plus_one=CPU_COUNT + 1) for a in args]
    parsed = parse_worker_args(args, NWORKERS)
    nworkers, nthreads = parsed.nworkers, parsed.nthreads
    expected_n, expected_t = resolve_nworkers_nthreads(nworkers, nthreads, CPU_COUNT)
    with scheduler() as address:
        proc = subprocess.Popen(
            [
                *worker_command(sys.executable),
                address,
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--name",
                "parity",
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            with Client(address, timeout=30) as client:
                client.wait_for_workers(expected_n, timeout=120)
                workers = client.scheduler_info()["workers"].values()
        finally:
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    expected_names = {"parity"} if expected_n == 1 else {f"parity-{i}" for i in range(expected_n)}
    assert {str(w["name"]) for w in workers} == expected_names
    assert {w["nthreads"] for w in workers} == {expected_t}


# --- CPU_COUNT and MEMORY_LIMIT -------------------------------------------------------------


def test_cpu_count_matches_dask_here() -> None:
    import dask.system

    assert cpu_count(dask=RELEASE.dask) == dask.system.cpu_count()


def test_memory_limit_matches_distributed_here() -> None:
    import distributed.system
    import psutil  # type: ignore[import-untyped,unused-ignore]

    ours = memory_limit(psutil.virtual_memory().total, distributed=INSTALLED)
    assert ours == distributed.system.memory_limit() == distributed.system.MEMORY_LIMIT


def namespace_unusable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for a private mount namespace"
    if shutil.which("unshare") is None:
        return "needs unshare(1)"
    return None


REAL_DASK = """
import json, subprocess, sys, psutil, dask.system, distributed.system
results = {}
for name, root in json.loads(sys.argv[1]).items():
    subprocess.run(["mount", "--bind", root, "/sys/fs/cgroup"], check=True)
    try:
        results[name] = {"cpu": dask.system.cpu_count(),
                         "memory": distributed.system.memory_limit(),
                         "total": psutil.virtual_memory().total}
    finally:
        subprocess.run(["umount", "/sys/fs/cgroup"], check=True)
print(json.dumps(results))
"""


def run_real_dask_over(roots: dict[str, Path]) -> dict[str, dict[str, int]]:
    """dask's CPU count and distributed's memory limit with each tree mounted over
    /sys/fs/cgroup in turn, in a mount namespace of its own (the host's mounts stay as
    they are). One process for all trees: importing distributed costs seconds here."""
    out = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-c",
            REAL_DASK,
            json.dumps({name: str(root) for name, root in roots.items()}),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, dict[str, int]] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def own_last_cgroup_path() -> str:
    """The path dask's v2 CPU rule takes from /proc/self/cgroup: the last line's."""
    path = Path("/proc/self/cgroup").read_text().strip().split(":")[-1]
    return path if path.endswith("/") else f"{path}/"


UNLIMITED_V1 = "9223372036854771712\n"

# Files relative to the cgroup mount root; "{own}" is where dask looks for cpu.max.
SCENARIOS: dict[str, dict[str, str]] = {
    "v1-limits": {
        "memory/memory.limit_in_bytes": f"{3 * GiB}\n",
        "memory/memory.soft_limit_in_bytes": UNLIMITED_V1,
        "cpu,cpuacct/cpu.cfs_quota_us": "150000\n",
        "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    },
    "v1-unlimited-cpuacct-cpu": {
        "memory/memory.limit_in_bytes": UNLIMITED_V1,
        "memory/memory.soft_limit_in_bytes": f"{2 * GiB}\n",
        "cpuacct,cpu/cpu.cfs_quota_us": "-1\n",
        "cpuacct,cpu/cpu.cfs_period_us": "100000\n",
    },
    "v2-max-high-low": {
        "memory.max": f"{2 * GiB}\n",
        "memory.high": "max\n",
        "memory.low": f"{512 * MiB}\n",  # counts only from 2023.10
        "{own}cpu.max": "50000 100000\n",  # counts only from dask 2022.10
    },
    "v2-high-only": {
        "memory.max": "max\n",
        "memory.high": f"{3 * GiB // 2}\n",
        "{own}cpu.max": "max 100000\n",
    },
    "v2-low-only": {"memory.max": "max\n", "memory.low": f"{GiB}\n"},
    "empty": {},
    "garbage": {
        "memory/memory.limit_in_bytes": "lots\n",
        "memory.max": "\n",
        "memory.high": "-5\n",
        "cpu,cpuacct/cpu.cfs_quota_us": "x\n",
        "{own}cpu.max": "100000\n",
    },
}


@pytest.fixture(scope="module")
def real_over_scenarios(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    reason = namespace_unusable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"parity in a mount namespace cannot run in CI: {reason}")
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("cgroup-trees")
    own = own_last_cgroup_path().lstrip("/")
    roots: dict[str, Path] = {}
    for scenario, files in SCENARIOS.items():
        root = base / scenario / "sys/fs/cgroup"
        root.mkdir(parents=True)
        for rel, content in files.items():
            path = root / rel.replace("{own}", own)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        roots[scenario] = root
    return {"roots": roots, "real": run_real_dask_over(roots)}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_cpu_count_and_memory_limit_match_in_a_namespace(
    scenario: str, real_over_scenarios: dict[str, Any]
) -> None:
    real = real_over_scenarios["real"][scenario]
    sys_root = real_over_scenarios["roots"][scenario].parent.parent
    affinity = len(os.sched_getaffinity(0))
    assert cpu_count(Path("/proc"), sys_root, affinity, dask=RELEASE.dask) == real["cpu"]
    got = memory_limit(real["total"], sys_root, distributed=INSTALLED)
    assert got == real["memory"]


# --- a user's --memory-limit -------------------------------------------------------------------

sizes = st.one_of(
    st.just("auto"),
    st.integers(min_value=0, max_value=2**50).map(str),
    st.floats(min_value=0, max_value=1).map(repr),
    st.floats(min_value=1, max_value=1e15, allow_infinity=False).map(repr),
    st.tuples(
        st.one_of(
            st.integers(min_value=0, max_value=10**6).map(str),
            st.decimals(min_value=0, max_value=10**4, places=2).map(str),
        ),
        st.sampled_from(
            [
                *["", "B", "kB", "KiB", "MB", "MiB", "GB", "GiB", "TB", "TiB", "PB", " MiB"],
                *["mib", "kb", "K", "M", "G", "gb", "mb", "k", "KB", "Mi", "Gi", " ", "X"],
            ]
        ),
    ).map("".join),
    st.sampled_from(["inf", "nan", "-1", "-0.5", "1e3", "1_000", "", "  2GiB  ", "5 GB"]),
    st.text(max_size=8),
)


def dask_parse_memory_limit(value: str, nthreads: int, cpu: int) -> int | None:
    from distributed.worker_memory import parse_memory_limit

    kwargs: dict[str, Any] = {}
    if "logger" in inspect.signature(parse_memory_limit).parameters:
        kwargs["logger"] = logging.getLogger("parity")
    result: int | None = parse_memory_limit(value, nthreads, total_cores=cpu, **kwargs)
    return result


@settings(max_examples=500)
@given(sizes, st.integers(min_value=1, max_value=128), st.integers(min_value=1, max_value=128))
def test_user_memory_limit_matches_parse_memory_limit(value: str, nthreads: int, cpu: int) -> None:
    from distributed.system import MEMORY_LIMIT

    try:
        theirs: int | Exception | None = dask_parse_memory_limit(value, nthreads, cpu)
    except Exception as exc:
        theirs = exc
    try:
        ours: int | Exception | None = resolve_user_memory_limit(value, nthreads, cpu, MEMORY_LIMIT)
    except Exception as exc:
        ours = exc
    if isinstance(theirs, Exception):
        assert isinstance(ours, Exception), f"dask rejects {value!r} ({theirs!r}), we gave {ours}"
    elif (isinstance(theirs, int) and theirs < 0) or not value.strip():
        # dask computes a negative limit (the worker then fails to start) or reads ""
        # as 1 byte: refused here before anything is written (issue 13 row 7).
        assert isinstance(ours, ValueError), value
    else:
        assert ours == theirs, value
