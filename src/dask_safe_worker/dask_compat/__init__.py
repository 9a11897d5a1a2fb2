"""What depends on the installed dask/distributed release: their rules, replicated.

The entrypoint must not import dask or distributed before it execs (about 0.5 s), so these
modules replicate the rules it needs from data and read files under injectable roots. One
module per upstream file, named after it, so that a change upstream has one place here:

    release             the installed releases (from package metadata) and the supported
                        range; `Release`, resolved once per start and passed to the others
    dask_worker         distributed/cli/dask_worker.py: its option table per release, how it
                        resolves --nworkers/--nthreads (with distributed/deploy/utils.py's
                        nprocesses_nthreads), and the command that starts it
    distributed_system  distributed/system.py: MEMORY_LIMIT, the cgroup files it reads
    dask_system         dask/system.py: CPU_COUNT, the CPU quota it honours
    features            the per-release facts above, in one record for the audit log

Parity tests (tests/test_parity.py, run by scripts/matrix.py against every release) import
the real thing and compare; docs/compatibility.md has the table of what differs per
release. This package imports nothing: each importer pays only for the module it uses
(`--print-limit`'s start-up time is a goal).
"""
