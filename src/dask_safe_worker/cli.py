"""`dask-safe-worker [OUR OPTIONS] [ANY dask worker ARGS]`: measure, plan, limit, pass, run.

This module is the imperative shell: it reads options, calls the pure measurement and
planning code, and hands side effects to `cgroup_write`, `run_worker` and `supervise`.
It must not import dask or distributed: the worker does that after exec.
"""

from __future__ import annotations

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
    WriteOptions,
    WriteOutcome,
    apply_limit,
    intended_strategy,
)
from .env_options import env_option, env_var
from .measure import Measurement, measure
from .plan import (
    DEFAULT_MIN_WORKER_MEMORY,
    DEFAULT_NANNY_ALLOWANCE,
    Plan,
    PlanError,
    Settings,
    make_plan,
)
from .sizes import Amount, parse_amount, parse_bytes
from .worker_args import parse_worker_args, split_argv, with_memory_limit

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
        try:
            size = parse_bytes(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if size < 0:
            self.fail(f"{value!r} is negative", param, ctx)
        return size


class _SwapType(click.ParamType):  # type: ignore[type-arg]
    name = "SIZE|keep"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or isinstance(value, int):
            return value
        if str(value) == "keep":
            return None
        return _SizeType().convert(value, param, ctx)


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
        show_default="40MiB",
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
        default=DEFAULT_CHILD_NAME,
        show_default=True,
        help="Name of the child cgroup created when our own cgroup cannot be limited.",
    ),
    _option(
        "memory-high-fraction",
        type=click.FloatRange(0, 1, max_open=True),
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
        f"to the worker as {PLAN_FILE_ENV} [default: a file in the temp directory].",
    ),
    _option(
        "worker-help",
        is_flag=True,
        help="Show `dask worker --help`: every option not listed here goes to the worker.",
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
) | {"--help"}

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


def _fail(code: int, message: str, audit: Audit, event: str) -> NoReturn:
    audit(event, message=message, exit_code=code)
    click.echo(f"dask-safe-worker: {message}", err=True)
    sys.exit(code)


def _worker_prefix(worker_command: str | None) -> list[str]:
    if worker_command:
        import shlex  # only here: every import counts against --print-limit's start-up

        return shlex.split(worker_command)
    return dask_compat.worker_command(sys.executable)


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
    argv: Sequence[str], outcome: WriteOutcome, params: dict[str, Any]
) -> list[str]:
    """`python -m dask_safe_worker.supervise ... -- <worker argv>`."""
    cmd = [sys.executable, "-m", "dask_safe_worker.supervise"]
    cmd += ["--log-format", "none" if params["log_format"] == "none" else "json"]
    if params["init_process_group"]:
        cmd.append("-g")
    if outcome.created_child and outcome.parent_dir:
        cmd += ["--remove-cgroup", outcome.created_child, "--parent-cgroup", outcome.parent_dir]
    return [*cmd, "--", *argv]


def _write_plan_file(path: str | None, document: dict[str, Any], audit: Audit) -> str | None:
    # json and tempfile are imported where used: --print-limit needs neither, and its
    # start-up time is a goal (docs/benchmarks.md).
    import json
    import tempfile

    target = path or os.path.join(tempfile.gettempdir(), f"dask-safe-worker-{os.getpid()}.json")
    try:
        Path(target).write_text(json.dumps(document, indent=2) + "\n")
    except OSError as exc:
        audit("plan.file.failed", path=target, reason=exc.strerror or str(exc))
        return None
    audit("plan.file.written", path=target)
    return target


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
    prefix = _worker_prefix(params["worker_command"])
    query = params["print_limit"] or params["dry_run"]
    audit = make_audit("none" if query and params["log_format"] == "auto" else params["log_format"])
    audit("cli.started", version=__version__, options=_params_for_log(ctx), argv=worker_args)

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
        wargs = parse_worker_args(worker_args, dask_compat.nworkers_options(release))
    except dask_compat.WorkerArgsError as exc:
        _fail(EXIT_USAGE, f"invalid dask worker arguments: {exc}", audit, "cli.usage.error")
    if wargs.version_only:
        from .run_worker import exec_worker

        exec_worker([*prefix, *worker_args], os.environ, audit)

    supervised = bool(params["init"]) if params["init"] is not None else os.getpid() == 1
    try:
        m = measure()
    except (OSError, ValueError) as exc:
        _fail(
            EXIT_MEASURE_FAILED, f"cannot read memory information: {exc}", audit, "measure.failed"
        )
    audit("measure.done", **m.as_dict())

    try:
        plan = make_plan(m, wargs, _settings(params, supervised))
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

    outcome = apply_limit(m, plan.budget, opts=_write_options(params), audit=audit)
    audit("cgroup.write.outcome", **outcome.as_dict())
    if params["cgroup_write"] == "required" and not outcome.enforced:
        _fail(
            EXIT_WRITE_REQUIRED,
            f"--cgroup-write required, but the kernel limit could not be set ({outcome.reason})",
            audit,
            "cgroup.write.required.failed",
        )

    env = dict(os.environ)
    plan_file = _write_plan_file(
        params["plan_file"], plan_document(m, plan, argv, outcome, params), audit
    )
    if plan_file:
        env[PLAN_FILE_ENV] = plan_file
    audit("worker.argv", argv=argv, supervised=supervised)

    from .run_worker import exec_worker

    if supervised:
        # Exec a bare supervisor rather than supervising from here: as PID 1 it lives as
        # long as the container, and this process carries click and structlog (~27 MiB
        # RSS against ~11 MiB for the bare one, benchmarks/supervisor_rss.py).
        exec_worker(supervisor_argv(argv, outcome, params), env, audit, event="init.exec")
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
    context_settings={"max_content_width": 100},
)


def main(argv: Sequence[str] | None = None) -> None:
    """The `dask-safe-worker` console script."""
    command.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="dask-safe-worker")
