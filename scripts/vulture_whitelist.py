"""Names vulture (scripts/test.sh's dead-code check) cannot see used.

Each is read by something outside the Python call graph: pytest, dask, cgroupspy, a
JSON document built with `dataclasses.asdict`, or a subprocess. A name that is really
unused is deleted, not listed here.
"""

# ruff: noqa: B018, F821
# mypy: ignore-errors

# pytest: markers, hooks, collection settings and autouse fixtures.
pytestmark
pytest_configure
pytest_terminal_summary
pytest_runtest_makereport  # tests/vm/guest/conftest.py
pytest_collection_finish  # tests/vm/conftest.py
pytest_sessionfinish  # tests/vm/conftest.py
collect_ignore
_runtime_dir  # tests/test_instances.py, autouse
_leave_run_as_it_was  # tests/test_plan_file.py, autouse
_private_runtime_dir  # tests/conftest.py, autouse
_host_run_dir_untouched  # tests/conftest.py, autouse
_.add_pid  # tests/cgroup_util.py: helper API kept beside enter_command
_.memory_dir  # tests/image/podman_engine.py: used when a test fails, to explain it
_.leftovers

# Dataclass fields that only reach JSON (asdict: the audit log, the plan file, reports).
requested  # cgroup.write.WriteOutcome
siblings_committed  # plan.Plan
dask_default_limit  # plan.Plan
mount_root  # cgroup_locate.CgroupLocation
headroom_before  # benchmarks/dswbench/harness.RunResult
workload_bytes
stats_error
nanny_rss_median
_.headroom_before
_.workload_bytes
_.stats_error
_.nanny_rss_median
# benchmarks/dswbench/charge.Proc and Charge (the nanny-charge report's JSON)
pss
anonymous
private_dirty
private_clean
shared_clean
rss_file
cgroup_anon
cgroup_file
cgroup_kernel
nanny_private
worker_rss
by_cgroup
by_smaps

# Read by others: dask calls the preloads' dask_setup and dask_teardown; cgroupspy reads
# full_path and limit_in_bytes; attributes set on dask's objects and on sys.
dask_setup
dask_teardown
_.full_path
_.limit_in_bytes
_.total_memory
_.transfer_incoming_bytes_limit
_.unraisablehook
# worker_cli's table is dumped as JSON by a subprocess (worker_cli._DUMP).
_.as_json
# The package's lazy names (dask_safe_worker.LocalCluster, .memory_limit): Python calls
# a module's __getattr__.
__getattr__
