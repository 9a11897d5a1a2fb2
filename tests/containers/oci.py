"""A real container harness on runc: OCI bundles built in Python, no Docker engine needed.

The rootfs is a plain (non-recursive) read-only bind mount of `/`, so the project's venv is
visible inside without building an image. That bind mount is made in a private mount
namespace that `unshare` creates for `runc run` alone: the host's mount table never sees
it, and it disappears with runc.

Containers get pid, mount, ipc, uts and cgroup namespaces and *no* network namespace: the
worker inside reaches a scheduler on 127.0.0.1.

Cgroups. With the cgroupfs driver on v1, runc reads `linux.cgroupsPath` per hierarchy: an
absolute path is taken from each hierarchy's root, a relative one from runc's own cgroup in
that hierarchy (libcontainer/cgroups/fs `subsysPath`, checked here on runc 1.1). We use a
relative path: in the memory hierarchy it lands below this process's own memory cgroup,
in the others below our own cgroup there, and `runc delete` removes every leaf. An absolute
path would also create parents in the other hierarchies that nobody removes. After start,
the harness reads the container's `/proc/<pid>/cgroup` from outside and refuses to go on
unless its memory cgroup is below ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MiB = 2**20
GiB = 2**30

# Only a guard against hangs; tests never assert on durations.
HANG_GUARD_S = 120.0

# Docker's default capability set, so that root in these containers is as strong as in a
# `docker run` without --privileged, and no stronger.
DOCKER_DEFAULT_CAPS = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]

NAMESPACES = ("pid", "ipc", "uts", "mount", "cgroup")

# Where the test's scratch directory appears inside: /tmp exists in every rootfs, and dask
# needs a writable local directory.
SHARED_IN_CONTAINER = "/tmp"

_ROOTFS_SCRIPT = 'mount --bind / "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'


def runc_binary() -> str | None:
    return shutil.which("runc")


def unavailable_reason() -> str | None:
    """None if runc containers can run here, else why not."""
    if os.geteuid() != 0:
        return "runc containers need root"
    if runc_binary() is None:
        return "runc is not installed (Debian package: runc)"
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare/mount (util-linux, mount) are not installed"
    if memory_hierarchy() is None:
        return "no cgroup v1 memory hierarchy"
    return None


def require_runc() -> None:
    """Skip outside CI when containers cannot run; in CI a missing runc is a failure."""
    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"container tests must run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def memory_hierarchy(mountinfo: Path = Path("/proc/self/mountinfo")) -> Path | None:
    """Mount point of the v1 memory hierarchy, if it is mounted at its root."""
    for line in mountinfo.read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fields, post_fields = pre.split(), post.split()
        if len(post_fields) < 3 or post_fields[0] != "cgroup":
            continue
        if "memory" in post_fields[2].split(",") and fields[3] == "/":
            return Path(fields[4].replace("\\040", " "))
    return None


def own_memory_cgroup(proc_cgroup: Path = Path("/proc/self/cgroup")) -> str:
    """This process's v1 memory cgroup path, relative to the hierarchy root."""
    return cgroup_of(proc_cgroup.read_text())


def cgroup_of(text: str) -> str:
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    raise LookupError("no memory line in /proc/<pid>/cgroup")


def venv_bin() -> Path:
    # sys.prefix, not a fixed path: CI clones anywhere.
    return Path(sys.prefix) / "bin"


def worker_entrypoint_argv(args: Sequence[str]) -> list[str]:
    """What the image runs for `docker run IMAGE ARGS...`: read from docker/Dockerfile, so
    that image and harness cannot drift. argv[0] is found through PATH, as in the image."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    try:
        from artifacts_util import DOCKERFILE, dockerfile_entrypoint_argv
    finally:
        sys.path.pop(0)
    return dockerfile_entrypoint_argv(DOCKERFILE, list(args))


def _hidden_ancestor(path: Path) -> Path | None:
    """The outermost ancestor of `path` that other users cannot traverse (like /root)."""
    current = Path("/")
    for part in path.parts[1:-1]:
        current = current / part
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def paths_a_non_root_user_needs() -> list[Path]:
    """The interpreter, the venv and this checkout's sources (editable install)."""
    import dask_safe_worker

    src = Path(dask_safe_worker.__file__).resolve().parent.parent
    return sorted(
        {Path(os.path.realpath(sys.prefix)), Path(os.path.realpath(sys.base_prefix)), src}
    )


@dataclass
class ContainerSpec:
    args: list[str]
    memory_limit: int | None = 512 * MiB
    cgroupfs_rw: bool = False
    uid: int = 0
    gid: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = SHARED_IN_CONTAINER


def hidden_paths() -> dict[Path, list[Path]]:
    """Directories a non-root user cannot traverse, each with the paths it needs below."""
    hidden: dict[Path, list[Path]] = {}
    for needed in paths_a_non_root_user_needs():
        ancestor = _hidden_ancestor(needed / "x")
        if ancestor is not None:
            hidden.setdefault(ancestor, []).append(needed)
    return hidden


def build_config(
    spec: dict[str, Any],
    want: ContainerSpec,
    rootfs: Path,
    shared: Path,
    cgroups_path: str,
    shadows: Mapping[Path, tuple[Path, list[Path]]] | None = None,
) -> dict[str, Any]:
    """Turn `runc spec`'s default config into ours (pure).

    `shadows` maps a directory to hide to (the host directory covering it, the paths to
    bind back below it)."""
    shadows = shadows or {}
    config: dict[str, Any] = json.loads(json.dumps(spec))
    config["root"] = {"path": str(rootfs), "readonly": True}
    process = config["process"]
    process["terminal"] = False
    process["args"] = list(want.args)
    process["cwd"] = want.cwd
    process["user"] = {"uid": want.uid, "gid": want.gid}
    process["env"] = [
        f"PATH={venv_bin()}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        f"HOME={SHARED_IN_CONTAINER}",
        "PYTHONDONTWRITEBYTECODE=1",
        *(f"{k}={v}" for k, v in want.env.items()),
    ]
    root = want.uid == 0
    process["capabilities"] = {
        "bounding": list(DOCKER_DEFAULT_CAPS),
        # As Docker does for a non-root USER: no capabilities survive into its processes.
        "effective": list(DOCKER_DEFAULT_CAPS) if root else [],
        "permitted": list(DOCKER_DEFAULT_CAPS) if root else [],
        "inheritable": [],
        "ambient": [],
    }
    linux = config["linux"]
    linux["namespaces"] = [{"type": t} for t in NAMESPACES]
    linux["cgroupsPath"] = cgroups_path
    resources = linux.setdefault("resources", {})
    if want.memory_limit is not None:
        resources["memory"] = {"limit": want.memory_limit}
    mounts = config["mounts"]
    for mount in mounts:
        if mount["destination"] == "/sys/fs/cgroup":
            options = [o for o in mount.get("options", []) if o not in ("ro", "rw")]
            mount["options"] = [*options, "rw" if want.cgroupfs_rw else "ro"]
    for ancestor, (shadow, needed_paths) in sorted(shadows.items()):
        # The rootfs is the host's /, where the interpreter may sit below a directory only
        # root can enter (a pyenv in root's home, say). Cover that directory with an empty,
        # traversable one and bind back just what the worker needs, read-only. (Not a
        # tmpfs: runc gives a tmpfs the mode of the directory it covers.)
        mounts.append(
            {
                "destination": str(ancestor),
                "type": "bind",
                "source": str(shadow),
                "options": ["rbind", "ro"],
            }
        )
        for needed in needed_paths:
            mounts.append(
                {
                    "destination": str(needed),
                    "type": "bind",
                    "source": str(needed),
                    "options": ["rbind", "ro"],
                }
            )
    mounts.append(
        {
            "destination": SHARED_IN_CONTAINER,
            "type": "bind",
            "source": str(shared),
            "options": ["rbind", "rw"],
        }
    )
    # A checkout below /tmp (CI clones wherever it likes) would vanish behind the scratch
    # mount: bind the project and its venv back over it, read-only, at their own paths.
    for keep in sorted(project_paths()):
        if keep.is_relative_to(SHARED_IN_CONTAINER):
            mounts.append(
                {
                    "destination": str(keep),
                    "type": "bind",
                    "source": str(keep),
                    "options": ["rbind", "ro"],
                }
            )
    return config


def project_paths() -> set[Path]:
    """The checkout and the running venv, without one nested in the other."""
    paths = {Path(__file__).resolve().parents[2], Path(sys.prefix).resolve()}
    return {p for p in paths if not any(p != q and p.is_relative_to(q) for q in paths)}


class Container:
    """One runc container, started in the foreground so that runc reports its exit code."""

    def __init__(self, workdir: Path, want: ContainerSpec) -> None:
        self.want = want
        self.id = f"dsw-test-{uuid.uuid4().hex[:12]}"
        self.workdir = workdir
        self.bundle = workdir / "bundle"
        self.rootfs = self.bundle / "rootfs"
        self.state_root = workdir / "runc-state"
        self.shared = workdir / "shared"
        self.stdout_path = workdir / "stdout"
        self.stderr_path = workdir / "stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.hierarchy = memory_hierarchy() or Path("/sys/fs/cgroup/memory")
        self.parent_cgroup = own_memory_cgroup()
        self._returncode: int | None = None
        for d in (self.rootfs, self.state_root, self.shared):
            d.mkdir(parents=True, exist_ok=True)
        # World-writable with the sticky bit, like /tmp: the container may run as any user.
        self.shared.chmod(0o1777)
        self._write_config()

    # -- bundle ---------------------------------------------------------------------------
    def _runc(self, *args: str) -> list[str]:
        return [runc_binary() or "runc", "--root", str(self.state_root), *args]

    def _write_config(self) -> None:
        config_path = self.bundle / "config.json"
        config_path.unlink(missing_ok=True)
        subprocess.run(self._runc("spec", "--bundle", str(self.bundle)), check=True)
        spec = json.loads(config_path.read_text())
        shadows: dict[Path, tuple[Path, list[Path]]] = {}
        if self.want.uid != 0:
            for i, (ancestor, needed_paths) in enumerate(sorted(hidden_paths().items())):
                shadow = self.workdir / f"shadow{i}"
                for needed in needed_paths:
                    # Mount points must exist before the read-only shadow is mounted.
                    (shadow / needed.relative_to(ancestor)).mkdir(parents=True, exist_ok=True)
                for d in (shadow, *shadow.rglob("*")):
                    d.chmod(0o755)
                shadows[ancestor] = (shadow, needed_paths)
        config = build_config(spec, self.want, self.rootfs, self.shared, self.id, shadows)
        config_path.write_text(json.dumps(config, indent=2))

    @property
    def config(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.bundle / "config.json").read_text())
        return loaded

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, *, keep: bool = False) -> None:
        """`runc run` in a private mount namespace holding the read-only rootfs mount."""
        run = self._runc(
            "run", *(["--keep"] if keep else []), "--bundle", str(self.bundle), self.id
        )
        argv = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            _ROOTFS_SCRIPT,
            "sh",
            str(self.rootfs),
            *run,
        ]
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    def state(self) -> dict[str, Any] | None:
        result = subprocess.run(self._runc("state", self.id), capture_output=True)
        if result.returncode != 0:
            return None
        loaded: dict[str, Any] = json.loads(result.stdout)
        return loaded

    def wait_running(self) -> int:
        """Wait until the container runs; returns its init's pid as the host sees it, after
        checking that its memory cgroup lies below ours."""
        deadline = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline:
            st = self.state()
            if st is not None and st.get("status") == "running" and st.get("pid"):
                pid = int(st["pid"])
                self._check_cgroup(pid)
                return pid
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"container exited with {self.proc.returncode} before running:\n{self.stderr()}"
                )
            time.sleep(0.05)
        raise AssertionError("container did not start")

    def _check_cgroup(self, pid: int) -> None:
        try:
            actual = cgroup_of(Path(f"/proc/{pid}/cgroup").read_text())
        except FileNotFoundError:
            return  # already gone; nothing ran outside the intended cgroup for long
        expected = f"{self.parent_cgroup.rstrip('/')}/{self.id}"
        if actual != expected:
            self.kill("KILL")
            raise AssertionError(f"container cgroup {actual!r} is not {expected!r}")

    @property
    def host_cgroup_dir(self) -> Path:
        """The container's memory cgroup, seen from the host."""
        return self.hierarchy / self.parent_cgroup.lstrip("/") / self.id

    def kill(self, sig: str = "TERM") -> None:
        """`runc kill`: the signal goes to the container's init (our PID 1)."""
        subprocess.run(self._runc("kill", self.id, sig), capture_output=True)

    def wait(self, timeout: float = HANG_GUARD_S) -> int:
        """The container's exit code as runc reports it (128+N for a signal)."""
        assert self.proc is not None, "not started"
        try:
            self._returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill("KILL")
            raise AssertionError(f"container still running after {timeout} s") from None
        return self._returncode

    def run(self, timeout: float = HANG_GUARD_S, *, keep: bool = False) -> int:
        self.start(keep=keep)
        return self.wait(timeout)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The JSON audit lines on the container's stderr."""
        found = []
        for line in self.stderr().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    found.append(json.loads(line))
        return found

    def destroy(self) -> None:
        """Finalizer: kill, delete, end our runc by PID, remove leftover cgroups."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill("KILL")
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        subprocess.run(self._runc("delete", "--force", self.id), capture_output=True)
        # runc delete removes its cgroups; should it have died first, remove the leaf it
        # made below our own memory cgroup (nothing else is ours to touch).
        with contextlib.suppress(FileNotFoundError, OSError):
            leftover = self.host_cgroup_dir
            for sub in sorted((p for p in leftover.iterdir() if p.is_dir()), reverse=True):
                sub.rmdir()
            leftover.rmdir()
        shutil.rmtree(self.state_root, ignore_errors=True)


@contextlib.contextmanager
def container(workdir: Path, want: ContainerSpec) -> Iterator[Container]:
    c = Container(workdir, want)
    try:
        yield c
    finally:
        c.destroy()
