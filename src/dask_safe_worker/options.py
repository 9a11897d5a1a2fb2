"""Our options, once: name, environment variable, parser, default and help, without click.

Both start paths derive from this table: `cli` builds its click command from it, and
`entry`'s click-free `--print-limit` path reads the same options from argv and the
environment with the same parsers (click costs ~13 ms to import; docs/benchmarks.md).
A parser takes the text as given and returns the value or raises ValueError with the
message the user sees.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from .cgroup.write import DEFAULT_CHILD_NAME, MAX_LIMIT, child_name_problem
from .events import LOG_FORMATS
from .plan import DEFAULT_MIN_WORKER_MEMORY, DEFAULT_NANNY_ALLOWANCE
from .records import record
from .sizes import Amount, parse_amount, parse_bytes

TYPE_CHECKING = False  # typing costs ~2 ms to import on the fast path; mypy knows this name
if TYPE_CHECKING:
    from typing import Any, Literal

    from .cgroup.write import WriteMode, WriteOptions
    from .plan import Settings

    LogFormat = Literal["auto", "json", "console", "none"]
    Kind = Literal["value", "flag", "switch"]

ENV_PREFIX = "DASK_SAFE_WORKER"
WRITE_MODES = ("auto", "never", "required")


def env_var(name: str) -> str:
    """`cgroup-write` is `DASK_SAFE_WORKER_CGROUP_WRITE`."""
    return f"{ENV_PREFIX}_{name.upper().replace('-', '_')}"


PLAN_FILE_ENV = env_var("plan-file")
# The plan file's path as the worker inherits it: not an option's variable, so that an
# instance started inside a worker never takes the outer instance's file as its own
# --plan-file and overwrites it (issue 24 row 11). tests/test_plan_file.py checks that
# no option reads it.
PLAN_EXPORT_ENV = "DASK_SAFE_WORKER_PLAN"


# A bare number is bytes, so `--reserve 1.5` meant 1 byte: below this, a number without a
# unit is taken as a forgotten unit and refused rather than guessed (0 stays "none").
BARE_BYTES_FLOOR = 2**20


def refuse_tiny_bare_number(text: str) -> None:
    try:
        number = float(text)
    except ValueError:
        return  # has a unit (or is not a number: the parser says so)
    if 1 <= number < BARE_BYTES_FLOOR:
        raise ValueError(
            f"{text.strip()!r} has no unit and would be {int(number)} byte(s): "
            "give a unit (e.g. 512MiB, 1.5GiB)"
        )


def parse_size(text: str) -> int:
    if not text.strip():
        # dask's parse_bytes reads "" as 1 byte; here that is always a mistake.
        raise ValueError("empty size")
    refuse_tiny_bare_number(text)
    size = parse_bytes(text)
    if size < 0:
        raise ValueError(f"{text!r} is negative")
    if size > MAX_LIMIT:
        raise ValueError(f"{text!r} is larger than any kernel limit")
    return size


def parse_reserve(text: str) -> Amount:
    """A size or a fraction, as `parse_amount` reads it; a size no kernel limit can hold
    is a usage error, not a plan that refuses (issue 24 row 13)."""
    amount = parse_amount(text)
    if amount.fraction is None:
        refuse_tiny_bare_number(text)
    if amount.bytes is not None and amount.bytes > MAX_LIMIT:
        raise ValueError(f"{text!r} is larger than any kernel limit")
    return amount


def parse_fraction(text: str) -> float:
    """A float in [0, 1): NaN is refused (every comparison with NaN is false, so a range
    check alone lets it through)."""
    try:
        number = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{text!r} is not a number") from None
    if not (math.isfinite(number) and 0 <= number < 1):
        raise ValueError(f"{text!r} is not at least 0 and below 1")
    return number


def parse_child_name(text: str) -> str:
    problem = child_name_problem(text)
    if problem is not None:
        raise ValueError(f"must be one plain path component: {problem}")
    return text


def parse_swap(text: str) -> int | None:
    """None leaves memory.swap.max as it is."""
    return None if text == "keep" else parse_size(text)


@record
class Options:
    """Our options, parsed and typed: built once, from click's values or the fast path's."""

    reserve: Amount
    min_worker_memory: int
    nanny_allowance: int
    cgroup_write: WriteMode
    cgroup_child: str
    memory_high_fraction: float
    swap_max: int | None
    clamp_memory_limit: bool
    worker_command: str | None
    dry_run: bool
    print_limit: bool
    log_format: LogFormat
    init: bool | None
    init_process_group: bool
    plan_file: str | None
    # --follow / --no-follow as given; None follows unless --no-init (`following`).
    follow: bool | None
    follow_interval: float
    worker_help: bool
    allow_unreadable_cgroup: bool = False

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Options:
        """From {dest: parsed value}, as click or `fast_options` produce them; a default
        that click hands over as given (a number) is parsed like text."""
        return cls(
            reserve=values["reserve"],
            min_worker_memory=int(values["min_worker_memory"]),
            nanny_allowance=int(values["nanny_allowance"]),
            cgroup_write=values["cgroup_write"],
            cgroup_child=str(values["cgroup_child"]),
            memory_high_fraction=float(values["memory_high_fraction"]),
            swap_max=values["swap_max"],
            clamp_memory_limit=bool(values["clamp_memory_limit"]),
            worker_command=values["worker_command"],
            dry_run=bool(values["dry_run"]),
            print_limit=bool(values["print_limit"]),
            log_format=values["log_format"],
            init=values["init"],
            init_process_group=bool(values["init_process_group"]),
            plan_file=values["plan_file"],
            follow=values["follow"],
            follow_interval=float(values["follow_interval"]),
            worker_help=bool(values["worker_help"]),
            allow_unreadable_cgroup=bool(values.get("allow_unreadable_cgroup", False)),
        )

    @property
    def following(self) -> bool:
        """Whether a supervisor follows the budget live: by default, unless --no-follow,
        or --no-init alone (exec the worker, as before following was the default)."""
        if self.follow is not None:
            return self.follow
        return self.init is not False

    def supervised(self, pid: int) -> bool:
        """--init or --no-init, else supervise only as PID 1; following always (somebody
        must stay to watch: the supervisor does)."""
        if self.following:
            return True
        return self.init if self.init is not None else pid == 1

    def settings(self, pid: int) -> Settings:
        from .plan import Settings

        return Settings(
            reserve=self.reserve,
            min_worker_memory=self.min_worker_memory,
            nanny_allowance=self.nanny_allowance,
            supervised=self.supervised(pid),
            clamp_memory_limit=self.clamp_memory_limit,
            follows=self.following,
        )

    def write_options(self) -> WriteOptions:
        """ValueError for a value `apply_limit` would refuse."""
        from .cgroup.write import WriteOptions

        return WriteOptions(
            mode=self.cgroup_write,
            child_name=self.cgroup_child,
            memory_high_fraction=self.memory_high_fraction or None,
            swap_max=self.swap_max,
        )


def parse_interval(text: str) -> float:
    # only for --follow-interval: not on the fast path
    from .follow.decide import validate_interval

    try:
        return validate_interval(float(text))
    except ValueError as exc:
        raise ValueError(
            str(exc) if "interval" in str(exc) else f"{text!r} is not a number"
        ) from None


@record
class OptionSpec:
    """One of our options. `kind`: a value option, a flag, or an on/off switch
    (`--init/--no-init`, None when neither is given)."""

    name: str
    help: str
    kind: Kind = "value"
    # None: the text itself (or, for `choices`, one of them).
    parse: Callable[[str], object] | None = None
    type_name: str = ""
    choices: tuple[str, ...] = ()
    default: str | float | bool | None = None
    show_default: bool | str = False
    path: bool = False
    # --version: an environment variable would stop every start.
    has_env: bool = True

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str | None:
        return env_var(self.name) if self.has_env else None

    @property
    def names(self) -> tuple[str, ...]:
        """Every spelling on the command line."""
        if self.kind == "switch":
            return (f"--{self.name}", f"--no-{self.name}")
        return (f"--{self.name}",)

    def convert(self, text: str) -> object:
        """The value of `text` given for this option; ValueError with the user's message."""
        if self.choices and text not in self.choices:
            raise ValueError(f"{text!r} is not one of {', '.join(map(repr, self.choices))}")
        return text if self.parse is None else self.parse(text)


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "reserve",
        parse=parse_reserve,
        type_name="SIZE|FRACTION",
        default="0",
        show_default=True,
        help="Memory kept back for everything else: a size with a unit (512MiB) or a "
        "fraction (0.1 or 10%) of the memory before the reserve (own working set + "
        "available); the budget is what remains. A bare number of 1 or more is bytes and "
        "must be at least 1 MiB (1.5 is refused: write 1.5GiB or 15%).",
    ),
    OptionSpec(
        "min-worker-memory",
        parse=parse_size,
        type_name="SIZE",
        default=str(DEFAULT_MIN_WORKER_MEMORY),
        show_default="256MiB",
        help="Refuse to start (exit 3, nothing touched) when a worker would get less.",
    ),
    OptionSpec(
        "nanny-allowance",
        parse=parse_size,
        type_name="SIZE",
        default=str(DEFAULT_NANNY_ALLOWANCE),
        show_default="40MiB",
        help="Memory set aside for each nanny process, outside the workers' limits.",
    ),
    OptionSpec(
        "cgroup-write",
        choices=WRITE_MODES,
        default="auto",
        show_default=True,
        help="Enforce the budget as a kernel cgroup limit where permitted (auto), "
        "never, or fail with exit 4 if the kernel limit cannot be set (required).",
    ),
    OptionSpec(
        "cgroup-child",
        parse=parse_child_name,
        type_name="NAME",
        default=DEFAULT_CHILD_NAME,
        show_default=True,
        help="Name of the child cgroup created when our own cgroup cannot be limited: one "
        "plain path component (no '/', not '.' or '..'); taken names get a unique suffix.",
    ),
    OptionSpec(
        "memory-high-fraction",
        parse=parse_fraction,
        type_name="FRACTION",
        default=0.0,
        show_default=True,
        help="cgroup v2: also set memory.high to this fraction of the budget, a "
        "throttle zone before the hard limit (0 = off).",
    ),
    OptionSpec(
        "swap-max",
        parse=parse_swap,
        type_name="SIZE|keep",
        default="0",
        show_default=True,
        help="cgroup v2: memory.swap.max for the worker's cgroup ('keep' leaves it).",
    ),
    OptionSpec(
        "allow-unreadable-cgroup",
        kind="flag",
        help="Start even when a memory cgroup level we are in cannot be read or located "
        "(a bind mount over the controller, a path outside our cgroup namespace): plan "
        "from host memory and the levels that can be read, and write no limit where our "
        "cgroup is not located. Without it, or a --memory-limit you give, such a start "
        "exits 1 (a level that cannot be read never counts as no limit).",
    ),
    OptionSpec(
        "clamp-memory-limit",
        kind="flag",
        help="Lower a --memory-limit you gave to the planned value when it does not "
        "fit the budget (by default it passes through unchanged).",
    ),
    OptionSpec(
        "worker-command",
        help="The command that starts the worker, e.g. 'dask cuda worker' "
        "[default: this Python's -m distributed.cli.dask_worker].",
    ),
    OptionSpec("dry-run", kind="flag", help="Print the whole plan as JSON; change nothing."),
    OptionSpec(
        "print-limit",
        kind="flag",
        help="Print the budget in bytes (for host-side scripts); change nothing.",
    ),
    OptionSpec(
        "log-format",
        choices=LOG_FORMATS,
        default="auto",
        show_default=True,
        help="Audit log on stderr: JSON lines, console, or none (auto: console on a TTY).",
    ),
    OptionSpec(
        "init",
        kind="switch",
        help="Supervise the worker like tini (forward signals, reap zombies) instead of "
        "exec'ing it [default: only when running as PID 1].",
    ),
    OptionSpec(
        "init-process-group",
        kind="flag",
        help="With --init, forward signals to the worker's whole process group (tini -g).",
    ),
    OptionSpec(
        "plan-file",
        path=True,
        help="Where to record the plan as JSON for `dask-safe-audit`; its path is exported "
        f"to the worker as {PLAN_EXPORT_ENV} [default: a file in a private runtime directory].",
    ),
    OptionSpec(
        "follow",
        kind="switch",
        help="Keep following memory after the start (the default): re-measure every "
        "--follow-interval, share the pool fairly with the other instances on this host, "
        "and move every worker's and nanny's memory limit (and the kernel limit written "
        "at start) when the budget changes; a supervisor stays beside the worker. "
        "--no-follow (or --no-init) execs the worker and plans once: its budget is then "
        "a fixed commitment that other instances plan around.",
    ),
    OptionSpec(
        "follow-interval",
        parse=parse_interval,
        type_name="SECONDS",
        default="1",
        show_default=True,
        help="Seconds between two measurements while following (at least 0.05).",
    ),
    OptionSpec(
        "worker-help",
        kind="flag",
        help="Show `dask worker --help`: every option not listed here goes to the worker.",
    ),
    OptionSpec(
        "version",
        kind="flag",
        has_env=False,
        help="Show this tool's version and the installed distributed's, then exit.",
    ),
)

HELP_NAMES = frozenset({"--help", "-h"})
VALUE_NAMES: frozenset[str] = frozenset(n for o in OPTIONS if o.kind == "value" for n in o.names)
FLAG_NAMES: frozenset[str] = (
    frozenset(n for o in OPTIONS if o.kind != "value" for n in o.names) | HELP_NAMES
)
BY_NAME: dict[str, OptionSpec] = {o.name: o for o in OPTIONS}

# What a plain `--print-limit` may carry and still be answered without click: everything
# that changes the budget, or is only checked. The rest (another action, a plan file, a
# worker command, an audit log to print) goes to the full command.
FAST_VALUES = frozenset(
    {
        "reserve",
        "min-worker-memory",
        "nanny-allowance",
        "cgroup-write",
        "cgroup-child",
        "memory-high-fraction",
        "swap-max",
        "log-format",
    }
)
FAST_FLAGS = frozenset(
    {"print-limit", "clamp-memory-limit", "init-process-group", "allow-unreadable-cgroup"}
)
# A log format that prints nothing for a query (auto means none there).
FAST_LOG_FORMATS = frozenset({"auto", "none"})


def fast_options(ours: Sequence[str], environ: Mapping[str, str]) -> Options | None:
    """Our options from `ours` (as `split_argv` returns them) and the environment, parsed
    as the full command parses them, or None where the full command must decide: an
    option it alone handles, a repeated or invalid one (it explains the error)."""
    given: dict[str, str] = {}
    flags: dict[str, bool] = {}
    i = 0
    while i < len(ours):
        name, eq, inline = ours[i].partition("=")
        spec = BY_NAME.get(name.removeprefix("--"))
        if name in VALUE_NAMES and spec is not None and spec.name in FAST_VALUES:
            if not eq:
                if i + 1 >= len(ours):
                    return None
                inline = ours[i + 1]
            if spec.name in given:
                return None
            given[spec.name] = inline
            i += 1 if eq else 2
        elif ours[i] in ("--init", "--no-init"):
            if "init" in flags:
                return None
            flags["init"] = ours[i] == "--init"
            i += 1
        elif spec is not None and spec.kind == "flag" and spec.name in FAST_FLAGS and not eq:
            flags[spec.name] = True
            i += 1
        else:
            return None
    if not flags.get("print-limit"):
        return None
    values: dict[str, object] = {}
    for spec in OPTIONS:
        env = spec.env
        from_env = environ.get(env) if env is not None else None
        if spec.kind != "value":
            if spec.name not in flags and from_env:
                return None  # click's boolean spellings: the full command reads them
            values[spec.dest] = flags.get(spec.name, False if spec.kind == "flag" else None)
            continue
        text: str | None = None
        if spec.name in given:
            text = given[spec.name]
        elif from_env:
            if spec.name not in FAST_VALUES:
                return None
            text = from_env
        if text is None:
            if spec.name in FAST_VALUES and isinstance(spec.default, str):
                text = spec.default
            else:
                values[spec.dest] = spec.default
                continue
        try:
            values[spec.dest] = spec.convert(text)
        except ValueError:
            return None
    if values["log_format"] not in FAST_LOG_FORMATS:
        return None
    return Options.from_values(values)
