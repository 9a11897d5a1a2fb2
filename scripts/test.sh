#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, then runs the
# linters, the type checker, the tests (unit, real-kernel, end-to-end, runc containers,
# the cgroup v2 VM suite) and the compatibility matrix.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n=== %s\n' "$*"; }

install_system_packages() {
    # runc for the container suite; qemu, a Debian kernel, busybox-static and file for the
    # cgroup v2 VM suite. Linters (shellcheck, hadolint) come from PyPI with the dev group.
    local need=()
    command -v runc >/dev/null || need+=(runc)
    command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
    compgen -G '/boot/vmlinuz-*' >/dev/null || need+=(linux-image-amd64)
    # virtme-ng boots the guest with a static busybox, and checks it with file(1).
    dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
    command -v file >/dev/null || need+=(file)
    # The image suite (tests/image): podman builds docker/Dockerfile on a base made by
    # mmdebstrap; netavark, aardvark-dns and iptables give compose its bridge network (in
    # a network namespace of the test's own); podman-compose runs docker/compose.yaml.
    command -v podman >/dev/null || need+=(podman)
    command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
    command -v podman-compose >/dev/null || need+=(podman-compose)
    dpkg -s netavark >/dev/null 2>&1 || need+=(netavark)
    dpkg -s aardvark-dns >/dev/null 2>&1 || need+=(aardvark-dns)
    command -v iptables >/dev/null || need+=(iptables)
    # tests/test_slurm.py: a one-node Slurm (munged, slurmctld, slurmd) of the test's own.
    command -v munged >/dev/null || need+=(munge)
    command -v slurmctld >/dev/null || need+=(slurmctld)
    command -v slurmd >/dev/null || need+=(slurmd)
    # uv's own venv (scripts/ensure-uv.sh): Debian's python3 has neither pip nor ensurepip.
    if ! command -v uv >/dev/null; then
        command -v python3 >/dev/null || need+=(python3)
        python3 -m ensurepip --version >/dev/null 2>&1 || need+=(python3-venv)
    fi
    # tests/test_distributed_cli_suite.py fetches Debian's python3-distributed (its test
    # file) with `apt-get download`, which needs the package lists even when nothing is
    # missing.
    if [ "${#need[@]}" -eq 0 ]; then
        if [ "$(id -u)" = 0 ] && ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
            log "apt-get update (no package lists)"
            apt-get update -qq
        fi
        return
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "missing system packages: ${need[*]} (install them as root with apt-get)" >&2
        return
    fi
    log "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
}

# shellcheck source=scripts/ensure-uv.sh
. scripts/ensure-uv.sh

install_system_packages
ensure_uv

log "uv sync (locked)"
# Python 3.11 (Debian 12's own): the matrix leaves this Python's cell to this environment,
# whose whole suite runs below.
uv sync --locked --all-groups --python 3.11

log "ruff check, ruff format --check, mypy --strict (src, tests, scripts, benchmarks), vulture"
uv run ruff check .
uv run ruff format --check .
uv run mypy --strict src
# Tests, scripts and benchmarks too: one run per group, since the conftest.py files of
# tests/, tests/containers, tests/vm and tests/vm/guest are all module "conftest".
uv run mypy --strict src scripts benchmarks tests/*.py
uv run mypy --strict tests/containers
uv run mypy --strict tests/image
uv run mypy --strict tests/vm/*.py
uv run mypy --strict tests/vm/guest
# Dead code: what nothing calls is deleted; scripts/vulture_whitelist.py lists the names
# only pytest, dask or a JSON document use.
uv run vulture src scripts benchmarks tests --min-confidence 60

# The matrix runs first so that pytest's summary is the last line of the run; a failing
# matrix still lets pytest run, and either failure fails the whole command.
status=0
if [ -f scripts/matrix.py ] && [ -z "${DSW_SKIP_MATRIX:-}" ]; then
    log "compatibility matrix"
    # Two cells' unit tests at once: each is one pytest process, and the machine has two cores.
    uv run python scripts/matrix.py --jobs 2 || status=$?
fi

log "pytest"
# The 30 slowest tests close the log: where the time of the run goes.
uv run pytest -ra -p no:cacheprovider --durations=30 "$@" || status=$?
# No test may replace a host path: /dev/null above all (issue 24 row 0).
if [ ! -c /dev/null ]; then
    echo "FAILED: /dev/null is no longer a character device after the tests" >&2
    status=1
fi
exit "$status"
