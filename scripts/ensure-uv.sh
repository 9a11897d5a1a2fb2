# shellcheck shell=bash
# Sourced by scripts/demo.sh and scripts/test.sh: puts uv on PATH, installing it if needed.
#
# Debian 12's own python3 has no pip, and refuses `pip install` outside a venv (PEP 668),
# so uv goes into a venv of its own, made with Debian's python3-venv, under the user's cache
# directory. As root, a missing python3-venv is installed with apt-get; as a user, the
# script says what to install and stops.

ensure_uv() {
    if command -v uv >/dev/null; then
        return 0
    fi
    local venv="${XDG_CACHE_HOME:-$HOME/.cache}/dask-safe-worker/uv-venv"
    if [ ! -x "$venv/bin/uv" ]; then
        rm -rf "$venv"
        if ! python3 -m venv "$venv" >/dev/null 2>&1; then
            rm -rf "$venv"
            if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
                echo "installing python3-venv with apt-get (needed to install uv)" >&2
                DEBIAN_FRONTEND=noninteractive apt-get update -qq
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
                python3 -m venv "$venv"
            else
                echo "$0: uv is not installed, and python3 cannot make a venv to install it;" \
                    "install python3-venv (sudo apt-get install python3-venv) or uv" \
                    "(https://docs.astral.sh/uv/), then run this again" >&2
                return 1
            fi
        fi
        echo "installing uv into $venv" >&2
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check uv
    fi
    export PATH="$venv/bin:$PATH"
}
