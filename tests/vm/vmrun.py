"""Boot a throwaway VM with a real cgroup v2 kernel and run one command in it.

The host's own kernel keeps the memory controller on cgroup v1, so cgroup v2 behaviour
(EPERM at a delegated namespace root, EBUSY from the no-internal-process rule, OOM
kills inside a cgroup) can only be observed in a guest kernel. virtme-ng boots Debian's
kernel under QEMU with the host's filesystem mounted read-only as the guest's root, so
the project's venv runs unchanged inside; only the directories passed as `rwdirs` are
writable from the guest, and results come back through them.

Standard library only, so that benchmarks can import it by path without a test runner:

    sys.path.insert(0, "tests/vm"); from vmrun import run_in_vm

docs/cgroup-v2.md describes the set-up and the costs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUEST_TESTS = REPO / "tests" / "vm" / "guest"

# Debian packages the VM needs; the PyPI side (virtme-ng) is a dev dependency.
# virtme-ng builds the guest's initramfs from a static busybox, which it checks with file(1).
APT_PACKAGES = ("qemu-system-x86", "linux-image-amd64", "busybox-static", "file")
INSTALL_HINT = (
    f"apt-get install -y {' '.join(APT_PACKAGES)}  (then `uv sync` for virtme-ng); "
    "set DSW_VM_KERNEL to use another kernel image"
)
KERNEL_ENV = "DSW_VM_KERNEL"
DEFAULT_MEMORY = "1500M"
DEFAULT_CPUS = 2
# Bound for one boot of the whole guest suite, which took ~6 minutes on the CI machine
# before the global OOM part of test_follow_v2 (its contender fills the guest's memory,
# minutes in an emulated guest) and test_follow_v2's 900 s start bound (a loaded host).
VM_TIMEOUT = 1800.0
# Files the guest script writes: when it starts, and its command's exit status at the end.
_STARTED_FILE = "guest-started"
_STATUS_FILE = "guest-exit-status"
# A boot takes ~20 s (up to a minute on a busy host). Rarely, under load, a TCG guest
# never reaches the script; such a boot is killed and tried once more.
BOOT_TIMEOUT = 240.0
BOOT_ATTEMPTS = 2


class VMUnavailable(RuntimeError):
    """The VM cannot be booted here (missing qemu, kernel, busybox or virtme-ng)."""


class VMBootError(RuntimeError):
    """The VM was started but never ran the command (or did not finish it in time)."""


@dataclass(frozen=True)
class VMTools:
    vng: Path
    kernel: Path


def _kernel_sort_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.name))


def find_kernel() -> Path | None:
    """`$DSW_VM_KERNEL`, else the newest readable /boot/vmlinuz-* with its modules."""
    override = os.environ.get(KERNEL_ENV)
    if override:
        return Path(override) if os.access(override, os.R_OK) else None
    candidates = [
        p
        for p in Path("/boot").glob("vmlinuz-*")
        if os.access(p, os.R_OK)
        # A modular distribution kernel needs its modules (9p, virtio) for the initramfs.
        and Path("/lib/modules", p.name.removeprefix("vmlinuz-")).is_dir()
    ]
    return max(candidates, key=_kernel_sort_key) if candidates else None


def find_vng() -> Path | None:
    beside_python = Path(sys.executable).parent / "vng"
    if beside_python.exists():
        return beside_python
    found = shutil.which("vng")
    return Path(found) if found else None


def find_tools() -> VMTools:
    """Everything a boot needs, or VMUnavailable saying what is missing and how to fix it."""
    missing: list[str] = []
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64")
    kernel = find_kernel()
    if kernel is None:
        missing.append(f"a kernel image (/boot/vmlinuz-* with /lib/modules, or ${KERNEL_ENV})")
    if (
        not any(shutil.which(name) for name in ("busybox-static", "busybox.static", "busybox"))
        and not Path("/bin/busybox").exists()
    ):
        missing.append("a static busybox (virtme-ng builds the initramfs from it)")
    if shutil.which("file") is None:
        missing.append("file(1) (virtme-ng checks that busybox is static with it)")
    vng = find_vng()
    if vng is None:
        missing.append("virtme-ng's `vng` (a dev dependency: `uv sync`)")
    if missing or kernel is None or vng is None:
        raise VMUnavailable(
            f"cannot boot the test VM: missing {', '.join(missing)}. {INSTALL_HINT}"
        )
    return VMTools(vng=vng, kernel=kernel)


def default_workdir() -> Path:
    """Host directories shared read-write with the guest live here (gitignored)."""
    return REPO / ".tmp" / "vm"


def _kill_group(proc: subprocess.Popen[str]) -> None:
    # vng starts qemu as its child; the session we created holds both and nothing else.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@dataclass(frozen=True)
class _BootHung:
    stdout: str
    stderr: str


def _boot(
    argv: list[str], started: Path, timeout: float, stop: threading.Event | None = None
) -> tuple[int, str, str] | _BootHung:
    """Run vng once: (its exit code, stdout, stderr), or _BootHung if the guest never
    started the script within BOOT_TIMEOUT. `stop` set: the VM is killed (VMBootError)."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    begin = time.monotonic()
    while True:
        try:
            stdout, stderr = proc.communicate(timeout=2.0)
            return proc.returncode, stdout, stderr
        except subprocess.TimeoutExpired:
            elapsed = time.monotonic() - begin
            hung = not started.exists() and elapsed > BOOT_TIMEOUT
            stopped = stop is not None and stop.is_set()
            if hung or stopped or elapsed > timeout:
                _kill_group(proc)
                stdout, stderr = proc.communicate()
                if hung:
                    return _BootHung(stdout, stderr)
                if stopped:
                    raise VMBootError(f"the VM was stopped after {elapsed:.0f} s") from None
                raise VMBootError(
                    f"the VM did not finish within {timeout:.0f} s\n--- stdout\n"
                    f"{stdout[-4000:]}\n--- stderr\n{stderr[-4000:]}"
                ) from None


def run_in_vm(
    command: str,
    memory: str = DEFAULT_MEMORY,
    timeout: float = 600.0,
    *,
    cpus: int = DEFAULT_CPUS,
    rwdirs: Sequence[Path] = (),
    env: Mapping[str, str] | None = None,
    workdir: Path | None = None,
    warm_python: bool = False,
    stop: threading.Event | None = None,
) -> subprocess.CompletedProcess[str]:
    """Boot a VM, run `command` with /bin/sh as root in the guest, and power off.

    The guest's cwd is the repository. `env` is exported in the guest before `command`.
    Each directory in `rwdirs` is writable from the guest at the same path; everything
    else of the host is read-only, and the guest's /tmp is a RAM overlay that is
    discarded at power-off. The result's returncode is the command's own exit status.

    `warm_python` gives the guest bytecode compiled on the host for distributed, dask and
    this project (see bytecode_archive), and sets HOME and PYTHONPYCACHEPREFIX to
    writable places in /tmp; it saves ~20 s per Python process that imports distributed.

    Raises VMUnavailable when the tools are missing, and VMBootError when the guest did
    not boot (twice), or did not finish within `timeout` seconds (the VM is then killed).
    """
    tools = find_tools()
    base = workdir or default_workdir()
    base.mkdir(parents=True, exist_ok=True)
    control = Path(tempfile.mkdtemp(prefix="vmrun-", dir=base))
    try:
        status = control / _STATUS_FILE
        exports = "".join(
            f"export {name}={shlex.quote(value)}\n" for name, value in (env or {}).items()
        )
        # The command goes through a file: vng passes its command on the kernel command
        # line, which the kernel truncates at 2 KiB.
        script = control / "guest.sh"
        script.write_text(
            f"touch {shlex.quote(str(control / _STARTED_FILE))}\n"
            f"cd {shlex.quote(str(REPO))}\n{_python_setup(control) if warm_python else ''}"
            f"{exports}"
            f"( {command}\n)\n"
            f"echo $? > {shlex.quote(str(status))}\n"
            f"exit $(cat {shlex.quote(str(status))})\n"
        )
        argv = [
            str(tools.vng),
            "--run",
            str(tools.kernel),
            # KVM guests hang at boot on this project's CI machine; TCG is slow but works.
            "--disable-kvm",
            "--memory",
            memory,
            "--cpus",
            str(cpus),
            "--rwdir",
            str(control),
            *(f"--rwdir={d}" for d in rwdirs),
            "--",
            f"sh {shlex.quote(str(script))}",
        ]
        outcome = _boot(argv, control / _STARTED_FILE, timeout, stop)
        for _ in range(BOOT_ATTEMPTS - 1):
            if isinstance(outcome, _BootHung):
                outcome = _boot(argv, control / _STARTED_FILE, timeout, stop)
        if isinstance(outcome, _BootHung):
            raise VMBootError(
                f"the VM did not boot within {BOOT_TIMEOUT:.0f} s, {BOOT_ATTEMPTS} times\n"
                f"--- stdout\n{outcome.stdout[-4000:]}\n--- stderr\n{outcome.stderr[-4000:]}"
            )
        returncode, stdout, stderr = outcome
        if not status.exists():
            raise VMBootError(
                f"the VM never ran the command to its end (vng exit {returncode}): "
                f"{shlex.join(argv)}\n--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-4000:]}"
            )
        code = int(status.read_text().strip() or "255")
        return subprocess.CompletedProcess(argv, code, stdout, stderr)
    finally:
        shutil.rmtree(control, ignore_errors=True)


def guest_python() -> Path:
    """The project venv's interpreter; the guest sees it at the same path."""
    return Path(sys.executable)


# Imported on the host to fill the guest's bytecode cache; the packages are compiled whole
# because the scheduler, nanny and worker import many of their modules lazily.
_WARM_MODULES = (
    "distributed",
    "distributed.cli.dask_scheduler",
    "distributed.cli.dask_worker",
    "dask_safe_worker.cli",
    "dask_safe_worker.cgroup.write",
    "pytest",
    "pytest_timeout",
)
# prometheus_client where installed (the dev group): with it the scheduler and every
# worker import distributed's /metrics handlers, and our worker preload its collector.
_WARM_PACKAGES = ("distributed", "dask", "tornado", "dask_safe_worker", "_pytest")
_WARM_OPTIONAL = ("prometheus_client",)
_WARM_CODE = f"""
import compileall, importlib, os, sys
for name in {_WARM_MODULES!r}:
    importlib.import_module(name)
for name in {_WARM_OPTIONAL!r}:
    try:
        importlib.import_module(name)
    except ImportError:
        continue
for name in {_WARM_PACKAGES!r} + tuple(n for n in {_WARM_OPTIONAL!r} if n in sys.modules):
    compileall.compile_dir(os.path.dirname(sys.modules[name].__file__), quiet=2)
"""


def bytecode_archive(target: Path) -> Path | None:
    """A tar of the bytecode the guest suite needs, compiled on the (fast) host.

    The guest's root is read-only 9p, so without this every boot compiles distributed
    again in the emulated CPU, once per process (~20 s each). The guest unpacks it into
    its RAM /tmp and points PYTHONPYCACHEPREFIX there; the pyc files stay valid because
    the guest sees the same source files, with the same mtimes, at the same paths.
    Best effort: None if anything fails, and the guest then compiles for itself.
    """
    with tempfile.TemporaryDirectory(prefix="vm-bytecode-") as cache:
        env = {**os.environ, "PYTHONPYCACHEPREFIX": cache}
        warm = subprocess.run(
            [str(guest_python()), "-c", _WARM_CODE], env=env, capture_output=True, check=False
        )
        if warm.returncode != 0:
            return None
        packed = subprocess.run(
            ["tar", "-cf", str(target), "-C", cache, "."], capture_output=True, check=False
        )
        return target if packed.returncode == 0 else None


def _python_setup(control: Path) -> str:
    """Guest shell lines: writable HOME and bytecode cache, filled from the host."""
    lines = (
        "mkdir -p /tmp/home /tmp/pycache\nexport HOME=/tmp/home PYTHONPYCACHEPREFIX=/tmp/pycache\n"
    )
    archive = bytecode_archive(control / "bytecode.tar")
    if archive is not None:
        lines += f"tar -xf {shlex.quote(str(archive))} -C /tmp/pycache\n"
    return lines


@dataclass(frozen=True)
class GuestSuiteResult:
    completed: subprocess.CompletedProcess[str]
    junit_xml: str
    results_dir: Path


def run_guest_suite(
    results_dir: Path,
    memory: str = DEFAULT_MEMORY,
    timeout: float = VM_TIMEOUT,
    pytest_args: Sequence[str] = (),
    extended: bool = False,
    stop: threading.Event | None = None,
) -> GuestSuiteResult:
    """One boot, the whole tests/vm/guest suite; junit XML and logs land in results_dir.
    `extended`: also the tests and parts that cost minutes of emulated work each (the
    `extended` marker, DSW_VM_EXTENDED in the guest); CI's boot leaves them out.
    `stop`: set from another thread, it kills the VM (VMBootError)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    junit = results_dir / "junit.xml"
    junit.unlink(missing_ok=True)
    venv_bin = guest_python().parent
    pytest_cmd = [
        str(guest_python()),
        "-m",
        "pytest",
        # Its own ini: rootdir and confcutdir stop at tests/vm/guest, so the host suite's
        # conftest files and pyproject settings stay out of the guest run.
        "-c",
        str(GUEST_TESTS / "pytest.ini"),
        "--rootdir",
        str(GUEST_TESTS),
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        "-v",
        "-rA",
        *([] if extended else ["-m", "not extended"]),
        *pytest_args,
        str(GUEST_TESTS),
    ]
    env = {
        "PATH": f"{venv_bin}:/usr/sbin:/usr/bin:/sbin:/bin",
        "DSW_VM_RESULTS": str(results_dir),
        "DSW_VM_MEMORY": memory,
        "DSW_VM_EXTENDED": "1" if extended else "0",
        "PYTHONUNBUFFERED": "1",
    }
    completed = run_in_vm(
        shlex.join(pytest_cmd),
        memory=memory,
        timeout=timeout,
        rwdirs=[results_dir],
        env=env,
        warm_python=True,
        stop=stop,
    )
    xml = junit.read_text() if junit.exists() else ""
    return GuestSuiteResult(completed=completed, junit_xml=xml, results_dir=results_dir)
