"""The Dask client side: connect, run `remote.collect` on every worker, judge."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

from .deaths import death_rows
from .facts import facts_from_report
from .render import result_rows
from .verdicts import Verdict, judge


def security_from(ca: str | None, cert: str | None, key: str | None) -> Any:
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


def run_audit(
    address: str | None,
    scheduler_file: str | None,
    security: Any,
    connect_timeout: float,
    timeout: float,
    where: str | None = None,
) -> tuple[str, list[dict[str, Any]], list[Verdict], list[dict[str, Any]]]:
    """Connect, run `collect` on every worker, judge, and read the workers' deaths:
    (scheduler, rows, verdicts, deaths of workers no longer connected). Raises
    ConnectionError with a message fit for the user on any connection problem."""
    import concurrent.futures

    import cloudpickle
    from distributed import Client as _Client

    from . import remote

    _quiet_distributed()
    # Errors in the client's finalizers (a half-built Client closing itself) are noise
    # after we have reported the connection error ourselves.
    sys.unraisablehook = _ignore_unraisable
    client_cls: Any = _Client
    # By value: workers without dask-safe-worker installed can still run `collect`
    # and say so, instead of failing to unpickle it.
    cloudpickle.register_pickle_by_value(remote)
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
        future = pool.submit(_run_everywhere, client, remote.collect, list(workers))
        try:
            answers: dict[str, Any] = future.result(timeout=timeout) if workers else {}
        except concurrent.futures.TimeoutError:
            raise ConnectionError(
                f"the workers did not answer within {timeout:g} s (raise --timeout)"
            ) from None
        finally:
            pool.shutdown(wait=False)
        scheduler = str(info.get("address") or address)
        events = _death_events(client)
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
    nannies = {a: w.get("nanny") if isinstance(w, dict) else None for a, w in workers.items()}
    rows, gone = death_rows(result_rows(facts, verdicts), nannies, events)
    return scheduler, rows, verdicts, gone


def _death_events(client: Any) -> list[Any]:
    """The scheduler's death events (follow/nanny_deaths.py); none from a scheduler
    that cannot say: the deaths are an addition to the audit, not its subject."""
    from ..follow.death import TOPIC

    try:
        return list(client.get_events(TOPIC))
    except Exception:
        return []


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


def configured_address() -> str | None:
    """What `dask worker` uses without an address: dask's `scheduler-address` config,
    which DASK_SCHEDULER_ADDRESS sets."""
    import dask.config

    value = dask.config.get("scheduler-address", None)
    return str(value) if value else None
