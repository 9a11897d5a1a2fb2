"""The safe budget from Python: `memory_limit()` and `LocalCluster` for notebooks.

The calling process (a notebook kernel) is a neighbour of the workers that can grow: the
plan counts it out of the budget, with a reserve for its growth (`plan.py`, pure). With
processes, the workers go into a child cgroup of the kernel's with the budget as its
limit (`child.py`, `join.py`); a thread in the kernel follows the budget live
(`watch.py`). docs/notebooks.md shows the use, docs/design.md the choices. Nothing here
is imported by `import dask_safe_worker`: the package's `__getattr__` loads it on use.
"""
