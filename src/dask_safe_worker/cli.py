"""`dask-safe-worker [OUR OPTIONS] [ANY dask worker ARGS]`: measure, plan, limit, pass, run.

This module is the imperative shell: it reads options, calls the pure measurement and
planning code, and hands side effects to `cgroup_write`, `run_worker` and `supervise`.
It must not import dask or distributed: the worker does that after exec.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click

from . import __version__
from .cgroup.pool import Member, Pool, find_pool, plan_inputs
from .cgroup.write import WriteOptions, WriteOutcome, enforce, memory_high_kernel_problem
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
from .events import Audit, StartAudit
from .exits import (
    EXIT_EXEC_FAILED,
    EXIT_MEASURE_FAILED,
    EXIT_PLAN_REFUSED,
    EXIT_UNSUPPORTED,
    EXIT_USAGE,
    EXIT_WRITE_REQUIRED,
    Refused,
)
from .gpus import gpu_workers
from .local_dir import require_scratch
from .measure import Measurement, measure, unreadable_problem
from .options import (
    FLAG_NAMES,
    OPTIONS,
    PLAN_EXPORT_ENV,
    PLAN_FILE_ENV,
    VALUE_NAMES,
    Options,
    OptionSpec,
)
from .plan import (
    Plan,
    PlanError,
    PoolBusy,
    make_plan,
    resolve_worker_values,
    user_limit_warning,
)
from .records import replace
from .worker_args import (
    WorkerArgs,
    apply_memory_limit,
    launch_problem,
    parse_worker_args,
    scheduler_given,
    split_argv,
)
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
    # Our pool and our claim in it (written under the pool's lock before any kernel
    # limit); None for a query, or where no runtime directory is usable.
    pool: Pool | None = None
    member: Member | None = None
    # Whether Dask's side can follow: the worker imports our preloads.
    movable: bool = True

    @property
    def argv(self) -> list[str]:
        return [*self.prefix, *self.worker_args]


@dataclass(frozen=True)
class PassThrough:
    """Run the worker command as given, without a plan (--worker-help, `--version`)."""

    argv: list[str]


def prepare(worker_args: list[str], opts: Options, audit: StartAudit) -> Prepared | PassThrough:
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
    _check_readable(m, wargs, opts, audit)
    query = opts.print_limit or opts.dry_run
    # Dask's side follows where the worker can import our preloads: dask's own worker in
    # this Python, or wherever --follow was asked for by name. Else the budget cannot
    # move, and is a fixed commitment in the pool.
    runs_dask = runs_dask_worker(opts.worker_command, prefix)
    movable = opts.following and (opts.follow is True or runs_dask)
    m, plan, pool, member = _plan(
        m, wargs, worker_args, runs_dask, opts, release, query, movable, audit
    )
    return Prepared(
        opts=opts,
        measurement=m,
        plan=plan,
        parsed_args=wargs,
        prefix=prefix,
        worker_args=apply_memory_limit(worker_args, plan.memory_limit),
        write_options=write_options,
        supervised=opts.supervised(os.getpid()),
        pool=pool,
        member=member,
        movable=movable,
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
    if opts.follow is None and opts.init is False:
        audit("follow.off", reason="--no-init: the worker is exec'd, nobody stays to follow")
    gpu_count = gpu_workers(prefix, worker_args, audit)
    if gpu_count is not None:
        wargs = replace(wargs, gpu_workers=gpu_count)
    dask_default = runs_dask_worker(opts.worker_command, prefix) or gpu_count is not None
    require_scratch(wargs.local_directory, os.environ, dask_default)
    return wargs


def _invalid_worker_args(exc: Exception | str) -> Refused:
    return Refused(
        EXIT_USAGE, f"invalid dask worker arguments: {exc} (see `dask-safe-worker --worker-help`)"
    )


def _measure(release: Release, audit: Audit, quiet: bool = False) -> Measurement:
    try:
        m = measure(release=release)
    except (OSError, ValueError) as exc:
        message = f"cannot read memory information: {exc}"
        raise Refused(EXIT_MEASURE_FAILED, message, event="measure.failed") from None
    from .cgroup.our_limit import with_operators_limit

    # Our own earlier write is not the operator's limit (issue 24 row 5).
    m, ours = with_operators_limit(m)
    if not quiet and ours is not None and m.location is not None:
        audit(
            "cgroup.limit.ours",
            target=m.location.cgroup_path,
            in_force=ours.written,
            original=ours.original,
            ancestors=ours.ancestors,
        )
    if not quiet:
        audit("measure.done", **m.as_dict())
    return m


def _check_readable(m: Measurement, wargs: WorkerArgs, opts: Options, audit: StartAudit) -> None:
    """Fail closed on a level we know exists but cannot read (issue 24 row 4), unless
    the user said how to go on; then say what the plan cannot see."""
    if not m.unreadable:
        return
    problem = unreadable_problem(m, wargs.memory_limit is not None, opts.allow_unreadable_cgroup)
    if problem is not None:
        raise Refused(EXIT_MEASURE_FAILED, problem, event="measure.failed")
    audit("measure.unreadable.warning", levels=list(m.unreadable))
    audit.flush()  # the log's lines before this one on stderr, as they were decided
    click.echo(
        "dask-safe-worker: warning: planning without the memory cgroup levels that cannot "
        "be read: " + "; ".join(m.unreadable),
        err=True,
    )


# How long a newcomer waits for the pool's other instances to come down to their new
# shares when what is free now is too small to start with: they move on their next
# tick (1 s by default), their kernel limits once their workers hold the lower limit.
ARRIVAL_WAIT = 30.0
ARRIVAL_POLL = 0.25


def _plan(
    m: Measurement,
    wargs: WorkerArgs,
    worker_args: Sequence[str],
    runs_dask: bool,
    opts: Options,
    release: Release,
    query: bool,
    movable: bool,
    audit: StartAudit,
) -> tuple[Measurement, Plan, Pool | None, Member | None]:
    """The plan in our pool: the measurement it was made from, the plan, the pool, and
    our claim in it. A start holds the pool's lock from reading the others' claims until
    its own is written; a query (--print-limit, --dry-run) only reads."""
    import time

    try:
        values = resolve_worker_values(wargs, m)
    except dask_worker.WorkerArgsError as exc:
        raise _invalid_worker_args(exc) from None
    if runs_dask:
        # A query plans without a scheduler; the worker a start execs needs one.
        configured = query or scheduler_given(worker_args) or _scheduler_configured()
        problem = launch_problem(worker_args, values.n_workers, wargs.nanny, configured)
        if problem is not None:
            raise _invalid_worker_args(f"Failed to launch worker. {problem}")
    pool = find_pool(m, os.environ, create=not query)
    claim = _Claim(None if query else pool, audit)
    deadline = time.monotonic() + ARRIVAL_WAIT
    try:
        while True:
            with claim.locked():
                try:
                    m, siblings, view = plan_inputs(m, opts.cgroup_child, pool, os.getpid())
                    settings = replace(opts.settings(os.getpid()), settled=query)
                    plan = make_plan(m, wargs, settings, siblings, view)
                except PoolBusy as exc:
                    # Announced with nothing held yet, so that the others make room.
                    claim.write(_member(m, values.n_workers, 0, None))
                    if time.monotonic() >= deadline:
                        message = f"{exc}; they did not within {ARRIVAL_WAIT:g} s"
                        raise Refused(EXIT_PLAN_REFUSED, message, event="plan.refused") from None
                    claim.waiting(str(exc))
                else:
                    fixed = plan.commitment if plan.fixed else (None if movable else plan.budget)
                    member = claim.write(_member(m, values.n_workers, plan.budget, fixed))
                    break
            time.sleep(ARRIVAL_POLL)
            m = _measure(release, audit, quiet=True)
    except PlanError as exc:
        raise Refused(EXIT_PLAN_REFUSED, str(exc), event="plan.refused") from None
    except BaseException:
        claim.withdraw()
        raise
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
            audit.flush()
            click.echo(f"dask-safe-worker: warning: {user_limit_warning(plan)}", err=True)
    return m, plan, claim.pool, member


def _scheduler_configured() -> bool:
    """Whether dask's configuration may give the worker a scheduler address (read only
    when the arguments give none: the files are not read on a usual start)."""
    import site

    from .dask_compat.dask_config import scheduler_address_configured

    prefixes = [sys.prefix, *getattr(site, "PREFIXES", [sys.exec_prefix])]
    return scheduler_address_configured(os.environ, prefixes, os.path.expanduser("~"))


def _member(m: Measurement, weight: int, committed: int, fixed: int | None) -> Member:
    return Member(
        pid=os.getpid(),
        weight=weight,
        fixed=fixed,
        committed=committed,
        working_set=m.own_working_set,
    )


class _Claim:
    """Our claim in the pool while we plan: the pool's lock, and the claim's own lock
    (kept open, inheritable, for the life of the instance)."""

    def __init__(self, pool: Pool | None, audit: StartAudit) -> None:
        self.pool, self.audit = pool, audit
        self.fd: int | None = None
        self.announced = False

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        if self.pool is None:
            yield
            return
        try:
            lock = self.pool.acquire(wait=False)
            if lock is None:
                # Another instance holds it: whoever watches sees the start so far
                # while it waits, not after.
                self.audit.flush()
                lock = self.pool.acquire()
        except OSError as exc:
            lock = None
            self._lost(exc)
        if lock is None:
            yield
            return
        try:
            yield
        finally:
            os.close(lock)

    def write(self, member: Member) -> Member | None:
        if self.pool is None:
            return None
        try:
            if self.fd is None:
                self.fd = self.pool.claim(member)
            else:
                self.pool.update(member)
        except OSError as exc:
            self._lost(exc)
            return None
        return member

    def waiting(self, reason: str) -> None:
        if not self.announced and self.pool is not None:
            self.audit("pool.waiting", reason=reason, pool=self.pool.key)
            self.announced = True
        # A wait of up to ARRIVAL_WAIT: its reason is shown while it lasts.
        self.audit.flush()

    def withdraw(self) -> None:
        if self.pool is not None and self.fd is not None:
            self.pool.leave(os.getpid())
            os.close(self.fd)
            self.fd = None

    def _lost(self, exc: OSError) -> None:
        # Without a claim the others do not see us; we still start within what is free.
        assert self.pool is not None
        self.audit("pool.claim.failed", pool=self.pool.key, reason=exc.strerror or str(exc))
        self.withdraw()
        self.pool = None


def act(prepared: Prepared, audit: StartAudit) -> NoReturn:
    """Write the kernel limit and the plan file, then exec the worker (or the supervisor)."""
    opts, m, plan = prepared.opts, prepared.measurement, prepared.plan
    program = prepared.prefix[0]
    if not program_exists(program):
        # Found missing now rather than at exec, after the kernel limit was written.
        audit("worker.exec.failed", argv0=program, reason="No such file or directory")
        raise Refused(EXIT_EXEC_FAILED, f"cannot run {program!r}: not found", event="")
    # From here a signal waits: for the supervisor, which removes a child cgroup made
    # below, or for the exec of the worker, which then cancels the start and removes it.
    # Without this, SIGTERM or Ctrl-C before the exec would leave the child behind.
    from .supervise import defer_signals

    defer_signals()
    outcome = enforce(m, plan.budget, prepared.write_options, audit)
    member = _with_child(prepared, outcome, audit)
    worker_args, env, follow_spec = prepared.worker_args, dict(os.environ), None
    if opts.following:
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
            pool=prepared.pool if member is not None else None,
            member=member,
            preloads=prepared.movable,
        )
        env.update(follow_env)
    argv = [*prepared.prefix, *worker_args]
    from .plan_file import plan_document, record_plan

    document = plan_document(m, plan, argv, outcome, opts.cgroup_write)
    # Where dask-safe-audit finds the pool's live claims, and whether this instance
    # moves with them (a supervisor follows) or keeps its start plan.
    document["following"] = opts.following and follow_spec is not None
    document["pool"] = (
        None
        if member is None or prepared.pool is None
        else {"key": prepared.pool.key, "directory": str(prepared.pool.directory)}
    )
    plan_file = record_plan(opts.plan_file, document, audit)
    # The worker names a plan file only when one was written (dask-safe-audit reads it
    # through PLAN_EXPORT_ENV). The option's own variable is not passed on: an instance
    # started inside the worker would take it as its --plan-file and overwrite ours.
    env.pop(PLAN_FILE_ENV, None)
    env.pop(PLAN_EXPORT_ENV, None)
    if plan_file:
        env[PLAN_EXPORT_ENV] = plan_file
    from .start_summary import start_summary

    audit(
        "start.summary",
        summary=start_summary(plan, outcome),
        n_workers=plan.n_workers,
        per_worker=plan.effective_per_worker,
        budget=plan.budget,
        limiting=plan.limiting,
        reserve=plan.reserve,
        kernel_limit=outcome.read_back if outcome.written else None,
    )
    audit("worker.argv", argv=argv, supervised=prepared.supervised)

    from .run_worker import exec_supervisor, exec_worker, supervisor_argv

    if prepared.supervised:
        # Exec a bare supervisor rather than supervising from here: as PID 1 it lives as
        # long as the container, and this process carries click and the planning code
        # (~20 MiB RSS against ~11 MiB for the bare one, benchmarks/supervisor_rss.py).
        group = opts.init_process_group
        cmd = supervisor_argv(argv, outcome, opts.log_format, group, follow_spec)
        exec_supervisor(cmd, env, audit, worker=argv, process_group=group)
    child = None
    if outcome.created_child and outcome.parent_dir:
        child = (outcome.created_child, outcome.parent_dir)
    exec_worker(argv, env, audit, child)


def _with_child(prepared: Prepared, outcome: WriteOutcome, audit: Audit) -> Member | None:
    """Our claim, with the child cgroup the kernel limit went to: the others then read
    our working set from the kernel."""
    member, pool, plan = prepared.member, prepared.pool, prepared.plan
    if member is None or pool is None:
        return member
    changed = member
    if outcome.strategy == "child" and outcome.parent_dir and outcome.target:
        child = os.path.join(outcome.parent_dir, outcome.target.rsplit("/", 1)[-1])
        changed = replace(changed, cgroup=child)
    if not outcome.enforced and plan.effective_per_worker is not None:
        # No kernel limit of ours: we hold what Dask's side may use, which for an
        # explicit --memory-limit is its commitment, not the whole budget.
        dask_side = plan.n_workers * plan.effective_per_worker + plan.overhead
        changed = replace(changed, committed=min(member.committed, dask_side))
    if changed != member:
        member = changed
        with contextlib.suppress(OSError):
            pool.update(member)
    # Our pid is every line's own field.
    fields = {k: v for k, v in member.as_dict().items() if k != "pid"}
    audit("pool.claimed", pool=pool.key, directory=str(pool.directory), **fields)
    return member


def run(ctx: click.Context, opts: Options) -> None:
    """One start, as named steps: log, prepare (reads only), then answer or act."""
    worker_args: list[str] = ctx.meta.get("dask_safe_worker.worker_args", [])
    audit = _start_audit(worker_args, opts)
    # Held until the worker has been started (run_worker), so that structlog's import is
    # off the worker's way; every other way out writes them first (the `finally` below).
    audit.hold()
    audit("cli.started", version=__version__, options=_params_for_log(ctx), argv=worker_args)
    try:
        prepared = prepare(worker_args, opts, audit)
        if isinstance(prepared, PassThrough):
            from .run_worker import exec_worker

            exec_worker(prepared.argv, os.environ, audit)
        if opts.print_limit or opts.dry_run:
            audit.flush()  # a query's answer comes after its lines, as they were decided
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
        audit.flush()
        click.echo(f"dask-safe-worker: {refused.message}", err=True)
        sys.exit(refused.code)
    finally:
        # An exit, an exception or a return: no line of the start is lost.
        audit.flush()


def _start_audit(worker_args: list[str], opts: Options) -> StartAudit:
    """The audit log of this start; a query (--print-limit, --dry-run) is quiet by default."""
    query = opts.print_limit or opts.dry_run
    return StartAudit(
        "none" if query and opts.log_format == "auto" else opts.log_format,
        worker_name=worker_name(worker_args, dask_worker.WORKER_VALUE_OPTIONS),
    )


def _print_dry_run(prepared: Prepared) -> None:
    """The plan as JSON, with what the kernel-limit write would do (read, not tried); a
    --cgroup-write required that would end in exit 4 ends the dry run so too: a dry run
    exits as the start would."""
    import json

    from .cgroup.predict import predict_limit
    from .plan_file import plan_document

    opts, plan = prepared.opts, prepared.plan
    document = plan_document(prepared.measurement, plan, prepared.argv, None, opts.cgroup_write)
    predicted = predict_limit(prepared.measurement, plan.budget, prepared.write_options)
    document["cgroup_write"]["predicted"] = predicted.as_dict()
    click.echo(json.dumps(document, indent=2))
    if opts.cgroup_write == "required" and not predicted.enforced:
        raise Refused(
            EXIT_WRITE_REQUIRED,
            f"--cgroup-write required, but the kernel limit could not be set "
            f"({predicted.reason}; found by --dry-run, which wrote nothing)",
            event="cgroup.write.required.failed",
        )


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
