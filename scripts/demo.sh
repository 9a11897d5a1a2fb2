#!/usr/bin/env bash
# The main job: a local scheduler, dask-safe-worker, a small computation, and each
# worker's memory limit printed against what was measured.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/ensure-uv.sh
. scripts/ensure-uv.sh
ensure_uv
uv sync --locked --quiet
exec uv run python scripts/demo.py "$@"
