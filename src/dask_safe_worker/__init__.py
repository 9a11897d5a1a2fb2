"""dask-safe-worker: two programs over one measuring and planning core.

Module map (docs/design.md explains the design):

`dask-safe-worker` (one start: argv -> plan -> limit -> exec)
    entry          console script; answers a plain `--print-limit` without click
    options        the option table (names, env vars, parsers, defaults, help) and the
                   typed `Options`; both `entry` and `cli` are built from it
    cli            the click command; `prepare` (check, parse, measure, plan: reads only)
                   and `act` (kernel limit, plan file, exec or supervisor)
    worker_args    split our options from the worker's; read the ones the plan needs
    worker_cli     check the worker's arguments against dask worker's own click options
    measure        host memory and every cgroup level (below proc_root and root)
    proc_parse, cgroup_parse, cgroup_locate, cgroup_files
                   pure parsers of /proc and cgroup files; locating our cgroup; file access
    cgroup_leave   move back to the parent, then rmdir a child (stdlib only)
    cgroup_claim   an flock that marks a child cgroup as a running instance's
    siblings       other instances' child cgroups beside ours
    plan           measurement + worker values -> budget and per-worker --memory-limit (pure)
    sizes          byte sizes and fractions as users type them
    records        frozen value classes without importing dataclasses (start-up cost)
    cgroup_write   the one place that writes cgroup files
    plan_file      the plan as JSON in a private runtime directory
    run_worker     the exec edge
    supervise      the tini-like supervisor (stdlib only) exec'd for --init / PID 1
    events, event_line
                   the audit log of one start: one JSON line per decision
    dask_compat/   what depends on the installed dask/distributed release, one module
                   per upstream file it mirrors (no import of dask or distributed):
                   release (the installed `Release`, resolved once per start and passed
                   in; the supported range), dask_worker (distributed/cli/dask_worker.py:
                   options, --nworkers/--nthreads), distributed_system (distributed/
                   system.py: MEMORY_LIMIT), dask_system (dask/system.py: CPU_COUNT),
                   features (the per-release facts for the audit log)

`--follow` (a live budget, run by the supervisor)
    follow (pure core), follow_setup (at start), watch (each tick), live_limit (the
    channel), follow_dask, follow_worker, follow_nanny (preloads), _scheduler_side

`dask-safe-audit` (checks a running cluster; a separate program)
    cluster_audit/ a subpackage, one module per job: remote (runs on every worker via
                   Client.run), facts (report -> WorkerFacts), verdicts (judge, pure),
                   render (rows, table), client (connect, run, judge), cli (click)
    env_options    its click options with environment variables
"""

__version__ = "0.1.0"
