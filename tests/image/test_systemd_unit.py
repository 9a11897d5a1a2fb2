"""entrypoints/systemd's units under a real systemd: Debian's systemd 252 as PID 1 of a
podman container on this host, installed as the units' comments say and driven by
`systemctl`, with the worker registering at a scheduler on 127.0.0.1 (host network).

Where systemd runs. No `--systemd=always`: on cgroup v1 podman then binds the host's
whole name=systemd hierarchy into the container, read-write, and systemd would make its
cgroups at that hierarchy's root. Instead the container gets a private cgroup namespace,
so that every cgroup mount in it is rooted at the container's own cgroup (below the test
engine's `--cgroup-parent`, below our own memory cgroup), and CAP_SYS_ADMIN, with which
the entry shell remounts the memory and name=systemd mounts read-write (runc mounts them
read-only) before it execs /sbin/init. The entry shell first checks that systemd's view is
rooted at the container (its own memory cgroup is `/`, every cgroup mount's root is `/`),
and refuses to start systemd otherwise. Not --privileged: /sys stays read-only, so udev and
the like stay off, and the devices stay the container's.

What the units run: this project's own venv and interpreter, bound read-only at their
paths, linked as /opt/dask-safe-worker/bin/dask-safe-worker (the path ExecStart= names).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from podman_engine import (
    REPO,
    Engine,
    Running,
    base_tarball,
    import_base,
    start,
)

from scheduler_util import scheduler

pytestmark = pytest.mark.image

UNITS = REPO / "entrypoints" / "systemd"
SERVICE = "dask-safe-worker.service"
TEMPLATE = "dask-safe-worker@.service"
# What systemd names the template's slice (`systemd-escape`'s \x2d for each '-').
TEMPLATE_SLICE = "system-dask\\x2dsafe\\x2dworker.slice"
IMAGE = "localhost/dsw-systemd:bookworm"
PACKAGES = ("systemd", "systemd-sysv")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MiB = 2**20
UNIT_MAX = 700 * MiB
SLICE_MAX = 1200 * MiB
# Guards against hangs only: a worker registered in ~20 s here.
DEADLINE = 180.0

# Runs as the container's command: refuse unless the cgroup view is the container's own,
# then make the two hierarchies systemd writes (memory, name=systemd) writable, and let the
# units' dynamic users reach the interpreter bound below /root.
ENTRY = r"""
set -e
grep -qx '[0-9]*:memory:/' /proc/self/cgroup || { echo 'memory cgroup view not private'; exit 90; }
if grep ' - cgroup2\? ' /proc/self/mountinfo | awk '$4 != "/"' | grep -q .; then
    echo 'a cgroup mount shows more than the container'; exit 91
fi
mount -o remount,bind,rw /sys/fs/cgroup/memory
mount -o remount,bind,rw /sys/fs/cgroup/systemd
chmod 0755 /root
exec /sbin/init
"""

T = TypeVar("T")


def _wait(what: str, check: Callable[[], T | None], deadline: float = DEADLINE) -> T:
    end = time.monotonic() + deadline
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < end, f"not within {deadline:.0f} s: {what}"
        time.sleep(0.5)


# DynamicUser= implies PrivateTmp=: a unit sees its own /tmp and /var/tmp, so a checkout
# or venv there (CI clones into /tmp) would be hidden from it and its ExecStart missing.
PRIVATE_TMP = (Path("/tmp"), Path("/var/tmp"))
# Where such a path is bound a second time, outside them, for the units' drop-in.
ALIASES = Path("/srv/dsw-test-binds")


def _tops() -> list[Path]:
    """The venv (the project is installed editable: the repository too) and the
    interpreter it was made from: the outermost of them."""
    paths = {REPO, Path(sys.prefix), Path(sys.base_prefix)}
    return sorted(p for p in paths if not any(p != q and p.is_relative_to(q) for q in paths))


def _hidden() -> list[tuple[Path, Path]]:
    """(alias, path) for each of `_tops()` that a unit's private /tmp would hide."""
    hidden = [p for p in _tops() if any(p.is_relative_to(t) for t in PRIVATE_TMP)]
    return [(ALIASES / str(i), p) for i, p in enumerate(hidden)]


def _bind_mounts() -> list[str]:
    """`_tops()` read-only at their own paths, and again at their aliases when hidden."""
    own = [f"--volume={p}:{p}:ro" for p in _tops()]
    return own + [f"--volume={p}:{alias}:ro" for alias, p in _hidden()]


def _drop_in_lines() -> list[str]:
    """Shell lines that give both units the hidden paths back, bound at their own paths
    in the unit's namespace (a test's set-up, not the user's: the docs install to /opt)."""
    if not _hidden():
        return []
    binds = " ".join(f"{alias}:{p}" for alias, p in _hidden())
    text = f"printf '%s\\n' '[Service]' {shlex.quote(f'BindReadOnlyPaths={binds}')}"
    lines = []
    for unit in (SERVICE, TEMPLATE):
        d = f"/etc/systemd/system/{unit}.d"
        lines += [f"mkdir -p {d}", f"{text} > {d}/test-paths.conf"]
    return lines


@dataclass
class Host:
    """A container with systemd as PID 1, and the scheduler its workers join."""

    container: Running
    scheduler: str

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = self.container.engine.podman("exec", self.container.name, *args, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"{shlex.join(args)}: exit {done.returncode}\n{done.stderr}")
        return done

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check)

    def show(self, unit: str) -> dict[str, str]:
        props = "ActiveState,SubState,Result,ExecMainCode,ExecMainStatus,NRestarts,ControlGroup"
        out = self.systemctl("show", unit, f"--property={props}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False).stdout

    def invocation(self, unit: str) -> str:
        """The ID of the unit's running start (empty once it has stopped)."""
        return self.systemctl("show", unit, "--property=InvocationID", "--value").stdout.strip()

    def events(self, unit: str, name: str, invocation: str = "") -> list[dict[str, Any]]:
        """The tool's events `name` from one start of the unit (the journal keeps all),
        by default the running one."""
        field = f"_SYSTEMD_INVOCATION_ID={invocation or self.invocation(unit)}"
        lines = self.run("journalctl", "--no-pager", "-o", "cat", field, check=False).stdout
        found = []
        for line in lines.splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    event = json.loads(line)
                    if event.get("event") == name:
                        found.append(event)
        return found

    def memory_dir(self, cgroup: str) -> Path:
        """A cgroup of the container's systemd, in the host's memory hierarchy."""
        init = self.container.host_memory_dir()
        # systemd, the container's first process, has moved itself to its init.scope.
        assert init.name == "init.scope", init
        return init.parent / cgroup.lstrip("/")

    def status(self, unit: str) -> str:
        """For assertion messages: what `systemctl status` and the journal say."""
        done = self.systemctl("status", unit, check=False)
        return f"{done.stdout}{done.stderr}\n--- journal\n{self.journal(unit)[-6000:]}"


@pytest.fixture(scope="module")
def host(podman: Engine) -> Iterator[Host]:
    import_base(podman, base_tarball(PACKAGES, venv=None), tag=IMAGE, path=PATH)
    with scheduler() as address:
        container = start(
            podman,
            [
                "--cgroupns=private",
                # podman's own systemd mode is the one that binds the host's hierarchy.
                "--systemd=false",
                "--cap-add=SYS_ADMIN",
                "--tmpfs=/run",
                "--tmpfs=/tmp",
                *_bind_mounts(),
            ],
            ["sh", "-c", ENTRY],
            image=IMAGE,
        )
        h = Host(container, address)
        try:
            _wait("systemd moves itself to init.scope", lambda: _in_init_scope(container))
            h.systemctl("is-system-running", "--wait", check=False)
            install = [
                "mkdir -p /opt/dask-safe-worker/bin",
                f"ln -s {shlex.quote(sys.prefix)}/bin/dask-safe-worker /opt/dask-safe-worker/bin/",
                # The install lines of the units' comments, from the repository's files.
                f"install -D -m 0644 {UNITS}/worker.env /etc/dask-safe-worker/worker.env",
                f"install -m 0644 {UNITS}/{SERVICE} {UNITS}/{TEMPLATE} /etc/systemd/system/",
                # What the comment says to edit: the scheduler's address.
                f"sed -i 's|tcp://scheduler:8786|{address}|' /etc/dask-safe-worker/worker.env",
                *_drop_in_lines(),
                "systemctl daemon-reload",
            ]
            h.run("sh", "-c", " && ".join(install))
            yield h
        finally:
            failed = h.systemctl("--failed", check=False).stdout
            print(f"\nsystemd in the container, failed units at the end:\n{failed}")
            podman.podman("rm", "--force", "--time", "0", container.name, check=False)


def _in_init_scope(container: Running) -> bool:
    # The entry shell refuses (exit 90, 91) when the cgroup view is not the container's.
    assert container.running(), container.logs()
    # Also asserts that the container's cgroup is below the engine's parent.
    return container.host_memory_dir().name == "init.scope"


def _limits(address: str) -> list[int]:
    """Every registered worker's Dask memory limit."""
    from distributed import Client

    with Client(address, timeout=30) as client:
        info = client.scheduler_info(n_workers=-1)["workers"]
        return sorted(int(w["memory_limit"]) for w in info.values())


def _stopped_clean(h: Host, unit: str) -> None:
    state = h.show(unit)
    assert state["Result"] == "success", (state, h.status(unit))
    assert state["ActiveState"] == "inactive" and state["NRestarts"] == "0", state


def test_memory_max_is_the_budget_and_stop_is_clean(host: Host) -> None:
    """`systemctl set-property ... MemoryMax=` becomes the unit's kernel limit and bounds
    the tool's budget; the worker registers; `systemctl stop` closes it gracefully
    (exit 0, no restart) and leaves no cgroup behind."""
    h = host
    h.systemctl("set-property", SERVICE, f"MemoryMax={UNIT_MAX}")
    h.systemctl("start", SERVICE)
    unit_dir = h.memory_dir(h.show(SERVICE)["ControlGroup"])
    try:
        limits = _wait("the worker registers", lambda: _limits(h.scheduler))
        assert int((unit_dir / "memory.limit_in_bytes").read_text()) == UNIT_MAX
        (summary,) = h.events(SERVICE, "start.summary")
        assert summary["limiting"] == "/system.slice/dask-safe-worker.service", summary
        assert 0 < summary["budget"] <= UNIT_MAX, summary
        assert len(limits) == 1 and limits[0] == summary["per_worker"], (limits, summary)
        # Any limit the tool wrote is a child's, within the unit's.
        assert summary["kernel_limit"] is None or summary["kernel_limit"] <= UNIT_MAX, summary
        assert h.show(SERVICE)["ActiveState"] == "active", h.status(SERVICE)
    finally:
        h.systemctl("stop", SERVICE)
    _stopped_clean(h, SERVICE)
    assert h.show(SERVICE)["ExecMainStatus"] == "0", h.status(SERVICE)
    _wait("the worker leaves the scheduler", lambda: not _limits(h.scheduler) or None)
    assert not unit_dir.exists(), sorted(str(p) for p in unit_dir.rglob("*"))


def test_stop_while_starting_is_clean(host: Host) -> None:
    """A stop once the supervisor runs, while `dask worker` is still importing (no signal
    handlers of its own yet): the worker dies of the SIGTERM and the tool exits 143
    (128 + SIGTERM), which the unit's SuccessExitStatus= counts as the clean stop it is."""
    h = host
    h.systemctl("start", SERVICE)
    invocation = h.invocation(SERVICE)
    try:
        _wait("the supervisor starts", lambda: h.events(SERVICE, "init.start", invocation))
    finally:
        h.systemctl("stop", SERVICE)
    # The case under test (a worker that had registered already would exit 0). From the
    # tool's own event: systemd shows ExecMainStatus=0 once 143 counts as success.
    (end,) = h.events(SERVICE, "init.exit", invocation)
    assert end["code"] == 143, h.status(SERVICE)
    _stopped_clean(h, SERVICE)


def test_exit_3_is_not_restarted(host: Host) -> None:
    """A budget below --min-worker-memory is exit 3, and RestartPreventExitStatus= keeps
    the unit down: failed at once, never in auto-restart."""
    h = host
    h.systemctl("set-environment", "DASK_SAFE_WORKER_MIN_WORKER_MEMORY=64GiB")
    try:
        h.systemctl("start", SERVICE, check=False)

        def ended() -> dict[str, str] | None:
            state = h.show(SERVICE)
            return state if state["SubState"] in ("failed", "auto-restart", "dead") else None

        state = _wait("the unit leaves active", ended)
        assert state["ExecMainStatus"] == "3", h.status(SERVICE)
        # auto-restart would be the state during RestartSec= before a restart.
        assert state["SubState"] == "failed" and state["NRestarts"] == "0", state
    finally:
        h.systemctl("unset-environment", "DASK_SAFE_WORKER_MIN_WORKER_MEMORY")
        h.systemctl("stop", SERVICE, check=False)
        h.systemctl("reset-failed", SERVICE, check=False)


def test_template_instances_share_the_slice(host: Host) -> None:
    """Two instances of the template, started together in their slice with MemoryMax=:
    both register, their Dask limits settle to equal shares that fit the slice together,
    and stopping them is clean."""
    h = host
    instances = ["dask-safe-worker@1.service", "dask-safe-worker@2.service"]
    h.systemctl("set-property", TEMPLATE_SLICE, f"MemoryMax={SLICE_MAX}")
    h.systemctl("start", *instances)
    try:

        def fair() -> list[int] | None:
            limits = _limits(h.scheduler)
            return limits if len(limits) == 2 and limits[1] <= limits[0] * 1.1 else None

        limits = _wait("both register with equal shares", fair)
        assert sum(limits) <= SLICE_MAX, (limits, h.status(instances[0]))
        slice_dir = h.memory_dir(f"/system.slice/{TEMPLATE_SLICE}")
        assert int((slice_dir / "memory.limit_in_bytes").read_text()) == SLICE_MAX
        for unit in instances:
            (summary,) = h.events(unit, "start.summary")
            assert summary["limiting"] == f"/system.slice/{TEMPLATE_SLICE}", summary
    finally:
        h.systemctl("stop", *instances)
    for unit in instances:
        _stopped_clean(h, unit)
    _wait("the workers leave the scheduler", lambda: not _limits(h.scheduler) or None)
