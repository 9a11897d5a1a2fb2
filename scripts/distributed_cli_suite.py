#!/usr/bin/env python3
"""distributed's own CLI tests, run with `dask worker` and again with dask-safe-worker.

A drop-in check: `distributed/cli/tests/test_dask_worker.py` of the installed
distributed release (or of Debian's package, with that package's release: below) runs
twice with pytest, once as written (plain `dask worker`) and once with every `dask
worker` it starts replaced by `dask-safe-worker`; the passing test ids must be the same.
It prints one row per test and the differing ids with an excerpt of their failures, and
exits 1 when they differ.

    uv run python scripts/distributed_cli_suite.py
    uv run python scripts/distributed_cli_suite.py --source ~/src/distributed
    uv run python scripts/distributed_cli_suite.py --source /path/to/distributed.git --ref 2026.8.0
    uv run python scripts/distributed_cli_suite.py --debian

Where the tests come from, the first that has them:
1. --source or $DSW_DISTRIBUTED_SOURCE, a source of the installed release: a checkout,
   an unpacked or packed source tarball, or a git directory with --ref /
   $DSW_DISTRIBUTED_REF (default: the tag named like the installed version).
2. The sdist of exactly the installed version on PyPI (the index's JSON API, the file's
   sha256 checked), cached under ~/.cache/dask-safe-worker/distributed-sdist/. The
   sdists of 2022.12.1, 2024.12.1 and 2026.8.0 ship no tests (2026.8.0's pyproject.toml
   excludes "*tests*"), so with those this step only costs one cached download.
3. Debian's python3-distributed, which installs the tests for its autopkgtests (Debian 12:
   2022.12.1+ds.1-3): fetched once with `apt-get download` into
   ~/.cache/dask-safe-worker/debian-python3-distributed/ and unpacked with dpkg-deb. Its
   release is not the installed one, so the runs use a venv of their own (uv venv + uv
   pip install, in the work directory): the project editable, distributed and dask of the
   package's upstream release (2022.12.1) from PyPI, pytest and pytest-timeout. Debian's
   only change to the file (diffed against the 2022.12.1 tag) is a
   `@pytest.mark.isinstalled` on 25 tests, its marker for tests that need the installed
   scripts; they all run here. The package has neither distributed's root conftest.py nor
   its pytest configuration: STAND_IN puts in what the file needs (utils_test's fixtures,
   --runslow, the markers under --strict-markers, the 300 s per-test timeout).
   apt-get failing (no package lists, no Debian) is SourceUnavailable: the caller skips.
Only the test file, its package's __init__.py and distributed's root conftest.py and
pytest configuration are written, into a temporary directory; nothing of distributed is
kept in this repository. --debian goes straight to 3.

Subsets. compare() runs the whole file unless told `only` (function names) or
`without`: tests/test_distributed_cli_suite.py splits it between its two comparisons to
keep CI's time (SHARED_HOST in a test cgroup, the rest but ELSEWHERE in this session's),
and a test that passes in one run only is run again, alone, in both modes (a start that
misses a 30 s wait on a loaded host rarely misses it twice; a drop-in failure fails
again): it passes in a mode if it passed in either of that mode's runs.

How `dask worker` is replaced. distributed's popen() starts workers as
`<python> -m dask worker ARGS`, resolving a bare "dask" to the script beside the
interpreter, so a `dask` earlier on PATH is never found. Instead
scripts/distributed_cli_shim/ goes first on PYTHONPATH of both runs: its sitecustomize
records each `dask worker` start (with the test that made it) and, in the second run,
execs `<python> -m dask_safe_worker ARGS` in the same process. Tests that start
`python -m distributed.cli.dask_worker` or call its `main` in-process test distributed
itself and run the same in both runs; the table shows which tests started a worker.
The same directory's pytest plugin registers the `flaky` marker (pytest-rerunfailures
is not installed here), in both runs.

The rules of this machine. The tool runs in this machine's session cgroup, so both runs
have DASK_SAFE_WORKER_CGROUP_WRITE=never (the shim sets it on every start it replaces):
the tool measures, plans, passes --memory-limit and execs the worker, which is the
drop-in surface these tests check, and writes no cgroup. With `never` it makes no child
cgroups either, so what instances learn of each other from those (the other instances'
child cgroups and their limits) is not exercised here: tests/test_distributed_cli_suite.py
also runs the pair inside a test cgroup of its own with writing on (Placement). Each run
has its own XDG_RUNTIME_DIR for plan files and instance claims. Tests that dial an
address outside loopback, bind a scheduler to every interface, or put a worker on every
interface on purpose are deselected in both runs (NETWORK_DESELECTED, each with its
reason); a test function that names such an address and is not deselected stops the run
before anything starts.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHIM = REPO / "scripts" / "distributed_cli_shim"
TEST_FILE = "distributed/cli/tests/test_dask_worker.py"
REQUIRED = (TEST_FILE, "distributed/cli/tests/__init__.py", "conftest.py")
# distributed's pytest configuration: pyproject.toml since 2023, setup.cfg before;
# pytest.ini is the stand-in written for Debian's package (STAND_IN).
CONFIG = ("pyproject.toml", "setup.cfg", "pytest.ini")
INDEX = "https://pypi.org/simple/distributed/"
DEBIAN_PACKAGE = "python3-distributed"
DIST_PACKAGES = "usr/lib/python3/dist-packages"
# Debian's package installs the tests but not distributed's root conftest.py and pytest
# configuration; these stand in for them with what the test file needs: the fixtures of
# distributed.utils_test (loop, requires_default_ports), --runslow, the markers it uses
# under --strict-markers (`isinstalled` is Debian's, added by its patch), and the
# per-test timeout of distributed's own configuration.
STAND_IN: dict[str, bytes] = {
    "conftest.py": b"""\
# dask-safe-worker's stand-in for distributed's root conftest.py (not in Debian's package).
from distributed.utils_test import *  # noqa: F403


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run slow tests")
""",
    "pytest.ini": b"""\
[pytest]
addopts = --strict-markers -p no:asyncio
markers =
    slow: marks tests as slow (run with --runslow)
    isinstalled: Debian's marker for tests that need distributed's installed scripts
timeout = 300
timeout_method = signal
""",
}
# What the release's own venv gets besides the project and distributed/dask: the test
# runner and the timeout plugin of the stand-in configuration.
VENV_EXTRAS = ("pytest", "pytest-timeout")
MODES = ("plain", "safe")

_LOOPBACK_SCHEDULER = "schedulers bind 127.0.0.1 only"
NETWORK_DESELECTED: dict[str, str] = {
    "test_worker_timeout[True]": "dials 192.168.1.100:7777",
    "test_worker_timeout[False]": "dials 192.168.1.100:7777",
    "test_timeout[--nanny]": "dials 192.168.1.100:7777",
    "test_timeout[--no-nanny]": "dials 192.168.1.100:7777",
    "test_dashboard_non_standard_ports": "binds and dials get_ip(), the host's outward address",
    "test_scheduler_file[--nanny]": (
        "`dask scheduler` without --host binds every interface and writes the host's"
        " outward address into the scheduler file, which worker and client dial"
    ),
    "test_scheduler_file[--no-nanny]": (
        "`dask scheduler` without --host binds every interface and writes the host's"
        " outward address into the scheduler file, which worker and client dial"
    ),
    "test_scheduler_address_env": (
        f"`dask scheduler --port N` without --host binds every interface; {_LOOPBACK_SCHEDULER}"
    ),
    "test_error_during_startup[--nanny]": (
        f"`dask scheduler --port N` without --host binds every interface; {_LOOPBACK_SCHEDULER}"
    ),
    "test_error_during_startup[--no-nanny]": (
        f"`dask scheduler --port N` without --host binds every interface; {_LOOPBACK_SCHEDULER}"
    ),
    "test_contact_listen_address[tcp://0.0.0.0:---nanny]": "--listen-address on 0.0.0.0",
    "test_contact_listen_address[tcp://0.0.0.0:---no-nanny]": "--listen-address on 0.0.0.0",
    "test_respect_host_listen_address[0.0.0.0---nanny]": "--host 0.0.0.0",
    "test_respect_host_listen_address[0.0.0.0---no-nanny]": "--host 0.0.0.0",
    "test_listen_address_ipv6[tcp://:---nanny]": "--listen-address tcp://: (every interface)",
    "test_listen_address_ipv6[tcp://:---no-nanny]": "--listen-address tcp://: (every interface)",
}
# The tests in which several worker processes or instances share the host: a subset
# for a second comparison where instances write cgroups and see each other's.
SHARED_HOST = (
    "test_nanny_worker_port_range",
    "test_nworkers_requires_nanny",
    "test_nworkers_negative",
    "test_nworkers_auto",
    "test_nworkers_expands_name",
)
# Left out of the comparison in this session's cgroup (CI's time is short): the
# SHARED_HOST tests run in the test-cgroup comparison instead, and test_signal_handling
# starts `python -m distributed.cli.dask_worker` itself (no `dask worker`: distributed's
# code in both runs), costs 15-20 s per case and hung 300 s in both modes on a loaded host.
ELSEWHERE: dict[str, str] = {
    **dict.fromkeys(SHARED_HOST, "runs in the test-cgroup comparison (SHARED_HOST)"),
    "test_signal_handling": "starts no `dask worker`: distributed's own code in both runs",
}
# What makes a test function need a reviewed deselection: an IPv4 literal outside
# 127.0.0.0/8 (0.0.0.0 is reviewed per parameter above), the host's outward address, or
# a `dask scheduler` started without --host.
_OUTSIDE_ADDRESS = re.compile(
    r"\b(?!127\.)(?!0\.0\.0\.0\b)\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b|\bget_ipv?6?\("
)
_SCHEDULER_START = re.compile(r"""["']scheduler["']|dask scheduler""")
# A line of a failure excerpt worth showing: an exception as Python prints it.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit): ")


class SourceUnavailable(Exception):
    """No copy of the installed release's test file: the comparison cannot run."""


class UnreviewedTest(Exception):
    """The test file has a test that may leave loopback and is not deselected."""


@dataclass(frozen=True)
class Source:
    """distributed's files that the runs need (path relative to the source root)."""

    description: str
    files: Mapping[str, bytes]


@dataclass(frozen=True)
class Suite:
    """The test file and the interpreter that runs it, with that release installed."""

    source: Source
    version: str
    python: str = sys.executable


def _as_is(argv: list[str]) -> list[str]:
    return argv


@dataclass(frozen=True)
class Placement:
    """Where both runs' processes live. By default in this process's cgroup, which the
    tool must not write (`never`). A caller that made a cgroup of its own may start the
    runs inside it (`enter` wraps the command) and let the tool write there: below it,
    every limit the tool writes is on a cgroup that the caller created."""

    cgroup_write: str = "never"
    enter: Callable[[list[str]], list[str]] = _as_is
    # The run's pytest pids, for a caller whose cleanup may end them.
    started: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.cgroup_write != "never" and self.enter is _as_is:
            raise ValueError("the tool writes cgroups only in runs started in a cgroup of ours")


@dataclass(frozen=True)
class Outcome:
    status: str  # passed, failed, error, skipped
    message: str = ""
    detail: str = ""
    output: str = ""


@dataclass
class Run:
    mode: str
    seconds: float
    outcomes: dict[str, Outcome]
    # test id -> the `dask worker` starts the shim saw during that test
    starts: dict[str, int]
    log: Path

    def passed(self) -> set[str]:
        return {t for t, o in self.outcomes.items() if o.status == "passed"}


@dataclass
class Comparison:
    source: str
    version: str
    plain: Run
    safe: Run
    deselected: dict[str, str] = field(default_factory=dict)
    # Tests that passed in one run only at first, run again in both.
    retried: list[str] = field(default_factory=list)

    def differing(self) -> list[str]:
        return sorted(self.plain.passed() ^ self.safe.passed())

    def substituted(self) -> set[str]:
        """Tests in which dask-safe-worker really started in place of `dask worker`."""
        return set(self.safe.starts)


ABSENT = Outcome("absent")


def installed_version() -> str:
    return metadata.version("distributed")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dask-safe-worker" / "distributed-sdist"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sdist_on_index(version: str) -> tuple[str, str, str]:
    """(filename, url, sha256) of distributed's sdist for `version`, from PyPI's JSON API."""
    request = urllib.request.Request(
        INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        listing = json.load(response)
    for name in (f"distributed-{version}.tar.gz", f"distributed-{version}.zip"):
        for entry in listing["files"]:
            if entry["filename"] == name:
                return name, str(entry["url"]), str(entry["hashes"]["sha256"])
    raise SourceUnavailable(f"PyPI lists no sdist of distributed {version}")


def cached_sdist(version: str, cache: Path) -> Path:
    """The sdist of `version`, downloaded once and checked against the index's sha256;
    the digest is kept beside it, so a later run is offline and still checks it."""
    for path in sorted(cache.glob(f"distributed-{version}.*")):
        recorded = path.with_name(path.name + ".sha256")
        if recorded.is_file() and sha256(path) == recorded.read_text().strip():
            return path
    try:
        name, url, digest = sdist_on_index(version)
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / (name + ".part")
        with urllib.request.urlopen(url, timeout=300) as response, partial.open("wb") as f:
            shutil.copyfileobj(response, f)
    except OSError as e:
        raise SourceUnavailable(f"cannot download distributed {version}'s sdist: {e}") from e
    if sha256(partial) != digest:
        partial.unlink()
        raise SourceUnavailable(f"{name} from PyPI does not match the index's sha256")
    path = cache / name
    partial.rename(path)
    path.with_name(name + ".sha256").write_text(digest + "\n")
    return path


def files_from_tar(archive: Path, wanted: Iterable[str]) -> dict[str, bytes]:
    """`wanted` paths relative to the archive's top directory (an sdist's layout)."""
    found: dict[str, bytes] = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            rel = member.name.split("/", 1)[1] if "/" in member.name else ""
            if rel in wanted and member.isfile():
                f = tar.extractfile(member)
                if f is not None:
                    found[rel] = f.read()
    return found


def is_git_dir(path: Path) -> bool:
    return (path / "HEAD").is_file() and (path / "objects").is_dir()


def files_from_git(git_dir: Path, ref: str, wanted: Iterable[str]) -> dict[str, bytes]:
    def git(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["git", "--git-dir", str(git_dir), *args], capture_output=True)

    if git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").returncode != 0:
        raise SourceUnavailable(f"{git_dir} has no commit {ref!r}; name one with --ref")
    found: dict[str, bytes] = {}
    for rel in wanted:
        shown = git("show", f"{ref}:{rel}")
        if shown.returncode == 0:
            found[rel] = shown.stdout
    return found


def files_from_tree(root: Path, wanted: Iterable[str]) -> dict[str, bytes]:
    return {rel: (root / rel).read_bytes() for rel in wanted if (root / rel).is_file()}


def resolve_source(
    version: str,
    given: str | None = None,
    ref: str | None = None,
    cache: Path | None = None,
) -> Source:
    """distributed's test files for `version`: from `given` (a tree, a tarball, or a git
    directory at `ref`), else from the PyPI sdist of `version`."""
    wanted = (*REQUIRED, *CONFIG)
    if given:
        path = Path(given).expanduser()
        if (path / ".git").exists() and ref:
            path = path / ".git"
        if is_git_dir(path):
            ref = ref or version
            files = files_from_git(path, ref, wanted)
            description = f"{path} at {ref} (its release is not checked against {version})"
        elif path.is_dir():
            files = files_from_tree(path, wanted)
            description = f"{path} (its release is not checked against {version})"
        elif path.is_file():
            files = files_from_tar(path, wanted)
            description = f"{path} (its release is not checked against {version})"
        else:
            raise SourceUnavailable(f"{given}: no such source")
    else:
        sdist = cached_sdist(version, cache or cache_dir())
        files = files_from_tar(sdist, wanted)
        description = f"{sdist.name} from PyPI (sha256 {sha256(sdist)[:16]}...)"
        if TEST_FILE not in files:
            raise SourceUnavailable(
                f"the sdist of distributed {version} ({sdist}) ships no {TEST_FILE};"
                " give a source of that release with --source or $DSW_DISTRIBUTED_SOURCE"
                " (a checkout, a source tarball, or a git directory with --ref)"
            )
    missing = [rel for rel in REQUIRED if rel not in files]
    if missing or not any(c in files for c in CONFIG):
        raise SourceUnavailable(f"{description} lacks {', '.join(missing) or 'a pytest config'}")
    return Source(description, files)


def deb_version(filename: str) -> str:
    """The package version in a .deb's name as apt-get download writes it
    (`python3-distributed_2022.12.1+ds.1-3_all.deb`: an epoch's colon is %3a)."""
    parts = filename.removesuffix(".deb").split("_")
    if len(parts) != 3 or parts[0] != DEBIAN_PACKAGE or not parts[1]:
        raise ValueError(f"{filename!r} is not a {DEBIAN_PACKAGE} .deb")
    return parts[1].replace("%3a", ":")


def upstream_release(version: str) -> str:
    """distributed's release in a Debian version: 2022.12.1+ds.1-3 -> 2022.12.1 (no
    epoch, no Debian revision, no +ds/+dfsg repack suffix)."""
    upstream = version.split(":", 1)[-1].rsplit("-", 1)[0]
    release = re.split(r"[+~]", upstream, maxsplit=1)[0]
    if not re.fullmatch(r"\d+(\.\d+)+", release):
        raise ValueError(f"no distributed release in Debian version {version!r}")
    return release


def debian_files(package: Mapping[str, bytes]) -> dict[str, bytes]:
    """The runs' files from the package's files (paths as in the package, without the
    leading /): its test file and package __init__.py, and the stand-ins."""
    installed = {rel: f"{DIST_PACKAGES}/{rel}" for rel in REQUIRED}
    files = {rel: package[path] for rel, path in installed.items() if path in package}
    files.update(STAND_IN)
    return files


def venv_install(python: str, release: str) -> list[str]:
    """The uv command that puts the project (editable), distributed and dask `release`
    and the runner into the venv of `python`."""
    pins = (f"distributed=={release}", f"dask=={release}")
    return ["uv", "pip", "install", "-q", "--python", python, "-e", str(REPO), *pins, *VENV_EXTRAS]


def debian_cache() -> Path:
    return cache_dir().parent / f"debian-{DEBIAN_PACKAGE}"


def tool(
    argv: Sequence[str], what: str, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> None:
    """One step of the Debian source; SourceUnavailable with the step and the last line
    it printed if it fails."""
    if shutil.which(argv[0]) is None:
        raise SourceUnavailable(f"{what}: {argv[0]} is not on PATH")
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise SourceUnavailable(
            f"{what}: `{' '.join(argv)}` exited {done.returncode}{': ' + said[-1] if said else ''}"
        )


def debian_suite(cache: Path, work: Path) -> Suite:
    """The test file of Debian's python3-distributed (fetched once with apt-get download
    into `cache`) and a venv in `work` with the project and the package's upstream
    release of distributed and dask from PyPI."""
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if not debs:
        tool(
            ["apt-get", "download", DEBIAN_PACKAGE],
            f"fetching Debian's {DEBIAN_PACKAGE}",
            cwd=cache,
        )
        debs = sorted(cache.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if len(debs) != 1:
        raise SourceUnavailable(f"{cache}: expected one {DEBIAN_PACKAGE} .deb, found {len(debs)}")
    deb = debs[0]
    version = deb_version(deb.name)
    release = upstream_release(version)
    unpacked = work / "deb"
    tool(["dpkg-deb", "-x", str(deb), str(unpacked)], f"unpacking {deb.name}")
    files = debian_files(files_from_tree(unpacked, (f"{DIST_PACKAGES}/{r}" for r in REQUIRED)))
    if TEST_FILE not in files:
        raise SourceUnavailable(f"{deb.name} ships no {TEST_FILE}")
    venv = work / f"venv-distributed-{release}"
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    # Only PyPI is reachable: uv must use an interpreter that is here.
    env["UV_PYTHON_DOWNLOADS"] = "never"
    tool(["uv", "venv", "-q", "--python", sys.executable, str(venv)], "making a venv", env=env)
    try:
        tool(venv_install(python, release), f"installing distributed {release}", env=env)
    except SourceUnavailable as e:
        # PyPI is reachable where the suite runs: a failed install is a failure, not a skip.
        raise RuntimeError(str(e)) from e
    description = (
        f"Debian's {DEBIAN_PACKAGE} {version} ({deb.name}; stand-ins for {' and '.join(STAND_IN)})"
    )
    return Suite(Source(description, files), release, python)


def resolve_suite(given: str | None, ref: str | None, work: Path, debian: bool = False) -> Suite:
    """The first that has the test file: `given` (a source of the installed release),
    the PyPI sdist of the installed release, Debian's python3-distributed (run with its
    own release, in a venv in `work`). `debian` goes straight to the last."""
    version = installed_version()
    if given and not debian:
        return Suite(resolve_source(version, given, ref), version)
    reasons: list[str] = []
    if not debian:
        try:
            return Suite(resolve_source(version), version)
        except SourceUnavailable as e:
            reasons.append(str(e))
    try:
        return debian_suite(debian_cache(), work)
    except SourceUnavailable as e:
        raise SourceUnavailable("; ".join([*reasons, str(e)])) from e


def write_source(source: Source, root: Path) -> None:
    for rel, content in source.files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


def test_name(nodeid: str) -> str:
    # Split at the first "::": parameters such as tcp://[::1]: hold more.
    return nodeid.split("::", 1)[-1]


def unreviewed(test_source: str, collected: Iterable[str]) -> list[str]:
    """Collected ids of test functions that name an address outside loopback or start a
    scheduler without --host, and are not all deselected: running them could break the
    rules of the machine, so a person reviews them and extends NETWORK_DESELECTED."""
    risky: set[str] = set()
    for node in ast.parse(test_source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            body = ast.get_source_segment(test_source, node) or ""
            starts_scheduler = _SCHEDULER_START.search(body) and "--host" not in body
            if _OUTSIDE_ADDRESS.search(body) or starts_scheduler:
                risky.add(node.name)
    return sorted(
        t
        for t in map(test_name, collected)
        if t.split("[", 1)[0] in risky and t not in NETWORK_DESELECTED
    )


def child_env(
    mode: str, work: Path, cgroup_write: str = "never", python: str = sys.executable
) -> dict[str, str]:
    env = dict(os.environ)
    if python != sys.executable:
        # A venv of the release's own: its scripts first, as if it were activated.
        bin_dir = str(Path(python).parent)
        env.update(VIRTUAL_ENV=str(Path(bin_dir).parent), PATH=f"{bin_dir}:{env.get('PATH', '')}")
    # Options for the outer pytest (when a test of ours calls this) are not distributed's.
    for name in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_CURRENT_TEST"):
        env.pop(name, None)
    runtime = work / "run"
    runtime.mkdir(parents=True, exist_ok=True)
    shim_path = os.pathsep.join(p for p in (str(SHIM), env.get("PYTHONPATH", "")) if p)
    env.update(
        PYTHONPATH=shim_path,
        DSW_SUITE_MODE=mode,
        DSW_SUITE_LOG=str(work / "starts.jsonl"),
        DASK_SAFE_WORKER_CGROUP_WRITE=cgroup_write,
        DSW_SUITE_CGROUP_WRITE=cgroup_write,
        XDG_RUNTIME_DIR=str(runtime),
    )
    return env


def pytest_argv(extra: Sequence[str], python: str = sys.executable) -> list[str]:
    return [
        python,
        "-m",
        "pytest",
        TEST_FILE,
        "--runslow",
        "-p",
        "no:cacheprovider",
        "-p",
        "dsw_suite_markers",
        "--color=no",
        # Python's own traceback format: pytest's re-parses source with ast, which
        # CPython 3.11.7 can fail with "SystemError: AST constructor recursion depth
        # mismatch" as an INTERNALERROR that ends the whole run.
        "--tb=native",
        *extra,
    ]


def collect(root: Path, work: Path, python: str) -> list[str]:
    work.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        pytest_argv(["--collect-only", "-q", "-o", "addopts="], python),
        cwd=root,
        env=child_env("plain", work, python=python),
        capture_output=True,
        text=True,
    )
    ids = [line for line in done.stdout.splitlines() if line.startswith(f"{TEST_FILE}::")]
    if done.returncode != 0 or not ids:
        raise RuntimeError(f"collecting {TEST_FILE} failed:\n{done.stdout}\n{done.stderr}")
    return ids


def read_junit(path: Path) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        nodeid = f"{TEST_FILE}::{case.get('name', '')}"
        output = "\n".join((e.text or "") for e in case if e.tag in ("system-out", "system-err"))
        status, message, detail = "passed", "", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                status = {"failure": "failed"}.get(tag, tag)
                message, detail = found.get("message", ""), found.text or ""
                break
        outcomes[nodeid] = Outcome(status, message, detail, output)
    return outcomes


def read_starts(path: Path) -> dict[str, int]:
    starts: dict[str, int] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            test = json.loads(line)["test"]
            starts[test] = starts.get(test, 0) + 1
    return starts


def run_mode(
    mode: str, root: Path, work: Path, deselect: Iterable[str], place: Placement, python: str
) -> Run:
    work.mkdir(parents=True, exist_ok=True)
    xml, log = work / "junit.xml", work / "pytest.log"
    argv = pytest_argv(
        [
            f"--junitxml={xml}",
            "-o",
            "junit_logging=all",
            f"--basetemp={work / 'tmp'}",
            *(f"--deselect={t}" for t in deselect),
        ],
        python,
    )
    started = time.monotonic()
    env = child_env(mode, work, place.cgroup_write, python)
    with (
        log.open("w") as out,
        subprocess.Popen(
            place.enter(argv),
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        ) as proc,
    ):
        place.started.add(proc.pid)
        returncode = proc.wait()
        # A test that timed out can leave its workers behind (test_signal_handling's
        # nanny, waited for in a `with Popen`, outlives the run): the run's process group
        # is ours, and nothing in it may outlive the run.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    seconds = time.monotonic() - started
    # 0: all passed, 1: some failed; anything else means pytest itself did not finish.
    if returncode not in (0, 1) or not xml.is_file():
        raise RuntimeError(f"pytest ({mode}) exited {returncode}; see {log}")
    starts = read_starts(work / "starts.jsonl")
    return Run(mode, seconds, read_junit(xml), starts, log)


def compare(
    suite: Suite,
    work: Path,
    log: Callable[[str], None] = print,
    place: Placement | None = None,
    only: Collection[str] | None = None,
    without: Mapping[str, str] | None = None,
) -> Comparison:
    """Both runs of the test file, one after the other (some tests use fixed ports);
    with `only` (test function names), both runs run just those; `without` (function
    name -> why) leaves those out of both."""
    place = place or Placement()
    source = suite.source
    root = work / "distributed-src"
    write_source(source, root)
    collected = collect(root, work / "collect", suite.python)
    risky = unreviewed(source.files[TEST_FILE].decode(), collected)
    if risky:
        raise UnreviewedTest(
            "not run: these tests may leave loopback and are not in NETWORK_DESELECTED: "
            + ", ".join(risky)
        )
    names = {test_name(t) for t in collected}
    deselected = {t: why for t, why in NETWORK_DESELECTED.items() if t in names}
    deselected.update(left_out(names - set(deselected), only, without or {}))
    deselect = [f"{TEST_FILE}::{t}" for t in deselected]
    runs: dict[str, Run] = {}
    for mode in MODES:
        log(f"running distributed's CLI tests with {mode_label(mode)} ...")
        runs[mode] = run_mode(mode, root, work / mode, deselect, place, suite.python)
        log(f"  {mode}: {runs[mode].seconds:.0f} s, {len(runs[mode].passed())} passed")
    first = Comparison(source.description, suite.version, runs["plain"], runs["safe"], deselected)
    retry = first.differing()
    if not retry:
        return first
    # Many tests wait 30 s for workers; on a loaded host a start can miss that in either
    # run. A test that differs gets a second run of its own in both modes: a drop-in
    # failure fails again, a slow moment rarely strikes the same test twice.
    log(f"running again in both modes, alone: {', '.join(map(test_name, retry))}")
    others = [t for t in collected if t not in retry]
    for mode in MODES:
        again = run_mode(mode, root, work / f"{mode}-again", others, place, suite.python)
        runs[mode] = with_retry(runs[mode], again)
    return Comparison(
        source.description, suite.version, runs["plain"], runs["safe"], deselected, retry
    )


def left_out(
    names: Iterable[str], only: Collection[str] | None, without: Mapping[str, str]
) -> dict[str, str]:
    """Test ids (of `names`) outside a comparison's subset, each with why."""
    out: dict[str, str] = {}
    for t in sorted(names):
        function = t.split("[", 1)[0]
        if only is not None and function not in only:
            out[t] = "not in this comparison's subset"
        elif function in without:
            out[t] = without[function]
    return out


def with_retry(first: Run, again: Run) -> Run:
    """`first` with the tests that passed in `again` as passed (a test passes in a mode
    if it passed in either of its runs)."""
    outcomes = dict(first.outcomes)
    outcomes.update((t, o) for t, o in again.outcomes.items() if o.status == "passed")
    starts = dict(first.starts)
    for t, n in again.starts.items():
        starts[t] = starts.get(t, 0) + n
    return Run(first.mode, first.seconds + again.seconds, outcomes, starts, first.log)


def mode_label(mode: str) -> str:
    return "`dask worker`" if mode == "plain" else "dask-safe-worker for `dask worker`"


def worker_argv(line: str) -> str | None:
    """The worker command line in dask-safe-worker's `worker.argv` audit line."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("event") != "worker.argv":
        return None
    return " ".join(str(a) for a in event.get("argv", []))


def excerpt(outcome: Outcome, lines: int = 6) -> str:
    """The failure's message and the end of its traceback, then from what the test's
    processes printed: dask-safe-worker's one-line messages, exceptions, the worker
    command lines it ran, and popen's return-code headers."""
    parts = [outcome.message.splitlines()[0] if outcome.message else outcome.status]
    tail = [line for line in outcome.detail.splitlines() if line.strip()][-lines:]
    parts += [f"    {line}" for line in tail]
    seen: set[str] = set()
    for line in outcome.output.splitlines():
        argv = worker_argv(line)
        if argv is not None:
            line = f"worker argv: {argv}"
        elif not (
            line.startswith("dask-safe-worker: ")
            or _EXCEPTION_LINE.match(line)
            or (line.startswith("------ ") and "returncode" in line)
        ):
            continue
        if line not in seen:
            seen.add(line)
            parts.append(f"  | {line}")
    return "\n".join(parts)


def differences(c: Comparison) -> str:
    """Each test id that passed in one run only, with an excerpt of its failure."""
    lines = [f"passing in one run only: {len(c.differing())}"]
    for t in c.differing():
        plain, safe = c.plain.outcomes.get(t, ABSENT), c.safe.outcomes.get(t, ABSENT)
        worse, which = (safe, "dask-safe-worker") if t in c.plain.passed() else (plain, "plain")
        lines.append(f"== {t}: {plain.status} plain, {safe.status} with dask-safe-worker")
        lines.append(f"-- under {which}:")
        lines.append(excerpt(worse))
    return "\n".join(lines)


def report(c: Comparison) -> str:
    rows = sorted(set(c.plain.outcomes) | set(c.safe.outcomes))
    width = max(len(test_name(t)) for t in rows)
    lines = [
        f"distributed {c.version}: {TEST_FILE} from {c.source}",
        f"{'test':<{width}}  {'plain':<8} {'safe':<8} starts",
        f"{'-' * width}  {'-' * 8} {'-' * 8} ------",
    ]
    differing = set(c.differing())
    for t in rows:
        plain, safe = c.plain.outcomes.get(t, ABSENT), c.safe.outcomes.get(t, ABSENT)
        starts = c.safe.starts.get(t, 0)
        flag = "  DIFFERS" if t in differing else ""
        lines.append(
            f"{test_name(t):<{width}}  {plain.status:<8} {safe.status:<8} {starts:>6}{flag}"
        )
    lines.append("")
    lines.append("starts: `dask worker` starts made by the test, each a dask-safe-worker in the")
    lines.append("safe run; a test with 0 ran distributed's own code in both runs.")
    if c.retried:
        lines.append(f"passed in one run only at first, so run again in both: {len(c.retried)}")
        lines += [f"  {test_name(t)}" for t in c.retried]
    lines.append(f"deselected in both runs ({len(c.deselected)}):")
    lines += [f"  {t}: {why}" for t, why in c.deselected.items()]
    lines += ["", differences(c), ""]
    lines.append(
        f"plain {c.plain.seconds:.0f} s, safe {c.safe.seconds:.0f} s; logs: "
        f"{c.plain.log}, {c.safe.log}"
    )
    both = len(c.plain.passed() & c.safe.passed())
    lines.append(f"drop-in check: {both} pass in both runs, {len(differing)} in one run only")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else "")
    parser.add_argument(
        "--source",
        default=os.environ.get("DSW_DISTRIBUTED_SOURCE"),
        help="distributed source of the installed release: a checkout, a tarball or a git"
        " directory (default: $DSW_DISTRIBUTED_SOURCE, else the PyPI sdist)",
    )
    parser.add_argument(
        "--ref",
        default=os.environ.get("DSW_DISTRIBUTED_REF"),
        help="commit or tag when --source is a git directory (default: the installed version)",
    )
    parser.add_argument(
        "--debian",
        action="store_true",
        help=f"run the test file of Debian's {DEBIAN_PACKAGE} with its release in a venv"
        " of its own (the default when the installed release's sdist ships no tests)",
    )
    parser.add_argument("--work", help="keep the runs' files here (default: a temporary dir)")
    args = parser.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="dsw-cli-suite-"))
    try:
        suite = resolve_suite(args.source, args.ref, work, args.debian)
        comparison = compare(suite, work)
    except (SourceUnavailable, UnreviewedTest) as e:
        print(f"distributed_cli_suite: {e}", file=sys.stderr)
        return 2
    print(report(comparison))
    return 1 if comparison.differing() else 0


if __name__ == "__main__":
    sys.exit(main())
