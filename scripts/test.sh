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
    if [ "${#need[@]}" -eq 0 ]; then
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

install_uv() {
    if ! command -v uv >/dev/null; then
        log "pip install uv"
        python3 -m pip install --quiet --disable-pip-version-check uv
    fi
}

install_system_packages
install_uv

log "uv sync (locked)"
uv sync --locked --all-groups

log "ruff check, ruff format --check, mypy --strict src"
uv run ruff check .
uv run ruff format --check .
uv run mypy --strict src

# The matrix runs first so that pytest's summary is the last line of the run; a failing
# matrix still lets pytest run, and either failure fails the whole command.
status=0
if [ -f scripts/matrix.py ] && [ -z "${DSW_SKIP_MATRIX:-}" ]; then
    log "compatibility matrix"
    uv run python scripts/matrix.py || status=$?
fi

log "pytest"
uv run pytest -ra -p no:cacheprovider "$@" || status=$?
exit "$status"
