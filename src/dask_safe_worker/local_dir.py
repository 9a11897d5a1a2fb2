"""Whether the worker will have a directory for its files (spill, scratch, locks).

`dask worker` creates its scratch space under `--local-directory`, else dask's
`temporary-directory` (DASK_TEMPORARY_DIRECTORY), else the temp directory. Where none is
writable it dies with a traceback after start-up, when our kernel limit is already
written; checked here first, it is one line and exit 2, before anything is touched.
Reads only: nothing is created.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .exits import EXIT_USAGE, Refused

FIX = (
    "mount a tmpfs or emptyDir at /tmp, set TMPDIR to a writable directory, "
    "or pass --local-directory"
)


def directory_problem(path: Path) -> str | None:
    """Why the worker could not use (or `makedirs`) `path`; None when it can."""
    probe = path if path.is_absolute() else Path.cwd() / path
    while not probe.exists():
        if probe.parent == probe:
            return "no part of it exists"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        # access(2) reports a read-only mount too, not only missing permissions.
        return f"{probe} is not writable"
    return None


def scratch_problem(
    local_directory: str | None, environ: Mapping[str, str], dask_default: bool
) -> str | None:
    """The one-line reason the worker has nowhere to write, or None.

    `dask_default`: the worker is dask's own (or dask-cuda's), which falls back to the
    temp directory; a custom command's defaults are its own business."""
    if local_directory is not None:
        problem = directory_problem(Path(local_directory))
        if problem is None:
            return None
        return f"--local-directory {local_directory}: {problem}"
    if not dask_default:
        return None
    configured = environ.get("DASK_TEMPORARY_DIRECTORY")
    if configured:
        problem = directory_problem(Path(configured))
        if problem is None:
            return None
        return f"DASK_TEMPORARY_DIRECTORY {configured}: {problem}; {FIX}"
    from .plan_file import temp_dir

    try:
        temp_dir()
    except OSError:
        return f"no writable temporary directory for the worker's files: {FIX}"
    return None


def require_scratch(
    local_directory: str | None, environ: Mapping[str, str], dask_default: bool
) -> None:
    """Refused (exit 2, one line) when the worker will have nowhere to write."""
    problem = scratch_problem(local_directory, environ, dask_default)
    if problem is not None:
        raise Refused(EXIT_USAGE, problem)
