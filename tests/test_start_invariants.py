"""Issue 13: invariants of the whole command line over generated argv and environments.

Each example runs the real `dask-safe-worker`, writing for real, inside a test cgroup
below our own that another process shares (so a write would create a child), with our
options, worker options, separators, odd bytes, empty values, NaN/inf and huge numbers
on the command line and in `DASK_SAFE_WORKER_*` variables. For every example:

- no Python traceback on stderr;
- only documented exit codes;
- a refusal (2, 3, 5) creates no cgroup and changes no limit;
- every JSON line of the audit log parses (strictly: NaN and infinity are not JSON).

A run that gets as far as starting its worker (the `worker.exec`/`init.exec` event) is
ended there by the test, with its whole process group, which the test started: the
scheduler is a closed port on 127.0.0.1. Bounded to 40 examples (about 20-40 s here).
The whole test runs twice: as started from the host, and inside a PID namespace
(`unshare -p -f --mount-proc`), where the process that shares the test cgroup cannot be
seen (issue 24 row 3).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st

from cgroup_util import KernelCgroup
from scheduler_util import closed_port
from start_util import DSW, NOOP_WORKER, cgroup_state, other_process

GiB = 2**30
DOCUMENTED_EXIT_CODES = {0, 1, 2, 3, 4, 5, 127}
REFUSALS = {2, 3, 5}

pytestmark = pytest.mark.kernel

PORT = closed_port()
ODD = ["\udcff", "\udc80x", "é", "\t", "\n", "x\ny", "\x7f"]
VALUES = st.one_of(
    st.sampled_from(
        [
            *("", " ", "0", "1", "-1", "nan", "NaN", "inf", "-inf", "1e400", "1e30", "0.5"),
            *("1.0", "10%", "150%", "512MiB", "-5GB", "1PiB", "2**64", "18446744073709551616"),
            *("auto", "never", "required", "keep", "..", ".", "/", "a/b", "dask-safe-worker"),
            *ODD,
        ]
    ),
    st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=6),
)
OUR_VALUE_OPTIONS = [
    "--reserve",
    "--min-worker-memory",
    "--nanny-allowance",
    "--cgroup-write",
    "--cgroup-child",
    "--memory-high-fraction",
    "--swap-max",
    "--plan-file",
]
OUR_FLAGS = [
    "--dry-run",
    "--print-limit",
    "--clamp-memory-limit",
    "--init",
    "--no-init",
    "--init-process-group",
    "-h",
    "--version",
]
# Only commands that are harmless with any arguments: the worker command is executed.
WORKER_COMMANDS = ["", "   ", "dask 'worker", "dask worker", NOOP_WORKER, "/nonexistent/w"]
WORKER_TOKENS = [
    f"tcp://127.0.0.1:{PORT}",
    f"127.0.0.1:{PORT}",
    "--nthreads",
    "--nworkers",
    "--memory-limit",
    "--name",
    "--no-nanny",
    "--nanny",
    "--death-timeout",
    "--",
    "--dryrun",
    "--nprocs",
    "--bogus-opt",
    "dask",
    "worker",
    "dask-worker",
    "cuda",
    "-",
]
ENV_NAMES = [
    "RESERVE",
    "MIN_WORKER_MEMORY",
    "NANNY_ALLOWANCE",
    "MEMORY_HIGH_FRACTION",
    "SWAP_MAX",
    "CGROUP_CHILD",
    "CGROUP_WRITE",
    "PLAN_FILE",
    "INIT",
    "CLAMP_MEMORY_LIMIT",
    "WORKER_COMMAND",
]

piece = st.one_of(
    st.tuples(st.sampled_from(OUR_VALUE_OPTIONS), VALUES).map(list),
    st.tuples(st.sampled_from(OUR_VALUE_OPTIONS), VALUES).map(lambda t: [f"{t[0]}={t[1]}"]),
    st.sampled_from(WORKER_COMMANDS).map(lambda c: ["--worker-command", c]),
    st.sampled_from(OUR_FLAGS).map(lambda f: [f]),
    st.sampled_from(WORKER_TOKENS).map(lambda t: [t]),
    VALUES.map(lambda v: [v]),
)
argv_st = st.lists(piece, max_size=8).map(lambda pieces: [t for p in pieces for t in p])
env_st = st.dictionaries(
    st.sampled_from(ENV_NAMES).map(lambda n: f"DASK_SAFE_WORKER_{n}"),
    st.one_of(VALUES, st.sampled_from(WORKER_COMMANDS)),
    max_size=3,
)


def _strict_json(line: str) -> object:
    def refuse(constant: str) -> object:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


def run_until_worker(
    cg: KernelCgroup,
    argv: list[str],
    env: dict[str, str],
    cwd: Path,
    started: set[int],
    wrapper: tuple[str, ...] = (),
) -> tuple[int | None, str]:
    """(exit code, or None when the worker was reached and ended by us; stderr)."""
    proc = subprocess.Popen(
        cg.enter_command([*wrapper, *DSW, "--log-format", "json", *argv]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    started.add(proc.pid)
    assert proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    chunks: list[bytes] = []
    reached = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not sel.select(timeout=0.5):
            continue
        data = os.read(proc.stderr.fileno(), 65536)
        if not data:
            break
        chunks.append(data)
        text = b"".join(chunks)
        if b'"event": "worker.exec"' in text or b'"event": "init.exec"' in text:
            reached = True
            break
    if reached or proc.poll() is None:
        # Our own session: the tool, its supervisor and the worker they started.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    rest = proc.stderr.read()
    proc.stderr.close()
    stderr = (b"".join(chunks) + rest).decode("utf-8", "replace")
    return (None if reached else proc.returncode), stderr


def remove_new_children(cg: KernelCgroup, before: dict[str, int]) -> None:
    for rel in sorted(set(cgroup_state(cg.path)) - set(before), reverse=True):
        for _ in range(50):
            try:
                (cg.path / rel).rmdir()
                break
            except OSError:
                time.sleep(0.05)


@pytest.fixture
def shared_cgroup(kernel_cgroup: KernelCgroup, started_pids: set[int]) -> KernelCgroup:
    kernel_cgroup.set_limit(4 * GiB)
    return kernel_cgroup


# Issue 24 row 3: also inside a PID namespace, where the process that shares the cgroup
# is invisible (cgroup.procs leaves it out): the shared parent is still never written.
@pytest.mark.parametrize(
    "wrapper",
    [
        pytest.param((), id="host"),
        pytest.param(
            ("unshare", "-p", "-f", "--mount-proc"),
            id="pid-namespace",
            marks=pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare"),
        ),
    ],
)
@settings(
    max_examples=40,
    deadline=None,
    # No explain phase: it reruns a failing case hundreds of times (minutes here).
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(argv=argv_st, env_extra=env_st)
# Each outcome at least once, whatever the generator draws: a start that writes and
# reaches its worker, a supervised one, a refusal of each kind.
@example(argv=[f"tcp://127.0.0.1:{PORT}"], env_extra={})
@example(argv=["--init", "--worker-command", NOOP_WORKER], env_extra={})
@example(argv=["--min-worker-memory", "1PiB", f"tcp://127.0.0.1:{PORT}"], env_extra={})
@example(argv=["--cgroup-child", ".."], env_extra={"DASK_SAFE_WORKER_SWAP_MAX": "nan"})
@example(argv=["dask", "worker", "\udcff"], env_extra={})
# A budget below the shared cgroup's limit: as its (wrongly) sole occupant, a start in a
# PID namespace would write the shared parent (issue 24 row 3).
@example(argv=["--reserve", "10%", f"tcp://127.0.0.1:{PORT}"], env_extra={})
def test_no_traceback_no_write_on_refusal_only_documented_codes(
    argv: list[str],
    env_extra: dict[str, str],
    wrapper: tuple[str, ...],
    shared_cgroup: KernelCgroup,
    started_pids: set[int],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    cwd = tmp_path_factory.mktemp("cwd")
    runtime = cwd / "run"
    runtime.mkdir(mode=0o700)
    base = {k: v for k, v in os.environ.items() if not k.startswith("DASK_SAFE_WORKER")}
    env = {**base, "XDG_RUNTIME_DIR": str(runtime), **env_extra}
    with other_process(shared_cgroup, started_pids):
        before = cgroup_state(shared_cgroup.path)
        try:
            code, stderr = run_until_worker(shared_cgroup, argv, env, cwd, started_pids, wrapper)
            after = cgroup_state(shared_cgroup.path)
        finally:
            remove_new_children(shared_cgroup, before)
    event(f"exit {'worker reached' if code is None else code}")
    assert "Traceback" not in stderr, stderr
    if code is not None:
        assert code in DOCUMENTED_EXIT_CODES, (code, stderr)
    if code in REFUSALS:
        assert after == before, stderr
    for line in stderr.splitlines():
        if line.startswith("{"):
            record = _strict_json(line)
            assert isinstance(record, dict) and "event" in record
    # The parent's limit is never touched, whatever happened.
    assert after["."] == before["."]
