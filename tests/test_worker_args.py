"""Argument pass-through: ours out, theirs byte for byte and in order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_safe_worker.cli import OUR_FLAG_OPTIONS, OUR_VALUE_OPTIONS
from dask_safe_worker.dask_compat.dask_worker import (
    WORKER_FLAG_OPTIONS,
    WORKER_VALUE_OPTIONS,
    WorkerArgsError,
)
from dask_safe_worker.worker_args import (
    launch_problem,
    parse_worker_args,
    split_argv,
    with_memory_limit,
)

WORKER_OPTIONS = WORKER_VALUE_OPTIONS | WORKER_FLAG_OPTIONS


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    return split_argv(argv, OUR_VALUE_OPTIONS, OUR_FLAG_OPTIONS)


def test_our_option_names_never_collide_with_dask_worker() -> None:
    # --help and --version are ours on purpose (issue 15 item 4): they describe this tool.
    assert {"--help", "--version"} == (OUR_VALUE_OPTIONS | OUR_FLAG_OPTIONS) & WORKER_OPTIONS


worker_tokens = st.lists(
    st.one_of(
        st.sampled_from(sorted(WORKER_OPTIONS - {"--help", "--version"})),
        st.text(min_size=0, max_size=6).filter(
            lambda t: t.split("=")[0] not in OUR_VALUE_OPTIONS | OUR_FLAG_OPTIONS
        ),
        st.just("--"),
        st.just("tcp://127.0.0.1:8786"),
    ),
    max_size=12,
)


@given(worker_tokens)
def test_worker_args_pass_through_unchanged(argv: list[str]) -> None:
    ours, theirs = split(argv)
    assert ours == [] and theirs == argv


@given(worker_tokens, st.integers(0, 12))
def test_ours_are_taken_out_anywhere_before_double_dash(argv: list[str], at: int) -> None:
    at = min(at, argv.index("--") if "--" in argv else len(argv))
    # Don't split a worker option from its value.
    if at > 0 and argv[at - 1] in WORKER_OPTIONS and "=" not in argv[at - 1]:
        return
    mixed = [*argv[:at], "--reserve", "10%", "--dry-run", *argv[at:]]
    ours, theirs = split(mixed)
    assert ours == ["--reserve", "10%", "--dry-run"]
    assert theirs == argv


def test_values_of_worker_options_are_not_ours() -> None:
    ours, theirs = split(["tcp://s:8786", "--name", "--dry-run", "--print-limit"])
    assert theirs == ["tcp://s:8786", "--name", "--dry-run"]
    assert ours == ["--print-limit"]


def test_everything_after_double_dash_is_theirs() -> None:
    ours, theirs = split(["--dry-run", "--", "--dry-run", "--reserve", "1"])
    assert ours == ["--dry-run"] and theirs == ["--", "--dry-run", "--reserve", "1"]


def test_parse_worker_args_last_wins_and_equals_form() -> None:
    argv = ["s", "--nworkers", "9", "--nthreads=3", "--nworkers=2", "--no-nanny"]
    args = parse_worker_args([*argv, "--memory-limit=1G"], ("--nworkers",))
    assert args.nworkers == "2" and args.nthreads == 3
    assert not args.nanny and args.memory_limit == "1G"
    assert parse_worker_args(["--", "--nthreads", "x"], ("--nworkers",)).nthreads is None


def test_nprocs_counts_only_where_it_is_an_alias() -> None:
    old = ("--nworkers", "--nprocs")
    assert parse_worker_args(["s", "--nprocs", "4"], old).nworkers == "4"
    assert parse_worker_args(["s", "--nprocs", "4"], ("--nworkers",)).nworkers is None
    with pytest.raises(WorkerArgsError, match="both"):
        parse_worker_args(["s", "--nprocs", "4", "--nworkers", "2"], old)


@pytest.mark.parametrize(
    "argv", [["--nthreads", "two"], ["--nthreads"], ["--nthreads", "-1"], ["--memory-limit"]]
)
def test_invalid_worker_args(argv: list[str]) -> None:
    with pytest.raises(WorkerArgsError):
        parse_worker_args(argv, ("--nworkers",))


def test_with_memory_limit_adds_before_double_dash_or_replaces() -> None:
    assert with_memory_limit(["s", "--", "x"], 5) == ["s", "--memory-limit", "5", "--", "x"]
    assert with_memory_limit(["s"], 5) == ["s", "--memory-limit", "5"]
    assert with_memory_limit(["--memory-limit", "9G", "s"], 5) == ["--memory-limit", "5", "s"]
    assert with_memory_limit(["--memory-limit=9G"], 5) == ["--memory-limit=5"]


@pytest.mark.parametrize(
    ("args", "n_workers", "nanny", "expected"),
    [
        (["--no-nanny"], 2, False, "--no-nanny argument when n_workers > 1"),
        (["--contact-address", "tcp://127.0.0.1:9000"], 1, True, "Must specify --listen-address"),
        (["--listen-address", "tcp://127.0.0.1:9000"], 2, True, "when n_workers > 1"),
        (["--listen-address=tcp://127.0.0.1:9000", "--host", "127.0.0.1"], 1, True, "--host"),
        (["--no-nanny"], 1, False, None),
        (["--listen-address", "tcp://127.0.0.1:9000"], 1, True, None),
        # After `--`, tokens are the preloads' own.
        (["--", "--contact-address", "x"], 1, True, None),
    ],
)
def test_dask_workers_launch_refusals_are_found_before_any_write(
    args: list[str], n_workers: int, nanny: bool, expected: str | None
) -> None:
    problem = launch_problem(args, n_workers, nanny, True)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and expected in problem
