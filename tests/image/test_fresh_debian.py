"""The README's first command on a fresh Debian 12, in a container built from Debian's
packages: python3 and ca-certificates as a cloud image has them, no pip, no venv module, no
uv. `bash scripts/demo.sh` must get uv by itself (issue: `python3 -m pip` fails there) and
adapt to a container where it cannot create a cgroup.

The checkout is copied (tracked and new files, not the host's .venv), so the container's
`uv sync` never touches the host's environment. The host's package index and CA bundle are
handed in at test time, as a CI machine's configuration would be.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from podman_engine import (
    CA_BUNDLE_IN_IMAGE,
    REPO,
    Engine,
    base_tarball,
    cache_dir,
    host_ca_bundle,
    host_index_url,
    import_base,
)

pytestmark = pytest.mark.image

FRESH_IMAGE = "localhost/dsw-fresh-debian:bookworm"
# What Debian's cloud images have; python3-venv (and so ensurepip) is not among them.
FRESH_PACKAGES = ("python3", "ca-certificates")
LAST_LINE = "every worker's limit equals the plan"


@pytest.fixture(scope="module")
def fresh_image(podman: Engine) -> str:
    import_base(podman, base_tarball(FRESH_PACKAGES, venv=None), FRESH_IMAGE)
    return FRESH_IMAGE


@pytest.fixture
def checkout(tmp_path: Path) -> Iterator[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    copy = tmp_path / "src"
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    # Readable for the non-root case too.
    subprocess.run(["chmod", "-R", "a+rwX", str(tmp_path)], check=True)
    yield copy


def host_configuration() -> list[str]:
    """podman options that hand the container this host's package index and CA bundle."""
    options: list[str] = []
    bundle = host_ca_bundle()
    if bundle is not None:
        options += ["-v", f"{bundle}:{CA_BUNDLE_IN_IMAGE}:ro"]
        # Debian's pip uses its own certifi bundle, uv its webpki roots, unless told.
        options += [
            "-e",
            f"PIP_CERT={CA_BUNDLE_IN_IMAGE}",
            "-e",
            f"SSL_CERT_FILE={CA_BUNDLE_IN_IMAGE}",
        ]
    index = host_index_url()
    if index:
        options += ["-e", f"PIP_INDEX_URL={index}", "-e", f"UV_DEFAULT_INDEX={index}"]
    return options


def test_demo_runs_on_a_fresh_debian_12_as_root(
    podman: Engine, fresh_image: str, checkout: Path
) -> None:
    # A cache of the container's own uv downloads, kept between runs only to save time.
    uv_cache = cache_dir() / "fresh-debian-uv-cache"
    uv_cache.mkdir(parents=True, exist_ok=True)
    result = podman.podman(
        "run",
        "--rm",
        *podman.run_options(),
        "--memory",
        "3g",
        "-v",
        f"{checkout}:/src",
        "-v",
        f"{uv_cache}:/uv-cache",
        "-e",
        "UV_CACHE_DIR=/uv-cache",
        *host_configuration(),
        "-w",
        "/src",
        fresh_image,
        "bash",
        "scripts/demo.sh",
        check=False,
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    # As root, the missing python3-venv comes from apt; uv goes into a venv of its own.
    assert "installing python3-venv with apt-get" in result.stderr
    assert "installing uv into" in result.stderr
    # The demo adapts: a container's cgroupfs is read-only, so there is no demo cgroup.
    assert "no demo cgroup" in result.stdout, result.stdout
    assert result.stdout.strip().splitlines()[-1] == LAST_LINE, result.stdout[-2000:]


def test_demo_as_a_user_without_python3_venv_says_what_to_install(
    podman: Engine, fresh_image: str, checkout: Path
) -> None:
    result = podman.podman(
        "run",
        "--rm",
        *podman.run_options(),
        "--user",
        "1000:1000",
        "-e",
        "HOME=/tmp",
        "-v",
        f"{checkout}:/src",
        "-w",
        "/src",
        fresh_image,
        "bash",
        "scripts/demo.sh",
        check=False,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "install python3-venv" in lines[0] and "Traceback" not in result.stderr
