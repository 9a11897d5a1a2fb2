"""click options that can also be set from an environment variable `<PREFIX>_<NAME>`."""

from __future__ import annotations

from typing import Any

import click


def env_var(prefix: str, name: str) -> str:
    """`--cgroup-write` under `DASK_SAFE_WORKER` is `DASK_SAFE_WORKER_CGROUP_WRITE`."""
    return f"{prefix}_{name.upper().replace('-', '_')}"


def env_option(prefix: str, name: str, *dest: str, **kwargs: Any) -> click.Option:
    """`--name` with its environment variable, shown in --help."""
    kwargs.setdefault("show_envvar", True)
    return click.Option([f"--{name}", *dest], envvar=env_var(prefix, name), **kwargs)
