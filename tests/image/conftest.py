from __future__ import annotations

from collections.abc import Iterator

import pytest
from podman_engine import (
    Built,
    Engine,
    base_tarball,
    build_image,
    engine,
    import_base,
    require_podman,
)


@pytest.fixture(scope="session")
def podman() -> Iterator[Engine]:
    """One private podman (storage, config, cgroup parents) for the whole session."""
    require_podman()
    with engine() as e:
        yield e


@pytest.fixture(scope="session")
def built(podman: Engine) -> Built:
    """The unmodified docker/Dockerfile, built once per session on a local Debian base."""
    import_base(podman, base_tarball())
    result = build_image(podman)
    print(f"\nimage built in {result.build_seconds:.1f} s, {result.size_bytes / 1e6:.0f} MB")
    return result
