"""podman from Debian's packages, run so that it touches nothing outside the test.

Everything global is made private: the storage root, the run root, libpod's tmp dir and the
network config directory live in one scratch directory per session, and a containers.conf
that the session writes (CONTAINERS_CONF) sets them, with:

- `cgroup_manager = "cgroupfs"`: the hosts this runs on have no systemd to ask;
- explicit `default_ulimits` no higher than our own hard limits: podman's defaults raise
  RLIMIT_NOFILE, which fails ("error setting rlimit type 7") without CAP_SYS_RESOURCE;
- `events_logger = "file"`: no journald needed.

Cgroups. Every container and every build gets `--cgroup-parent` below this process's own
memory cgroup (builds and runs each their own parent, never podman's default). With
cgroupfs on v1, podman uses the same parent path in every hierarchy, so in the others
(cpu, pids, ...) it creates that path from their root: `CgroupParent` records which of
those directories did not exist before and removes them, deepest first, at the end.

Nothing here is specific to one machine: the CA bundle and the package index the build
needs are read from the environment at test time (`build_mounts`), never committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "localhost/dsw-test-base:bookworm"
IMAGE = "localhost/dask-safe-worker:test"
# Guards against hangs only; no test asserts on durations.
HANG_GUARD_S = 180.0

# A local stand-in for the official python image, from Debian's packages only: no image
# registry is reachable on CI. Debian's python3 is externally managed (PEP 668), so a venv
# made with python3-venv comes first on PATH, which gives the Dockerfile a working `pip`.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_VENV = "/opt/venv"
BASE_PATH = f"{BASE_VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# Where Debian keeps its CA bundle; the host's own bundle is bound over it for builds.
CA_BUNDLE_IN_IMAGE = "/etc/ssl/certs/ca-certificates.crt"


# -- what may run here ---------------------------------------------------------------------
def unavailable_reason() -> str | None:
    """None if podman can run containers here, else why not."""
    if os.geteuid() != 0:
        return "the image tests run podman as root (CI runs as root)"
    if shutil.which("podman") is None:
        return "podman is not installed (scripts/test.sh installs it from Debian's packages)"
    if shutil.which("mmdebstrap") is None:
        return "mmdebstrap is not installed (scripts/test.sh installs it)"
    if memory_mount() is None:
        return "no cgroup v1 memory hierarchy to put the containers below"
    return None


def require_podman() -> None:
    """Skip where the engine truly cannot run; in CI that is a failure."""
    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"image tests must run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


# -- cgroups -------------------------------------------------------------------------------
def cgroup_mounts(mountinfo: str) -> list[Path]:
    """Mount points of every cgroup hierarchy mounted at its root (pure)."""
    found = []
    for line in mountinfo.splitlines():
        pre, _, post = line.partition(" - ")
        fields, post_fields = pre.split(), post.split()
        if post_fields and post_fields[0] in ("cgroup", "cgroup2") and fields[3] == "/":
            found.append(Path(fields[4].replace("\\040", " ")))
    return found


def memory_mount() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fields, post_fields = pre.split(), post.split()
        if (
            len(post_fields) >= 3
            and post_fields[0] == "cgroup"
            and "memory" in post_fields[2].split(",")
            and fields[3] == "/"
        ):
            return Path(fields[4])
    return None


def own_memory_cgroup(text: str) -> str:
    """The v1 memory cgroup in a /proc/<pid>/cgroup text (pure)."""
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    raise LookupError("no v1 memory cgroup in /proc/<pid>/cgroup")


def _remove_empty_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        _remove_empty_tree(sub)
    # A cgroup with tasks refuses rmdir (EBUSY): it is reported by the caller, not forced.
    with contextlib.suppress(OSError):
        path.rmdir()


class CgroupParent:
    """A `--cgroup-parent` below our own memory cgroup, gone again after `remove()`."""

    def __init__(self, prefix: str) -> None:
        own = own_memory_cgroup(Path("/proc/self/cgroup").read_text())
        self.path = f"{own.rstrip('/')}/{prefix}-{uuid.uuid4().hex[:8]}"
        self._created: list[Path] = []
        for mount in cgroup_mounts(Path("/proc/self/mountinfo").read_text()):
            # The outermost directory of the path that does not exist yet: podman creates
            # it and everything below, and all of that is ours to remove.
            current = mount
            for part in Path(self.path).parts[1:]:
                current = current / part
                if not current.exists():
                    self._created.append(current)
                    break

    def memory_dir(self) -> Path:
        mount = memory_mount()
        assert mount is not None
        return mount / self.path.lstrip("/")

    def leftovers(self) -> list[Path]:
        return [p for p in self._created if p.exists()]

    def remove(self) -> None:
        for top in self._created:
            _remove_empty_tree(top)


# -- the engine ----------------------------------------------------------------------------
def _ulimit(name: str, which: int, cap: int) -> str:
    # Never above what we have: raising a hard limit needs CAP_SYS_RESOURCE. The cap keeps
    # it at or below the engine's own defaults, which builds apply before ours.
    soft, hard = resource.getrlimit(which)
    value = min(v for v in (soft, hard, cap) if v != resource.RLIM_INFINITY)
    return f"{name}={value}:{value}"


def ulimits() -> list[str]:
    return [
        _ulimit("nofile", resource.RLIMIT_NOFILE, 1024 * 1024),
        _ulimit("nproc", resource.RLIMIT_NPROC, 32768),
    ]


def containers_conf(scratch: Path) -> str:
    """The session's containers.conf (pure apart from reading our own rlimits)."""
    return "\n".join(
        [
            "[containers]",
            f"default_ulimits = {json.dumps(ulimits())}",
            "[engine]",
            # crun refuses hybrid cgroups (v1 controllers beside a cgroup2 mount), and
            # podman picks it whenever it is installed.
            'runtime = "runc"',
            'cgroup_manager = "cgroupfs"',
            'events_logger = "file"',
            f'events_logfile_path = "{scratch}/events.log"',
            f'tmp_dir = "{scratch}/libpod-tmp"',
            "[network]",
            'network_backend = "netavark"',
            f'network_config_dir = "{scratch}/networks"',
            "",
        ]
    )


@dataclass
class Engine:
    scratch: Path
    run_parent: CgroupParent
    build_parent: CgroupParent

    @property
    def conf(self) -> Path:
        return self.scratch / "containers.conf"

    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def argv(self, *args: str) -> list[str]:
        return [
            "podman",
            "--root",
            str(self.scratch / "storage"),
            "--runroot",
            str(self.scratch / "run"),
            "--storage-driver",
            "overlay",
            *args,
        ]

    def podman(
        self,
        *args: str,
        check: bool = True,
        timeout: float = HANG_GUARD_S,
        enter: Callable[[list[str]], list[str]] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`podman ARGS`; with `enter`, the command as `enter` wraps it (a namespace)."""
        argv = self.argv(*args)
        result = subprocess.run(
            argv if enter is None else enter(argv),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
            )
        return result

    def run_options(self) -> list[str]:
        return ["--network", "host", "--cgroup-parent", self.run_parent.path]

    def build_options(self) -> list[str]:
        return [
            "--network",
            "host",
            "--cgroup-parent",
            self.build_parent.path,
            # Builds do not read default_ulimits.
            *(f"--ulimit={u}" for u in ulimits()),
        ]


@contextlib.contextmanager
def engine() -> Iterator[Engine]:
    scratch = Path(tempfile.mkdtemp(prefix="dsw-podman-"))
    (scratch / "networks").mkdir()
    (scratch / "libpod-tmp").mkdir()
    e = Engine(scratch, CgroupParent("dsw-podman-run"), CgroupParent("dsw-podman-build"))
    e.conf.write_text(containers_conf(scratch))
    try:
        yield e
    finally:
        e.podman("rm", "--all", "--force", "--time", "0", check=False)
        e.podman("pod", "rm", "--all", "--force", check=False)
        e.podman("network", "prune", "--force", check=False)
        # reset unmounts the overlay layers, so that the directory can go.
        e.podman("system", "reset", "--force", check=False)
        e.run_parent.remove()
        e.build_parent.remove()
        shutil.rmtree(scratch, ignore_errors=True)


# -- the base image and the build ----------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("DSW_IMAGE_CACHE", f"{root}/dask-safe-worker-tests"))


def mmdebstrap_argv(
    target: Path, packages: Sequence[str] = BASE_PACKAGES, *, venv: str | None = BASE_VENV
) -> list[str]:
    hooks = [f'--customize-hook=chroot "$1" python3 -m venv {venv}'] if venv else []
    return [
        "mmdebstrap",
        "--quiet",
        "--variant=minbase",
        f"--include={','.join(packages)}",
        # Documentation is dead weight in a test image.
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        *hooks,
        "bookworm",
        str(target),
        os.environ.get("DSW_DEBIAN_MIRROR", DEBIAN_MIRROR),
    ]


def base_tarball(packages: Sequence[str] = BASE_PACKAGES, *, venv: str | None = BASE_VENV) -> Path:
    """A bookworm root from Debian's packages, cached by what it is made of."""
    argv = mmdebstrap_argv(Path("-"), packages, venv=venv)
    key = hashlib.sha256(json.dumps(argv).encode()).hexdigest()
    tarball = cache_dir() / f"bookworm-{key[:16]}.tar"
    if tarball.exists():
        return tarball
    tarball.parent.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(f".{os.getpid()}.partial.tar")
    subprocess.run(
        mmdebstrap_argv(partial, packages, venv=venv),
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=900,
    )
    partial.rename(tarball)
    return tarball


def import_base(e: Engine, tarball: Path, tag: str = BASE_IMAGE, path: str = BASE_PATH) -> None:
    e.podman(
        "import",
        "--change",
        f"ENV PATH={path}",
        # uv's own TLS stack reads SSL_CERT_FILE; pip is pointed at it by the build's pip.conf.
        "--change",
        f"ENV SSL_CERT_FILE={CA_BUNDLE_IN_IMAGE}",
        str(tarball),
        tag,
        timeout=600,
    )


def host_ca_bundle() -> Path | None:
    """The CA bundle this host's pip and uv trust, where TLS may be intercepted."""
    for var in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        value = os.environ.get(var)
        if value and Path(value).is_file():
            return Path(value)
    default = Path("/etc/ssl/certs/ca-certificates.crt")
    return default if default.is_file() else None


def host_index_url() -> str | None:
    """The package index this host's pip or uv is told to use, if not PyPI's default.
    Only http(s) indexes: a file:// index on the host is not inside the build."""
    for var in ("PIP_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX_URL"):
        value = os.environ.get(var)
        if value and value.startswith(("http://", "https://")):
            return value
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["python3", "-m", "pip", "config", "get", "global.index-url"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.strip()
        if out.startswith(("http://", "https://")):
            return out
    return None


def build_mounts(scratch: Path) -> list[str]:
    """`podman build -v` options that give the build's pip and uv this host's index and CA
    bundle, written at test time, so that the Dockerfile stays unmodified."""
    options: list[str] = []
    pip_conf = ["[global]", f"cert = {CA_BUNDLE_IN_IMAGE}"]
    index = host_index_url()
    if index:
        pip_conf.append(f"index-url = {index}")
        uv_toml = scratch / "uv.toml"
        uv_toml.write_text(f'index-url = "{index}"\n')
        options += ["-v", f"{uv_toml}:/etc/uv/uv.toml:ro"]
    (scratch / "pip.conf").write_text("\n".join(pip_conf) + "\n")
    options += ["-v", f"{scratch / 'pip.conf'}:/etc/pip.conf:ro"]
    bundle = host_ca_bundle()
    if bundle is not None:
        options += ["-v", f"{bundle}:{CA_BUNDLE_IN_IMAGE}:ro"]
    return options


@dataclass(frozen=True)
class Built:
    image: str
    build_seconds: float
    size_bytes: int


def build_image(
    e: Engine,
    tag: str = IMAGE,
    dockerfile: Path = REPO / "docker" / "Dockerfile",
    build_args: Sequence[str] = (f"PYTHON_IMAGE={BASE_IMAGE}",),
    context: Path = REPO,
) -> Built:
    """A Dockerfile of ours, unmodified, on a local base given as a build argument."""
    ignorefile = dockerfile.with_name(dockerfile.name + ".dockerignore")
    started = time.monotonic()
    e.podman(
        "build",
        *e.build_options(),
        *build_mounts(e.scratch),
        *(f"--build-arg={a}" for a in build_args),
        *(["--ignorefile", str(ignorefile)] if ignorefile.exists() else []),
        "-f",
        str(dockerfile),
        "-t",
        tag,
        str(context),
        timeout=900,
    )
    seconds = time.monotonic() - started
    size = int(e.podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())
    return Built(tag, seconds, size)


# -- containers ----------------------------------------------------------------------------
def audit_events(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    return events


@dataclass
class Running:
    engine: Engine
    name: str

    def logs(self) -> str:
        r = self.engine.podman("logs", self.name, check=False)
        return r.stdout + r.stderr

    def events(self) -> list[dict[str, Any]]:
        return audit_events(self.logs())

    def event(self, name: str) -> dict[str, Any]:
        found = [ev for ev in self.events() if ev.get("event") == name]
        assert len(found) == 1, f"expected one {name} event, got {found}\n{self.logs()}"
        return found[0]

    def pid(self) -> int:
        out = self.engine.podman("inspect", "--format", "{{.State.Pid}}", self.name).stdout
        return int(out.strip())

    def host_memory_dir(self) -> Path:
        """The container's memory cgroup, seen from the host."""
        path = own_memory_cgroup(Path(f"/proc/{self.pid()}/cgroup").read_text())
        assert path.startswith(self.engine.run_parent.path + "/"), path
        mount = memory_mount()
        assert mount is not None
        return mount / path.lstrip("/")

    def running(self) -> bool:
        out = self.engine.podman("inspect", "--format", "{{.State.Running}}", self.name).stdout
        return out.strip() == "true"

    def wait(self, timeout: float = HANG_GUARD_S) -> int:
        return int(self.engine.podman("wait", self.name, timeout=timeout).stdout.strip())


def start(e: Engine, options: Sequence[str], args: Sequence[str], image: str = IMAGE) -> Running:
    name = f"dsw-{uuid.uuid4().hex[:10]}"
    e.podman("run", "--detach", "--name", name, *e.run_options(), *options, image, *args)
    return Running(e, name)


def run(
    e: Engine, options: Sequence[str], args: Sequence[str], image: str = IMAGE
) -> subprocess.CompletedProcess[str]:
    return e.podman("run", "--rm", *e.run_options(), *options, image, *args, check=False)
