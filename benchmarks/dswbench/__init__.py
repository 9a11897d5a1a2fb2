"""The memory-pressure benchmark behind benchmarks/pressure.py, split by job.

- common: the scenario's constants and number formatting;
- workloads: what runs inside the worker, and the spill/burst/steady workloads;
- harness: one run (cgroups, agent, scheduler, worker, sampler) and the interleaved series;
- startup: start-up cost (registration pairs, query modes, import profile);
- plots, report (with report_header.md, the fixed prose): docs/benchmarks.md;
- main: the command line;
- support: the tests' cgroup and port helpers, the one place that puts tests/ on the path.
"""
