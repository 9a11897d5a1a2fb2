"""--follow on the command line: bad input exits 2 before anything is written, and a
channel that cannot be written turns following off while the worker still starts."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cgroup_util import KernelCgroup
from scheduler_util import audit_events

DSW = [sys.executable, "-m", "dask_safe_worker"]
GiB = 2**30
# A worker command that accepts any arguments and exits at once.
FAKE_WORKER = f"{sys.executable} -c 'import sys; print(sys.argv[1:])'"


def run(
    args: list[str], tmp: Path, env: dict[str, str] | None = None, prefix: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(prefix or []), *DSW, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(tmp), **(env or {})},
        check=False,
    )


@pytest.mark.kernel
@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--follow", "--follow-interval", "0"], {}),
        (["--follow", "--follow-interval", "-1"], {}),
        (["--follow", "--follow-interval", "soon"], {}),
        (["--follow", "--follow-interval", "nan"], {}),
        (["--follow", "--follow-interval=inf"], {}),
        (["--follow"], {"DASK_SAFE_WORKER_FOLLOW_INTERVAL": "0"}),
        (["--follow", "--no-init"], {}),
    ],
)
def test_bad_follow_input_exits_2_and_writes_nothing(
    kernel_cgroup: KernelCgroup,
    started_pids: set[int],
    tmp_path: Path,
    args: list[str],
    env: dict[str, str],
) -> None:
    kernel_cgroup.set_limit(GiB)
    before = kernel_cgroup.limit()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    argv = [
        *args,
        "--reserve",
        "100MiB",
        "--plan-file",
        str(tmp_path / "plan.json"),
        "--worker-command",
        FAKE_WORKER,
        "tcp://127.0.0.1:1",
    ]
    proc = subprocess.run(
        kernel_cgroup.enter_command([*DSW, *argv]),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(tmp), **env},
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "follow" in proc.stderr
    assert kernel_cgroup.limit() == before
    assert list(tmp.iterdir()) == [] and not (tmp_path / "plan.json").exists()
    assert [p.name for p in kernel_cgroup.path.iterdir() if p.is_dir()] == []


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)
def test_read_only_channel_disables_follow_and_the_worker_starts(tmp_path: Path) -> None:
    # Read-only filesystems in a private mount namespace over every directory Python's
    # tempfile would try (it skips an unwritable TMPDIR and falls back to /tmp, /var/tmp
    # and the working directory): a container with a read-only root and no scratch /tmp.
    # Bound read-only onto themselves rather than covered: the interpreter under test may
    # live there (the compatibility matrix builds its venvs in a temp directory).
    mounts = " && ".join(
        f"mount --bind {d} {d} && mount -o remount,bind,ro {d}" for d in ("/tmp", "/var/tmp")
    )
    # A /run of its own: the pool's runtime directory falls back there from the
    # read-only temp directory, and the host's is not the test's to fill.
    script = f'{mounts} && mount -t tmpfs -o mode=755 tmpfs /run && cd /tmp && exec "$@"'
    # A null device of this test's own: written into, it works on the read-only /tmp.
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    null.chmod(0o666)  # mknod applies the umask
    proc = run(
        [
            "--follow",
            "--cgroup-write",
            "never",
            # The plan file is another helper's; only the channel is under test here.
            "--plan-file",
            str(null),
            "--log-format",
            "json",
            "--worker-command",
            FAKE_WORKER,
            "tcp://127.0.0.1:1",
        ],
        Path("/tmp"),
        prefix=["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"],
    )
    assert proc.returncode == 0, proc.stderr
    events = audit_events(proc.stderr)
    disabled = [e for e in events if e["event"] == "follow.disabled"]
    assert len(disabled) == 1
    assert str(disabled[0]["reason"]).startswith("cannot write the live-limit channel")
    names = [e["event"] for e in events]
    # Still supervised, and the worker ran without our preloads.
    assert "init.exec" in names and "init.start" in names
    assert "follow.started" not in names
    assert "dask_safe_worker.follow.worker" not in proc.stdout
    assert "tcp://127.0.0.1:1" in proc.stdout
    assert stat.S_ISCHR(null.lstat().st_mode)


def test_the_worker_starts_before_the_supervisor_which_adopts_it(tmp_path: Path) -> None:
    # The supervisor's start (an interpreter, the watch) is off the way to a registered
    # worker: the planning process forks the worker, then execs the supervisor.
    proc = run(
        [
            "--cgroup-write",
            "never",
            "--log-format",
            "json",
            "--plan-file",
            str(tmp_path / "plan.json"),
            "--worker-command",
            f"{sys.executable} -c 'import os, sys; print(os.getppid()); sys.exit(5)'",
            "tcp://127.0.0.1:1",
        ],
        tmp_path,
    )
    assert proc.returncode == 5, proc.stderr
    events = audit_events(proc.stderr)
    by_name = {e["event"]: e for e in events}
    tool = by_name["cli.started"]["pid"]
    worker = by_name["init.start"]["adopted"]
    assert by_name["init.child.exited"]["child_pid"] == worker
    exec_argv = by_name["init.exec"]["argv"]
    assert exec_argv[exec_argv.index("--adopt") + 1] == str(worker)
    assert exec_argv.index("--adopt") < exec_argv.index("--")
    # One process throughout: the planning process, then the supervisor, its parent.
    assert by_name["init.start"]["pid"] == tool and proc.stdout.split() == [str(tool)]
    assert by_name["follow.started"]["pid"] == tool


def test_no_follow_still_execs_the_worker_itself(tmp_path: Path) -> None:
    proc = run(
        [
            "--no-follow",
            "--cgroup-write",
            "never",
            "--log-format",
            "json",
            "--plan-file",
            str(tmp_path / "plan.json"),
            "--worker-command",
            f"{sys.executable} -c 'import os; print(os.getpid())'",
            "tcp://127.0.0.1:1",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    names = [e["event"] for e in audit_events(proc.stderr)]
    assert names[-1] == "worker.exec" and not any(n.startswith("init.") for n in names)
    tool = next(e for e in audit_events(proc.stderr) if e["event"] == "cli.started")["pid"]
    assert proc.stdout.split() == [str(tool)]
