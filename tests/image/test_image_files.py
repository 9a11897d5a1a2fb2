"""Lints for the files the image tests add; no engine needed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from podman_engine import REPO

VENV_BIN = Path(sys.prefix) / "bin"


def tool(name: str) -> str:
    found = shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
    assert found, f"{name} is a dev dependency"
    return found


def test_dask_image_dockerfile_lints_clean_with_hadolint() -> None:
    result = subprocess.run(
        [
            tool("hadolint"),
            "--no-color",
            "--failure-threshold",
            "style",
            str(REPO / "docker" / "Dockerfile.dask-image"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_are_shellcheck_clean() -> None:
    scripts = [
        REPO / "scripts" / "ensure-uv.sh",
        REPO / "scripts" / "demo.sh",
        REPO / "scripts" / "test.sh",
        REPO / "tests" / "image" / "dask-image-standin" / "prepare.sh",
    ]
    result = subprocess.run(
        [tool("shellcheck"), "--external-sources", *map(str, scripts)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
