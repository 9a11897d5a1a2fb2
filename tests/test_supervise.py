"""The supervisor against real processes and real signals.

Each supervisor runs in its own subprocess: it blocks signals and becomes a subreaper,
which must not leak into the test process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_safe_worker.events import SCHEMA_VERSION
from dask_safe_worker.supervise import main, supervise

PY = sys.executable
# Generous: only guards against a hang, never measures speed.
DEADLINE_S = 60.0


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the comm, or None once the pid is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def zombies_of(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = stat_fields(int(entry.name))
        if fields is not None and fields[0] == "Z" and int(fields[1]) == parent:
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    try:
        kids = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [d for kid in kids for d in (kid, *descendants(kid))]


class Supervisor:
    """One supervisor subprocess; records pids to end by PID in the finalizer."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.extra_pids: list[int] = []
        self.stdout = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def finish(self) -> tuple[int, list[dict[str, Any]], str]:
        self.stdout, err = self.proc.communicate(timeout=DEADLINE_S)
        events, other = [], []
        for line in err.decode().splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
            else:
                other.append(line)
        return self.proc.returncode, events, "\n".join(other)

    def cleanup(self) -> None:
        # Descendants first: once the supervisor is gone they would be orphans nobody knows.
        for pid in [*descendants(self.proc.pid), *self.extra_pids, self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def run_supervisor() -> Iterator[Callable[..., Supervisor]]:
    started: list[Supervisor] = []

    def start(
        child_argv: list[str], *, group: bool = False, script: str | None = None
    ) -> Supervisor:
        if script is None:
            argv = [PY, "-m", "dask_safe_worker.supervise", *(["-g"] if group else []), "--"]
            argv += child_argv
        else:
            argv = [PY, "-c", script, *child_argv]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        sup = Supervisor(proc)
        started.append(sup)
        return sup

    yield start
    for sup in started:
        sup.cleanup()


def py(code: str, *args: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code), *args]


SupervisePy = Callable[..., tuple[Path, Supervisor]]


@pytest.fixture
def supervise_py(run_supervisor: Callable[..., Supervisor], tmp_path: Path) -> SupervisePy:
    """Supervise a Python child whose one argument is the base of the files it writes
    (`<base>.ready`, ...); returns that base and the supervisor."""

    def start(code: str, **kwargs: Any) -> tuple[Path, Supervisor]:
        base = tmp_path / "child"
        return base, run_supervisor(py(code, str(base)), **kwargs)

    return start


STAMPS = ("schema", "host", "start_id", "level", "timestamp")


def without_stamps(event: dict[str, Any]) -> dict[str, Any]:
    """An audit line without what every line carries (schema, host, start id, level, time)."""
    assert event["schema"] == SCHEMA_VERSION
    assert event["host"] == os.uname().nodename
    assert re.fullmatch(r"[0-9a-f]{16}", event["start_id"])
    assert event["level"] in ("info", "warning")
    assert event["timestamp"].endswith("Z")
    return {k: v for k, v in event.items() if k not in STAMPS}


def names(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


@pytest.mark.parametrize("code", [0, 1, 3, 42, 255])
def test_exit_code_passes_through(run_supervisor: Callable[..., Supervisor], code: int) -> None:
    sup = run_supervisor(["sh", "-c", f"exit {code}"])
    rc, events, _ = sup.finish()
    assert rc == code
    assert names(events) == ["init.start", "init.child.exited", "init.exit"]
    assert events[1]["code"] == code
    assert events[2]["code"] == code


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV])
def test_killed_child_gives_128_plus_signal(
    run_supervisor: Callable[..., Supervisor], sig: signal.Signals
) -> None:
    sup = run_supervisor(["sh", "-c", f"kill -{sig.name[3:]} $$"])
    rc, events, _ = sup.finish()
    assert rc == 128 + sig
    exited = next(e for e in events if e["event"] == "init.child.exited")
    assert exited["signal"] == sig.name


def test_exec_failure_gives_127_and_a_reason(
    run_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-program"
    sup = run_supervisor([str(missing)])
    rc, events, stderr = sup.finish()
    assert rc == 127
    assert str(missing) in stderr
    assert "No such file or directory" in stderr
    assert without_stamps(events[-1]) == {"event": "init.exit", "pid": sup.pid, "code": 127}


TRAP_CHILD = """
    import os, signal, sys, time
    out = sys.argv[1]
    def handler(signum, frame):
        with open(out, "a") as f:
            f.write(signal.Signals(signum).name + "\\n")
        if signum == signal.SIGTERM:
            sys.exit(7)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
              signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH):
        signal.signal(s, handler)
    open(out + ".ready", "w").close()
    while True:
        time.sleep(0.05)
"""


@pytest.mark.parametrize(
    "sig",
    [
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGHUP,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGWINCH,
    ],
)
def test_signals_are_forwarded_to_the_child(supervise_py: SupervisePy, sig: signal.Signals) -> None:
    out, sup = supervise_py(TRAP_CHILD)
    wait_for(lambda: Path(f"{out}.ready").exists(), "child ready")
    os.kill(sup.pid, sig)
    wait_for(lambda: out.exists() and out.read_text() == f"{sig.name}\n", f"{sig.name} in child")
    # The supervisor survived the signal and still forwards: TERM ends the child with 7.
    os.kill(sup.pid, signal.SIGTERM)
    rc, events, _ = sup.finish()
    assert rc == 7
    assert out.read_text() == f"{sig.name}\nSIGTERM\n"
    child = next(e for e in events if e["event"] == "init.child.exited")["child_pid"]
    forwarded = [e for e in events if e["event"] == "init.signal.forwarded"]
    assert [(e["signal"], e["target_pid"], e["delivered"]) for e in forwarded] == [
        (sig.name, child, True),
        ("SIGTERM", child, True),
    ]


# Like distributed: the first TERM starts a graceful close and restores the default handler.
DISTRIBUTED_LIKE_CHILD = """
    import signal, sys, time
    out = sys.argv[1]
    def first(signum, frame):
        open(out, "w").write("closing\\n")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, first)
    open(out + ".ready", "w").close()
    while True:
        time.sleep(0.05)
"""


def test_second_sigterm_is_forwarded_and_ends_the_child(supervise_py: SupervisePy) -> None:
    out, sup = supervise_py(DISTRIBUTED_LIKE_CHILD)
    wait_for(lambda: Path(f"{out}.ready").exists(), "child ready")
    os.kill(sup.pid, signal.SIGTERM)
    wait_for(lambda: out.exists() and out.read_text() == "closing\n", "first TERM handled")
    os.kill(sup.pid, signal.SIGTERM)
    rc, events, _ = sup.finish()
    assert rc == 128 + signal.SIGTERM
    forwarded = [e["signal"] for e in events if e["event"] == "init.signal.forwarded"]
    assert forwarded == ["SIGTERM", "SIGTERM"]


def test_a_signal_the_worker_got_from_its_launcher_too_is_not_doubled(
    supervise_py: SupervisePy,
) -> None:
    """scancel (and systemd's KillMode=control-group) signal every process of the job:
    the worker has its own SIGTERM. A second from us would stop distributed at once,
    where one closes it gracefully."""
    out, sup = supervise_py(GRACEFUL_CHILD)
    ready = Path(f"{out}.ready")
    wait_for(lambda: ready.exists() and ready.read_text() != "", "child ready")
    # Past the supervisor's next wake-up, which sees the child's handler.
    time.sleep(1.5)
    child = int(Path(f"{out}.ready").read_text())
    sup.extra_pids.append(child)
    # The whole job, as a launcher kills it: the supervisor and the worker, at once.
    os.kill(child, signal.SIGTERM)
    os.kill(sup.pid, signal.SIGTERM)
    rc, events, _ = sup.finish()
    assert rc == 0, events
    assert out.read_text() == "closed\n"
    shared = [e for e in events if e["event"] == "init.signal.shared"]
    assert [e["signal"] for e in shared] == ["SIGTERM"], events
    assert not [e for e in events if e["event"] == "init.signal.forwarded"]


# Like distributed, and its close takes a while: a second TERM meanwhile kills it.
GRACEFUL_CHILD = """
    import os, signal, sys, time
    out = sys.argv[1]
    closing = []
    def first(signum, frame):
        closing.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, first)
    open(out + ".ready", "w").write(str(os.getpid()))
    while not closing:
        time.sleep(0.01)
    time.sleep(1.0)
    open(out, "w").write("closed\\n")
"""


# The child forks a grandchild in the same process group; both trap TERM.
GROUP_CHILD = """
    import os, signal, sys, time
    base = sys.argv[1]
    pid = os.fork()
    role = "grandchild" if pid == 0 else "child"
    def handler(signum, frame):
        open(f"{base}.{role}", "w").write(signal.Signals(signum).name)
        if role == "child":
            os.waitpid(pid, 0)
        os._exit(0)
    signal.signal(signal.SIGTERM, handler)
    open(f"{base}.{role}.ready", "w").write(str(os.getpid()))
    while True:
        time.sleep(0.05)
"""


@pytest.mark.parametrize("group", [True, False])
def test_process_group_forwarding(supervise_py: SupervisePy, group: bool) -> None:
    base, sup = supervise_py(GROUP_CHILD, group=group)
    for role in ("child", "grandchild"):
        # Written with a plain open: the file exists a moment before its pid is in it.
        wait_for(
            lambda r=role: (
                Path(f"{base}.{r}.ready").exists()  # type: ignore[misc]
                and Path(f"{base}.{r}.ready").read_text() != ""
            ),
            f"{role} ready",
        )
    child = int(Path(f"{base}.child.ready").read_text())
    grandchild = int(Path(f"{base}.grandchild.ready").read_text())
    sup.extra_pids += [child, grandchild]
    child_stat, sup_stat = stat_fields(child), stat_fields(sup.pid)
    assert child_stat is not None and sup_stat is not None
    if group:
        assert int(child_stat[2]) == child, "the child leads its own process group"
    else:
        assert int(child_stat[2]) == int(sup_stat[2]), "the child stays in our group"

    os.kill(sup.pid, signal.SIGTERM)
    if not group:
        # Only the child hears it; it then waits for a grandchild nobody told to stop.
        wait_for(lambda: Path(f"{base}.child").exists(), "child got TERM")
        assert not Path(f"{base}.grandchild").exists()
        os.kill(grandchild, signal.SIGKILL)
    rc, events, _ = sup.finish()
    assert rc == 0
    assert Path(f"{base}.child").read_text() == "SIGTERM"
    assert Path(f"{base}.grandchild").exists() == group
    forwarded = next(e for e in events if e["event"] == "init.signal.forwarded")
    assert without_stamps(forwarded) == {
        "event": "init.signal.forwarded",
        "pid": sup.pid,
        "signal": "SIGTERM",
        "delivered": True,
        **({"target_pgid": child} if group else {"target_pid": child}),
    }


# The worker double-forks: the middle process exits at once, so the grandchild is orphaned
# and reparented to the supervisor (its subreaper), which must reap it when it exits.
DOUBLE_FORK_CHILD = """
    import os, sys, time
    base = sys.argv[1]
    if os.fork() == 0:
        if os.fork() == 0:
            open(base + ".orphan", "w").write(str(os.getpid()))
            while not os.path.exists(base + ".go"):
                time.sleep(0.02)
            os._exit(5)
        os._exit(0)
    os.wait()
    while not os.path.exists(base + ".stop"):
        time.sleep(0.02)
"""


def test_orphans_are_reaped_while_the_worker_runs(supervise_py: SupervisePy) -> None:
    base, sup = supervise_py(DOUBLE_FORK_CHILD)
    wait_for(
        lambda: Path(f"{base}.orphan").exists() and Path(f"{base}.orphan").stat().st_size > 0,
        "orphan",
    )
    orphan = int(Path(f"{base}.orphan").read_text())
    sup.extra_pids.append(orphan)

    def orphan_parent() -> int | None:
        fields = stat_fields(orphan)
        return None if fields is None else int(fields[1])

    wait_for(lambda: orphan_parent() == sup.pid, "orphan reparented to the supervisor")
    Path(f"{base}.go").touch()
    # An unreaped orphan would stay a zombie of the supervisor forever.
    wait_for(lambda: stat_fields(orphan) is None, "orphan reaped")
    assert zombies_of(sup.pid) == []
    Path(f"{base}.stop").touch()
    rc, events, _ = sup.finish()
    assert rc == 0
    reaped = [e for e in events if e["event"] == "init.orphan.reaped"]
    assert [(e["child_pid"], e["code"]) for e in reaped] == [(orphan, 5)]
    assert names(events)[-2:] == ["init.child.exited", "init.exit"]


# The worker leaves an orphan behind that exits only once the worker itself is gone.
LINGERING_ORPHAN_CHILD = """
    import os, sys, time
    worker = os.getpid()
    if os.fork() == 0:
        if os.fork() == 0:
            open(sys.argv[1], "w").write(str(os.getpid()))
            while os.path.exists(f"/proc/{worker}"):
                time.sleep(0.02)
            os._exit(9)
        os._exit(0)
    os.wait()
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.02)
    sys.exit(4)
"""

SUPERVISE_SCRIPT = """
import json, os, sys
from dask_safe_worker.supervise import supervise
events = []
def audit(event, **fields):
    events.append(event)
    sys.stderr.write(json.dumps({"event": event, **fields}) + "\\n")
def on_child_exit():
    sys.stderr.write(json.dumps({"event": "test.on_child_exit", "seen": list(events)}) + "\\n")
rc = supervise(sys.argv[1:], audit=audit, on_child_exit=on_child_exit, reap_grace=%s)
sys.exit(rc)
"""


def test_lingering_orphans_are_reaped_after_the_worker_exits(supervise_py: SupervisePy) -> None:
    out, sup = supervise_py(LINGERING_ORPHAN_CHILD, script=SUPERVISE_SCRIPT % 60)
    rc, events, _ = sup.finish()
    assert rc == 4
    orphan = int(out.read_text())
    assert names(events) == [
        "init.start",
        "init.child.exited",
        "init.orphan.reaped",
        "test.on_child_exit",
        "init.exit",
    ]
    assert events[2]["child_pid"] == orphan and events[2]["code"] == 9
    # Cleanup ran only after every child it could wait for was gone.
    assert events[3]["seen"] == ["init.start", "init.child.exited", "init.orphan.reaped"]


STAYING_ORPHAN_CHILD = """
    import os, sys, time
    if os.fork() == 0:
        if os.fork() == 0:
            # Let go of the supervisor's pipes, or the test would wait for their EOF.
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            open(sys.argv[1], "w").write(str(os.getpid()))
            while True:
                time.sleep(1)
        os._exit(0)
    os.wait()
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.02)
    sys.exit(6)
"""


def test_an_orphan_that_stays_does_not_keep_the_supervisor(supervise_py: SupervisePy) -> None:
    out, sup = supervise_py(STAYING_ORPHAN_CHILD, script=SUPERVISE_SCRIPT % 0.2)
    try:
        rc, events, _ = sup.finish()
    finally:
        if out.exists() and out.stat().st_size:
            sup.extra_pids.append(int(out.read_text()))
    assert rc == 6
    assert names(events) == ["init.start", "init.child.exited", "test.on_child_exit", "init.exit"]
    orphan = stat_fields(sup.extra_pids[0])
    assert orphan is not None and orphan[0] != "Z", "the orphan is left running, not killed"


ENV_SCRIPT = """
import sys
from dask_safe_worker.supervise import supervise
sys.exit(supervise(sys.argv[1:], env={"ONLY_THIS": "yes"}))
"""


def test_env_replaces_the_environment(supervise_py: SupervisePy) -> None:
    code = "import os, sys, json; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
    out, sup = supervise_py(code, script=ENV_SCRIPT)
    rc, _, _ = sup.finish()
    assert rc == 0
    env = json.loads(out.read_text())
    env.pop("LC_CTYPE", None)  # Python may coerce the C locale at start-up
    assert env == {"ONLY_THIS": "yes"}


def test_child_gets_a_clean_signal_mask_and_default_sigpipe(
    run_supervisor: Callable[..., Supervisor],
) -> None:
    # cat, not python: python ignores SIGPIPE itself at start-up, cat reports what it inherited.
    sup = run_supervisor(["cat", "/proc/self/status"])
    rc, _, _ = sup.finish()
    assert rc == 0
    status = dict(line.split(":\t", 1) for line in sup.stdout.decode().splitlines())
    assert int(status["SigBlk"], 16) == 0
    assert int(status["SigIgn"], 16) & (1 << (signal.SIGPIPE - 1)) == 0
    assert int(status["SigIgn"], 16) & (1 << (signal.SIGXFSZ - 1)) == 0


def test_empty_argv_is_rejected() -> None:
    with pytest.raises(ValueError):
        supervise([])


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--bogus", "true"],
        ["-g"],
        ["--log-format", "xml", "true"],
        ["--remove-cgroup", "/nonexistent", "true"],
        ["--parent-cgroup", "/nonexistent", "--", "true"],
    ],
)
def test_module_main_usage_errors(args: list[str]) -> None:
    assert main(args) == 2


PROJECT_AUDIT_SCRIPT = """
import sys
from dask_safe_worker.events import make_audit
from dask_safe_worker.supervise import supervise
sys.exit(supervise(sys.argv[1:], audit=make_audit("json")))
"""


def test_fields_survive_the_project_audit_log(run_supervisor: Callable[..., Supervisor]) -> None:
    # The project's audit log stamps its own `pid`; ours must not be overwritten by it.
    sup = run_supervisor(["sh", "-c", "kill -USR1 $$"], script=PROJECT_AUDIT_SCRIPT)
    rc, events, _ = sup.finish()
    assert rc == 128 + signal.SIGUSR1
    exited = next(e for e in events if e["event"] == "init.child.exited")
    assert exited["pid"] == sup.pid
    assert exited["child_pid"] != sup.pid
    assert exited["signal"] == "SIGUSR1"
    assert {"init.start", "init.exit"} <= set(names(events))


def _supervise_in(
    child: Any, parent: Any, started_pids: set[int], *command: str
) -> tuple[int, list[dict[str, Any]]]:
    """Run `python -m dask_safe_worker.supervise` inside `child`, told to move back to
    `parent` and remove `child` at the end: (exit code, its audit lines)."""
    argv = [PY, "-m", "dask_safe_worker.supervise", "--remove-cgroup", str(child.path)]
    argv += ["--parent-cgroup", str(parent.path), *command]
    proc = subprocess.Popen(child.enter_command(argv), stderr=subprocess.PIPE)
    started_pids.add(proc.pid)
    _, err = proc.communicate(timeout=DEADLINE_S)
    return proc.returncode, [json.loads(line) for line in err.decode().splitlines()]


@pytest.mark.kernel
def test_module_main_removes_the_child_cgroup_after_the_worker(
    kernel_cgroup: Any, started_pids: set[int], tmp_path: Path
) -> None:
    # The supervisor starts inside `child`, as the CLI leaves it after the child strategy;
    # afterwards it must have moved back to `kernel_cgroup` and removed `child`.
    child = kernel_cgroup.child("worker")
    out = tmp_path / "cgroup"
    worker = f"grep memory /proc/self/cgroup > {out}"
    rc, events = _supervise_in(child, kernel_cgroup, started_pids, "--", "sh", "-c", worker)
    assert rc == 0
    assert out.read_text().rstrip().endswith("/" + child.path.name), "worker ran in child"
    assert not child.path.exists()
    removed = next(e for e in events if e["event"] == "cgroup.child.removed")
    assert removed["target"] == child.relative() and "error" not in removed
    assert names(events)[-2:] == ["cgroup.child.removed", "init.exit"]


@pytest.mark.kernel
def test_module_main_reports_a_cgroup_it_cannot_remove(
    kernel_cgroup: Any, started_pids: set[int]
) -> None:
    # A cgroup with a sub-cgroup cannot be removed: EBUSY, logged, exit code kept.
    child = kernel_cgroup.child("worker")
    child.child("busy")
    # Without "--": the command starts at the first argument that is no option.
    rc, events = _supervise_in(child, kernel_cgroup, started_pids, "sh", "-c", "exit 5")
    assert rc == 5
    removed = next(e for e in events if e["event"] == "cgroup.child.removed")
    assert removed["error"] == "EBUSY"
    assert child.path.exists()


# A worker that closes on TERM at once and leaves nothing behind in its cgroup. It says
# when its trap is set ($1): a forked worker is a descendant before it can catch TERM.
QUICK_WORKER = "trap 'exit 0' TERM; : > \"$1\"; while :; do sleep 0.05; done"


def _subdirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir())


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


@pytest.mark.kernel
@pytest.mark.parametrize(
    "when", ["child-created", "supervisor-exec", 0.1, 0.2, 0.3, 0.4, 0.5, "worker-running"]
)
def test_sigterm_early_in_init_leaves_no_child_cgroup(
    kernel_cgroup: Any, started_pids: set[int], tmp_path: Path, when: str | float
) -> None:
    # Issue 13 row 4: `--init` in a shared cgroup creates a child for the worker; a SIGTERM
    # at any moment of the start, even between the mkdir and the supervisor's exec, must
    # end with that child removed.
    import shlex

    kernel_cgroup.set_limit(2**30)
    ready = tmp_path / "worker-ready"
    neighbour = subprocess.Popen(kernel_cgroup.enter_command(["sleep", "600"]))
    started_pids.add(neighbour.pid)
    wait_for(lambda: neighbour.pid in kernel_cgroup.pids(), "neighbour in the cgroup")
    argv = [
        PY,
        "-m",
        "dask_safe_worker",
        "--init",
        "--log-format",
        "json",
        "--plan-file",
        str(tmp_path / "plan.json"),
        "--worker-command",
        f"sh -c {shlex.quote(QUICK_WORKER)} sh {shlex.quote(str(ready))}",
        "tcp://127.0.0.1:1",
    ]
    proc = subprocess.Popen(
        kernel_cgroup.enter_command(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    started_pids.add(proc.pid)
    if when == "child-created":
        wait_for(lambda: _subdirs(kernel_cgroup.path) != [], "the child cgroup")
    elif when == "supervisor-exec":
        wait_for(lambda: b"dask_safe_worker.supervise" in _cmdline(proc.pid), "the exec")
    elif when == "worker-running":
        wait_for(ready.exists, "the worker's TERM trap")
    else:
        assert isinstance(when, float)
        time.sleep(when)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=DEADLINE_S)
    stderr = err.decode()
    assert "Traceback" not in stderr
    assert _subdirs(kernel_cgroup.path) == [], stderr
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    if when == "child-created":
        # The worker was never started: the supervisor found the signal waiting for it.
        assert proc.returncode == 128 + signal.SIGTERM
        assert "init.start.cancelled" in names(events) and "init.start" not in names(events)
    elif when == "worker-running":
        assert proc.returncode == 0
    elif proc.returncode == -signal.SIGTERM:
        # Killed while still planning, before anything was created (signals are deferred
        # only from the write on).
        assert "cgroup.child.created" not in names(events)
    else:
        assert proc.returncode in (0, 128 + signal.SIGTERM)
    if "cgroup.child.created" in names(events):
        created = next(e for e in events if e["event"] == "cgroup.child.created")
        removed = next(e for e in events if e["event"] == "cgroup.child.removed")
        # One path style for both (issue 15 item 6), no error, and one start id throughout.
        assert removed["target"] == created["target"] and "error" not in removed
        assert len({e["start_id"] for e in events}) == 1
        assert {e["host"] for e in events} == {os.uname().nodename}


@pytest.mark.kernel
def test_module_main_usage_error_still_removes_the_child_cgroup(
    kernel_cgroup: Any, started_pids: set[int]
) -> None:
    child = kernel_cgroup.child("worker")
    argv = [PY, "-m", "dask_safe_worker.supervise", "--remove-cgroup", str(child.path)]
    argv += ["--parent-cgroup", str(kernel_cgroup.path), "--bogus", "--", "true"]
    proc = subprocess.Popen(child.enter_command(argv), stderr=subprocess.PIPE)
    started_pids.add(proc.pid)
    _, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 2
    assert b"usage:" in err
    assert not child.path.exists()


@pytest.mark.e2e
def test_ctrl_c_at_the_terminal_stops_an_init_worker_with_exit_0(
    started_pids: set[int], tmp_path: Path
) -> None:
    # Issue 13 row 11: Ctrl-C reaches the terminal's whole foreground group, the worker
    # included. The supervisor must not forward a second SIGINT (distributed takes the
    # second as "stop now" and exits 1). A real terminal: a pty whose line discipline turns
    # ^C into SIGINT for the foreground group, as a shell's job control sets it up.
    import fcntl
    import termios

    from scheduler_util import scheduler, wait_for_workers

    def controlling_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    master, slave = os.openpty()
    try:
        with scheduler() as address:
            argv = [PY, "-m", "dask_safe_worker", "--init", "--cgroup-write", "never"]
            argv += ["--log-format", "json", "--plan-file", str(tmp_path / "plan.json")]
            argv += [address, "--no-dashboard", "--nthreads", "1"]
            proc = subprocess.Popen(
                argv,
                stdin=slave,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=controlling_terminal,
            )
            started_pids.add(proc.pid)
            try:
                wait_for_workers(address, 1)
                assert os.tcgetpgrp(master) == proc.pid, "the worker's group is in front"
                os.write(master, b"\x03")
                _, err = proc.communicate(timeout=DEADLINE_S)
            finally:
                if proc.poll() is None:
                    for pid in [*descendants(proc.pid), proc.pid]:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    proc.wait()
    finally:
        os.close(master)
        os.close(slave)
    stderr = err.decode()
    assert proc.returncode == 0, stderr[-3000:]
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    shared = [e for e in events if e["event"] == "init.signal.shared"]
    assert [e["signal"] for e in shared] == ["SIGINT"]
    assert not [e for e in events if e["event"] == "init.signal.forwarded"]
    assert next(e for e in events if e["event"] == "init.exit")["code"] == 0


PENDING_SCRIPT = """
import json, os, signal, sys
from dask_safe_worker.supervise import defer_signals, supervise
def audit(event, **fields):
    sys.stderr.write(json.dumps({"event": event, **fields}) + "\\n")
def on_child_exit():
    audit("test.on_child_exit")
defer_signals()
os.kill(os.getpid(), signal.SIG%s)
sys.exit(supervise(sys.argv[1:], audit=audit, on_child_exit=on_child_exit))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_pending_before_the_start_cancels_it(
    run_supervisor: Callable[..., Supervisor], tmp_path: Path, sig: signal.Signals
) -> None:
    marker = tmp_path / "started"
    sup = run_supervisor(["touch", str(marker)], script=PENDING_SCRIPT % sig.name[3:])
    rc, events, _ = sup.finish()
    assert rc == 128 + sig
    assert not marker.exists(), "the worker was not started"
    assert names(events) == ["init.start.cancelled", "test.on_child_exit", "init.exit"]
    assert events[0]["signal"] == sig.name and events[-1]["code"] == 128 + sig


def test_a_pending_usr1_does_not_cancel_the_start(
    run_supervisor: Callable[..., Supervisor],
) -> None:
    # Only the stopping signals cancel; USR1 waits and is forwarded to the worker (which,
    # this early, has no handler yet: it ends from it, as it would under tini).
    sup = run_supervisor(["sleep", "5"], script=PENDING_SCRIPT % "USR1")
    rc, events, _ = sup.finish()
    assert "init.start" in names(events) and "init.start.cancelled" not in names(events)
    forwarded = [e for e in events if e["event"] == "init.signal.forwarded"]
    assert [e["signal"] for e in forwarded] == ["SIGUSR1"]
    assert rc == 128 + signal.SIGUSR1


def test_the_worker_dies_with_a_killed_supervisor(
    run_supervisor: Callable[..., Supervisor],
) -> None:
    # Launchers end a job by SIGKILL to the pid they started (dask-jobqueue's local
    # runner): that is the supervisor, and without it the worker's nanny ran on,
    # registered, as a plain `dask worker` killed that way does not.
    sup = run_supervisor(["sleep", "300"])
    wait_for(lambda: bool(descendants(sup.pid)), "the worker")
    (worker,) = descendants(sup.pid)
    sup.extra_pids.append(worker)
    os.kill(sup.pid, signal.SIGKILL)
    sup.proc.wait()

    def gone() -> bool:
        fields = stat_fields(worker)
        return fields is None or fields[0] == "Z"

    wait_for(gone, "the worker to die with its supervisor")


# The CLI's start (run_worker.exec_supervisor): the worker first, then the supervisor,
# exec'd in the same process, adopts it. Signals stay deferred from before the fork on.
ADOPT_SCRIPT = """
import os, sys
from dask_safe_worker.supervise import defer_signals, start_worker
defer_signals()
child = start_worker(sys.argv[1:], os.environ, False)
supervisor = [sys.executable, "-m", "dask_safe_worker.supervise", "--adopt", str(child)]
os.execv(sys.executable, [*supervisor, "--", *sys.argv[1:]])
"""


@pytest.mark.parametrize("code", [0, 42])
def test_an_adopted_worker_is_supervised_as_one_started_here(
    run_supervisor: Callable[..., Supervisor], code: int
) -> None:
    # Exits at once: before the supervisor waits, so its SIGCHLD must survive the exec.
    sup = run_supervisor(["sh", "-c", f"exit {code}"], script=ADOPT_SCRIPT)
    rc, events, _ = sup.finish()
    assert rc == code
    assert names(events) == ["init.start", "init.child.exited", "init.exit"]
    start, exited = events[0], events[1]
    assert start["adopted"] == exited["child_pid"] and start["subreaper"] is True
    assert start["argv"] == ["sh", "-c", f"exit {code}"]


def test_a_signal_before_the_supervisor_reaches_the_adopted_worker(
    run_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    out = tmp_path / "child"
    sup = run_supervisor(py(TRAP_CHILD, str(out)), script=ADOPT_SCRIPT)
    wait_for(lambda: Path(f"{out}.ready").exists(), "child ready")
    # Whether or not the supervisor is up yet: deferred until it forwards it.
    os.kill(sup.pid, signal.SIGTERM)
    rc, events, _ = sup.finish()
    assert rc == 7
    assert out.read_text() == "SIGTERM\n"
    child = next(e for e in events if e["event"] == "init.start")["adopted"]
    forwarded = [e for e in events if e["event"] == "init.signal.forwarded"]
    assert [(e["signal"], e["target_pid"]) for e in forwarded] == [("SIGTERM", child)]


def test_an_adopted_worker_gets_a_clean_signal_mask(
    run_supervisor: Callable[..., Supervisor],
) -> None:
    # SIGCHLD and the forwarded signals are blocked around the fork; the worker gets none.
    sup = run_supervisor(["cat", "/proc/self/status"], script=ADOPT_SCRIPT)
    rc, _, _ = sup.finish()
    assert rc == 0
    status = dict(line.split(":\t", 1) for line in sup.stdout.decode().splitlines())
    assert int(status["SigBlk"], 16) == 0
    assert int(status["SigIgn"], 16) & (1 << (signal.SIGPIPE - 1)) == 0


@pytest.mark.parametrize("pid", ["", "x1", "-3"])
def test_module_main_refuses_a_bad_adopt(pid: str) -> None:
    assert main(["--adopt", pid, "--", "true"]) == 2


_MASK_FIELDS = ("SigQ", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")


@given(
    masks=st.fixed_dictionaries({f: st.integers(0, 2**64 - 1) for f in _MASK_FIELDS[1:]}),
    tail=st.booleans(),
)
def test_status_masks_read_back_as_written(masks: dict[str, int], tail: bool) -> None:
    from dask_safe_worker.supervise import status_mask

    lines = ["Name:\tpython", "SigQ:\t0/94752"] + [f"{f}:\t{v:016x}" for f, v in masks.items()]
    text = ("\n".join(lines) + ("\nCpus_allowed:\t3\n" if tail else "")).encode()
    for field, value in masks.items():
        assert status_mask(text, field.encode()) == value
    assert status_mask(text, b"Missing") is None and status_mask(None, b"SigCgt") is None


def test_a_copy_pending_in_the_worker_counts_as_its_own() -> None:
    from dask_safe_worker.supervise import own_copy_pending, status_mask

    term = 1 << (signal.SIGTERM - 1)
    thread = b"Name:\tw\nSigPnd:\t%016x\nShdPnd:\t0000000000000000\n" % term
    process = b"Name:\tw\nSigPnd:\t0000000000000000\nShdPnd:\t%016x\n" % term
    neither = b"Name:\tw\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\n"
    assert own_copy_pending(signal.SIGTERM, thread) and own_copy_pending(signal.SIGTERM, process)
    assert not own_copy_pending(signal.SIGTERM, neither)
    assert not own_copy_pending(signal.SIGINT, process) and not own_copy_pending(15, None)
    # The real file of a live process parses.
    own = Path("/proc/self/status").read_bytes()
    assert status_mask(own, b"SigCgt") is not None and status_mask(own, b"ShdPnd") is not None
