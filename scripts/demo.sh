#!/usr/bin/env bash
# The main job: a local scheduler, dask-safe-worker, a small computation, and each
# worker's memory limit printed against what was measured.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v uv >/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check uv
fi
uv sync --locked --quiet
exec uv run python scripts/demo.py "$@"
