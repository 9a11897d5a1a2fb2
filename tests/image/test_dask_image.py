"""docker/Dockerfile.dask-image: dask-safe-worker on the official Dask image's conventions.

The official image cannot be pulled here, so a local stand-in with its layout is built
first (tests/image/dask-image-standin): Python in /opt/conda, tini -g as PID 1, and a
prepare.sh that installs EXTRA_PIP_PACKAGES before it runs the command. The test shows that
the package is installed before dask-safe-worker starts measuring, and that the worker then
registers with a plan inside the container's memory limit.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from podman_engine import (
    BASE_PACKAGES,
    REPO,
    Built,
    Engine,
    audit_events,
    base_tarball,
    build_image,
    build_mounts,
    import_base,
)

pytestmark = pytest.mark.image

GiB = 2**30
STANDIN_DIR = Path(__file__).resolve().parent / "dask-image-standin"
STANDIN_BASE = "localhost/dsw-test-conda-base:bookworm"
STANDIN = "localhost/dsw-test-dask-standin:2026.8.0"
LAYERED = "localhost/dask-safe-worker:test-dask-image"
# Small, pure Python, and not a dependency of dask, distributed or dask-safe-worker.
EXTRA = "six"
HANG_GUARD_S = 180.0


@pytest.fixture(scope="module")
def layered(podman: Engine) -> Built:
    tarball = base_tarball((*BASE_PACKAGES, "tini"), venv="/opt/conda")
    import_base(
        podman,
        tarball,
        STANDIN_BASE,
        path="/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    )
    build_image(
        podman,
        STANDIN,
        STANDIN_DIR / "Containerfile",
        (f"BASE={STANDIN_BASE}",),
        STANDIN_DIR,
    )
    return build_image(
        podman, LAYERED, REPO / "docker" / "Dockerfile.dask-image", (f"DASK_IMAGE={STANDIN}",)
    )


def test_extra_pip_packages_are_installed_before_the_worker_measures(
    podman: Engine, layered: Built, scheduler_address: str
) -> None:
    from distributed import Client

    name = "dsw-dask-image"
    podman.podman(
        "run",
        "--detach",
        "--name",
        name,
        *podman.run_options(),
        "--memory",
        "1g",
        # The package index and CA bundle of this host, as for the build.
        *build_mounts(podman.scratch),
        "-e",
        f"EXTRA_PIP_PACKAGES={EXTRA}",
        layered.image,
        "dask-safe-worker",
        scheduler_address,
        "--host",
        "127.0.0.1",
        "--no-dashboard",
        "--nthreads",
        "1",
    )
    try:
        with Client(scheduler_address, timeout=30) as client:
            deadline = time.monotonic() + HANG_GUARD_S
            while not client.scheduler_info()["workers"]:
                so_far = podman.podman("logs", name).stdout
                assert time.monotonic() < deadline, so_far
                time.sleep(0.2)
            limits = client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
        logs = podman.podman("logs", name)
        output = logs.stdout + logs.stderr
        lines = output.splitlines()
        installed = next(i for i, ln in enumerate(lines) if ln.startswith("Successfully installed"))
        assert EXTRA in lines[installed]
        first_audit = next(i for i, ln in enumerate(lines) if ln.startswith("{"))
        assert installed < first_audit, "prepare.sh must finish before dask-safe-worker starts"
        events = {e.get("event"): e for e in audit_events(output)}
        plan = events["plan.made"]
        assert plan["available"] <= GiB
        assert list(limits.values()) == [plan["per_worker"]]
        # tini is PID 1 and prepare.sh stays as the parent: dask-safe-worker is not PID 1.
        assert events["cli.started"]["pid"] != 1
    finally:
        podman.podman("rm", "--force", "--time", "0", name, check=False)
