"""Helpers for the guest suite: test cgroups on the VM's cgroup2 tree, and running the
product's CLI inside them.

Runs only inside the VM (conftest.py refuses anything else). Every cgroup here is created
by a test, below the pytest process's own cgroup (the guest's root), and removed by the
fixture that created it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler_util import audit_events, free_port

CGROUP2 = Path("/sys/fs/cgroup")
MiB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")
PYTHON = sys.executable
SAFE_WORKER = str(Path(sys.executable).parent / "dask-safe-worker")
# A closed port on loopback: stand-in workers never dial it.
NO_SCHEDULER = "tcp://127.0.0.1:1"
# Generous bounds for a software-emulated guest; a test fails, never hangs, past them.
RUN_TIMEOUT = 240.0


def errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def try_write(path: Path, text: str) -> str:
    """Write like `echo text > path`; return "ok" or the errno's name."""
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        return errno_name(exc)
    return "ok"


def page_floor(value: int) -> int:
    """The kernel stores memory.max / memory.high in whole pages, rounding down."""
    return value // PAGE * PAGE


class Cgroup:
    """A cgroup2 directory that a test created (or the root it created them below)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def cgroup_path(self) -> str:
        """The path as /proc/<pid>/cgroup shows it in the initial cgroup namespace."""
        return "/" + str(self.path.relative_to(CGROUP2))

    def child(self, name: str) -> Cgroup:
        (self.path / name).mkdir()
        return Cgroup(self.path / name)

    def read(self, name: str) -> str:
        return (self.path / name).read_text().strip()

    def write(self, name: str, value: str | int) -> None:
        (self.path / name).write_text(str(value))

    def enable_memory(self) -> None:
        self.write("cgroup.subtree_control", "+memory")

    def pids(self) -> list[int]:
        return [int(p) for p in self.read("cgroup.procs").split()]

    def events(self, name: str = "memory.events") -> dict[str, int]:
        pairs = (line.split() for line in self.read(name).splitlines())
        return {key: int(value) for key, value in pairs}

    def limit(self) -> str:
        return self.read("memory.max")


def enter(cg: Cgroup, argv: Sequence[str]) -> list[str]:
    """argv started inside `cg`: the shell moves itself in, then execs, so nothing of the
    command ever runs outside it."""
    return [
        "sh",
        "-c",
        f'echo $$ > {shlex.quote(str(cg.path))}/cgroup.procs && exec "$@"',
        "sh",
        *argv,
    ]


def enter_container(cg: Cgroup, argv: Sequence[str]) -> list[str]:
    """argv started the way a container runtime starts PID 1's tree: inside `cg`, in a new
    cgroup namespace rooted at `cg`, with cgroup2 remounted so /sys/fs/cgroup is `cg`."""
    remount = 'umount -l /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "$@"'
    inner = ["unshare", "--cgroup", "--mount", "--propagation", "private", "--"]
    return enter(cg, [*inner, "sh", "-c", remount, "sh", *argv])


@dataclass
class Processes:
    """Processes a test started; only these are ever signalled."""

    started: list[subprocess.Popen[Any]] = field(default_factory=list)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(list(argv), **kwargs)
        self.started.append(proc)
        return proc

    def pids(self) -> set[int]:
        return {p.pid for p in self.started}

    def end_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
        for proc in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)


def remove_tree(path: Path) -> None:
    """Remove a test's cgroup and everything below it, killing what still runs there."""
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        remove_tree(sub)
    for _ in range(100):
        pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        if not pids:
            break
        for pid in pids:
            # Only test cgroups are removed here, so a pid left inside is one the test
            # started or its descendant (a nanny's worker), in a VM we own.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    with contextlib.suppress(OSError):
        path.rmdir()


@contextlib.contextmanager
def make_cgroup_tree(started: Processes, label: str) -> Iterator[Cgroup]:
    """A fresh cgroup below ours (the guest's root), with +memory for its children;
    everything below it is removed afterwards."""
    own = Path("/proc/self/cgroup").read_text().strip()
    assert own == "0::/", f"the guest suite expects to run in the root cgroup, got {own!r}"
    base = Cgroup(CGROUP2 / f"dsw-vm-{label}-{uuid.uuid4().hex[:8]}")
    base.path.mkdir()
    try:
        base.enable_memory()
        yield base
    finally:
        started.end_all()
        remove_tree(base.path)


def memory_hog(procs: Processes, cg: Cgroup, size: int) -> subprocess.Popen[str]:
    """A process in `cg` holding `size` bytes of touched memory until killed."""
    code = (
        "import sys, time\n"
        f"held = b'\\x01' * {size}\n"
        "print('ready', flush=True)\n"
        "time.sleep(3600)\n"
    )
    proc = procs.popen(enter(cg, [PYTHON, "-c", code]), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", "the memory hog did not start"
    return proc


@dataclass
class SafeRun:
    returncode: int
    stdout: str
    stderr: str
    events: list[dict[str, Any]]
    document: dict[str, Any] | None
    # What the stand-in worker saw: its /proc/self/cgroup line, then its argv.
    report: list[str]

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    @property
    def outcome(self) -> dict[str, Any]:
        assert self.document is not None, self.stderr
        result: dict[str, Any] = self.document["cgroup_write"]["outcome"]
        return result

    @property
    def plan(self) -> dict[str, Any]:
        assert self.document is not None, self.stderr
        result: dict[str, Any] = self.document["plan"]
        return result

    @property
    def worker_cgroup(self) -> str:
        assert self.report, f"the stand-in worker never ran:\n{self.stderr}"
        return self.report[0].removeprefix("0::")

    @property
    def worker_args(self) -> list[str]:
        return self.report[1:]

    def explain(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def start_scheduler(procs: Processes, log: Path) -> tuple[subprocess.Popen[Any], str]:
    """A scheduler on 127.0.0.1, and its address. The first death of a worker running a
    task ends that task (KilledWorker), instead of three more OOM kills and restarts."""
    port = free_port()
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    with open(log, "wb") as out:
        proc = procs.popen(
            [
                *(PYTHON, "-m", "distributed.cli.dask_scheduler"),
                *("--host", "127.0.0.1", "--port", str(port), "--no-dashboard"),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, f"tcp://127.0.0.1:{port}"


def _exec_unless_following(options: Sequence[str]) -> list[str]:
    """These tests are about the start's writes and the kernel's kills: the worker is
    exec'd (`--no-follow`, the start as it was before following became the default),
    unless a test asks for `--follow` by name."""
    return list(options) if "--follow" in options else ["--no-follow", *options]


def start_safe_worker(
    procs: Processes,
    cg: Cgroup,
    address: str,
    plan_file: Path,
    log: Path,
    options: Sequence[str] = (),
    *,
    nanny_terminates: float | None = None,
) -> subprocess.Popen[Any]:
    """dask-safe-worker in `cg` with JSON audit lines and a plan file, 2 threads. The
    nanny must not terminate first where a test is about the kernel's kill, whose race
    with the nanny's 100 ms RSS poll would make it flaky; `nanny_terminates` is Dask's
    terminate threshold (a fraction of the Dask limit) where a test wants the restart."""
    terminate = "False" if nanny_terminates is None else str(nanny_terminates)
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__MEMORY__TERMINATE": terminate}
    with open(log, "wb") as out:
        return procs.popen(
            enter(
                cg,
                [
                    *(SAFE_WORKER, "--log-format", "json", "--plan-file", str(plan_file)),
                    *_exec_unless_following(options),
                    *(address, "--nthreads", "2", "--no-dashboard"),
                ],
            ),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def run_safe_worker(
    procs: Processes,
    cg: Cgroup,
    options: Sequence[str],
    workdir: Path,
    *,
    container: bool = False,
    worker_args: Sequence[str] = (NO_SCHEDULER,),
    dry_run: bool = False,
    prefix: Sequence[str] = (),
) -> SafeRun:
    """Run `dask-safe-worker` in `cg` (as a container's process tree if `container`) to
    completion, with a stand-in worker that records where it ran and with which arguments
    instead of starting dask (which costs ~20 s per process in this guest). `prefix`:
    a command that runs inside `cg` and execs the tool (its argv follows it)."""
    report = workdir / f"report-{uuid.uuid4().hex[:8]}"
    plan_file = workdir / f"plan-{uuid.uuid4().hex[:8]}.json"
    stand_in = shlex.join(
        ["sh", "-c", 'head -n1 /proc/self/cgroup > "$0"; printf "%s\\n" "$@" >> "$0"', str(report)]
    )
    argv = [
        SAFE_WORKER,
        "--log-format",
        "json",
        "--worker-command",
        stand_in,
        *(["--dry-run"] if dry_run else ["--plan-file", str(plan_file)]),
        *_exec_unless_following(options),
        *worker_args,
    ]
    argv = [*prefix, *argv]
    full = enter_container(cg, argv) if container else enter(cg, argv)
    proc = procs.popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    document: dict[str, Any] | None = None
    if dry_run and proc.returncode == 0:
        document = json.loads(stdout)
    elif plan_file.exists():
        document = json.loads(plan_file.read_text())
    lines = report.read_text().splitlines() if report.exists() else []
    return SafeRun(proc.returncode, stdout, stderr, audit_events(stderr), document, lines)


def wait_until(check: Callable[[], bool], what: str, timeout: float) -> None:
    """Poll `check` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def wait_for_workers(client: Any, n: int, timeout: float, cg: Cgroup, record: Path) -> None:
    """`client.wait_for_workers`, noting every minute what the processes in `cg` do (state,
    CPU seconds, RSS, where they sleep) in `record`: a worker that never registers is then
    either slow (its CPU time grows) or stuck (it does not)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.wait_for_workers(n, timeout=min(60.0, max(1.0, deadline - time.monotonic())))
            return
        except Exception:  # WorkerStartTimeoutError, which distributed's types do not name
            with open(record, "a") as out:
                out.write(f"--- {time.strftime('%H:%M:%S')}\n")
                for pid in cg.pids():
                    out.write(f"{_process_line(pid)}\n")
            if time.monotonic() >= deadline:
                raise


def _process_line(pid: int) -> str:
    proc = Path(f"/proc/{pid}")
    try:
        stat = (proc / "stat").read_text()
        wchan = (proc / "wchan").read_text()
        cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError as exc:
        return f"{pid} gone ({errno_name(exc)})"
    # The fields after the command's closing parenthesis: state is the first, utime and
    # stime the 12th and 13th, rss (in pages) the 22nd.
    rest = stat.rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(rest[11]) + int(rest[12])) / ticks
    rss = int(rest[21]) * PAGE // MiB
    return f"{pid} {rest[0]} cpu={cpu:.1f}s rss={rss}MiB wchan={wchan or '-'} {cmd[:120]}"
