"""The `dask-safe-worker` console script: a click-free fast path for `--print-limit`.

Host-side scripts call `dask-safe-worker --print-limit` before every container start, and
its start-up time is a goal (docs/benchmarks.md): click alone costs ~13 ms to import. When
the command line is `--print-limit` plus worker arguments and nothing else of ours is set,
the budget is computed here with the same functions and default settings the full command
uses. Anything else, and every error, goes through the full command, which explains it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

# Our option names, as cli derives them from its click definitions; tests/test_cli.py
# (test_fast_path_knows_every_option) keeps the two equal.
OUR_VALUE_NAMES: frozenset[str] = frozenset(
    {
        "--reserve",
        "--min-worker-memory",
        "--nanny-allowance",
        "--cgroup-write",
        "--cgroup-child",
        "--memory-high-fraction",
        "--swap-max",
        "--worker-command",
        "--log-format",
        "--plan-file",
        "--follow-interval",
    }
)
OUR_FLAG_NAMES: frozenset[str] = frozenset(
    {
        "--clamp-memory-limit",
        "--dry-run",
        "--print-limit",
        "--init",
        "--no-init",
        "--init-process-group",
        "--worker-help",
        "--version",
        "--follow",
        "--help",
        "-h",
    }
)
ENV_PREFIX = "DASK_SAFE_WORKER_"


def _plainly_valid(args: Sequence[str], values: frozenset[str], flags: frozenset[str]) -> bool:
    """Known options and at most one positional (the scheduler): what `dask worker`
    surely accepts. Anything else goes to the full command, which checks it against the
    release's click command and explains a refusal."""
    positionals, i = 0, 0
    while i < len(args):
        name, eq, _ = args[i].partition("=")
        if name in values:
            i += 1 if eq else 2
            continue
        if args[i] in flags:
            i += 1
            continue
        if args[i].startswith("-"):
            return False
        positionals += 1
        i += 1
    return positionals <= 1 and i == len(args)


def fast_print_limit(argv: Sequence[str], environ: dict[str, str]) -> int | None:
    """The budget for a plain `--print-limit`, or None where the full command must decide."""
    if any(name.startswith(ENV_PREFIX) for name in environ):
        return None
    from . import dask_compat
    from .cgroup_write import DEFAULT_CHILD_NAME
    from .measure import measure
    from .plan import PlanError, Settings, make_plan
    from .siblings import read_siblings, with_siblings
    from .worker_args import parse_worker_args, split_argv

    # The same split the full command makes, so `--name --print-limit` stays a worker name.
    ours, theirs = split_argv(argv, OUR_VALUE_NAMES, OUR_FLAG_NAMES)
    if ours != ["--print-limit"]:
        return None
    release = dask_compat.installed_distributed_version()
    try:
        dask_compat.check_supported(release)
        options = dask_compat.worker_options(release)
        if not _plainly_valid(theirs, options.values, options.flags - {"--help", "--version"}):
            return None
        wargs = parse_worker_args(theirs, dask_compat.nworkers_options(release))
        if wargs.version_only:
            return None
        m = measure()
        siblings = read_siblings(m, DEFAULT_CHILD_NAME)
        plan = make_plan(
            with_siblings(m, siblings), wargs, Settings(supervised=os.getpid() == 1), siblings
        )
    except (dask_compat.UnsupportedDistributedError, PlanError, OSError, ValueError):
        # WorkerArgsError is a ValueError. The full command reports each of these.
        return None
    return plan.budget


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    budget = fast_print_limit(args, dict(os.environ))
    if budget is not None:
        print(budget)
        return
    from .cli import main as full_main

    full_main(args)
