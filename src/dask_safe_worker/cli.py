"""`dask-safe-worker [OUR OPTIONS] [ANY dask worker ARGS]`: measure, plan, limit, pass, run.

This module is the imperative shell: it reads options, calls the pure measurement and
planning code, and hands side effects to `cgroup_write`, `run_worker` and `supervise`.
It must not import dask or distributed: the worker does that after exec.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from . import __version__, dask_compat
from .audit import LOG_FORMATS, SCHEMA_VERSION, Audit, make_audit
from .cgroup_write import (
    DEFAULT_CHILD_NAME,
    MAX_LIMIT,
    WriteOptions,
    WriteOutcome,
    apply_limit,
    child_name_problem,
    intended_strategy,
)
from .env_options import env_option, env_var
from .event_line import worker_name
from .measure import Measurement, measure
from .plan import (
    DEFAULT_MIN_WORKER_MEMORY,
    DEFAULT_NANNY_ALLOWANCE,
    Plan,
    PlanError,
    Settings,
    make_plan,
)
from .siblings import read_siblings, with_siblings
from .sizes import Amount, parse_amount, parse_bytes
from .worker_args import WorkerArgs, parse_worker_args, split_argv, with_memory_limit

ENV_PREFIX = "DASK_SAFE_WORKER"
PLAN_FILE_ENV = f"{ENV_PREFIX}_PLAN_FILE"

EXIT_MEASURE_FAILED = 1
EXIT_USAGE = 2
EXIT_PLAN_REFUSED = 3
EXIT_WRITE_REQUIRED = 4
EXIT_UNSUPPORTED = 5

MiB = 2**20


class _AmountType(click.ParamType):  # type: ignore[type-arg]
    name = "SIZE|FRACTION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, Amount):
            return value
        try:
            return parse_amount(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class _SizeType(click.ParamType):  # type: ignore[type-arg]
    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            return value
        if not str(value).strip():
            # dask's parse_bytes reads "" as 1 byte; here that is always a mistake.
            self.fail("empty size", param, ctx)
        try:
            size = parse_bytes(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if size < 0:
            self.fail(f"{value!r} is negative", param, ctx)
        if size > MAX_LIMIT:
            self.fail(f"{value!r} is larger than any kernel limit", param, ctx)
        return size


class _FractionType(click.ParamType):  # type: ignore[type-arg]
    """A float in [0, 1): unlike click.FloatRange, NaN is refused (every comparison with
    NaN is false, so a range check alone lets it through)."""

    name = "FRACTION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not (math.isfinite(number) and 0 <= number < 1):
            self.fail(f"{value!r} is not at least 0 and below 1", param, ctx)
        return number


class _ChildNameType(click.ParamType):  # type: ignore[type-arg]
    name = "NAME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        problem = child_name_problem(str(value))
        if problem is not None:
            self.fail(f"must be one plain path component: {problem}", param, ctx)
        return str(value)


class _SwapType(click.ParamType):  # type: ignore[type-arg]
    name = "SIZE|keep"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or isinstance(value, int):
            return value
        if str(value) == "keep":
            return None
        return _SizeType().convert(value, param, ctx)


class _IntervalType(click.ParamType):  # type: ignore[type-arg]
    name = "SECONDS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from .follow import validate_interval

        try:
            return validate_interval(float(value))
        except ValueError as exc:
            self.fail(
                str(exc) if "interval" in str(exc) else f"{value!r} is not a number", param, ctx
            )


def _option(name: str, **kwargs: Any) -> click.Option:
    return env_option(ENV_PREFIX, name, **kwargs)


OUR_OPTIONS: list[click.Parameter] = [
    _option(
        "reserve",
        type=_AmountType(),
        default="0",
        show_default=True,
        help="Memory kept back from the budget for everything else: bytes (512MiB) "
        "or a fraction of the budget (0.1 or 10%).",
    ),
    _option(
        "min-worker-memory",
        type=_SizeType(),
        default=str(DEFAULT_MIN_WORKER_MEMORY),
        show_default="256MiB",
        help="Refuse to start (exit 3, nothing touched) when a worker would get less.",
    ),
    _option(
        "nanny-allowance",
        type=_SizeType(),
        default=str(DEFAULT_NANNY_ALLOWANCE),
        show_default="96MiB",
        help="Memory set aside for each nanny process, outside the workers' limits.",
    ),
    _option(
        "cgroup-write",
        type=click.Choice(["auto", "never", "required"]),
        default="auto",
        show_default=True,
        help="Enforce the budget as a kernel cgroup limit where permitted (auto), "
        "never, or fail with exit 4 if the kernel limit cannot be set (required).",
    ),
    _option(
        "cgroup-child",
        type=_ChildNameType(),
        default=DEFAULT_CHILD_NAME,
        show_default=True,
        help="Name of the child cgroup created when our own cgroup cannot be limited: one "
        "plain path component (no '/', not '.' or '..'); taken names get a unique suffix.",
    ),
    _option(
        "memory-high-fraction",
        type=_FractionType(),
        default=0.0,
        show_default=True,
        help="cgroup v2: also set memory.high to this fraction of the budget, a "
        "throttle zone before the hard limit (0 = off).",
    ),
    _option(
        "swap-max",
        type=_SwapType(),
        default="0",
        show_default=True,
        help="cgroup v2: memory.swap.max for the worker's cgroup ('keep' leaves it).",
    ),
    _option(
        "clamp-memory-limit",
        is_flag=True,
        help="Lower a --memory-limit you gave to the planned value when it does not "
        "fit the budget (by default it passes through unchanged).",
    ),
    _option(
        "worker-command",
        default=None,
        help="The command that starts the worker, e.g. 'dask cuda worker' "
        "[default: this Python's -m distributed.cli.dask_worker].",
    ),
    _option("dry-run", is_flag=True, help="Print the whole plan as JSON; change nothing."),
    _option(
        "print-limit",
        is_flag=True,
        help="Print the budget in bytes (for host-side scripts); change nothing.",
    ),
    _option(
        "log-format",
        type=click.Choice(list(LOG_FORMATS)),
        default="auto",
        show_default=True,
        help="Audit log on stderr: JSON lines, console, or none (auto: console on a TTY).",
    ),
    click.Option(
        ["--init/--no-init"],
        envvar=env_var(ENV_PREFIX, "init"),
        show_envvar=True,
        default=None,
        help="Supervise the worker like tini (forward signals, reap zombies) instead of "
        "exec'ing it [default: only when running as PID 1].",
    ),
    _option(
        "init-process-group",
        is_flag=True,
        help="With --init, forward signals to the worker's whole process group (tini -g).",
    ),
    _option(
        "plan-file",
        type=click.Path(dir_okay=False, writable=True),
        default=None,
        help="Where to record the plan as JSON for `dask-safe-audit`; its path is exported "
        f"to the worker as {PLAN_FILE_ENV} [default: a file in a private runtime directory].",
    ),
    _option(
        "follow",
        is_flag=True,
        help="Keep following memory after the start: re-measure every --follow-interval, "
        "and move every worker's and nanny's memory limit (and the kernel limit written "
        "at start) when the budget changes. Implies supervision (--init).",
    ),
    _option(
        "follow-interval",
        type=_IntervalType(),
        default="1",
        show_default=True,
        help="Seconds between two measurements with --follow.",
    ),
    _option(
        "worker-help",
        is_flag=True,
        help="Show `dask worker --help`: every option not listed here goes to the worker.",
    ),
    click.Option(
        ["--version"],
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=lambda ctx, _param, value: _print_version(ctx) if value else None,
        help="Show this tool's version and the installed distributed's, then exit.",
    ),
]

OUR_VALUE_OPTIONS = frozenset(
    o for p in OUR_OPTIONS if isinstance(p, click.Option) and not p.is_flag for o in p.opts
)
OUR_FLAG_OPTIONS = frozenset(
    o
    for p in OUR_OPTIONS
    if isinstance(p, click.Option) and p.is_flag
    for o in (*p.opts, *p.secondary_opts)
) | {"--help", "-h"}

EPILOG = """\b
Every other argument goes to `dask worker` unchanged and in order, e.g.
  dask-safe-worker tcp://scheduler:8786 --nthreads 2 --nworkers 2
Unless you give --memory-limit, a per-worker --memory-limit in bytes is added.
See `dask-safe-worker --worker-help` for the worker's own options.

\b
Exit codes: 0 ok (or the worker's own code), 1 measurement failed, 2 usage error,
3 budget too small, 4 --cgroup-write required but not possible, 5 unsupported
distributed release, 127 worker not found.
"""


class SafeWorkerCommand(click.Command):
    """Takes our options out of argv; all the rest is the worker's, byte for byte."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ours, theirs = split_argv(args, OUR_VALUE_OPTIONS, OUR_FLAG_OPTIONS)
        ctx.meta["dask_safe_worker.worker_args"] = theirs
        return super().parse_args(ctx, ours)


def _warn_memory_limit(plan: Plan, audit: Audit) -> None:
    """A --memory-limit above the budget passes through (dask keeps it), so the kernel
    limit, not Dask's spilling, may be what stops the worker: say so, and the way out."""
    from .sizes import format_bytes

    audit(
        "plan.user_memory_limit.warning",
        value=plan.user_memory_limit,
        resolved=plan.user_memory_limit_bytes,
        n_workers=plan.n_workers,
        budget=plan.budget,
        planned=plan.per_worker,
    )
    given = plan.user_memory_limit_bytes or 0
    click.echo(
        f"dask-safe-worker: warning: --memory-limit {plan.user_memory_limit} "
        f"({format_bytes(given)} per worker, {plan.n_workers} worker(s)) does not fit the "
        f"budget of {format_bytes(plan.budget)}; Dask may not spill before the kernel "
        f"limit; add --clamp-memory-limit to use {format_bytes(plan.per_worker)} instead",
        err=True,
    )


def _print_version(ctx: click.Context) -> None:
    release = dask_compat.installed_distributed_version()
    click.echo(f"dask-safe-worker {__version__}")
    click.echo(f"distributed {release if release is not None else 'not installed'}")
    ctx.exit(0)


def _fail(code: int, message: str, audit: Audit, event: str) -> NoReturn:
    audit(event, message=message, exit_code=code)
    click.echo(f"dask-safe-worker: {message}", err=True)
    sys.exit(code)


def _check_memory_high_kernel(opts: WriteOptions, audit: Audit) -> None:
    """Refuse our own memory.high on a kernel older than 5.9, before any write."""
    if not opts.memory_high_fraction or opts.mode == "never":
        return
    from .cgroup_parse import MEMORY_HIGH_MIN_KERNEL, parse_kernel_release
    from .proc_parse import ParseError

    try:
        # uname(2), as the kernel reports itself to this process (setarch's UNAME26
        # personality included).
        release = parse_kernel_release(os.uname().release)
    except ParseError as exc:
        message = f"--memory-high-fraction needs Linux 5.9 or later; cannot tell: {exc}"
        _fail(EXIT_USAGE, message, audit, "cli.usage.error")
    if release < MEMORY_HIGH_MIN_KERNEL:
        _fail(
            EXIT_USAGE,
            f"--memory-high-fraction needs Linux 5.9 or later (older kernels can stall a "
            f"worker held at memory.high); this kernel is {release[0]}.{release[1]}: "
            "drop the option or use --memory-high-fraction 0",
            audit,
            "cli.usage.error",
        )


def _check_local_directory(
    wargs: WorkerArgs, worker_command: str | None, prefix: Sequence[str], audit: Audit
) -> None:
    """Exit 2 with one line, before any write, when the worker has nowhere to write."""
    from . import gpus
    from .local_dir import scratch_problem

    dask_default = _runs_dask_worker(worker_command, prefix) or gpus.is_dask_cuda(prefix)
    problem = scratch_problem(wargs.local_directory, os.environ, dask_default)
    if problem is not None:
        _fail(EXIT_USAGE, problem, audit, "cli.usage.error")


def _with_gpu_workers(
    wargs: WorkerArgs, prefix: Sequence[str], worker_args: Sequence[str], audit: Audit
) -> WorkerArgs:
    """dask-cuda starts one worker per visible GPU, each with the whole --memory-limit:
    count them, or refuse rather than give every GPU the node's budget."""
    from . import gpus

    if not gpus.is_dask_cuda(prefix):
        return wargs
    found = gpus.visible_gpus(worker_args, os.environ)
    audit("worker.gpus", **found.as_dict())
    if found.count is None:
        _fail(
            EXIT_USAGE,
            f"{' '.join(prefix)} starts one worker per GPU, and the GPUs cannot be counted "
            f"({found.source}): set CUDA_VISIBLE_DEVICES",
            audit,
            "cli.usage.error",
        )
    if found.count == 0:
        _fail(
            EXIT_USAGE,
            f"{' '.join(prefix)} would start no worker: no GPU is visible ({found.source} "
            "lists none)",
            audit,
            "cli.usage.error",
        )
    return dataclasses.replace(wargs, gpu_workers=found.count)


def _worker_prefix(worker_command: str | None) -> list[str]:
    """The worker command as an argv prefix; ValueError for one that is not a command."""
    if worker_command is None:
        return dask_compat.worker_command(sys.executable)
    import shlex  # only here: every import counts against --print-limit's start-up

    try:
        prefix = shlex.split(worker_command)
    except ValueError as exc:
        raise ValueError(f"--worker-command {worker_command!r}: {exc}") from None
    if not prefix:
        raise ValueError("--worker-command is empty")
    return prefix


# Worker commands that charts, operator specs and compose files put first in the
# container's arguments (the official images run `tini -g -- prepare.sh "$@"`). With
# `ENTRYPOINT ["dask-safe-worker"]` they arrive here; distributed's own worker is run as
# this Python's `-m distributed.cli.dask_worker` (the `dask-worker` script is gone since
# 2026.6), dask-cuda's as given.
LEADING_WORKER_COMMANDS: dict[tuple[str, ...], str | None] = {
    ("dask", "worker"): None,
    ("dask-worker",): None,
    ("dask", "cuda", "worker"): "dask cuda worker",
    ("dask-cuda-worker",): "dask-cuda-worker",
}


def split_leading_command(args: Sequence[str]) -> tuple[tuple[str, ...] | None, list[str]]:
    """(the leading worker command, the worker arguments after it)."""
    for leading in sorted(LEADING_WORKER_COMMANDS, key=len, reverse=True):
        if tuple(args[: len(leading)]) == leading:
            return leading, list(args[len(leading) :])
    return None, list(args)


def _program_exists(program: str) -> bool:
    """Whether execvp would find `program` as an executable file (its PATH search)."""
    if "/" in program:
        return os.path.isfile(program) and os.access(program, os.X_OK)
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return True
    return False


def _runs_dask_worker(worker_command: str | None, prefix: Sequence[str]) -> bool:
    """Whether the worker is distributed's own `dask worker` (whose options we know)."""
    if worker_command is None:
        return True
    tail = [os.path.basename(prefix[0]), *prefix[1:]]
    return tail in (["dask", "worker"], ["dask-worker"]) or (
        len(tail) >= 3 and tail[-2:] == ["-m", "distributed.cli.dask_worker"]
    )


def _check_worker_args(
    args: Sequence[str], worker_command: str | None, prefix: Sequence[str], audit: Audit
) -> None:
    """Refuse what `dask worker` would refuse, from the installed release's own click
    command (worker_cli explains how it is read without importing distributed)."""
    if not _runs_dask_worker(worker_command, prefix):
        audit("worker.args.checked", checked=False, reason="custom worker command")
        return
    from . import worker_cli

    try:
        table = worker_cli.option_table()
    except Exception as exc:  # a broken install: dask worker itself will say more
        audit("worker.args.checked", checked=False, reason=f"{type(exc).__name__}: {exc}")
        return
    worker_cli.check_argv(args, table)
    audit("worker.args.checked", checked=True, source=table.source)


def _settings(params: dict[str, Any], supervised: bool) -> Settings:
    return Settings(
        reserve=params["reserve"],
        min_worker_memory=params["min_worker_memory"],
        nanny_allowance=params["nanny_allowance"],
        supervised=supervised,
        clamp_memory_limit=params["clamp_memory_limit"],
    )


def _write_options(params: dict[str, Any]) -> WriteOptions:
    return WriteOptions(
        mode=params["cgroup_write"],
        child_name=params["cgroup_child"],
        memory_high_fraction=params["memory_high_fraction"] or None,
        swap_max=params["swap_max"],
    )


def plan_document(
    m: Measurement,
    plan: Plan,
    argv: Sequence[str],
    write: WriteOutcome | None,
    params: dict[str, Any],
) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "version": __version__,
        "measurement": m.as_dict(),
        "plan": plan.as_dict(),
        "cgroup_write": {
            "mode": params["cgroup_write"],
            "intended_strategy": intended_strategy(m, params["cgroup_write"]),
            "outcome": None if write is None else write.as_dict(),
        },
        "argv": list(argv),
    }


def supervisor_argv(
    argv: Sequence[str],
    outcome: WriteOutcome,
    params: dict[str, Any],
    follow_spec: str | None = None,
) -> list[str]:
    """`python -m dask_safe_worker.supervise ... -- <worker argv>`."""
    from .audit import start_id

    cmd = [sys.executable, "-m", "dask_safe_worker.supervise"]
    # Same format and start id as our lines, so that one start reads as one log.
    cmd += ["--log-format", params["log_format"], "--start-id", start_id()]
    name = worker_name(argv, dask_compat.WORKER_VALUE_OPTIONS)
    if name is not None:
        cmd += ["--worker-name", name]
    if params["init_process_group"]:
        cmd.append("-g")
    if outcome.created_child and outcome.parent_dir:
        cmd += ["--remove-cgroup", outcome.created_child, "--parent-cgroup", outcome.parent_dir]
    if follow_spec:
        cmd += ["--follow", follow_spec]
    return [*cmd, "--", *argv]


def _write_plan_file(path: str | None, document: dict[str, Any], audit: Audit) -> str | None:
    """The plan as JSON at `path` (default: a private runtime directory), or None after a
    logged failure: the worker starts either way, without a plan file to point to."""
    # json and the plan_file module are imported where used: --print-limit needs neither,
    # and its start-up time is a goal (docs/benchmarks.md).
    import json

    from .plan_file import default_path, write_atomic

    target: Path | None = None
    try:
        private: int | None = None
        if path:
            target = Path(path)
            stale = 0
        else:
            target, stale = default_path(os.environ, os.getpid())
            private = os.geteuid()
        write_atomic(target, json.dumps(document, indent=2) + "\n", private)
    except OSError as exc:
        reason = str(exc) if exc.strerror is None else exc.strerror
        audit("plan.file.failed", path=None if target is None else str(target), reason=reason)
        return None
    audit("plan.file.written", path=str(target), stale_removed=stale)
    return str(target)


def _params_for_log(ctx: click.Context) -> dict[str, object]:
    """Our options as the audit log may show them: values from the environment hidden."""
    shown: dict[str, object] = {}
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)
        if source is click.core.ParameterSource.ENVIRONMENT:
            shown[name] = "<from environment>"
        else:
            plain = isinstance(value, (int, float, str, bool, type(None)))
            shown[name] = value if plain else getattr(value, "describe", value.__str__)()
    return shown


def run(ctx: click.Context, params: dict[str, Any]) -> None:
    worker_args: list[str] = ctx.meta.get("dask_safe_worker.worker_args", [])
    query = params["print_limit"] or params["dry_run"]
    audit = make_audit(
        "none" if query and params["log_format"] == "auto" else params["log_format"],
        worker_name=worker_name(worker_args, dask_compat.WORKER_VALUE_OPTIONS),
    )
    audit("cli.started", version=__version__, options=_params_for_log(ctx), argv=worker_args)
    # Validate everything, then act: every value below is checked before the first write.
    leading, worker_args = split_leading_command(worker_args)
    if leading is not None:
        if params["worker_command"] is not None:
            _fail(
                EXIT_USAGE,
                f"both --worker-command and a leading {' '.join(leading)!r} name the worker "
                "command; give one",
                audit,
                "cli.usage.error",
            )
        params = {**params, "worker_command": LEADING_WORKER_COMMANDS[leading]}
        audit(
            "worker.command.leading",
            given=list(leading),
            worker_command=params["worker_command"] or "default",
        )
    try:
        prefix = _worker_prefix(params["worker_command"])
        write_options = _write_options(params)
    except ValueError as exc:
        _fail(EXIT_USAGE, str(exc), audit, "cli.usage.error")
    _check_memory_high_kernel(write_options, audit)

    if params["worker_help"]:
        from .run_worker import exec_worker

        exec_worker([*prefix, "--help"], os.environ, audit)

    release = dask_compat.installed_distributed_version()
    try:
        dask_compat.check_supported(release)
    except dask_compat.UnsupportedDistributedError as exc:
        _fail(EXIT_UNSUPPORTED, str(exc), audit, "cli.unsupported_distributed")
    features = dask_compat.release_features(release)
    audit(
        "dask.release",
        tested=release is not None and dask_compat.is_tested(release),
        **features.as_dict(),
    )

    try:
        _check_worker_args(worker_args, params["worker_command"], prefix, audit)
        wargs = parse_worker_args(worker_args, dask_compat.nworkers_options(release))
    except dask_compat.WorkerArgsError as exc:
        _fail(
            EXIT_USAGE,
            f"invalid dask worker arguments: {exc} (see `dask-safe-worker --worker-help`)",
            audit,
            "cli.usage.error",
        )
    if wargs.version_only:
        from .run_worker import exec_worker

        exec_worker([*prefix, *worker_args], os.environ, audit)
    wargs = _with_gpu_workers(wargs, prefix, worker_args, audit)
    _check_local_directory(wargs, params["worker_command"], prefix, audit)

    supervised = bool(params["init"]) if params["init"] is not None else os.getpid() == 1
    if params["follow"]:
        if params["init"] is False:
            _fail(
                EXIT_USAGE, "--follow needs a supervisor; drop --no-init", audit, "cli.usage.error"
            )
        # Somebody must stay to watch: the supervisor does (as with --init).
        supervised = True
    try:
        m = measure()
    except (OSError, ValueError) as exc:
        _fail(
            EXIT_MEASURE_FAILED, f"cannot read memory information: {exc}", audit, "measure.failed"
        )
    audit("measure.done", **m.as_dict())
    siblings = read_siblings(m, params["cgroup_child"])
    m = with_siblings(m, siblings)

    try:
        plan = make_plan(m, wargs, _settings(params, supervised), siblings)
    except dask_compat.WorkerArgsError as exc:
        _fail(EXIT_USAGE, str(exc), audit, "cli.usage.error")
    except PlanError as exc:
        _fail(EXIT_PLAN_REFUSED, str(exc), audit, "plan.refused")
    audit("plan.made", **plan.as_dict())
    if plan.user_memory_limit is not None:
        audit(
            "plan.user_memory_limit",
            value=plan.user_memory_limit,
            resolved=plan.user_memory_limit_bytes,
            fits=plan.user_fits,
            clamped=plan.memory_limit_arg is not None,
        )
        if plan.user_fits is False and plan.memory_limit_arg is None:
            _warn_memory_limit(plan, audit)

    final_args = (
        worker_args
        if plan.memory_limit_arg is None
        else with_memory_limit(worker_args, plan.memory_limit_arg)
    )
    argv = [*prefix, *final_args]

    if params["print_limit"]:
        click.echo(str(plan.budget))
        return
    if params["dry_run"]:
        import json

        click.echo(json.dumps(plan_document(m, plan, argv, None, params), indent=2))
        return

    if not _program_exists(prefix[0]):
        # Found missing now rather than at exec, after the kernel limit was written.
        from .run_worker import EXIT_EXEC_FAILED

        audit("worker.exec.failed", argv0=prefix[0], reason="No such file or directory")
        click.echo(f"dask-safe-worker: cannot run {prefix[0]!r}: not found", err=True)
        sys.exit(EXIT_EXEC_FAILED)

    if supervised:
        # From here a signal waits for the supervisor, which removes a child cgroup made
        # below; without this, SIGTERM before the exec would leave the child behind.
        from .supervise import defer_signals

        defer_signals()
    outcome = apply_limit(m, plan.budget, opts=write_options, audit=audit)
    audit("cgroup.write.outcome", **outcome.as_dict())
    if params["cgroup_write"] == "required" and not outcome.enforced:
        _fail(
            EXIT_WRITE_REQUIRED,
            f"--cgroup-write required, but the kernel limit could not be set ({outcome.reason})",
            audit,
            "cgroup.write.required.failed",
        )

    env = dict(os.environ)
    follow_spec: str | None = None
    if params["follow"]:
        from . import follow_setup

        try:
            setup = follow_setup.prepare(
                m, plan, wargs, _settings(params, supervised), outcome, params["follow_interval"]
            )
        except follow_setup.FollowUnavailable as exc:
            audit("follow.disabled", reason=str(exc))
        else:
            follow_spec = setup.spec_file
            env.update(setup.env)
            argv = [*prefix, *follow_setup.with_preloads(final_args, wargs.nanny)]
    plan_file = _write_plan_file(
        params["plan_file"], plan_document(m, plan, argv, outcome, params), audit
    )
    # Set from --plan-file or from the environment alike: the worker names a plan file
    # only when one was written (dask-safe-audit reads it through this variable).
    env.pop(PLAN_FILE_ENV, None)
    if plan_file:
        env[PLAN_FILE_ENV] = plan_file
    audit("worker.argv", argv=argv, supervised=supervised)

    from .run_worker import exec_worker

    if supervised:
        # Exec a bare supervisor rather than supervising from here: as PID 1 it lives as
        # long as the container, and this process carries click and structlog (~27 MiB
        # RSS against ~11 MiB for the bare one, benchmarks/supervisor_rss.py).
        exec_worker(
            supervisor_argv(argv, outcome, params, follow_spec), env, audit, event="init.exec"
        )
    exec_worker(argv, env, audit)


def _callback(**params: Any) -> None:
    run(click.get_current_context(), params)


command = SafeWorkerCommand(
    name="safe-worker",
    params=OUR_OPTIONS,
    callback=_callback,
    help="Start a Dask worker whose memory budget comes from what this machine and its "
    "cgroups really have free, enforced as a kernel limit where permitted.",
    epilog=EPILOG,
    options_metavar="[OPTIONS] [DASK WORKER ARGS]...",
    context_settings={"max_content_width": 100, "help_option_names": ["-h", "--help"]},
)


def main(argv: Sequence[str] | None = None) -> None:
    """The `dask-safe-worker` console script."""
    command.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="dask-safe-worker")
