"""Issue 13 rows 10, 12d, 13: the plan file is written safely, one way, without litter.

The runs write no cgroup (`--cgroup-write never`); the worker command is a Python that
prints what it inherited, so each test sees the file and the variable the worker gets.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dask_safe_worker import plan_file
from scheduler_util import audit_events

DSW = [sys.executable, "-m", "dask_safe_worker"]
PRIVATE_RUN = 'mount --make-rprivate / && mount -t tmpfs -o mode=755 tmpfs /run && exec "$@"'
# Prints the plan file variable the worker inherited (or "-").
SHOW_ENV = f"{sys.executable} -c \"import os; print(os.environ.get('DASK_SAFE_WORKER_PLAN', '-'))\""


@pytest.fixture(autouse=True)
def _leave_run_as_it_was() -> Iterator[None]:
    """As root, a refused private directory falls back to /run/dask-safe-worker: what
    these tests make there (plan files, and the pool a start keeps there, claims in a
    pool directory that was there before included) is removed again, and the directory
    if they made it."""
    run_dir = Path("/run/dask-safe-worker")
    existed = run_dir.exists()
    before = set(run_dir.rglob("*")) if existed else set()
    yield
    if not run_dir.is_dir() or run_dir.is_symlink():
        return
    # Deepest first, so that a directory is empty when its turn comes.
    for made in sorted(set(run_dir.rglob("*")) - before, key=lambda q: -len(q.parts)):
        if made.is_dir() and not made.is_symlink():
            made.rmdir()
        else:
            made.unlink()
    if not existed:
        run_dir.rmdir()


def start(
    args: list[str], env: dict[str, str], shell_prefix: str = ""
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_SAFE_WORKER", "XDG_"))}
    argv = [*DSW, "--no-follow", "--cgroup-write", "never", "--log-format", "json"]
    argv += ["--worker-command", SHOW_ENV, *args]
    if shell_prefix:
        # The shell does its work, then execs the tool: the tool runs with the shell's pid.
        argv = ["sh", "-c", f'{shell_prefix}; exec "$@"', "sh", *argv]
    if os.geteuid() == 0:
        # As root the fallback is /run/dask-safe-worker: the host's is not the tests' to
        # fill (parallel suites shared and left it), so a /run of this start's own.
        argv = ["unshare", "--mount", "sh", "-c", PRIVATE_RUN, "sh", *argv]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env={**base, **env}, check=False
    )


def plan_entries(directory: Path) -> list[str]:
    """What a runtime directory holds besides the pools of instances (cgroup/pool.py),
    which share it with the plan files."""
    return sorted(n for n in os.listdir(directory) if not n.startswith("pool-"))


def test_default_file_is_private_and_exported(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    proc = start([], {"XDG_RUNTIME_DIR": str(runtime)})
    assert proc.returncode == 0, proc.stderr
    exported = Path(proc.stdout.strip())
    assert exported.parent == runtime / "dask-safe-worker"
    assert stat.S_IMODE(exported.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(exported.stat().st_mode) == 0o600
    assert json.loads(exported.read_text())["plan"]["budget"] > 0
    # Only the plan file itself: no temporary file is left beside it.
    assert plan_entries(exported.parent) == [exported.name]


def test_planted_symlink_at_the_default_path_is_replaced_not_followed(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    private = runtime / "dask-safe-worker"
    private.mkdir(parents=True, mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    name = plan_file.default_name(0).replace("-0.json", "-$$.json")
    proc = start([], {"XDG_RUNTIME_DIR": str(runtime)}, f'ln -s {victim} "{private}/{name}"')
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == "precious\n"
    exported = Path(proc.stdout.strip())
    assert not exported.is_symlink() and json.loads(exported.read_text())["plan"]


def test_a_symlink_given_as_plan_file_is_refused_before_any_write(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "plan.json"
    link.symlink_to(victim)
    proc = start(["--plan-file", str(link)], {})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("dask-safe-worker:") == 1 and "is a symlink" in proc.stderr
    assert victim.read_text() == "precious\n"
    assert link.is_symlink() and sorted(os.listdir(tmp_path)) == ["plan.json", "victim"]
    # Refused before the worker ran: it printed nothing.
    assert proc.stdout == ""


def test_a_null_device_given_as_plan_file_stays_a_device(tmp_path: Path) -> None:
    # Issue 24 row 0: renaming over /dev/null replaced the host's null device. A node of
    # this test's own (c 1 3, as /dev/null is) stands in for it.
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    null.chmod(0o666)  # mknod applies the umask
    proc = start(["--plan-file", str(null)], {})
    assert proc.returncode == 0, proc.stderr
    info = null.lstat()
    assert stat.S_ISCHR(info.st_mode) and info.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(info.st_mode) == 0o666
    assert os.listdir(tmp_path) == ["null"]  # no temporary file beside it
    assert proc.stdout.strip() == str(null)
    written = [e for e in audit_events(proc.stderr) if e["event"] == "plan.file.written"]
    assert written and written[0]["path"] == str(null)


def test_a_fifo_given_as_plan_file_receives_the_plan(tmp_path: Path) -> None:
    fifo = tmp_path / "plan.fifo"
    os.mkfifo(fifo, 0o600)
    # A reader holds the FIFO open before the start, as a log collector would.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        proc = start(["--plan-file", str(fifo)], {})
        assert proc.returncode == 0, proc.stderr
        received = b""
        while chunk := os.read(reader, 1 << 16):
            received += chunk
    finally:
        os.close(reader)
    assert json.loads(received)["plan"]["budget"] > 0
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_a_fifo_without_reader_is_a_logged_failure_not_a_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "plan.fifo"
    os.mkfifo(fifo, 0o600)
    proc = start(["--plan-file", str(fifo)], {})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "-"
    failed = [e for e in audit_events(proc.stderr) if e["event"] == "plan.file.failed"]
    assert failed and failed[0]["path"] == str(fifo)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


@pytest.mark.parametrize("kind", ["directory", "socket"])
def test_what_is_neither_file_nor_stream_is_refused(kind: str, tmp_path: Path) -> None:
    import socket

    target = tmp_path / "target"
    if kind == "directory":
        target.mkdir()
        expected = "directory"
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(target))
        sock.close()
        expected = "is a socket"
    proc = start(["--plan-file", str(target)], {})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and expected in proc.stderr
    assert proc.stdout == ""
    assert os.listdir(tmp_path) == ["target"]


def test_planted_file_is_replaced_atomically(tmp_path: Path) -> None:
    planted = tmp_path / "plan.json"
    planted.write_text("planted\n")
    planted.chmod(0o666)
    proc = start(["--plan-file", str(planted)], {})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(planted.read_text())["plan"]["budget"] > 0
    assert stat.S_IMODE(planted.stat().st_mode) == 0o600


@pytest.mark.parametrize("planted", ["symlink", "open-to-others", "a-file"])
def test_an_unsafe_private_directory_is_never_used(planted: str, tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    private = runtime / "dask-safe-worker"
    if planted == "symlink":
        private.symlink_to(elsewhere, target_is_directory=True)
    elif planted == "open-to-others":
        private.mkdir()
        private.chmod(0o777)
    else:
        private.write_text("x")
    proc = start([], {"XDG_RUNTIME_DIR": str(runtime), "TMPDIR": str(tmp_path / "tmp")})
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(elsewhere) == []
    exported = proc.stdout.strip()
    # The next candidate (as root /run, else the per-user temp directory) took it.
    assert not exported.startswith(str(private))


def test_no_litter_the_path_of_a_dead_pid_is_removed(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    private = runtime / "dask-safe-worker"
    private.mkdir(parents=True, mode=0o700)
    # A pid that cannot be running: above the kernel's pid_max.
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    stale = private / plan_file.default_name(pid_max + 1)
    stale.write_text("{}")
    other_host = private / f"plan-otherhost-{pid_max + 1}.json"
    other_host.write_text("{}")
    for _ in range(3):
        proc = start([], {"XDG_RUNTIME_DIR": str(runtime)})
        assert proc.returncode == 0, proc.stderr
    assert not stale.exists()
    # Files of other hosts sharing the directory are not ours to judge.
    assert other_host.exists()
    # Three starts leave at most the files of their own (exited) pids, which the next
    # start removes: at most one per start since the last one, never an accumulation.
    proc = start([], {"XDG_RUNTIME_DIR": str(runtime)})
    left = plan_entries(private)
    assert len(left) == 2, left  # the last start's file and the other host's


def test_plan_file_in_a_missing_directory_behaves_the_same_for_both_spellings(
    tmp_path: Path,
) -> None:
    missing = str(tmp_path / "missing" / "plan.json")
    by_option = start(["--plan-file", missing], {})
    by_env = start([], {"DASK_SAFE_WORKER_PLAN_FILE": missing})
    for proc in (by_option, by_env):
        assert proc.returncode == 0, proc.stderr
        # The worker starts, and is not told about a plan file that does not exist.
        assert proc.stdout.strip() == "-"
        failed = [e for e in audit_events(proc.stderr) if e["event"] == "plan.file.failed"]
        assert failed and failed[0]["path"] == missing


def test_read_only_root_filesystem_gives_no_traceback(tmp_path: Path) -> None:
    # A real read-only root: a mount namespace where / is remounted read-only.
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace")
    script = (
        "mount --make-rprivate / && mount -o remount,bind,ro / && "
        # /tmp and /var/tmp stay visible but read-only: the interpreter under test may
        # live there (the compatibility matrix builds its venvs in a temp directory).
        "mount -t tmpfs -o ro tmpfs /run && "
        "mount --bind /tmp /tmp && mount -o remount,bind,ro /tmp && "
        "mount --bind /var/tmp /var/tmp && mount -o remount,bind,ro /var/tmp && "
        'exec "$@"'
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_SAFE_WORKER", "XDG_"))}
    proc = subprocess.run(
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            script,
            "sh",
            *DSW,
            "--no-follow",
            "--cgroup-write",
            "never",
            "--log-format",
            "json",
            "--worker-command",
            SHOW_ENV,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, "TMPDIR": "/nonexistent-tmp"},
        check=False,
    )
    if proc.returncode != 0 and "mount" in proc.stderr and "Traceback" not in proc.stderr:
        pytest.skip(f"cannot make a read-only root here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    events = audit_events(proc.stderr)
    failed = [e for e in events if e["event"] == "plan.file.failed"]
    assert failed, proc.stderr
    assert proc.stdout.strip() == "-"
    assert any(e["event"] == "worker.exec" for e in events)


def test_a_runtime_directory_of_another_user_is_not_used(tmp_path: Path) -> None:
    # `sudo` may keep the invoking user's XDG_RUNTIME_DIR; its owner could swap our
    # subdirectory for a link, so it is skipped.
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory owned by another user")
    runtime = tmp_path / "run-of-nobody"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, 65534, 65534)
    proc = start([], {"XDG_RUNTIME_DIR": str(runtime)})
    assert proc.returncode == 0, proc.stderr
    assert not proc.stdout.strip().startswith(str(runtime))
    assert os.listdir(runtime) == []


@pytest.mark.parametrize("spelling", ["option", "environment"])
def test_an_instance_started_inside_a_worker_keeps_its_own_plan_file(
    spelling: str, tmp_path: Path
) -> None:
    # Issue 24 row 11: the path exported to the worker was also the --plan-file option's
    # variable, so an instance started inside the worker overwrote the outer one's file.
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    outer = tmp_path / "outer.json"
    show = tmp_path / "show.py"
    show.write_text(
        f"#!{sys.executable}\nimport os\n"
        "print(os.environ.get('DASK_SAFE_WORKER_PLAN', '-'))\n"
        "print(os.environ.get('DASK_SAFE_WORKER_PLAN_FILE', '-'))\n"
    )
    inner = tmp_path / "inner.sh"
    inner.write_text(
        "#!/bin/sh\n"
        f"exec {' '.join(DSW)} --no-follow --cgroup-write never --log-format json "
        f"--worker-command {show}\n"
    )
    for script in (show, inner):
        script.chmod(0o700)
    given = ["--plan-file", str(outer)] if spelling == "option" else []
    env = {"DASK_SAFE_WORKER_PLAN_FILE": str(outer)} if spelling == "environment" else {}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_SAFE_WORKER", "XDG_"))}
    argv = [*DSW, "--no-follow", "--cgroup-write", "never", "--log-format", "json", *given]
    proc = subprocess.run(
        [*argv, "--worker-command", str(inner)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, "XDG_RUNTIME_DIR": str(runtime), **env},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    exported, option_var = proc.stdout.split()
    # The outer file still holds the outer start's plan: its worker was the inner script.
    assert json.loads(outer.read_text())["argv"][0] == str(inner)
    # The inner instance wrote a file of its own, in its default place, and named it.
    assert Path(exported) != outer and Path(exported).parent == runtime / "dask-safe-worker"
    assert json.loads(Path(exported).read_text())["argv"][0] == str(show)
    # Neither worker inherits the option's variable.
    assert option_var == "-"


def test_no_option_reads_a_name_exported_to_the_worker() -> None:
    from dask_safe_worker.follow.live_limit import CONFIGURED_PRELOADS_ENV, LIVE_FILE_ENV
    from dask_safe_worker.options import OPTIONS, PLAN_EXPORT_ENV, PLAN_FILE_ENV

    read = {spec.env for spec in OPTIONS if spec.env is not None}
    assert PLAN_FILE_ENV in read
    assert not read & {PLAN_EXPORT_ENV, LIVE_FILE_ENV, CONFIGURED_PRELOADS_ENV}


def test_a_read_only_run_with_our_directory_falls_back_to_the_next_one(tmp_path: Path) -> None:
    # Issue 24 row 10: /run/dask-safe-worker existed on a read-only /run; the plan file
    # failed there and no other directory was tried, so the audit called the worker
    # unmanaged. A read-only tmpfs over /run, in a mount namespace of this test's own,
    # holds the directory as a start before the remount made it.
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace (and /run as the candidate)")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    script = (
        "mount --make-rprivate / && mount -t tmpfs -o mode=755 tmpfs /run && "
        "mkdir -m 700 /run/dask-safe-worker && mount -o remount,ro /run && "
        'test -d /run/dask-safe-worker && exec "$@"'
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_SAFE_WORKER", "XDG_"))}
    tool = [*DSW, "--no-follow", "--cgroup-write", "never", "--log-format", "json"]
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, "sh", *tool, "--worker-command", SHOW_ENV],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, "TMPDIR": str(tmp)},
        check=False,
    )
    if proc.returncode != 0 and "mount" in proc.stderr and "Traceback" not in proc.stderr:
        pytest.skip(f"cannot make a private read-only /run here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    exported = Path(proc.stdout.strip())
    assert exported.parent == tmp / f"dask-safe-worker-{os.geteuid()}", proc.stderr
    written = [e for e in audit_events(proc.stderr) if e["event"] == "plan.file.written"]
    assert written and written[0]["path"] == str(exported)
    # What dask-safe-audit reads on the worker: the plan, so the worker counts as managed.
    from dask_safe_worker.cluster_audit import remote

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(remote.PLAN_FILE_ENV, str(exported))
        path, plan, error = remote._read_plan()
    assert (path, error) == (str(exported), None)
    assert plan is not None and plan["budget"] > 0


@pytest.mark.parametrize(
    "question",
    [["--print-limit"], ["--dry-run", "tcp://127.0.0.1:1"]],
    ids=["print-limit", "dry-run"],
)
def test_a_question_makes_no_runtime_directory(question: list[str], tmp_path: Path) -> None:
    # Only an instance that claims memory needs the pool's directory; a question that
    # made one left an empty directory in /run on every host it was asked on.
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_SAFE_WORKER", "XDG_"))}
    proc = subprocess.run(
        [*DSW, "--cgroup-write", "never", *question],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, "XDG_RUNTIME_DIR": str(runtime)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(runtime) == []


def test_readers_find_the_directory_writers_chose(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    environ = {"XDG_RUNTIME_DIR": str(runtime)}
    assert plan_file.existing_runtime_dir(environ) is None
    assert not (runtime / plan_file.DIR_NAME).exists()
    made = plan_file.runtime_dir(environ)
    assert plan_file.existing_runtime_dir(environ) == made
    # A directory open to others is never read from, as it is never written to.
    made.chmod(0o777)
    assert plan_file.existing_runtime_dir(environ) != made


def test_the_temp_directory_is_the_one_tempfile_gives(tmp_path: Path) -> None:
    """`temp_dir` answers without tempfile where the answer is plain, and as tempfile
    would: with TMPDIR usable, missing, or not given."""
    ask = (
        "import sys\n"
        "from dask_safe_worker.plan_file import temp_dir\n"
        "print(temp_dir(), 'tempfile' in sys.modules)\n"
        "import tempfile\n"
        "print(tempfile.gettempdir())\n"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "TEMP", "TMP")}
    for extra in ({"TMPDIR": str(tmp_path)}, {"TMPDIR": str(tmp_path / "missing")}, {}):
        proc = subprocess.run(
            [sys.executable, "-c", ask],
            capture_output=True,
            text=True,
            env={**base, **extra},
            check=True,
            timeout=60,
        )
        ours, theirs = proc.stdout.splitlines()
        answer, loaded = ours.rsplit(" ", 1)
        assert answer == theirs, extra
        # A missing TMPDIR is tempfile's to judge.
        assert loaded == str(extra.get("TMPDIR", "").endswith("missing"))
