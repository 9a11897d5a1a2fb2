"""The measurement over one fixture tree per layout (general paths, not this host's)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dask_safe_worker.dask_compat.release import installed_release
from dask_safe_worker.measure import Measurement, measure

FIXTURES = Path(__file__).parent / "fixtures"
MiB, GiB = 2**20, 2**30
# The installed release's CPU_COUNT and MEMORY_LIMIT rules, as a start applies them.
RELEASE = installed_release()


def at(scenario: str, own_pid: int = 4242) -> Measurement:
    root = FIXTURES / scenario
    return measure(root / "proc", root, release=RELEASE, affinity=4, rlimit_rss=-1, own_pid=own_pid)


def test_hybrid_nested_takes_the_ancestor_scope_limit() -> None:
    m = at("hybrid-nested")
    assert m.location is not None and m.location.version == 1
    assert [lvl.path for lvl in m.levels] == [
        "/user.slice/user-1000.slice/session-3.scope/dask",
        "/user.slice/user-1000.slice/session-3.scope",
        "/user.slice/user-1000.slice",
        "/user.slice",
        "/",
    ]
    own = m.levels[0]
    assert own.limit is None and own.hierarchical_limit == 2 * GiB
    assert own.working_set == 200 * MiB
    assert m.levels[1].headroom == GiB
    assert m.available == GiB
    assert m.limiting == "/user.slice/user-1000.slice/session-3.scope"
    assert m.sole_occupant and m.own_working_set == 200 * MiB
    assert m.host.total == 16 * GiB and not m.host.available_estimated


def test_docker_v1_sees_its_limit_at_the_mount_root() -> None:
    m = at("docker-v1", own_pid=1)
    assert m.location is not None and m.location.version == 1
    assert m.location.relative == ""
    assert [lvl.path for lvl in m.levels] == ["/"]
    assert m.available == GiB - 80 * MiB
    assert m.limiting == "/" and m.sole_occupant
    assert m.warnings == ()


def test_docker_v2_private_cgroupns() -> None:
    m = at("docker-v2-cgroupns", own_pid=1)
    assert m.location is not None and m.location.version == 2
    assert m.location.cgroup_path == "/"
    assert m.levels[0].limit == GiB
    assert m.available == GiB - 150 * MiB
    assert m.own_working_set == 150 * MiB


def test_systemd_v2_ancestor_lower_than_leaf() -> None:
    m = at("systemd-v2-nest")
    assert m.location is not None and m.location.version == 2
    leaf, dask_slice, system_slice, root = m.levels
    assert leaf.limit == 8 * GiB and dask_slice.limit == 3 * GiB
    assert system_slice.limit is None and root.limit is None and root.error is None
    assert m.limiting == "/system.slice/dask.slice"
    assert m.available == 3 * GiB - 1000 * MiB
    # Two processes share the scope: only our own RSS counts as ours.
    assert not m.sole_occupant and m.own_working_set == 50 * MiB


def test_kubernetes_v1_pod() -> None:
    m = at("k8s-v1", own_pid=1)
    assert m.location is not None and m.location.relative == ""
    assert m.available == 2 * GiB - 600 * MiB
    assert not m.sole_occupant


def test_kubernetes_v2_pod_limit_below_container_headroom() -> None:
    m = at("k8s-v2", own_pid=1)
    paths = [lvl.path for lvl in m.levels]
    assert paths[0].endswith(".scope") and len(paths) == 5
    assert m.limiting.endswith("-pod0f6e5d4c_3b2a.slice")
    assert m.available == 1536 * MiB - 1000 * MiB


@pytest.mark.parametrize("scenario", ["unlimited-v1", "unlimited-v2"])
def test_unlimited_sentinels(scenario: str) -> None:
    m = at(scenario)
    assert all(lvl.effective_limit is None for lvl in m.levels)
    assert m.available == 9 * GiB and m.limiting == "host"


def test_malformed_files_become_errors_not_exceptions() -> None:
    m = at("malformed")
    assert m.host.available_estimated
    assert m.host.available == 6 * GiB + 512 * MiB
    own = m.levels[0]
    assert own.limit is None and own.error is not None and "limit" in own.error
    assert own.working_set == 400 * MiB
    assert m.available == m.host.available


def test_missing_memory_files_in_leaf() -> None:
    m = at("missing-files")
    assert m.levels[0].error is not None
    assert m.levels[0].usage is None
    assert m.available == 2 * GiB - 1000 * MiB


def test_path_outside_mount_root_is_not_located_and_not_read_as_unlimited() -> None:
    # Issue 24 rows 1 and 4: the mount root is another container's cgroup, never ours:
    # it is neither read as our level nor written, and our own level counts as unreadable.
    m = at("outside-root", own_pid=1)
    assert m.location is None and m.ancestor is None and m.levels == ()
    assert any("cannot be located" in w for w in m.warnings)
    assert len(m.unreadable) == 1 and "/docker/other-container" in m.unreadable[0]
    assert not m.sole_occupant


def test_as_dict_is_json_serialisable() -> None:
    import json

    for scenario in sorted(p.name for p in FIXTURES.iterdir()):
        doc = at(scenario).as_dict()
        assert json.loads(json.dumps(doc)) == doc


def test_odd_bytes_v2_become_level_errors_and_warnings() -> None:
    # Non-UTF-8 bytes in mountinfo (a parseable mount point and an unparseable line),
    # memory.max, memory.current, memory.stat and cgroup.procs (issue 13, rows 2 and 2b).
    m = at("odd-bytes-v2")
    assert m.location is not None and m.location.version == 2
    leaf, dask_slice, system_slice, root = m.levels
    assert leaf.limit is None and leaf.error is not None
    assert "memory.max is not an integer" in leaf.error
    # The odd memory.stat lines are skipped; the good inactive_file line still counts.
    assert leaf.inactive_file == 100 * MiB and leaf.working_set == 400 * MiB
    assert dask_slice.limit == 3 * GiB and dask_slice.error is None
    assert system_slice.usage is None and system_slice.error is not None
    assert "memory.current is not an integer" in system_slice.error
    assert root.error is None
    assert m.available == 3 * GiB - 1000 * MiB
    assert m.own_procs is None
    assert any(w.startswith("cannot list the own cgroup's processes") for w in m.warnings)
    skipped = [w for w in m.warnings if w.startswith("skipped a line of mountinfo")]
    assert len(skipped) == 1 and "not a mount line" in skipped[0]


def test_odd_bytes_v1_become_level_errors_and_warnings() -> None:
    m = at("odd-bytes-v1")
    # cgroup2's controllers are garbage, so memory is not on v2: the v1 hierarchy is used.
    assert m.location is not None and m.location.version == 1
    own, scope, user, user_slice, root = m.levels
    assert own.limit is None and own.error is not None and "limit_in_bytes" in own.error
    assert own.hierarchical_limit == 2 * GiB and own.working_set == 200 * MiB
    assert user_slice.usage is None and user_slice.error is not None
    assert scope.headroom == GiB and m.available == GiB
    assert root.error is None and user.error is None


def test_a_cgroup_path_with_a_non_utf8_byte_is_measured(tmp_path: Path) -> None:
    # A cgroup whose name is not UTF-8 (mkdir takes any byte): its files are still found.
    import shutil

    root = tmp_path / "tree"
    shutil.copytree(FIXTURES / "systemd-v2-nest", root)
    slice_dir = root / "sys/fs/cgroup/system.slice/dask.slice"
    odd = os.fsdecode(b"worker\xff\xc3.scope")
    (slice_dir / "worker.scope").rename(slice_dir / odd)
    (root / "proc/self/cgroup").write_bytes(b"0::/system.slice/dask.slice/worker\xff\xc3.scope\n")
    m = measure(root / "proc", root, release=RELEASE, affinity=4, rlimit_rss=-1, own_pid=4242)
    assert m.location is not None
    leaf = m.levels[0]
    assert os.fsencode(leaf.path) == b"/system.slice/dask.slice/worker\xff\xc3.scope"
    assert leaf.limit == 8 * GiB and leaf.error is None
    assert m.limiting == "/system.slice/dask.slice"
    assert m.own_procs == (4242, 4243)
    # The audit log and plan file stay JSON: the odd bytes are escaped, not lost.
    import json

    assert json.loads(json.dumps(m.as_dict()))["cgroup_levels"][0]["path"] == leaf.path


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_a_real_mount_point_with_a_non_utf8_byte_does_not_stop_measuring(tmp_path: Path) -> None:
    # Issue 13 row 2: a tmpfs mounted on a non-UTF-8 directory name in a mount namespace
    # of the test's own (unshare -m: private propagation, gone with its last process).
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    odd = os.fsencode(tmp_path) + b"/caf\xe9 \xff"
    os.mkdir(odd)
    # The kernel escapes the space as \040 and writes the other bytes as they are.
    as_listed = b"caf\xe9\\040\xff"
    script = (
        b'mount -t tmpfs none "$1" && grep -c -F "$2" /proc/self/mountinfo && shift 2 && exec "$@"'
    )
    cli = [sys.executable, "-m", "dask_safe_worker", "--print-limit", "--cgroup-write", "never"]
    proc = subprocess.run(
        [b"unshare", b"-m", b"sh", b"-c", script, b"sh", odd, as_listed, *map(os.fsencode, cli)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    count, budget = proc.stdout.decode().split()
    assert int(count) == 1, "the odd mount point is in the mount table"
    assert int(budget) > 0
    assert b"Traceback" not in proc.stderr


def test_routine_levels_carry_no_failure_words() -> None:
    # Launchers fail a worker on "error" in its output (dask-jobqueue), and so do alerting
    # rules: a level without an error has no `error` field; a real one keeps it.
    import json

    clean = at("systemd-v2-nest").as_dict()
    assert "error" not in json.dumps(clean).lower()
    levels = at("malformed").as_dict()["cgroup_levels"]
    assert isinstance(levels, list) and "error" in levels[0]


def _fixture_files(scenario: str) -> list[str]:
    root = FIXTURES / scenario
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("scenario", ["hybrid-nested", "systemd-v2-nest"])
def test_any_bytes_in_any_kernel_file_never_escape_measure(scenario: str) -> None:
    # Issue 13 row 2b: whatever bytes a file holds, measure() raises only for
    # /proc/meminfo (its docstring) and only OSError/ParseError; everything else becomes a
    # level error or a warning.
    import shutil
    import tempfile

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from dask_safe_worker.proc_parse import ParseError

    files = _fixture_files(scenario)
    odd = st.sampled_from([b"\xff", b"\xc3\x28", b"\x00", b"\n", b" ", b"-", b"max", b"\\"])
    content = st.one_of(st.binary(max_size=64), st.lists(odd | st.binary(max_size=4)).map(b"".join))

    @settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
    @given(changes=st.dictionaries(st.sampled_from(files), content, min_size=1, max_size=3))
    def check(changes: dict[str, bytes]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "tree"
            shutil.copytree(FIXTURES / scenario, root)
            for rel, data in changes.items():
                (root / rel).write_bytes(data)
            try:
                m = measure(
                    root / "proc", root, release=RELEASE, affinity=4, rlimit_rss=-1, own_pid=4242
                )
            except (OSError, ParseError):
                assert "proc/meminfo" in changes
                return
            import json

            json.dumps(m.as_dict())
            assert m.available >= 0

    check()


def test_kubernetes_memory_qos_high_is_a_ceiling_and_oom_group_is_read() -> None:
    # Memory QoS sets memory.high on the container below memory.max: the kernel
    # throttles above it, so the headroom is high - working set and that level limits.
    m = at("k8s-v2-memory-qos", own_pid=1)
    own, pod = m.levels[0], m.levels[1]
    assert own.high == 600 * MiB and pod.high is None
    assert own.headroom == 600 * MiB - 250 * MiB
    assert m.available == 350 * MiB and m.limiting == own.path
    assert own.oom_group is True and pod.oom_group is False
    line = m.as_dict()["cgroup_levels"]
    assert isinstance(line, list)
    assert line[0]["high"] == 600 * MiB and line[0]["oom_group"] is True


def test_missing_oom_group_and_high_files_are_absent_not_errors() -> None:
    # Kernels before 4.19 have no memory.oom.group; the v2 root has neither file.
    m = at("k8s-v2", own_pid=1)
    assert all(lvl.oom_group is None and lvl.high is None for lvl in m.levels)
    assert all(lvl.error is None for lvl in m.levels)
    assert all("oom_group" not in lvl.as_dict() for lvl in m.levels)


def _copy(scenario: str, tmp_path: Path) -> Path:
    import shutil

    root = tmp_path / scenario
    shutil.copytree(FIXTURES / scenario, root)
    return root


def _at(root: Path, own_pid: int = 4242) -> Measurement:
    return measure(root / "proc", root, release=RELEASE, affinity=4, rlimit_rss=-1, own_pid=own_pid)


def test_a_pid_namespace_without_its_own_cgroup_view_is_never_sole_occupant() -> None:
    # Issue 24 row 3: no kthreadd at pid 2 (a PID namespace), and our cgroup is not the
    # root of what we see: processes outside the namespace may share it, unseen.
    m = at("k8s-v2", own_pid=1)
    assert m.own_procs == (1,) and not m.sole_occupant
    assert m.hidden_neighbours is not None and "PID namespace" in m.hidden_neighbours
    assert m.as_dict()["hidden_neighbours"] == m.hidden_neighbours
    # A container's own cgroup view (the mount root is its cgroup) is one made for it.
    assert at("docker-v1", own_pid=1).sole_occupant
    assert at("docker-v2-cgroupns", own_pid=1).hidden_neighbours is None


def test_a_pid_0_in_cgroup_procs_is_a_hidden_neighbour(tmp_path: Path) -> None:
    # v2 lists a process outside our PID namespace as 0.
    root = _copy("unlimited-v2", tmp_path)
    assert _at(root).sole_occupant
    (root / "sys/fs/cgroup/dask.scope/cgroup.procs").write_text("4242\n0\n")
    m = _at(root)
    assert not m.sole_occupant and m.hidden_neighbours is not None
    assert "pid 0" in m.hidden_neighbours


def test_more_tasks_in_pids_current_than_we_see_is_a_hidden_neighbour(tmp_path: Path) -> None:
    root = _copy("unlimited-v2", tmp_path)
    (root / "proc/4242").mkdir()
    (root / "proc/4242/status").write_text("Name:\tpython\nThreads:\t3\n")
    (root / "sys/fs/cgroup/dask.scope/pids.current").write_text("3\n")
    assert _at(root).sole_occupant
    (root / "sys/fs/cgroup/dask.scope/pids.current").write_text("4\n")
    m = _at(root)
    assert not m.sole_occupant and m.hidden_neighbours is not None
    assert "pids.current counts 4 tasks" in m.hidden_neighbours
