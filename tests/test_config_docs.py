"""docs/configuration.md is generated from the click definitions and must stay in sync."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest

from dask_safe_worker import cli
from dask_safe_worker.cluster_audit import cli as audit_cli

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "gen_config_docs.py"
DOC = REPO_ROOT / "docs" / "configuration.md"


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_config_docs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_reference_is_what_the_generator_writes() -> None:
    expected = load_generator().render()
    assert DOC.read_text() == expected, (
        "docs/configuration.md is out of date: run `uv run python scripts/gen_config_docs.py`"
    )


@pytest.mark.parametrize(
    "command", [cli.command, audit_cli.command], ids=["dask-safe-worker", "dask-safe-audit"]
)
def test_every_option_and_env_var_is_documented(command: click.Command) -> None:
    text = load_generator().render()
    options = [p for p in command.params if isinstance(p, click.Option)]
    assert options
    for p in options:
        row = next(
            (line for line in text.splitlines() if line.startswith(f"| `{p.opts[0]}`")), None
        )
        assert row is not None, f"{p.opts[0]} has no row"
        # Only --version has none: a variable would make every start print and exit.
        assert f"`{p.envvar}`" in row if p.opts != ["--version"] else "| — |" in row
        assert p.help and " ".join(p.help.split()).replace("|", "\\|") in row


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    gen = load_generator()
    gen.TARGET = tmp_path / "configuration.md"
    gen.TARGET.write_text("stale\n")
    gen.REPO_ROOT = tmp_path
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0
    assert gen.main(["--check"]) == 0
    assert gen.TARGET.read_text() == DOC.read_text()


def test_script_runs_as_documented() -> None:
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert r.returncode == 0, r.stderr
