from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from oci import Container, ContainerSpec, require_runc


@pytest.fixture
def make_container(tmp_path: Path) -> Iterator[Callable[..., Container]]:
    """Factory for runc containers; every one is killed and deleted by the finalizer."""
    require_runc()
    made: list[Container] = []

    def make(args: list[str], **options: object) -> Container:
        workdir = tmp_path / f"c{len(made)}"
        c = Container(workdir, ContainerSpec(args=args, **options))  # type: ignore[arg-type]
        made.append(c)
        return c

    yield make
    for c in made:
        c.destroy()
