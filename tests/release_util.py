"""The installed distributed release, for tests of facts that hold only from a release on.

The compatibility matrix runs the unit tests against older releases too; a test of what
the shipped image's release does (its scripts, its log wording) skips there, naming why.
"""

from __future__ import annotations

import pytest

from dask_safe_worker.dask_compat.release import Version, installed_release


def require_distributed_at_least(major: int, minor: int, why: str) -> None:
    """Skip unless the installed distributed is at least `major.minor`."""
    release = installed_release().distributed
    if release is None or release < Version(major, minor):
        pytest.skip(f"distributed {release} is older than {major}.{minor}: {why}")
