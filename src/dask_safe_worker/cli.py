"""`dask-safe-worker [OUR OPTIONS] [ANY dask worker ARGS]`: measure, plan, limit, pass, run.

This module is the imperative shell: it reads options, calls the pure measurement and
planning code, and hands side effects to `cgroup_write`, `run_worker` and `supervise`.
It must not import dask or distributed: the worker does that after exec.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click

from . import __version__
from .cgroup.siblings import read_siblings, with_siblings
from .cgroup.write import WriteOptions, enforce, memory_high_kernel_problem
from .dask_compat import dask_worker
from .dask_compat.features import release_features
from .dask_compat.release import (
    Release,
    UnsupportedDistributedError,
    check_supported,
    installed_release,
    is_tested,
)
from .event_line import worker_name
from .events import Audit, make_audit
from .exits import (
    EXIT_EXEC_FAILED,
    EXIT_MEASURE_FAILED,
    EXIT_PLAN_REFUSED,
    EXIT_UNSUPPORTED,
    EXIT_USAGE,
    Refused,
)
from .gpus import gpu_workers
from .local_dir import require_scratch
from .measure import Measurement, measure
from .options import FLAG_NAMES, OPTIONS, PLAN_FILE_ENV, VALUE_NAMES, Options, OptionSpec
from .plan import Plan, PlanError, make_plan, resolve_worker_values, user_limit_warning
from .records import replace
from .worker_args import WorkerArgs, apply_memory_limit, parse_worker_args, split_argv
from .worker_command import (
    check_worker_args,
    program_exists,
    runs_dask_worker,
    take_leading_command,
    worker_prefix,
)


class _ParsedType(click.ParamType):  # type: ignore[type-arg]
    """A click type for one of our options: its parser, from the option table."""

    def __init__(self, spec: OptionSpec) -> None:
        self.name = spec.type_name
        self._convert = spec.convert

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value  # a default that is a value already
        try:
            return self._convert(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _click_option(spec: OptionSpec) -> click.Option:
    """The click form of one row of `options.OPTIONS`."""
    if spec.name == "version":
        return click.Option(
            ["--version"],
            is_flag=True,
            expose_value=False,
            is_eager=True,
            callback=lambda ctx, _param, value: _print_version(ctx) if value else None,
            help=spec.help,
        )
    kwargs: dict[str, Any] = {"envvar": spec.env, "show_envvar": True, "help": spec.help}
    if spec.kind == "switch":
        return click.Option(["/".join(spec.names)], default=None, **kwargs)
    if spec.kind == "flag":
        return click.Option(list(spec.names), is_flag=True, **kwargs)
    param_type: click.ParamType | None = None  # type: ignore[type-arg]
    if spec.choices:
        param_type = click.Choice(list(spec.choices))
    elif spec.path:
        param_type = click.Path(dir_okay=False, writable=True)
    elif spec.parse is not None:
        param_type = _ParsedType(spec)
    if spec.show_default:
        kwargs["show_default"] = spec.show_default
    return click.Option(list(spec.names), type=param_type, default=spec.default, **kwargs)


OUR_OPTIONS: list[click.Parameter] = [_click_option(spec) for spec in OPTIONS]
OUR_VALUE_OPTIONS = VALUE_NAMES
OUR_FLAG_OPTIONS = FLAG_NAMES

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


def _print_version(ctx: click.Context) -> None:
    distributed = installed_release().distributed
    click.echo(f"dask-safe-worker {__version__}")
    click.echo(f"distributed {distributed if distributed is not None else 'not installed'}")
    ctx.exit(0)


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


@dataclass(frozen=True)
class Prepared:
    """Everything `act` needs, checked: options, measurement, plan and the worker's argv."""

    opts: Options
    measurement: Measurement
    plan: Plan
    parsed_args: WorkerArgs
    prefix: list[str]
    # The worker's arguments with the plan's --memory-limit applied.
    worker_args: list[str]
    write_options: WriteOptions
    supervised: bool

    @property
    def argv(self) -> list[str]:
        return [*self.prefix, *self.worker_args]


@dataclass(frozen=True)
class PassThrough:
    """Run the worker command as given, without a plan (--worker-help, `--version`)."""

    argv: list[str]


def prepare(worker_args: list[str], opts: Options, audit: Audit) -> Prepared | PassThrough:
    """Check, parse, measure, plan: reads only. The first refusal raises `Refused`;
    nothing is written before everything is checked."""
    worker_command, worker_args = take_leading_command(worker_args, opts.worker_command, audit)
    opts = replace(opts, worker_command=worker_command)
    prefix, write_options = _checked_options(opts)
    if opts.worker_help:
        return PassThrough([*prefix, "--help"])
    release = _supported_release(audit)
    wargs = _checked_worker_args(worker_args, opts, prefix, release, audit)
    if wargs.version_only:
        return PassThrough([*prefix, *worker_args])
    m = _measure(release, audit)
    m, plan = _plan(m, wargs, opts, audit)
    return Prepared(
        opts=opts,
        measurement=m,
        plan=plan,
        parsed_args=wargs,
        prefix=prefix,
        worker_args=apply_memory_limit(worker_args, plan.memory_limit),
        write_options=write_options,
        supervised=opts.supervised(os.getpid()),
    )


def _checked_options(opts: Options) -> tuple[list[str], WriteOptions]:
    """The worker command's argv prefix and the write options, every value checked."""
    try:
        prefix = worker_prefix(opts.worker_command)
        write_options = opts.write_options()
    except ValueError as exc:
        raise Refused(EXIT_USAGE, str(exc)) from None
    problem = memory_high_kernel_problem(write_options, os.uname().release)
    if problem is not None:
        raise Refused(EXIT_USAGE, problem)
    if opts.plan_file:
        from .plan_file import PlanFileError, given_kind

        try:
            given_kind(Path(opts.plan_file))
        except PlanFileError as exc:
            raise Refused(EXIT_USAGE, str(exc)) from None
    return prefix, write_options


def _supported_release(audit: Audit) -> Release:
    """The installed distributed/dask pair, resolved once: every rule below predicts it."""
    release = installed_release()
    try:
        check_supported(release.distributed)
    except UnsupportedDistributedError as exc:
        raise Refused(EXIT_UNSUPPORTED, str(exc), event="cli.unsupported_distributed") from None
    audit(
        "dask.release",
        tested=release.distributed is not None and is_tested(release.distributed),
        **release_features(release).as_dict(),
    )
    return release


def _checked_worker_args(
    worker_args: list[str], opts: Options, prefix: list[str], release: Release, audit: Audit
) -> WorkerArgs:
    """The worker's arguments, checked as `dask worker` would, then read for the plan."""
    try:
        check_worker_args(worker_args, opts.worker_command, prefix, audit)
        wargs = parse_worker_args(worker_args, dask_worker.nworkers_options(release.distributed))
    except dask_worker.WorkerArgsError as exc:
        raise _invalid_worker_args(exc) from None
    if wargs.version_only:
        return wargs
    if opts.follow and opts.init is False:
        raise Refused(EXIT_USAGE, "--follow needs a supervisor; drop --no-init")
    gpu_count = gpu_workers(prefix, worker_args, audit)
    if gpu_count is not None:
        wargs = replace(wargs, gpu_workers=gpu_count)
    dask_default = runs_dask_worker(opts.worker_command, prefix) or gpu_count is not None
    require_scratch(wargs.local_directory, os.environ, dask_default)
    return wargs


def _invalid_worker_args(exc: Exception) -> Refused:
    return Refused(
        EXIT_USAGE, f"invalid dask worker arguments: {exc} (see `dask-safe-worker --worker-help`)"
    )


def _measure(release: Release, audit: Audit) -> Measurement:
    try:
        m = measure(release=release)
    except (OSError, ValueError) as exc:
        message = f"cannot read memory information: {exc}"
        raise Refused(EXIT_MEASURE_FAILED, message, event="measure.failed") from None
    audit("measure.done", **m.as_dict())
    return m


def _plan(
    m: Measurement, wargs: WorkerArgs, opts: Options, audit: Audit
) -> tuple[Measurement, Plan]:
    """The measurement with the siblings' promises, and the plan made from it."""
    try:
        resolve_worker_values(wargs, m)
    except dask_worker.WorkerArgsError as exc:
        raise _invalid_worker_args(exc) from None
    siblings = read_siblings(m, opts.cgroup_child)
    m = with_siblings(m, siblings)
    try:
        plan = make_plan(m, wargs, opts.settings(os.getpid()), siblings)
    except PlanError as exc:
        raise Refused(EXIT_PLAN_REFUSED, str(exc), event="plan.refused") from None
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
            audit(
                "plan.user_memory_limit.warning",
                value=plan.user_memory_limit,
                resolved=plan.user_memory_limit_bytes,
                n_workers=plan.n_workers,
                budget=plan.budget,
                planned=plan.per_worker,
            )
            click.echo(f"dask-safe-worker: warning: {user_limit_warning(plan)}", err=True)
    return m, plan


def act(prepared: Prepared, audit: Audit) -> NoReturn:
    """Write the kernel limit and the plan file, then exec the worker (or the supervisor)."""
    opts, m, plan = prepared.opts, prepared.measurement, prepared.plan
    program = prepared.prefix[0]
    if not program_exists(program):
        # Found missing now rather than at exec, after the kernel limit was written.
        audit("worker.exec.failed", argv0=program, reason="No such file or directory")
        raise Refused(EXIT_EXEC_FAILED, f"cannot run {program!r}: not found", event="")
    if prepared.supervised:
        # From here a signal waits for the supervisor, which removes a child cgroup made
        # below; without this, SIGTERM before the exec would leave the child behind.
        from .supervise import defer_signals

        defer_signals()
    outcome = enforce(m, plan.budget, prepared.write_options, audit)
    worker_args, env, follow_spec = prepared.worker_args, dict(os.environ), None
    if opts.follow:
        from .follow.setup import attach

        settings = opts.settings(os.getpid())
        worker_args, follow_env, follow_spec = attach(
            m,
            plan,
            prepared.parsed_args,
            settings,
            outcome,
            opts.follow_interval,
            worker_args,
            audit,
        )
        env.update(follow_env)
    argv = [*prepared.prefix, *worker_args]
    from .plan_file import plan_document, record_plan

    document = plan_document(m, plan, argv, outcome, opts.cgroup_write)
    plan_file = record_plan(opts.plan_file, document, audit)
    # Set from --plan-file or from the environment alike: the worker names a plan file
    # only when one was written (dask-safe-audit reads it through this variable).
    env.pop(PLAN_FILE_ENV, None)
    if plan_file:
        env[PLAN_FILE_ENV] = plan_file
    audit("worker.argv", argv=argv, supervised=prepared.supervised)

    from .run_worker import exec_supervisor, exec_worker, supervisor_argv

    if prepared.supervised:
        # Exec a bare supervisor rather than supervising from here: as PID 1 it lives as
        # long as the container, and this process carries click and structlog (~27 MiB
        # RSS against ~11 MiB for the bare one, benchmarks/supervisor_rss.py).
        cmd = supervisor_argv(argv, outcome, opts.log_format, opts.init_process_group, follow_spec)
        exec_supervisor(cmd, env, audit)
    exec_worker(argv, env, audit)


def run(ctx: click.Context, opts: Options) -> None:
    """One start, as named steps: log, prepare (reads only), then answer or act."""
    worker_args: list[str] = ctx.meta.get("dask_safe_worker.worker_args", [])
    audit = _start_audit(worker_args, opts)
    audit("cli.started", version=__version__, options=_params_for_log(ctx), argv=worker_args)
    try:
        prepared = prepare(worker_args, opts, audit)
        if isinstance(prepared, PassThrough):
            from .run_worker import exec_worker

            exec_worker(prepared.argv, os.environ, audit)
        if opts.print_limit:
            click.echo(str(prepared.plan.budget))
            return
        if opts.dry_run:
            _print_dry_run(prepared)
            return
        act(prepared, audit)
    except Refused as refused:
        if refused.event:
            audit(refused.event, message=refused.message, exit_code=refused.code)
        click.echo(f"dask-safe-worker: {refused.message}", err=True)
        sys.exit(refused.code)


def _start_audit(worker_args: list[str], opts: Options) -> Audit:
    """The audit log of this start; a query (--print-limit, --dry-run) is quiet by default."""
    query = opts.print_limit or opts.dry_run
    return make_audit(
        "none" if query and opts.log_format == "auto" else opts.log_format,
        worker_name=worker_name(worker_args, dask_worker.WORKER_VALUE_OPTIONS),
    )


def _print_dry_run(prepared: Prepared) -> None:
    import json

    from .plan_file import plan_document

    document = plan_document(
        prepared.measurement, prepared.plan, prepared.argv, None, prepared.opts.cgroup_write
    )
    click.echo(json.dumps(document, indent=2))


def _callback(**values: Any) -> None:
    # The one place click's untyped values become typed options.
    run(click.get_current_context(), Options.from_values(values))


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
