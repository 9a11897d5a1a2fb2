#!/bin/sh
# host-prestart.sh: size a Dask worker container from the host, before compose starts it.
#
# The seed blog post's one-liner,
#     grep -i memavailable /proc/meminfo | sed 's/[a-zA-Z]+:\s+//'
# printed "MemAvailable:  N kB" (basic sed has no `+`), so compose got a string it cannot
# use, and even the bare number would have been kB where compose's mem_limit wants bytes.
# This script yields BYTES:
#   1. `dask-safe-worker --print-limit --cgroup-write never`: the same plan the worker
#      makes (MemAvailable, every cgroup limit that applies, a reserve for the OS/agents).
#      When the tool is installed but refuses (a bad DASK_SAFE_WORKER_* value: exit 2; a
#      minimum that cannot be met: exit 3; ...), its error stays on stderr and the script
#      fails with the tool's exit code and sets nothing: a larger fallback number would
#      hand the container more memory than the operator asked for.
#   Only when the tool is not installed at all:
#   2. MemAvailable from /proc/meminfo, converted kB -> bytes;
#   3. 0, which compose reads as "no limit": an unknown size never blocks a start.
#
# Executed, it prints one line for an env file:
#     entrypoints/host-prestart.sh > docker/.env && docker compose -f docker/compose.yaml up
# Sourced, it exports DASK_WORKER_MEM_LIMIT into the calling shell and prints nothing:
#     . entrypoints/host-prestart.sh && docker compose -f docker/compose.yaml up
#
# DASK_PRESTART_MEMINFO names another meminfo file, e.g. /host/proc/meminfo when this runs
# in a container with the host's /proc mounted there. Options of the tool come from its own
# environment variables (DASK_SAFE_WORKER_RESERVE=...), which it reads itself.

# A sourced script shares the caller's shell: keep its options as they were.
_dsw_saved_options=$(set +o)
set -eu

_dsw_is_bytes() {
    # One positive decimal integer and nothing else.
    case $1 in
        '' | *[!0-9]* | 0*) return 1 ;;
    esac
    return 0
}

_dsw_limit=
_dsw_source=default
_dsw_status=0

if command -v dask-safe-worker >/dev/null 2>&1; then
    # --cgroup-write never: on a host this only measures; it must not limit the caller's cgroup.
    # Its stderr is left alone: when it refuses, the reason is the operator's to read.
    _dsw_out=$(dask-safe-worker --print-limit --cgroup-write never) || _dsw_status=$?
    if [ "$_dsw_status" -ne 0 ]; then
        echo "host-prestart: dask-safe-worker --print-limit failed (exit $_dsw_status);" \
            "DASK_WORKER_MEM_LIMIT not set" >&2
    elif _dsw_is_bytes "$_dsw_out"; then
        _dsw_limit=$_dsw_out
        _dsw_source="dask-safe-worker --print-limit"
    else
        echo "host-prestart: dask-safe-worker --print-limit printed no byte count;" \
            "DASK_WORKER_MEM_LIMIT not set" >&2
        _dsw_status=1
    fi
else
    # Not installed: the host's MemAvailable is the best estimate left.
    _dsw_meminfo=${DASK_PRESTART_MEMINFO:-/proc/meminfo}
    if [ -r "$_dsw_meminfo" ]; then
        while read -r _dsw_key _dsw_value _dsw_unit; do
            if [ "$_dsw_key" = "MemAvailable:" ]; then
                # The kernel writes "kB" and means KiB.
                if [ "${_dsw_unit:-}" = kB ] && _dsw_is_bytes "$_dsw_value"; then
                    _dsw_limit=$((_dsw_value * 1024))
                    _dsw_source="MemAvailable in $_dsw_meminfo"
                fi
                break
            fi
        done <"$_dsw_meminfo"
    fi
fi

if [ "$_dsw_status" -eq 0 ]; then
    DASK_WORKER_MEM_LIMIT=${_dsw_limit:-0}
    export DASK_WORKER_MEM_LIMIT
    case ${0##*/} in
        host-prestart.sh)
            echo "host-prestart: DASK_WORKER_MEM_LIMIT from $_dsw_source" >&2
            echo "DASK_WORKER_MEM_LIMIT=$DASK_WORKER_MEM_LIMIT"
            ;;
    esac
fi

unset _dsw_limit _dsw_source _dsw_out _dsw_meminfo _dsw_key _dsw_value _dsw_unit
unset -f _dsw_is_bytes
eval "$_dsw_saved_options"
unset _dsw_saved_options
# Executed, this is the script's exit status; sourced, the status of the `.` command, so
# `. host-prestart.sh && docker compose up` does not start on a refused plan.
# The status is expanded into the string before eval, so the variable can go first.
eval "unset _dsw_status; return $_dsw_status 2>/dev/null || exit $_dsw_status"
