"""Split our options from `dask worker`'s and read the few of theirs the plan needs (pure).

Everything that is not ours passes through byte for byte and in order. Knowing which
`dask worker` options take a value is what lets us tell `--name --dry-run` (a worker
named "--dry-run") from our own `--dry-run`.
"""

from __future__ import annotations

from .dask_compat.dask_worker import WORKER_VALUE_OPTIONS, WorkerArgsError
from .records import record

TYPE_CHECKING = False  # typing costs ~2 ms to import on the fast path; mypy knows this name
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Literal

    MemoryLimitAction = Literal["keep", "set", "clamped"]


@record
class MemoryLimitDecision:
    """What happens to `--memory-limit` on the worker's command line: keep the user's
    value, set the planned one (none given), or clamp the user's to the planned one."""

    action: MemoryLimitAction
    # The bytes that go on the command line; None for keep.
    value: int | None = None


@record
class WorkerArgs:
    nworkers: str | None = None
    nthreads: int | None = None
    nanny: bool = True
    memory_limit: str | None = None
    version_only: bool = False
    # `dask cuda worker`: one worker (with its nanny) per visible GPU, each with the
    # whole `--memory-limit`; None for distributed's own worker.
    gpu_workers: int | None = None
    local_directory: str | None = None


def split_argv(
    argv: Sequence[str],
    our_value_options: frozenset[str],
    our_flag_options: frozenset[str],
    worker_value_options: frozenset[str] = WORKER_VALUE_OPTIONS,
) -> tuple[list[str], list[str]]:
    """(ours, theirs). Ours are recognised anywhere before a `--`; after it, nothing is."""
    ours: list[str] = []
    theirs: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            theirs.extend(argv[i:])
            break
        name, has_value = (
            (token.split("=", 1)[0], "=" in token)
            if token.startswith("--")
            else (
                token,
                False,
            )
        )
        if name in our_value_options:
            take = 1 if has_value else 2
            ours.extend(argv[i : i + take])
            i += take
        elif name in our_flag_options:
            ours.append(token)
            i += 1
        elif name in worker_value_options and not has_value:
            theirs.extend(argv[i : i + 2])
            i += 2
        else:
            theirs.append(token)
            i += 1
    return ours, theirs


def _options(args: Sequence[str]) -> list[tuple[int, str, str | None]]:
    """(index, name, value) of each option before `--`, as click would read them."""
    found: list[tuple[int, str, str | None]] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            break
        if token.startswith("--"):
            name, eq, inline = token.partition("=")
            if eq:
                found.append((i, name, inline))
            elif name in WORKER_VALUE_OPTIONS:
                found.append((i, name, args[i + 1] if i + 1 < len(args) else None))
                i += 1
            else:
                found.append((i, name, None))
        i += 1
    return found


def parse_worker_args(args: Sequence[str], nworkers_options: Sequence[str]) -> WorkerArgs:
    """The values `dask worker` will see for the options the plan depends on.

    Later occurrences win, as in click. Raises WorkerArgsError for values `dask worker`
    would reject, so that we fail before touching anything. `nworkers_options` are the
    names that set the worker count in the installed release
    (`dask_compat.dask_worker.nworkers_options`): `--nprocs` only before 2022.10, after
    which `dask worker` rejects it, so it must not count.
    """
    counting = tuple(nworkers_options)
    given: dict[str, str] = {}
    nworkers: str | None = None
    nthreads: int | None = None
    nanny = True
    memory_limit: str | None = None
    local_directory: str | None = None
    version_only = False
    for _, name, value in _options(args):
        if name in ("--nworkers", "--nprocs", "--nthreads", "--memory-limit") and value is None:
            raise WorkerArgsError(f"option {name} requires a value")
        if name in ("--nworkers", "--nprocs"):
            if name in counting:
                assert value is not None
                given[name] = value
                nworkers = value
        elif name == "--nthreads":
            assert value is not None
            try:
                nthreads = int(value)
            except ValueError as exc:
                raise WorkerArgsError(f"--nthreads must be an integer, not {value!r}") from exc
            if nthreads < 0:
                raise WorkerArgsError(f"--nthreads must not be negative, not {nthreads}")
        elif name == "--memory-limit":
            memory_limit = value
        elif name == "--local-directory":
            local_directory = value
        elif name == "--nanny":
            nanny = True
        elif name == "--no-nanny":
            nanny = False
        elif name == "--version":
            version_only = True
    if len(given) > 1:
        raise WorkerArgsError("both --nprocs and --nworkers were given; use --nworkers only")
    return WorkerArgs(
        nworkers, nthreads, nanny, memory_limit, version_only, local_directory=local_directory
    )


def apply_memory_limit(args: Sequence[str], decision: MemoryLimitDecision) -> list[str]:
    """The worker's arguments after the plan's `--memory-limit` decision, in one pass."""
    if decision.value is None:
        return list(args)
    return with_memory_limit(args, decision.value)


def with_memory_limit(args: Sequence[str], limit: int) -> list[str]:
    """`args` with `--memory-limit <limit>`: replacing every given value, or added before
    any `--` (after it, tokens belong to preload scripts)."""
    out = list(args)
    replaced = False
    for index, name, _value in _options(args):
        if name != "--memory-limit":
            continue
        replaced = True
        if "=" in out[index]:
            out[index] = f"--memory-limit={limit}"
        elif index + 1 < len(out):
            out[index + 1] = str(limit)
    if replaced:
        return out
    cut = out.index("--") if "--" in out else len(out)
    return [*out[:cut], "--memory-limit", str(limit), *out[cut:]]


def scheduler_given(args: Sequence[str]) -> bool:
    """Whether `args` give `dask worker` a scheduler: its first positional argument (as
    click fills SCHEDULER: the first token that is neither an option nor an option's
    value, or the first after `--`) or `--scheduler-file`, either not empty."""
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            return bool(args[i + 1]) if i + 1 < len(args) else False
        if token.startswith("-") and token != "-":
            name, eq, value = token.partition("=")
            if name == "--scheduler-file":
                given = value if eq else (args[i + 1] if i + 1 < len(args) else "")
                if given:
                    return True
            if not eq and name in WORKER_VALUE_OPTIONS:
                i += 1
        else:
            return bool(token)
        i += 1
    return False


NO_SCHEDULER = (
    "Need to provide scheduler address like `dask worker SCHEDULER_ADDRESS:8786` "
    "(or --scheduler-file FILE, or DASK_SCHEDULER_ADDRESS)"
)


def launch_problem(
    args: Sequence[str], n_workers: int, nanny: bool, scheduler_configured: bool
) -> str | None:
    """What `dask worker` refuses after its option parsing ("Failed to launch worker",
    exit 1, or a ValueError's traceback for a missing scheduler), in its own words and
    its order: found here, before any limit or plan file is written.
    `scheduler_configured`: dask's configuration may hold a scheduler address
    (`dask_compat.dask_config`), or the scheduler does not matter (a query)."""
    names = {name for _, name, _ in _options(args)}
    listen = "--listen-address" in names
    if n_workers > 1 and not nanny:
        return "You cannot use the --no-nanny argument when n_workers > 1."
    if "--contact-address" in names and not listen:
        return "Must specify --listen-address when --contact-address is given"
    if n_workers > 1 and listen:
        return "You cannot specify --listen-address when n_workers > 1."
    if listen and names & {"--worker-port", "--host"}:
        return "You cannot specify --listen-address when --worker-port or --host is given."
    if not scheduler_configured and not scheduler_given(args):
        return NO_SCHEDULER
    return None
