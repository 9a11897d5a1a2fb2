"""The command line as a user meets it: help, errors, exit codes, queries, pass-through.

Nothing here writes a cgroup: every run is a query (--dry-run, --print-limit) or uses
--cgroup-write never.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from cgroup_util import kernel_cgroups_usable, make_test_cgroup
from dask_safe_worker.events import SCHEMA_VERSION
from scheduler_util import audit_events

DSW = [sys.executable, "-m", "dask_safe_worker"]
NEVER = ["--cgroup-write", "never"]
MiB = 2**20
GiB = 2**30


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*DSW, *args], capture_output=True, text=True, timeout=120, env=full_env, check=False
    )


def test_help_explains_our_options_and_how_to_reach_the_workers() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    for text in (
        "--reserve",
        "--cgroup-write",
        "--print-limit",
        "DASK_SAFE_WORKER_RESERVE",
        "--worker-help",
        "Exit codes",
    ):
        assert text in proc.stdout


def test_worker_help_shows_dask_workers_options() -> None:
    proc = run("--worker-help", "--log-format", "none")
    assert proc.returncode == 0
    assert "--nworkers" in proc.stdout and "--memory-limit" in proc.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--reserve", "lots"],
        ["--cgroup-write", "sometimes"],
        ["--memory-high-fraction", "2"],
        ["tcp://127.0.0.1:1", "--nthreads", "two"],
        ["tcp://127.0.0.1:1", "--nworkers", "many"],
        ["tcp://127.0.0.1:1", "--memory-limit", "lots"],
        ["--reserve"],
    ],
)
def test_bad_input_is_a_usage_error_without_traceback(args: list[str], tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    proc = run("--plan-file", str(plan), *NEVER, *args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not plan.exists()


def test_budget_too_small_exits_3_before_anything(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    proc = run("--plan-file", str(plan), "--min-worker-memory", "1PiB", "tcp://127.0.0.1:1")
    assert proc.returncode == 3
    assert "too small" in proc.stderr and "Traceback" not in proc.stderr
    assert not plan.exists()


def test_missing_worker_command_exits_127() -> None:
    proc = run(*NEVER, "--worker-command", "/nonexistent/worker", "tcp://127.0.0.1:1")
    assert proc.returncode == 127
    assert "cannot run" in proc.stderr


def test_dry_run_prints_the_plan_and_passes_args_through() -> None:
    proc = run(
        "--dry-run",
        "tcp://127.0.0.1:1",
        "--name",
        "--dry-run",
        "--preload",
        "mymodule",
        "--",
        "--preload-arg",
    )
    assert proc.returncode == 0
    assert proc.stderr == ""
    doc = json.loads(proc.stdout)
    assert doc["schema"] == SCHEMA_VERSION
    limit = doc["plan"]["memory_limit_arg"]
    assert doc["argv"][-9:] == [
        "tcp://127.0.0.1:1",
        "--name",
        "--dry-run",
        "--preload",
        "mymodule",
        "--memory-limit",
        str(limit),
        "--",
        "--preload-arg",
    ]
    assert doc["cgroup_write"]["outcome"] is None


def test_print_limit_is_one_integer_of_bytes() -> None:
    proc = run("--print-limit")
    assert proc.returncode == 0 and proc.stderr == ""
    budget = int(proc.stdout)
    dry = json.loads(run("--dry-run").stdout)
    assert abs(budget - dry["plan"]["budget"]) < 256 * MiB
    meminfo = Path("/proc/meminfo").read_text()
    total = next(
        int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemTotal:")
    )
    assert 0 < budget <= total


def test_environment_variables_configure_and_stay_out_of_the_log() -> None:
    env = {"DASK_SAFE_WORKER_RESERVE": "0.5", "DASK_SAFE_WORKER_LOG_FORMAT": "json"}
    proc = run(*NEVER, "--worker-command", "true", "tcp://127.0.0.1:1", env=env)
    assert proc.returncode == 0, proc.stderr
    events = audit_events(proc.stderr)
    started = next(e for e in events if e["event"] == "cli.started")
    assert started["options"]["reserve"] == "<from environment>"
    plan = next(e for e in events if e["event"] == "plan.made")
    assert plan["reserve"] == pytest.approx(plan["budget"], rel=0.01)


def test_version_names_ours_and_distributeds() -> None:
    import distributed

    from dask_safe_worker import __version__

    proc = run("--version")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.splitlines() == [
        f"dask-safe-worker {__version__}",
        f"distributed {distributed.__version__}",  # type: ignore[attr-defined]
    ]


def test_short_h_is_our_help_and_writes_nothing(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    proc = run("-h", "--plan-file", str(plan), "tcp://127.0.0.1:1")
    assert proc.returncode == 0
    assert proc.stdout == run("--help").stdout
    assert "--worker-help" in proc.stdout
    assert not plan.exists()


def test_worker_argument_errors_point_to_worker_help() -> None:
    proc = run(*NEVER, "tcp://127.0.0.1:1", "--bogus-opt", "x")
    assert proc.returncode == 2
    assert "--worker-help" in proc.stderr
    assert "distributed.cli.dask_worker --help" not in proc.stderr


def test_dask_subcommand_entry_point() -> None:
    from dask_safe_worker.dask_compat.features import release_features
    from dask_safe_worker.dask_compat.release import installed_release

    if not release_features(installed_release()).dask_cli_worker:
        pytest.skip("dask < 2022.10 has no `dask` command line to plug into")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dask",
            "safe-worker",
            "--dry-run",
            "tcp://127.0.0.1:1",
            "--nworkers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["plan"]["n_workers"] == 2
    assert doc["argv"][-2] == "--memory-limit"


def test_fast_path_and_click_share_one_option_table() -> None:
    from dask_safe_worker import cli, options

    click_names = {
        o
        for p in cli.command.params
        if isinstance(p, click.Option)
        for o in (*p.opts, *p.secondary_opts)
    }
    assert click_names == options.VALUE_NAMES | options.FLAG_NAMES - options.HELP_NAMES
    envs = {p.envvar for p in cli.command.params if isinstance(p, click.Option) and p.envvar}
    assert envs == {o.env for o in options.OPTIONS if o.env is not None}
    assert all(str(e).startswith(options.ENV_PREFIX + "_") for e in envs)


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--print-limit"], {}),
        (["tcp://127.0.0.1:1", "--nworkers", "2", "--print-limit"], {}),
        (["--print-limit", "--name", "x", "--no-nanny"], {}),
        # entrypoints/host-prestart.sh's call, and the same configured from the environment
        (["--print-limit", "--cgroup-write", "never"], {}),
        (["--print-limit", "--cgroup-write", "never"], {"DASK_SAFE_WORKER_RESERVE": "128MiB"}),
        (["--print-limit", "--reserve=10%", "--nanny-allowance", "64MiB"], {}),
        (["--print-limit", "--nworkers", "2", "--min-worker-memory", "64MiB"], {}),
    ],
)
def test_fast_print_limit_agrees_with_the_full_command(
    args: list[str], env: dict[str, str]
) -> None:
    """Both paths, one after the other in a 1 GiB test cgroup: there the budget is the
    limit minus what the cgroup's other processes hold, so it does not move with the
    host's free memory (which other tests on this machine change by gigabytes)."""
    reason = kernel_cgroups_usable()
    if reason is not None:
        pytest.skip(reason)
    entry = [sys.executable, "-c", "from dask_safe_worker.entry import main; main()"]
    started: set[int] = set()
    with make_test_cgroup(started) as cg:
        cg.set_limit(GiB)
        run_env = {**os.environ, **env}
        fast = subprocess.run(
            cg.enter_command([*entry, *args]),
            capture_output=True,
            text=True,
            timeout=120,
            env=run_env,
        )
        assert fast.returncode == 0, fast.stderr
        dry = subprocess.run(
            cg.enter_command([*entry, "--dry-run", *[a for a in args if a != "--print-limit"]]),
            capture_output=True,
            text=True,
            timeout=120,
            env=run_env,
        )
        assert dry.returncode == 0, dry.stderr
    budget = json.loads(dry.stdout)["plan"]["budget"]
    assert int(fast.stdout) <= GiB
    assert abs(int(fast.stdout) - budget) < 32 * MiB


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--print-limit", "--reserve", "lots"], {}),
        (["--print-limit"], {"DASK_SAFE_WORKER_RESERVE": "lots"}),
        (["--print-limit", "--reserve", "1GiB", "--reserve", "2GiB"], {}),
        (["--print-limit", "--cgroup-write", "sometimes"], {}),
        (["--print-limit", "--log-format", "json"], {}),
        (["--print-limit"], {"DASK_SAFE_WORKER_LOG_FORMAT": "console"}),
        (["--print-limit"], {"DASK_SAFE_WORKER_INIT": "1"}),
        (["--print-limit", "--plan-file", "plan.json"], {}),
        (["--print-limit", "--worker-command", "dask cuda worker"], {}),
        (["--print-limit"], {"DASK_SAFE_WORKER_WORKER_COMMAND": "dask cuda worker"}),
        (["--print-limit", "--dry-run"], {}),
        (["--print-limit", "--reserve"], {}),
        (["--reserve", "1GiB"], {}),
        (["--name", "--print-limit"], {}),
        (["--print-limit", "--nthreads", "two"], {}),
        (["--print-limit", "--min-worker-memory", "1PiB"], {}),
        (["--print-limit", "--version"], {}),
        (["--print-limit", "--", "--preload-arg"], {}),
        (["--print-limit", "--bogus-opt"], {}),
        (["--print-limit", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], {}),
        (["--print-limit", "-h"], {}),
    ],
)
def test_anything_but_a_plain_print_limit_takes_the_full_command(
    args: list[str], env: dict[str, str]
) -> None:
    from dask_safe_worker.entry import fast_print_limit

    assert fast_print_limit(args, env) is None


def test_host_prestart_call_is_read_by_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """entrypoints/host-prestart.sh's exact call, configured from the environment: the
    click-free reading gives what click gives."""
    from dask_safe_worker import cli
    from dask_safe_worker.options import Options, fast_options
    from dask_safe_worker.sizes import Amount

    args = ["--print-limit", "--cgroup-write", "never"]
    env = {"DASK_SAFE_WORKER_RESERVE": "10%", "DASK_SAFE_WORKER_SWAP_MAX": "keep"}
    fast = fast_options(args, env)
    assert fast is not None
    assert fast.cgroup_write == "never"
    assert fast.reserve == Amount(fraction=0.1)
    assert fast.swap_max is None
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ctx = cli.command.make_context("dask-safe-worker", list(args))
    assert Options.from_values(ctx.params) == fast


def test_a_reserve_no_kernel_limit_can_hold_is_a_usage_error() -> None:
    # Issue 24 row 13: 1e19 bytes was planned, then refused as a budget too small (3).
    proc = run("--cgroup-write", "never", "--reserve", "1e19", "tcp://127.0.0.1:1")
    assert proc.returncode == 2, proc.stderr
    assert "larger than any kernel limit" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("option", "value"),
    [("--reserve", "1.5"), ("--reserve", "1"), ("--reserve", "4096"),
     ("--min-worker-memory", "256"), ("--nanny-allowance", "40")],
)  # fmt: skip
def test_a_bare_number_below_a_mebibyte_asks_for_a_unit(option: str, value: str) -> None:
    # Issue 22: `--reserve 1.5` and `--reserve 1` were silently a 1-byte reserve.
    for path in ([], ["--print-limit"]):  # the click path and the fast path
        proc = run(*path, "--cgroup-write", "never", option, value, "tcp://127.0.0.1:1")
        assert proc.returncode == 2, (path, proc.stdout, proc.stderr)
        assert "has no unit" in proc.stderr and "Traceback" not in proc.stderr


def test_a_bare_number_is_still_bytes_or_a_fraction() -> None:
    from dask_safe_worker.options import parse_reserve, parse_size
    from dask_safe_worker.sizes import Amount

    assert parse_reserve("0") == Amount(fraction=0.0)
    assert parse_reserve("0.15") == Amount(fraction=0.15)
    assert parse_reserve("1073741824") == Amount(bytes=2**30)
    assert parse_reserve("1.5GiB") == Amount(bytes=int(1.5 * 2**30))
    assert parse_size("0") == 0 and parse_size("1e9") == 10**9


def test_memory_limit_zero_is_said_to_turn_dasks_limit_off() -> None:
    # Issue 24 row 13: the warning read "0 B per worker"; 0 means no limit to dask.
    proc = run(
        "--no-follow", "--cgroup-write", "never", "--log-format", "none",
        "--worker-command", "true", "--memory-limit", "0", "tcp://127.0.0.1:1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "turns Dask's memory limit off" in proc.stderr and "0 B" not in proc.stderr
