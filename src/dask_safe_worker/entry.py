"""The `dask-safe-worker` console script: a click-free fast path for `--print-limit`.

Host-side scripts call `dask-safe-worker --print-limit` before every container start
(entrypoints/host-prestart.sh adds `--cgroup-write never`), and its start-up time is a
goal (docs/benchmarks.md): click alone costs ~13 ms to import. When the command line is
`--print-limit` plus worker arguments and options that only shape or check the budget
(from argv or `DASK_SAFE_WORKER_*`), the budget is computed here from the same option
table (`options`), parsers and functions the full command uses. Anything else, and every
error, goes through the full command, which explains it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence


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


def fast_print_limit(argv: Sequence[str], environ: Mapping[str, str]) -> int | None:
    """The budget for a plain `--print-limit`, or None where the full command must decide."""
    from .cgroup.our_limit import with_operators_limit
    from .cgroup.pool import find_pool, plan_inputs
    from .dask_compat.dask_worker import nworkers_options, worker_options
    from .dask_compat.release import UnsupportedDistributedError, check_supported, installed_release
    from .measure import measure, unreadable_problem
    from .options import FLAG_NAMES, VALUE_NAMES, fast_options
    from .plan import PlanError, make_plan
    from .records import replace
    from .worker_args import parse_worker_args, split_argv

    # The same split the full command makes, so `--name --print-limit` stays a worker name.
    ours, theirs = split_argv(argv, VALUE_NAMES, FLAG_NAMES)
    opts = fast_options(ours, environ)
    if opts is None:
        return None
    release = installed_release()
    try:
        check_supported(release.distributed)
        options = worker_options(release.distributed)
        if not _plainly_valid(theirs, options.values, options.flags - {"--help", "--version"}):
            return None
        wargs = parse_worker_args(theirs, nworkers_options(release.distributed))
        if wargs.version_only:
            return None
        m, _ = with_operators_limit(measure(release=release), environ)
        if m.unreadable and unreadable_problem(
            m, wargs.memory_limit is not None, opts.allow_unreadable_cgroup
        ):
            return None  # the full command refuses it, with the reason
        # Read-only: a query neither makes the pool's directory nor takes its lock.
        pool = find_pool(m, environ, create=False)
        m, siblings, view = plan_inputs(m, opts.cgroup_child, pool, os.getpid())
        settings = replace(opts.settings(os.getpid()), settled=True)
        plan = make_plan(m, wargs, settings, siblings, view)
    except (UnsupportedDistributedError, PlanError, OSError, ValueError):
        # WorkerArgsError is a ValueError. The full command reports each of these.
        return None
    return plan.budget


def main(argv: Sequence[str] | None = None) -> None:
    if os.getpid() == 1:
        # PID 1 drops a signal it has no handler for; blocked, it waits instead, for the
        # supervisor or for the check before the worker's exec (run_worker). Later,
        # planning would leave a window in which `docker stop` is ignored for 10 s.
        from .supervise import defer_signals

        defer_signals()
    args = list(sys.argv[1:] if argv is None else argv)
    budget = fast_print_limit(args, dict(os.environ))
    if budget is not None:
        print(budget)
        return
    from .cli import main as full_main

    full_main(args)
