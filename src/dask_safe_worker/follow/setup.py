"""`--follow` at start: the channel, the spec for the supervisor, the preloads (an edge).

Called by the CLI after the kernel limit was written and before the supervisor is
exec'd. Everything it writes lives in one private directory that the supervisor removes
when the worker is gone. When any of it cannot be written, following is off (the caller
logs why) and the worker starts as it would without `--follow`.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..cgroup.pool import Member, Pool
from ..cgroup.write import WriteOutcome
from ..events import Audit
from ..measure import Measurement
from ..plan import Plan, Settings
from ..worker_args import WorkerArgs
from .decide import FollowSpec, ManagedLimit
from .live_limit import (
    CONFIGURED_PRELOADS_ENV,
    LIVE_FILE_ENV,
    SPEC_FILE,
    LiveLimit,
    prepare_channel,
    write_live_limit,
)

WORKER_PRELOAD = "dask_safe_worker.follow.worker"
NANNY_PRELOAD = "dask_safe_worker.follow.nanny"


@dataclass(frozen=True)
class FollowSetup:
    spec_file: str
    live_file: str
    env: dict[str, str]


class FollowUnavailable(Exception):
    """Following cannot work here; the message says why."""


def with_preloads(args: Sequence[str], nanny: bool) -> list[str]:
    """The worker's argv with our preloads, after any the user gave and before a `--`
    (after it, tokens are the preloads' own arguments)."""
    ours = ["--preload", WORKER_PRELOAD]
    if nanny:
        ours += ["--preload-nanny", NANNY_PRELOAD]
    out = list(args)
    cut = out.index("--") if "--" in out else len(out)
    return [*out[:cut], *ours, *out[cut:]]


def managed_limit(
    m: Measurement, outcome: WriteOutcome, root: Path = Path("/")
) -> ManagedLimit | None:
    """The kernel limit this start wrote, with what was there before; None if none."""
    if not outcome.written or m.location is None or outcome.read_back is None:
        return None
    if outcome.strategy == "own":
        directory = str(m.location.directory(root))
        original = m.levels[0].limit if m.levels else None
        original_high = m.levels[0].high if m.levels else None
    elif outcome.strategy == "child" and outcome.parent_dir and outcome.target:
        directory = os.path.join(outcome.parent_dir, outcome.target.rsplit("/", 1)[-1])
        # A child we created had no limit; one we found had a higher one (a lower one
        # is never written over), and the start's budget caps every raise anyway.
        original = None
        original_high = None
    else:
        return None
    # v1: what was above the level before our write (for a child, our own cgroup's
    # hierarchical limit): the watch's view of ancestors ours may hide.
    ancestors = m.levels[0].hierarchical_limit if m.levels else None
    return ManagedLimit(
        directory, m.location.version, original, outcome.read_back, original_high, ancestors
    )


def kernel_note(outcome: WriteOutcome) -> str:
    """Why following moves Dask's side alone, from the start's write outcome."""
    reasons = {
        "EROFS": "read-only cgroupfs: Dask's side follows alone",
        "existing_lower": "the limit found at start is not ours: Dask's side follows alone",
        "disabled": "--cgroup-write never: Dask's side follows alone",
        "no_memory_cgroup": "no memory cgroup: Dask's side follows alone",
    }
    return reasons.get(
        outcome.reason, f"no kernel limit written ({outcome.reason}): Dask's side follows alone"
    )


def _private_dir(prefix: str, base_dir: str | None) -> str:
    """A new directory only we can use, as `tempfile.mkdtemp` makes it: tempfile itself
    costs ~8 ms (shutil, random, bz2, lzma) on the way to the worker."""
    from ..plan_file import temp_dir

    base = os.path.abspath(base_dir if base_dir is not None else temp_dir())
    for _ in range(100):
        path = os.path.join(base, prefix + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no unused name for the live-limit channel", base)


def prepare(
    m: Measurement,
    plan: Plan,
    wargs: WorkerArgs,
    settings: Settings,
    outcome: WriteOutcome,
    interval: float,
    base_dir: str | None = None,
    pool: Pool | None = None,
    member: Member | None = None,
) -> FollowSetup:
    """Write the channel and the spec; raises FollowUnavailable with the reason."""
    per_worker = plan.effective_per_worker
    if per_worker is None:
        raise FollowUnavailable("the workers have no memory limit (--memory-limit 0)")
    try:
        directory = _private_dir("dask-safe-worker-follow-", base_dir)
        live = prepare_channel(directory)
        write_live_limit(live, LiveLimit(0, per_worker, plan.budget, interval, time.time()))
        managed = managed_limit(m, outcome)
        spec = FollowSpec(
            settings=settings,
            args=wargs,
            first_budget=plan.budget,
            first_per_worker=per_worker,
            interval=interval,
            channel=live,
            managed=managed,
            kernel_note=None if managed else kernel_note(outcome),
            pool_dir=None if pool is None else str(pool.directory),
            pool_key=None if pool is None else pool.key,
            weight=plan.n_workers,
            fixed=None if member is None else member.fixed,
            member_cgroup=None if member is None else member.cgroup,
            committed=None if member is None else member.committed,
        )
        spec_file = os.path.join(directory, SPEC_FILE)
        fd = os.open(spec_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(spec.to_json(), f)
    except OSError as exc:
        raise FollowUnavailable(
            f"cannot write the live-limit channel: {exc.strerror or exc}"
        ) from exc
    return FollowSetup(spec_file, live, {LIVE_FILE_ENV: live})


def attach(
    m: Measurement,
    plan: Plan,
    wargs: WorkerArgs,
    settings: Settings,
    outcome: WriteOutcome,
    interval: float,
    worker_args: Sequence[str],
    audit: Audit,
    pool: Pool | None = None,
    member: Member | None = None,
    preloads: bool = True,
) -> tuple[list[str], dict[str, str], str | None]:
    """(the worker's arguments, the variables it gets, the spec file for the supervisor)
    with following set up; the arguments as given and no spec when it cannot be
    (`follow.disabled` says why), so the worker starts either way. Without `preloads`
    (a worker command that may not import them) Dask's side stays as planned: the
    budget is a fixed commitment in the pool, and the supervisor still reports."""
    try:
        setup = prepare(m, plan, wargs, settings, outcome, interval, pool=pool, member=member)
    except FollowUnavailable as exc:
        audit("follow.disabled", reason=str(exc))
        return list(worker_args), {}, None
    if not preloads:
        audit(
            "follow.dask_side_off",
            reason="a custom worker command may not import our preloads (--follow adds them)",
        )
        return list(worker_args), setup.env, setup.spec_file
    env = dict(setup.env)
    configured = configured_roles(worker_args, wargs.nanny)
    if configured:
        env[CONFIGURED_PRELOADS_ENV] = ",".join(configured)
    return with_preloads(worker_args, wargs.nanny), env, setup.spec_file


def configured_roles(args: Sequence[str], nanny: bool) -> list[str]:
    """The roles whose preloads come from dask's config alone: our `--preload` (and
    `--preload-nanny`) on the command line would make dask skip them."""
    cut = args.index("--") if "--" in args else len(args)
    given = {a.partition("=")[0] for a in args[:cut]}
    roles = [] if "--preload" in given else ["worker"]
    if nanny and "--preload-nanny" not in given:
        roles.append("nanny")
    return roles
