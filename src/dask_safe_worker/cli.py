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
from .cgroup_write import (
    WriteOptions,
    WriteOutcome,
    apply_limit,
    intended_strategy,
)
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
from .events import SCHEMA_VERSION, Audit, make_audit
from .measure import Measurement, measure
from .options import FLAG_NAMES, OPTIONS, PLAN_FILE_ENV, VALUE_NAMES, Options, OptionSpec
from .plan import Plan, PlanError, make_plan, resolve_worker_values
from .records import replace
from .siblings import read_siblings, with_siblings
from .worker_args import WorkerArgs, apply_memory_limit, parse_worker_args, split_argv

EXIT_MEASURE_FAILED = 1
EXIT_USAGE = 2
EXIT_PLAN_REFUSED = 3
EXIT_WRITE_REQUIRED = 4
EXIT_UNSUPPORTED = 5


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
    distributed = installed_release().distributed
    click.echo(f"dask-safe-worker {__version__}")
    click.echo(f"distributed {distributed if distributed is not None else 'not installed'}")
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


def _check_plan_file(path: Path, audit: Audit) -> None:
    """Exit 2 before any write when --plan-file names what must not be written."""
    from .plan_file import PlanFileError, given_kind

    try:
        given_kind(path)
    except PlanFileError as exc:
        _fail(EXIT_USAGE, str(exc), audit, "cli.usage.error")


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
    return replace(wargs, gpu_workers=found.count)


def _worker_prefix(worker_command: str | None) -> list[str]:
    """The worker command as an argv prefix; ValueError for one that is not a command."""
    if worker_command is None:
        return dask_worker.worker_command(sys.executable)
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


def plan_document(
    m: Measurement,
    plan: Plan,
    argv: Sequence[str],
    write: WriteOutcome | None,
    opts: Options,
) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "version": __version__,
        "measurement": m.as_dict(),
        "plan": plan.as_dict(),
        "cgroup_write": {
            "mode": opts.cgroup_write,
            "intended_strategy": intended_strategy(m, opts.cgroup_write),
            "outcome": None if write is None else write.as_dict(),
        },
        "argv": list(argv),
    }


def supervisor_argv(
    argv: Sequence[str], outcome: WriteOutcome, opts: Options, follow_spec: str | None = None
) -> list[str]:
    """`python -m dask_safe_worker.supervise ... -- <worker argv>`."""
    from .events import start_id

    cmd = [sys.executable, "-m", "dask_safe_worker.supervise"]
    # Same format and start id as our lines, so that one start reads as one log.
    cmd += ["--log-format", opts.log_format, "--start-id", start_id()]
    name = worker_name(argv, dask_worker.WORKER_VALUE_OPTIONS)
    if name is not None:
        cmd += ["--worker-name", name]
    if opts.init_process_group:
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

    from .plan_file import default_path, write_atomic, write_given

    target: Path | None = None
    text = json.dumps(document, indent=2) + "\n"
    try:
        if path:
            target, stale = Path(path), 0
            write_given(target, text)
        else:
            target, stale = default_path(os.environ, os.getpid())
            write_atomic(target, text, os.geteuid())
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


def _measure(audit: Audit, release: Release) -> Measurement:
    try:
        m = measure(release=release)
    except (OSError, ValueError) as exc:
        _fail(
            EXIT_MEASURE_FAILED, f"cannot read memory information: {exc}", audit, "measure.failed"
        )
    audit("measure.done", **m.as_dict())
    return m


def prepare(worker_args: list[str], opts: Options, audit: Audit) -> Prepared | PassThrough:
    """Check, parse, measure, plan: reads only, and exits with the matching code and one
    clear line (and an audit event) on the first refusal. Nothing is written before
    everything is checked."""
    leading, worker_args = split_leading_command(worker_args)
    if leading is not None:
        if opts.worker_command is not None:
            _fail(
                EXIT_USAGE,
                f"both --worker-command and a leading {' '.join(leading)!r} name the worker "
                "command; give one",
                audit,
                "cli.usage.error",
            )
        opts = replace(opts, worker_command=LEADING_WORKER_COMMANDS[leading])
        audit(
            "worker.command.leading",
            given=list(leading),
            worker_command=opts.worker_command or "default",
        )
    try:
        prefix = _worker_prefix(opts.worker_command)
        write_options = opts.write_options()
    except ValueError as exc:
        _fail(EXIT_USAGE, str(exc), audit, "cli.usage.error")
    _check_memory_high_kernel(write_options, audit)
    if opts.plan_file:
        _check_plan_file(Path(opts.plan_file), audit)

    if opts.worker_help:
        return PassThrough([*prefix, "--help"])

    # Resolved once: every rule below predicts this release pair.
    release = installed_release()
    try:
        check_supported(release.distributed)
    except UnsupportedDistributedError as exc:
        _fail(EXIT_UNSUPPORTED, str(exc), audit, "cli.unsupported_distributed")
    audit(
        "dask.release",
        tested=release.distributed is not None and is_tested(release.distributed),
        **release_features(release).as_dict(),
    )

    # Every worker argument is checked here, before planning: the ones dask's click
    # command refuses, then the values the plan reads (some need the measurement).
    try:
        _check_worker_args(worker_args, opts.worker_command, prefix, audit)
        wargs = parse_worker_args(worker_args, dask_worker.nworkers_options(release.distributed))
        if wargs.version_only:
            return PassThrough([*prefix, *worker_args])
        if opts.follow and opts.init is False:
            _fail(
                EXIT_USAGE, "--follow needs a supervisor; drop --no-init", audit, "cli.usage.error"
            )
        wargs = _with_gpu_workers(wargs, prefix, worker_args, audit)
        _check_local_directory(wargs, opts.worker_command, prefix, audit)
        m = _measure(audit, release)
        resolve_worker_values(wargs, m)
    except dask_worker.WorkerArgsError as exc:
        _fail(
            EXIT_USAGE,
            f"invalid dask worker arguments: {exc} (see `dask-safe-worker --worker-help`)",
            audit,
            "cli.usage.error",
        )
    siblings = read_siblings(m, opts.cgroup_child)
    m = with_siblings(m, siblings)

    try:
        plan = make_plan(m, wargs, opts.settings(os.getpid()), siblings)
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


def act(prepared: Prepared, audit: Audit) -> NoReturn:
    """Write the kernel limit and the plan file, then exec the worker (or the supervisor)."""
    opts, m, plan, argv = prepared.opts, prepared.measurement, prepared.plan, prepared.argv
    if not _program_exists(argv[0]):
        # Found missing now rather than at exec, after the kernel limit was written.
        from .run_worker import EXIT_EXEC_FAILED

        audit("worker.exec.failed", argv0=argv[0], reason="No such file or directory")
        click.echo(f"dask-safe-worker: cannot run {argv[0]!r}: not found", err=True)
        sys.exit(EXIT_EXEC_FAILED)

    if prepared.supervised:
        # From here a signal waits for the supervisor, which removes a child cgroup made
        # below; without this, SIGTERM before the exec would leave the child behind.
        from .supervise import defer_signals

        defer_signals()
    outcome = apply_limit(m, plan.budget, opts=prepared.write_options, audit=audit)
    audit("cgroup.write.outcome", **outcome.as_dict())
    if opts.cgroup_write == "required" and not outcome.enforced:
        _fail(
            EXIT_WRITE_REQUIRED,
            f"--cgroup-write required, but the kernel limit could not be set ({outcome.reason})",
            audit,
            "cgroup.write.required.failed",
        )

    env = dict(os.environ)
    follow_spec: str | None = None
    if opts.follow:
        from . import follow_setup

        try:
            setup = follow_setup.prepare(
                m,
                plan,
                prepared.parsed_args,
                opts.settings(os.getpid()),
                outcome,
                opts.follow_interval,
            )
        except follow_setup.FollowUnavailable as exc:
            audit("follow.disabled", reason=str(exc))
        else:
            follow_spec = setup.spec_file
            env.update(setup.env)
            argv = [
                *prepared.prefix,
                *follow_setup.with_preloads(prepared.worker_args, prepared.parsed_args.nanny),
            ]
    plan_file = _write_plan_file(opts.plan_file, plan_document(m, plan, argv, outcome, opts), audit)
    # Set from --plan-file or from the environment alike: the worker names a plan file
    # only when one was written (dask-safe-audit reads it through this variable).
    env.pop(PLAN_FILE_ENV, None)
    if plan_file:
        env[PLAN_FILE_ENV] = plan_file
    audit("worker.argv", argv=argv, supervised=prepared.supervised)

    from .run_worker import exec_supervisor, exec_worker

    if prepared.supervised:
        # Exec a bare supervisor rather than supervising from here: as PID 1 it lives as
        # long as the container, and this process carries click and structlog (~27 MiB
        # RSS against ~11 MiB for the bare one, benchmarks/supervisor_rss.py).
        exec_supervisor(supervisor_argv(argv, outcome, opts, follow_spec), env, audit)
    exec_worker(argv, env, audit)


def run(ctx: click.Context, opts: Options) -> None:
    worker_args: list[str] = ctx.meta.get("dask_safe_worker.worker_args", [])
    query = opts.print_limit or opts.dry_run
    audit = make_audit(
        "none" if query and opts.log_format == "auto" else opts.log_format,
        worker_name=worker_name(worker_args, dask_worker.WORKER_VALUE_OPTIONS),
    )
    audit("cli.started", version=__version__, options=_params_for_log(ctx), argv=worker_args)
    prepared = prepare(worker_args, opts, audit)
    if isinstance(prepared, PassThrough):
        from .run_worker import exec_worker

        exec_worker(prepared.argv, os.environ, audit)
    if opts.print_limit:
        click.echo(str(prepared.plan.budget))
        return
    if opts.dry_run:
        import json

        document = plan_document(prepared.measurement, prepared.plan, prepared.argv, None, opts)
        click.echo(json.dumps(document, indent=2))
        return
    act(prepared, audit)


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
