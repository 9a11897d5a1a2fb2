"""`dask-safe-audit SCHEDULER_ADDRESS`: is every worker of a cluster safe from the kernel?

A separate console script, not a `dask-safe-worker audit` mode: `dask-safe-worker`
passes every argument it does not own to `dask worker`, and `audit` is a valid
positional there (a scheduler address or a name), so a sub-command would change what an
existing command line means. docs/audit-cluster.md explains the verdicts.

Shape: `collect` (audit_remote.py) runs on each worker and returns plain data;
`facts_from_report` and `judge` turn that into verdicts (pure); `main` is the shell
(connect, run, print, exit code). distributed is imported only after the options parse.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

import click

from .env_options import env_option
from .plan import DEFAULT_NANNY_ALLOWANCE
from .sizes import format_bytes

# 2: `action` per worker; a cgroup that only inherits a limit (v1) is no constraint.
AUDIT_SCHEMA = 2

SAFE = "safe"
AT_RISK = "at risk"
UNMANAGED = "unmanaged"
UNKNOWN = "unknown"
FITS = "fits"

EXIT_SAFE = 0
EXIT_AT_RISK = 1
EXIT_USAGE = 2
EXIT_UNVERIFIED = 3

DEFAULT_TERMINATE_FRACTION = 0.95
ENV_PREFIX = "DASK_SAFE_AUDIT"


@dataclass(frozen=True)
class Constraint:
    """Something that bounds the memory of every worker below it: the host, or a
    cgroup level with a limit. `key` is the same for every worker below it."""

    key: str
    name: str
    limit: int | None
    headroom: int | None


@dataclass(frozen=True)
class WorkerFacts:
    address: str
    host: str
    name: str = ""
    dask_limit: int | None = None
    rss: int = 0
    # Dask's nanny restarts the worker at this fraction of its limit; None: never.
    terminate_fraction: float | None = DEFAULT_TERMINATE_FRACTION
    nanny_room: int = 0
    managed: bool = False
    available: int | None = None
    kernel_limit: int | None = None
    kernel_limit_path: str | None = None
    constraints: tuple[Constraint, ...] = ()
    error: str | None = None
    notes: tuple[str, ...] = ()
    # The cgroups (as the worker sees them) with memory.oom.group=1: one kernel OOM
    # kill there takes every worker below, nanny and PID 1 included.
    oom_group: tuple[str, ...] = ()


@dataclass(frozen=True)
class Verdict:
    address: str
    verdict: str
    # For unmanaged workers: the measured risk, FITS or AT_RISK.
    risk: str | None
    reasons: tuple[str, ...] = field(default=())
    # One line: what the operator can do about it (None when nothing needs doing).
    action: str | None = None

    @property
    def at_risk(self) -> bool:
        return self.verdict == AT_RISK or self.risk == AT_RISK


def _reach(w: WorkerFacts) -> float:
    """The most this worker can use before Dask acts, or the kernel stops it first."""
    if w.dask_limit is None:
        dask_reach = math.inf
    else:
        fraction = w.terminate_fraction if w.terminate_fraction is not None else 1.0
        dask_reach = math.ceil(fraction * w.dask_limit)
    kernel = w.kernel_limit if w.kernel_limit is not None else math.inf
    return min(dask_reach, kernel)


def _threshold(w: WorkerFacts) -> float:
    """Where Dask restarts this worker (its whole limit if terminate is off)."""
    if w.dask_limit is None:
        return math.inf
    fraction = w.terminate_fraction if w.terminate_fraction is not None else 1.0
    return math.ceil(fraction * w.dask_limit)


def _size(value: float) -> str:
    return "unbounded" if math.isinf(value) else format_bytes(int(value))


_SHOWN_NEIGHBOURS = 4


def _label(w: WorkerFacts) -> str:
    return w.name or w.address


def _neighbours(w: WorkerFacts, group: Sequence[WorkerFacts]) -> str:
    """The other workers under one constraint, for a reason line."""
    others = [g for g in group if g is not w]
    shown = []
    for g in others[:_SHOWN_NEIGHBOURS]:
        limit = "no Dask limit" if g.dask_limit is None else f"Dask limit {_size(g.dask_limit)}"
        shown.append(f"{_label(g)} ({'' if g.managed else 'unmanaged, '}{limit})")
    if len(others) > _SHOWN_NEIGHBOURS:
        shown.append(f"{len(others) - _SHOWN_NEIGHBOURS} more")
    return ", ".join(shown)


def _names(workers: Sequence[WorkerFacts]) -> str:
    labels = [_label(w) for w in workers]
    if len(labels) > _SHOWN_NEIGHBOURS:
        return (
            ", ".join(labels[:_SHOWN_NEIGHBOURS]) + f" and {len(labels) - _SHOWN_NEIGHBOURS} more"
        )
    return ", ".join(labels)


def _action(
    w: WorkerFacts, kinds: set[str], unmanaged_neighbours: Sequence[WorkerFacts]
) -> str | None:
    """The one thing to do first, for the problems found (kinds), in order of cause."""
    if not kinds:
        return None
    if "no_terminate" in kinds:
        return (
            "set distributed.worker.memory.terminate back to 0.95 (for example "
            "DASK_DISTRIBUTED__WORKER__MEMORY__TERMINATE=0.95) and restart the worker"
        )
    if not w.managed:
        return (
            "start this worker with dask-safe-worker instead of `dask worker`, so that it "
            "gets a --memory-limit that fits what is free, or give it such a --memory-limit"
        )
    if "no_limit" in kinds:
        return "restart it without --memory-limit 0, so that dask-safe-worker sets one"
    if unmanaged_neighbours:
        return (
            f"fix the unmanaged worker(s) beside it ({_names(unmanaged_neighbours)}): start "
            "them with dask-safe-worker, or give them a --memory-limit that fits; then "
            "restart this worker to re-plan"
        )
    if "kernel" in kinds:
        return (
            "the workers under that limit were planned separately: restart them one after "
            "another to re-plan, or give each less with --reserve"
        )
    return (
        "the plan is made once at start and other processes have grown since: restart the "
        "worker to re-plan from what is free now, and keep room for them with --reserve "
        "(e.g. --reserve 10%)"
    )


def judge(workers: Sequence[WorkerFacts]) -> list[Verdict]:
    """One verdict per worker, in order.

    For every constraint a worker is under (the host, each cgroup level with a limit),
    with all audited workers under the same constraint:
    - kernel limit: the sum of Dask's restart thresholds plus nanny room must fit, or
      the kernel kills before Dask restarts;
    - available now: what the workers may still grow before Dask acts (each capped by
      its own kernel limit) must fit in the level's current headroom.
    A reason names the other workers under the same constraint; `action` says what to do.
    """
    members: dict[str, list[WorkerFacts]] = {}
    for w in workers:
        if w.error is None:
            for c in w.constraints:
                members.setdefault(c.key, []).append(w)

    verdicts: list[Verdict] = []
    for w in workers:
        if w.error is not None:
            action = (
                "install dask-safe-worker in that worker's environment to audit it"
                if "is not installed" in w.error
                else None
            )
            verdicts.append(Verdict(w.address, UNKNOWN, None, (w.error, *w.notes), action))
            continue
        problems: list[str] = []
        kinds: set[str] = set()
        # Unmanaged workers that share a constraint this worker has a problem with.
        unmanaged: list[WorkerFacts] = []
        if w.dask_limit is None:
            problems.append("Dask has no memory limit: it never spills, pauses or restarts")
            kinds.add("no_limit")
        if w.terminate_fraction is None:
            problems.append(
                "distributed.worker.memory.terminate is off: Dask never restarts the worker"
            )
            kinds.add("no_terminate")
        for c in w.constraints:
            group = members[c.key]
            where = c.name if c.name == "host" else f"cgroup {c.name}"
            beside = _neighbours(w, group)
            sharing = f"; sharing it: {beside}" if beside else ""
            found = False
            if c.limit is not None:
                need = sum(_threshold(g) + g.nanny_room for g in group)
                if need > c.limit:
                    found = True
                    kinds.add("kernel")
                    problems.append(
                        f"{len(group)} worker(s) at Dask's restart threshold plus nanny room "
                        f"need {_size(need)}, above the kernel limit {_size(c.limit)} of "
                        f"{where}: the kernel kills before Dask restarts{sharing}"
                    )
            if c.headroom is not None:
                growth = sum(max(0.0, _reach(g) - g.rss) for g in group)
                if growth > c.headroom:
                    found = True
                    kinds.add("headroom")
                    problems.append(
                        f"{len(group)} worker(s) may still grow by {_size(growth)} before "
                        f"Dask acts, but only {_size(c.headroom)} is available now in "
                        f"{where}{sharing}"
                    )
            if found:
                unmanaged += [g for g in group if not g.managed and g is not w]
        unique = list({id(g): g for g in unmanaged}.values())
        reasons = tuple(problems) + w.notes
        action = _action(w, kinds, unique)
        if w.managed:
            verdict = AT_RISK if problems else SAFE
            verdicts.append(Verdict(w.address, verdict, None, reasons, action))
        else:
            risk = AT_RISK if problems else FITS
            why = "not started by dask-safe-worker (no plan file)"
            verdicts.append(Verdict(w.address, UNMANAGED, risk, (why, *reasons), action))
    return verdicts


def exit_code(verdicts: Sequence[Verdict]) -> int:
    """0 every worker safe; 1 any at risk (unmanaged ones included); 3 none at risk but
    some could not be verified (unmanaged that fit, unknown, or no workers at all)."""
    if any(v.at_risk for v in verdicts):
        return EXIT_AT_RISK
    if verdicts and all(v.verdict == SAFE for v in verdicts):
        return EXIT_SAFE
    return EXIT_UNVERIFIED


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _cgroup_constraints(host_key: str, raw_levels: Any) -> list[Constraint]:
    """One constraint per cgroup that sets a limit itself, own cgroup first.

    On v1 an unlimited cgroup below a limited one reports the ancestor's limit as its
    `hierarchical_memory_limit`; that limit belongs to the ancestor, which is listed with
    it, so the child adds nothing. A limit above the topmost visible cgroup (a container's
    parent on the host) is kept, named as such.
    """
    levels = [lvl for lvl in raw_levels or [] if isinstance(lvl, dict)]
    constraints: list[Constraint] = []
    for level in levels:
        # Reports without `own_limit` came from a collector that knew only the effective one.
        own = _int(level.get("own_limit") if "own_limit" in level else level.get("limit"))
        if own is None:
            continue
        path = str(level.get("path"))
        key = level.get("key") or f"{host_key}:cgroup:{path}"
        constraints.append(Constraint(str(key), path, own, _headroom(own, level)))
    if levels:
        top = levels[-1]
        inherited = _int(top.get("hierarchical_limit"))
        own_limits = [c.limit for c in constraints if c.limit is not None]
        if inherited is not None and (not own_limits or inherited < min(own_limits)):
            path = str(top.get("path"))
            key = f"{top.get('key') or f'{host_key}:cgroup:{path}'}:above"
            name = f"above {path} (not visible here)"
            constraints.append(Constraint(key, name, inherited, _headroom(inherited, top)))
    return constraints


def _headroom(limit: int, level: Mapping[str, Any]) -> int | None:
    working_set = _int(level.get("working_set"))
    if working_set is None:
        return _int(level.get("headroom"))
    return max(0, limit - working_set)


def facts_from_report(
    address: str, info: Mapping[str, Any], report: Mapping[str, Any] | BaseException | None
) -> WorkerFacts:
    """Turn what `collect` returned (or the exception it raised, or nothing) into facts.

    `info` is the scheduler's view of the worker (host, name, memory_limit), used when
    the worker itself could not answer.
    """
    host = str(info.get("host") or address)
    name = str(info.get("name") or "")
    if report is None or isinstance(report, BaseException):
        reason = (
            "the worker did not answer"
            if report is None
            else f"the audit function failed: {type(report).__name__}: {report}"
        )
        return WorkerFacts(
            address, host, name, dask_limit=_int(info.get("memory_limit")) or None, error=reason
        )

    plan = report.get("plan") if isinstance(report.get("plan"), dict) else None
    managed = bool(report.get("plan_file"))
    notes: list[str] = []
    if report.get("plan_error"):
        notes.append(str(report["plan_error"]))
    dask_limit = _int(report.get("dask_memory_limit")) or None
    terminate = report.get("terminate_fraction")
    terminate_fraction = float(terminate) if isinstance(terminate, (int, float)) else None

    nanny_room = 0
    if plan is not None:
        overhead, n = _int(plan.get("overhead")), _int(plan.get("n_workers"))
        if overhead is not None and n:
            nanny_room = math.ceil(overhead / n)
        planned = _int(plan.get("effective_per_worker"))
        if planned is not None and dask_limit is not None and planned != dask_limit:
            notes.append(
                f"Dask's limit {format_bytes(dask_limit)} differs from the planned "
                f"{format_bytes(planned)}"
            )
        if plan.get("enforced") is False:
            notes.append(f"no kernel limit was set at start ({plan.get('write_reason')})")
    elif report.get("has_nanny"):
        nanny_room = DEFAULT_NANNY_ALLOWANCE

    if report.get("error"):
        return WorkerFacts(
            address,
            host,
            name,
            dask_limit=dask_limit,
            managed=managed,
            error=str(report["error"]),
            notes=tuple(notes),
        )

    hostname = str(report.get("hostname") or host)
    host_key = f"host:{report.get('boot_id') or hostname}"
    constraints = [Constraint(host_key, "host", None, _int(report.get("mem_available")))]
    constraints += _cgroup_constraints(host_key, report.get("levels"))
    # The smallest limit, and the cgroup that sets it (the innermost one on a tie).
    limited = [c for c in constraints if c.limit is not None]
    smallest = min(limited, key=lambda c: c.limit or 0, default=None)
    kernel_limit = smallest.limit if smallest is not None else None
    kernel_path = smallest.name if smallest is not None else None
    notes.extend(str(x) for x in report.get("warnings") or [])
    oom_group = tuple(
        str(lvl.get("path"))
        for lvl in report.get("levels") or []
        if isinstance(lvl, dict) and lvl.get("oom_group") is True
    )
    return WorkerFacts(
        address,
        host,
        name,
        dask_limit=dask_limit,
        rss=_int(report.get("rss")) or 0,
        terminate_fraction=terminate_fraction,
        nanny_room=nanny_room,
        managed=managed,
        available=_int(report.get("available")),
        kernel_limit=kernel_limit,
        kernel_limit_path=kernel_path,
        constraints=tuple(constraints),
        notes=tuple(notes),
        oom_group=oom_group,
    )


def result_rows(facts: Sequence[WorkerFacts], verdicts: Sequence[Verdict]) -> list[dict[str, Any]]:
    rows = []
    for f, v in zip(facts, verdicts, strict=True):
        rows.append(
            {
                "worker": f.address,
                "name": f.name,
                "host": f.host,
                "dask_memory_limit": f.dask_limit,
                "kernel_limit": f.kernel_limit,
                "kernel_limit_path": f.kernel_limit_path,
                "available": f.available,
                "rss": f.rss if f.error is None else None,
                "managed": f.managed,
                "verdict": v.verdict,
                "risk": v.risk,
                "reasons": list(v.reasons),
                "action": v.action,
                "constraints": [asdict(c) for c in f.constraints],
                "oom_group": list(f.oom_group),
            }
        )
    return rows


def _cell(value: int | None, none: str = "-") -> str:
    return none if value is None else format_bytes(value)


def render_table(rows: Sequence[Mapping[str, Any]]) -> str:
    header = ("WORKER", "HOST", "DASK LIMIT", "KERNEL LIMIT", "AVAILABLE NOW", "VERDICT")
    lines: list[tuple[str, ...]] = [header]
    for r in rows:
        verdict = r["verdict"] if r["risk"] is None else f"{r['verdict']} ({r['risk']})"
        lines.append(
            (
                str(r["name"] or r["worker"]),
                str(r["host"]),
                _cell(r["dask_memory_limit"], "none"),
                _cell(r["kernel_limit"], "none"),
                _cell(r["available"]),
                verdict,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]
    for r in rows:
        if r["reasons"]:
            out.append("")
            out.append(f"{r['name'] or r['worker']} ({r['worker']}): {r['verdict']}")
            out.extend(f"  - {reason}" for reason in r["reasons"])
            if r.get("action"):
                out.append(f"  what to do: {r['action']}")
    for r in rows:
        for path in r.get("oom_group") or []:
            out.append(
                f"{r['name'] or r['worker']}: memory.oom.group=1 at {path}: one kernel OOM "
                "kill there takes every process below it, not one worker"
            )
    return "\n".join(out)


def _option(name: str, *dest: str, **kwargs: Any) -> click.Option:
    return env_option(ENV_PREFIX, name, *dest, **kwargs)


class Seconds(click.ParamType):  # type: ignore[type-arg]
    """A finite number of seconds above zero: nan and inf are no timeout one can wait for."""

    name = "SECONDS"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or seconds <= 0:
            self.fail(f"{value!r} is not a finite number of seconds above 0", param, ctx)
        return seconds


AUDIT_OPTIONS: list[click.Parameter] = [
    _option(
        "scheduler-file",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="Read the scheduler's address (and TLS settings) from this file instead.",
    ),
    _option(
        "tls-ca-file",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="CA certificate(s) to verify the scheduler with (TLS).",
    ),
    _option(
        "tls-cert",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="Client certificate (may include the key) for a TLS scheduler.",
    ),
    _option(
        "tls-key",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="Client private key, if not in --tls-cert.",
    ),
    _option(
        "connect-timeout",
        type=Seconds(),
        default=10.0,
        show_default=True,
        help="Seconds (finite, above 0) to wait for the scheduler before giving up (exit 2).",
    ),
    _option(
        "timeout",
        type=Seconds(),
        default=60.0,
        show_default=True,
        help="Seconds (finite, above 0) to wait for the workers' answers (exit 2 when exceeded).",
    ),
    _option("json", "as_json", is_flag=True, help="Print machine-readable JSON instead."),
]

EPILOG = """\b
Verdicts: safe, at risk, unmanaged (not started by dask-safe-worker; with its
measured risk), unknown (could not measure; with the reason).

\b
Exit codes: 0 every worker safe, 1 any worker at risk (unmanaged included),
2 usage or connection error, 3 nothing at risk but not every worker verified safe
(unmanaged that fit, unknown, or no workers).
"""


def _die(message: str) -> NoReturn:
    click.echo(f"dask-safe-audit: {message}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # A Client whose constructor failed still closes itself from __del__ at interpreter
    # exit: seconds of waiting and an "Exception ignored" traceback. Nothing is left to
    # clean up here, so leave at once.
    os._exit(EXIT_USAGE)


def _security(ca: str | None, cert: str | None, key: str | None) -> Any:
    if not (ca or cert or key):
        return None
    from distributed.security import Security

    security: Any = Security
    return security(
        tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, require_encryption=True
    )


def _quiet_distributed() -> None:
    """The client logs every retry and disconnect; the audit reports errors itself."""
    import logging

    for name in ("distributed", "tornado", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _ignore_unraisable(_: Any) -> None:
    return None


def _run_everywhere(client: Any, function: Any, workers: list[str]) -> dict[str, Any]:
    """`client.run` on each worker; a worker's failure is its answer, not the audit's."""
    try:
        return dict(client.run(function, workers=workers, on_error="return"))
    except TypeError:
        pass  # a release without on_error: ask one worker at a time
    answers: dict[str, Any] = {}
    for address in workers:
        try:
            answers.update(client.run(function, workers=[address]))
        except Exception as exc:
            answers[address] = exc
    return answers


def audit_cluster(
    address: str | None,
    scheduler_file: str | None,
    security: Any,
    connect_timeout: float,
    timeout: float,
    where: str | None = None,
) -> tuple[str, list[dict[str, Any]], list[Verdict]]:
    """Connect, run `collect` on every worker, judge. Raises ConnectionError with a
    message fit for the user on any connection problem."""
    import concurrent.futures

    import cloudpickle
    from distributed import Client as _Client

    from . import audit_remote

    _quiet_distributed()
    # Errors in the client's finalizers (a half-built Client closing itself) are noise
    # after we have reported the connection error ourselves.
    sys.unraisablehook = _ignore_unraisable
    client_cls: Any = _Client
    # By value: workers without dask-safe-worker installed can still run `collect`
    # and say so, instead of failing to unpickle it.
    cloudpickle.register_pickle_by_value(audit_remote)
    kwargs: dict[str, Any] = {"timeout": connect_timeout, "set_as_default": False}
    if security is not None:
        kwargs["security"] = security
    where = where or address or f"the scheduler in {scheduler_file}"
    client: Any
    try:
        client = (
            client_cls(scheduler_file=scheduler_file, **kwargs)
            if scheduler_file
            else client_cls(address, **kwargs)
        )
    except Exception as exc:
        hint = ""
        if security is None and (address or "").startswith("tls://"):
            hint = " (a tls:// scheduler needs --tls-ca-file, --tls-cert and --tls-key)"
        raise ConnectionError(f"cannot connect to {where}: {exc}{hint}") from None
    try:
        try:
            # Recent releases list only the first few workers unless asked for all.
            info = client.scheduler_info(n_workers=-1)
        except TypeError:
            info = client.scheduler_info()
        workers: dict[str, Any] = dict(info.get("workers", {}))
        pool = concurrent.futures.ThreadPoolExecutor(1)
        future = pool.submit(_run_everywhere, client, audit_remote.collect, list(workers))
        try:
            answers: dict[str, Any] = future.result(timeout=timeout) if workers else {}
        except concurrent.futures.TimeoutError:
            raise ConnectionError(
                f"the workers did not answer within {timeout:g} s (raise --timeout)"
            ) from None
        finally:
            pool.shutdown(wait=False)
        scheduler = str(info.get("address") or address)
    except ConnectionError:
        raise
    except Exception as exc:
        raise ConnectionError(f"lost the connection to {where}: {exc}") from None
    finally:
        with contextlib.suppress(Exception):
            client.close(timeout=5)
    addresses = sorted(workers)
    facts = [facts_from_report(a, workers[a], answers.get(a)) for a in addresses]
    verdicts = judge(facts)
    return scheduler, result_rows(facts, verdicts), verdicts


def scheduler_file_address(text: str) -> str:
    """The address in a scheduler file's JSON; ValueError with what is wrong with it."""
    if not text.strip():
        raise ValueError("is empty")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"holds JSON {type(doc).__name__}, not an object with an address")
    address = doc.get("address")
    if not isinstance(address, str) or not address.strip():
        raise ValueError('has no "address" (a string such as "tcp://10.0.0.5:8786")')
    return address


def _configured_address() -> str | None:
    """What `dask worker` uses without an address: dask's `scheduler-address` config,
    which DASK_SCHEDULER_ADDRESS sets."""
    import dask.config

    value = dask.config.get("scheduler-address", None)
    return str(value) if value else None


def _run(scheduler_address: str | None, **params: Any) -> None:
    scheduler_file = params["scheduler_file"]
    if scheduler_address and scheduler_file:
        raise click.UsageError("give either SCHEDULER_ADDRESS or --scheduler-file, not both")
    where: str | None = None
    if scheduler_file:
        try:
            with open(scheduler_file, encoding="utf-8", errors="replace") as f:
                scheduler_address = scheduler_file_address(f.read())
        except (OSError, ValueError) as exc:
            _die(f"--scheduler-file {scheduler_file} {exc}")
        where = f"{scheduler_address} (from {scheduler_file})"
    elif not scheduler_address:
        scheduler_address = _configured_address()
        if scheduler_address is None:
            raise click.UsageError(
                "give SCHEDULER_ADDRESS or --scheduler-file, or set DASK_SCHEDULER_ADDRESS"
            )
        source = (
            "DASK_SCHEDULER_ADDRESS"
            if os.environ.get("DASK_SCHEDULER_ADDRESS")
            else "dask config scheduler-address"
        )
        where = f"{scheduler_address} (from {source})"
    try:
        security = _security(params["tls_ca_file"], params["tls_cert"], params["tls_key"])
    except Exception as exc:
        _die(f"invalid TLS settings: {exc}")
    try:
        scheduler, rows, verdicts = audit_cluster(
            scheduler_address,
            None,
            security,
            params["connect_timeout"],
            params["timeout"],
            where=where,
        )
    except ConnectionError as exc:
        _die(str(exc))
    code = exit_code(verdicts)
    if params["as_json"]:
        counts = {k: sum(1 for v in verdicts if v.verdict == k) for k in (SAFE, AT_RISK)}
        counts[UNMANAGED] = sum(1 for v in verdicts if v.verdict == UNMANAGED)
        counts[UNKNOWN] = sum(1 for v in verdicts if v.verdict == UNKNOWN)
        doc = {
            "schema": AUDIT_SCHEMA,
            "scheduler": scheduler,
            "workers": rows,
            "summary": counts,
            "exit_code": code,
        }
        click.echo(json.dumps(doc, indent=2))
    else:
        if rows:
            click.echo(render_table(rows))
        else:
            click.echo(f"{scheduler}: no workers connected; nothing to audit.")
    sys.exit(code)


def _callback(**params: Any) -> None:
    _run(**params)


command = click.Command(
    name="safe-audit",
    params=[click.Argument(["scheduler_address"], required=False), *AUDIT_OPTIONS],
    callback=_callback,
    help="Check every worker of a Dask cluster: does the memory limit Dask uses fit "
    "within the kernel limit and what is available now, with room for the nanny?",
    epilog=EPILOG,
    context_settings={"max_content_width": 100},
)


def main(argv: Sequence[str] | None = None) -> None:
    """The `dask-safe-audit` console script."""
    command.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="dask-safe-audit")


if __name__ == "__main__":
    main()
