"""`dask-safe-audit`'s click command: options, the run, output and exit code (the shell)."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from ..env_options import env_option
from .client import configured_address, run_audit, scheduler_file_address, security_from
from .render import printable, render_table
from .verdicts import AT_RISK, AUDIT_SCHEMA, EXIT_USAGE, SAFE, UNKNOWN, UNMANAGED, exit_code

ENV_PREFIX = "DASK_SAFE_AUDIT"


def _option(name: str, *dest: str, **kwargs: Any) -> click.Option:
    return env_option(ENV_PREFIX, name, *dest, **kwargs)


def _file_option(name: str, help: str) -> click.Option:
    """An existing file, no default."""
    return _option(name, type=click.Path(exists=True, dir_okay=False), default=None, help=help)


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


def _seconds_option(name: str, default: float, wait_for: str) -> click.Option:
    return _option(
        name,
        type=Seconds(),
        default=default,
        show_default=True,
        help=f"Seconds (finite, above 0) to wait for {wait_for}.",
    )


AUDIT_OPTIONS: list[click.Parameter] = [
    _file_option(
        "scheduler-file", "Read the scheduler's address (and TLS settings) from this file instead."
    ),
    _file_option("tls-ca-file", "CA certificate(s) to verify the scheduler with (TLS)."),
    _file_option("tls-cert", "Client certificate (may include the key) for a TLS scheduler."),
    _file_option("tls-key", "Client private key, if not in --tls-cert."),
    _seconds_option("connect-timeout", 10.0, "the scheduler before giving up (exit 2)"),
    _seconds_option("timeout", 60.0, "the workers' answers (exit 2 when exceeded)"),
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
    # A connection error may quote what a worker or scheduler sent.
    click.echo(printable(f"dask-safe-audit: {message}"), err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # A Client whose constructor failed still closes itself from __del__ at interpreter
    # exit: seconds of waiting and an "Exception ignored" traceback. Nothing is left to
    # clean up here, so leave at once.
    os._exit(EXIT_USAGE)


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
        scheduler_address = configured_address()
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
        security = security_from(params["tls_ca_file"], params["tls_cert"], params["tls_key"])
    except Exception as exc:
        _die(f"invalid TLS settings: {exc}")
    try:
        scheduler, rows, verdicts, gone = run_audit(
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
            "deaths_of_workers_gone": gone,
            "summary": counts,
            "exit_code": code,
        }
        click.echo(json.dumps(doc, indent=2))
    else:
        if rows:
            click.echo(render_table(rows, gone))
        else:
            click.echo(printable(f"{scheduler}: no workers connected; nothing to audit."))
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
