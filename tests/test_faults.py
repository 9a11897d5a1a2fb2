"""Issue 11, "Bad input and faults": each a clear logged outcome, the worker started where
it can be, exit 2 with one line where it cannot.

Real runs of the CLI. Mount changes happen only in a private mount namespace that each
test's command creates (`unshare -m`), and kernel writes only in a cgroup the test made.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from cgroup_util import KernelCgroup
from scheduler_util import audit_events
from start_util import DSW

GiB, MiB = 2**30, 2**20

pytestmark = pytest.mark.kernel

needs_unshare = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare(1)"
)


def _recorder(tmp_path: Path, seen_at: Path | None = None) -> tuple[str, Path]:
    record = tmp_path / "worker-argv.json"
    written = (seen_at or tmp_path) / "worker-argv.json"
    code = f"import json, sys; open({str(written)!r}, 'w').write(json.dumps(sys.argv[1:]))"
    return shlex.join([DSW[0], "-c", code]), record


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("DASK_SAFE_WORKER", "TMPDIR"))}


def _in_namespace(setup: str, argv: list[str], cwd: str = "/") -> list[str]:
    """argv run after `setup` in a private mount namespace (nothing leaks to the host).
    /run is the namespace's own too: with /tmp covered, the runtime directory under it
    falls back to /run/dask-safe-worker, and a plan file there outlived the test."""
    private_run = "mount -t tmpfs -o mode=755 tmpfs /run"
    script = f'set -e; {private_run}; {setup}; cd {shlex.quote(cwd)}; exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *argv]


def _human(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=120, env=_env(), check=False
    )


# Bound read-only onto themselves rather than covered: the interpreter under test may
# live below /tmp (a checkout or a matrix venv there).
NO_TMP = "; ".join(
    f"mount --bind {d} {d}; mount -o remount,bind,ro {d}" for d in ("/tmp", "/var/tmp")
)


@needs_unshare
def test_no_usable_temp_dir_is_one_line_that_says_how_to_fix_it() -> None:
    # A read-only root (docker run --read-only): /tmp, /var/tmp and the working directory
    # are all read-only. dask's worker would have nowhere for its scratch space.
    argv = _in_namespace(NO_TMP, [*DSW, "--cgroup-write", "never", "tcp://127.0.0.1:1"], cwd="/tmp")
    proc = _run(argv)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = _human(proc.stderr)
    assert "no writable temporary directory" in line and "tmpfs" in line and "TMPDIR" in line


@needs_unshare
def test_no_usable_temp_dir_still_starts_a_worker_that_has_its_own_directory(
    tmp_path: Path,
) -> None:
    # The same root, but the worker is told where to write: it starts.
    # tmp_path is below /tmp: bound to /mnt before /tmp is covered, it is the worker's
    # own directory, outside any temp directory.
    command, record = _recorder(tmp_path, seen_at=Path("/mnt"))
    setup = f"mount --bind {shlex.quote(str(tmp_path))} /mnt; {NO_TMP}"
    args = [*DSW, "--log-format", "json", "--cgroup-write", "never", "--worker-command", command]
    argv = _in_namespace(setup, [*args, "tcp://127.0.0.1:1", "--local-directory", "/mnt"], "/tmp")
    proc = _run(argv)
    assert proc.returncode == 0, proc.stderr
    assert "--local-directory" in json.loads(record.read_text())


def test_unwritable_plan_file_is_logged_and_the_worker_starts(tmp_path: Path) -> None:
    command, record = _recorder(tmp_path)
    plan = "/proc/no-such-dir/plan.json"
    proc = _run(
        [*DSW, "--log-format", "json", "--cgroup-write", "never", "--worker-command", command,
         "--plan-file", plan, "tcp://127.0.0.1:1"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (failed,) = [e for e in audit_events(proc.stderr) if e["event"] == "plan.file.failed"]
    assert failed["path"] == plan and failed["reason"]
    assert record.exists(), "the worker must start without a plan file"
    assert "Traceback" not in proc.stderr


@needs_unshare
@pytest.mark.parametrize(
    "directory",
    ["/mnt/dask-scratch", "/proc/self/status/sub"],
    ids=["read-only-fs", "below-a-file"],
)
def test_unwritable_local_directory_is_exit_2_before_anything(
    tmp_path: Path, directory: str
) -> None:
    command, record = _recorder(tmp_path)
    # /mnt: a read-only tmpfs in the test's own mount namespace (root ignores modes).
    proc = _run(_in_namespace("mount -t tmpfs -o ro tmpfs /mnt",
        [*DSW, "--log-format", "json", "--cgroup-write", "never", "--worker-command", command,
         "tcp://127.0.0.1:1", "--local-directory", directory]
    ))  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    (line,) = _human(proc.stderr)
    assert line.startswith(f"dask-safe-worker: --local-directory {directory}: ")
    assert not record.exists()
    assert "measure.done" not in proc.stderr, "refused before measuring or writing"


def test_a_local_directory_still_to_be_made_is_fine(tmp_path: Path) -> None:
    command, record = _recorder(tmp_path)
    local = tmp_path / "not" / "yet"
    proc = _run(
        [*DSW, "--cgroup-write", "never", "--worker-command", command, "tcp://127.0.0.1:1",
         f"--local-directory={local}"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert record.exists() and not local.exists()


@needs_unshare
def test_read_only_cgroupfs_logs_erofs_and_falls_back_to_the_flag(
    kernel_cgroup: KernelCgroup, tmp_path: Path
) -> None:
    # Our own test cgroup, bound read-only onto itself in a private namespace: the kernel
    # answers EROFS, as on Docker's and Kubernetes' default cgroupfs.
    kernel_cgroup.set_limit(2 * GiB)
    command, record = _recorder(tmp_path)
    path = shlex.quote(str(kernel_cgroup.path))
    setup = f"mount --bind {path} {path}; mount -o remount,bind,ro {path}"
    inner = [*DSW, "--log-format", "json", "--worker-command", command, "--reserve", "256MiB",
             "--plan-file", str(tmp_path / "plan.json"), "tcp://127.0.0.1:1"]  # fmt: skip
    proc = _run(kernel_cgroup.enter_command(_in_namespace(setup, inner)))
    assert proc.returncode == 0, proc.stderr
    failed = [e for e in audit_events(proc.stderr) if e["event"] == "cgroup.write.failed"]
    assert failed and all(e["reason"] == "EROFS" for e in failed), proc.stderr
    (outcome,) = [e for e in audit_events(proc.stderr) if e["event"] == "cgroup.write.outcome"]
    assert (outcome["written"], outcome["enforced"]) == (False, False)
    assert kernel_cgroup.limit() == 2 * GiB, "nothing written"
    assert not [p for p in kernel_cgroup.path.iterdir() if p.is_dir()], "no child left"
    # The worker started, with dask's own limit as the fallback.
    assert "--memory-limit" in json.loads(record.read_text())
