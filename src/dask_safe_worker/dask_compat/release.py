"""The installed distributed and dask releases, and the range this package supports.

Mirrors no single upstream file: the releases come from package metadata (the
`<name>-<version>.dist-info` directory), without importing either package. Each start
resolves them once (`installed_release()`) and passes the `Release` to the rules of the
other `dask_compat` modules; supported: distributed 2022.9.2 and newer, tested up to
`NEWEST_TESTED`.
"""

from __future__ import annotations

import functools
import os
import sys

from ..records import ordered_record, record


@ordered_record
class Version:
    """A release as (major, minor, patch); tuple order is release order."""

    major: int
    minor: int
    patch: int = 0

    @classmethod
    def parse(cls, text: str) -> Version:
        """The first three numeric components; "2023.3.2.1" is 2023.3.2 and a pre-release
        such as "2024.1.0rc1" counts as its release (only the leading digits of a piece)."""
        parts: list[int] = []
        for piece in text.strip().split(".")[:3]:
            digits = ""
            for ch in piece:
                if ch not in "0123456789":
                    break
                digits += ch
            parts.append(int(digits) if digits else 0)
        while len(parts) < 3:
            parts.append(0)
        return cls(parts[0], parts[1], parts[2])

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


@record
class Release:
    """The distributed and dask releases one start predicts, resolved once and passed on.

    None where a package is not installed: then each rule applies its newest release's
    behaviour (a missing distributed is refused by `check_supported` before any rule
    matters; a missing dask cannot happen next to an installed distributed, which pins it).
    """

    distributed: Version | None
    dask: Version | None


# 2022.9.0 and 2022.9.1 read only the v1 `memory.limit_in_bytes` at the cgroup root; v2
# detection (`memory.max`, `memory.high`) arrived in 2022.9.2, verified from the released
# `distributed/system.py`. Below it a v2 container's limit is invisible to dask.
OLDEST_SUPPORTED = Version(2022, 9, 2)
# The newest release the matrix runs against. Newer releases are accepted (the CLI may
# warn): the rules replicated here have been stable since 2023.10.
NEWEST_TESTED = Version(2026, 8, 0)


class UnsupportedDistributedError(RuntimeError):
    """The installed distributed is missing or older than the supported range."""


def supported_range() -> str:
    return f"distributed>={OLDEST_SUPPORTED} (tested up to {NEWEST_TESTED})"


def check_supported(version: Version | None) -> None:
    """Raise UnsupportedDistributedError, naming the supported range, unless `version`
    is one whose `dask worker` behaviour this package knows."""
    if version is None:
        raise UnsupportedDistributedError(
            f"distributed is not installed in this Python; dask-safe-worker needs "
            f"{supported_range()}"
        )
    if version < OLDEST_SUPPORTED:
        raise UnsupportedDistributedError(
            f"distributed {version} is not supported: dask-safe-worker needs "
            f"{supported_range()}, because older releases do not read cgroup v2 memory "
            f"limits. Upgrade with: pip install 'distributed>={OLDEST_SUPPORTED}'"
        )


def is_tested(version: Version) -> bool:
    """False for releases newer than the matrix covers (worth a warning, not an error)."""
    return version <= NEWEST_TESTED


@functools.cache
def _installed(distribution: str) -> Version | None:
    """The version of the first `<name>-<version>.dist-info` on sys.path.

    importlib.metadata would cost ~12 ms of imports (zipfile, email, csv) on every start,
    and --print-limit's start-up time is a goal; the directory name says the same thing.
    """
    prefix = distribution.lower().replace("-", "_") + "-"
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.endswith(".dist-info") and name.lower().startswith(prefix):
                return Version.parse(name[len(prefix) : -len(".dist-info")])
    from importlib import metadata  # eggs, zip imports: the slow, general way

    try:
        return Version.parse(metadata.version(distribution))
    except metadata.PackageNotFoundError:
        return None


def installed_release() -> Release:
    """The installed distributed and dask (whose `dask.system` computes CPU_COUNT), read
    from package metadata without importing either."""
    return Release(_installed("distributed"), _installed("dask"))
