"""`dask-safe-audit SCHEDULER_ADDRESS`: is every worker of a cluster safe from the kernel?

A separate console script, not a `dask-safe-worker audit` mode: `dask-safe-worker`
passes every argument it does not own to `dask worker`, and `audit` is a valid
positional there (a scheduler address or a name), so a sub-command would change what an
existing command line means. docs/audit-cluster.md explains the verdicts.

One module per job: `remote.collect` runs on each worker and returns plain data;
`facts.facts_from_report` and `verdicts.judge` turn that into verdicts (pure); `render`
prints them; `client` connects and runs `collect` everywhere; `cli` is the click command
(distributed is imported only after the options parse).
"""
