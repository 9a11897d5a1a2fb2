"""Readers for the launch artifacts (Dockerfile, compose file, systemd unit).

They live apart from the tests so that other suites can import them: the runc container
harness asserts that it runs `dockerfile_entrypoint_argv(DOCKERFILE, args)`, so the image and
the harness cannot drift apart.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"

# Docker's default for RUN/CMD/ENTRYPOINT in shell form, until a SHELL instruction changes it.
DEFAULT_SHELL = ("/bin/sh", "-c")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


@dataclass(frozen=True)
class Command:
    """A CMD or ENTRYPOINT as the builder records it."""

    argv: tuple[str, ...]
    shell_form: bool


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")


def _escape_char(lines: list[str]) -> str:
    # Parser directives are only honoured before the first comment, blank line or instruction.
    for line in lines:
        match = _DIRECTIVE.match(line)
        if match is None:
            break
        if match.group(1).lower() == "escape":
            value = match.group(2)
            if value not in ("\\", "`"):
                raise ValueError(f"invalid escape directive: {value!r}")
            return value
    return "\\"


def parse_dockerfile_text(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions, joining continuation lines like BuildKit."""
    # Only "\n" ends a line for Docker (str.splitlines would also split on U+2028 and others).
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    escape = _escape_char(lines)
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        # Comment lines vanish even in the middle of a continued instruction.
        if stripped.startswith("#"):
            continue
        if not pending:
            if not stripped:
                continue
            start = number
        body = raw.rstrip()
        if body.endswith(escape):
            pending.append(body[: -len(escape)])
            continue
        pending.append(body)
        logical = " ".join(part.strip() for part in pending if part.strip())
        pending = []
        keyword, _, arguments = logical.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
    if pending:
        raise ValueError("Dockerfile ends inside a continued line")
    return instructions


def _substitute(value: str, variables: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2)
        if name in variables and variables[name] != "":
            return variables[name]
        return default if default is not None else ""

    pattern = r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)"
    return re.sub(pattern, replace, value)


def _parse_arg(arguments: str) -> tuple[str, str | None]:
    name, sep, default = arguments.partition("=")
    if sep and len(default) >= 2 and default[0] == default[-1] and default[0] in "\"'":
        default = default[1:-1]
    return name.strip(), (default if sep else None)


def dockerfile_stages(path: Path) -> list[Stage]:
    """The build stages, with global ARG defaults substituted into each FROM."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in parse_dockerfile_text(path.read_text()):
        if instruction.keyword == "ARG" and not stages:
            name, default = _parse_arg(instruction.arguments)
            if default is not None:
                global_args[name] = default
            continue
        if instruction.keyword == "FROM":
            words = [w for w in instruction.arguments.split() if not w.startswith("--platform")]
            base = _substitute(words[0], global_args)
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=alias))
            continue
        if not stages:
            raise ValueError(f"line {instruction.line}: {instruction.keyword} before FROM")
        stages[-1].instructions.append(instruction)
    if not stages:
        raise ValueError(f"{path}: no FROM instruction")
    return stages


def _command(arguments: str, shell: tuple[str, ...]) -> Command:
    if arguments.startswith("["):
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return Command(tuple(value), shell_form=False)
    # Docker, too, falls back to shell form when the JSON does not parse.
    return Command((*shell, arguments), shell_form=True)


def _json_argv(arguments: str, keyword: str) -> tuple[str, ...]:
    value = json.loads(arguments)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{keyword} needs a JSON list of strings")
    return tuple(value)


def dockerfile_entrypoint_and_cmd(path: Path) -> tuple[Command, Command | None]:
    """The final stage's ENTRYPOINT and CMD, following Docker's inheritance rules.

    Setting ENTRYPOINT clears a CMD inherited from the base image (but not one set earlier
    in the same stage). A stage built FROM an earlier stage inherits that stage's values.
    Raises ValueError when the ENTRYPOINT would come from an external base image, which
    this file alone cannot tell.
    """
    stages = dockerfile_stages(path)
    states: dict[str, tuple[Command | None, Command | None]] = {}
    entrypoint: Command | None = None
    cmd: Command | None = None
    for index, stage in enumerate(stages):
        # FROM may name an earlier stage, or give its index.
        inherited = states.get(stage.base)
        entrypoint, cmd = inherited if inherited is not None else (None, None)
        shell: tuple[str, ...] = DEFAULT_SHELL
        cmd_set = False
        for instruction in stage.instructions:
            if instruction.keyword == "SHELL":
                shell = _json_argv(instruction.arguments, "SHELL")
            elif instruction.keyword == "CMD":
                cmd = _command(instruction.arguments, shell)
                cmd_set = True
            elif instruction.keyword == "ENTRYPOINT":
                entrypoint = _command(instruction.arguments, shell)
                if not cmd_set:
                    cmd = Command((), shell_form=False)
        states[str(index)] = (entrypoint, cmd)
        if stage.name is not None:
            states[stage.name] = (entrypoint, cmd)
    if entrypoint is None:
        raise ValueError(f"{path}: the final stage's ENTRYPOINT comes from its base image")
    return entrypoint, cmd


def dockerfile_entrypoint_argv(path: Path, args: list[str] | None = None) -> list[str]:
    """The argv a container of this image runs: ENTRYPOINT, then `args` or else CMD.

    `args` plays the part of `docker run IMAGE ARGS...` (or a Kubernetes container's `args`):
    when given, it replaces CMD, exactly as the runtimes do. A shell-form ENTRYPOINT ignores
    both CMD and args, as Docker does.
    """
    entrypoint, cmd = dockerfile_entrypoint_and_cmd(path)
    if entrypoint.shell_form:
        return list(entrypoint.argv)
    if args is not None:
        return [*entrypoint.argv, *args]
    if cmd is None:
        raise ValueError(f"{path}: CMD comes from the base image")
    return [*entrypoint.argv, *cmd.argv]


def dockerfile_env(path: Path) -> dict[str, str]:
    """ENV of the final stage (and of earlier stages it is built FROM), as written.

    Values set by an external base image are not known here; `$VAR` references are left as
    they are. Both `ENV K=V K2=V2` and the legacy `ENV K V` forms are read.
    """
    stages = dockerfile_stages(path)
    by_name: dict[str, dict[str, str]] = {}
    env: dict[str, str] = {}
    for index, stage in enumerate(stages):
        env = dict(by_name.get(stage.base, {}))
        for instruction in stage.instructions:
            if instruction.keyword != "ENV":
                continue
            words = shlex.split(instruction.arguments)
            if words and "=" not in words[0]:
                env[words[0]] = " ".join(words[1:])
                continue
            for word in words:
                key, _, value = word.partition("=")
                env[key] = value
        by_name[str(index)] = env
        if stage.name is not None:
            by_name[stage.name] = env
    return env


def dockerfile_labels(path: Path) -> dict[str, str]:
    """LABEL key=value pairs of the final stage (values unquoted, ARGs left as written)."""
    labels: dict[str, str] = {}
    for instruction in dockerfile_stages(path)[-1].instructions:
        if instruction.keyword == "LABEL":
            for word in shlex.split(instruction.arguments):
                key, sep, value = word.partition("=")
                if not sep:
                    raise ValueError(f"line {instruction.line}: LABEL without '='")
                labels[key] = value
    return labels


_COMPOSE_VARIABLE = re.compile(
    r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)"
)


def compose_interpolate(value: str, env: Mapping[str, str]) -> str:
    """Docker Compose's variable interpolation: $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, $$."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, operand = match.group(2), match.group(3)
        present = name in env
        empty = present and env[name] == ""
        if operator in (":-", ":?") and (not present or empty):
            if operator == ":?":
                raise KeyError(operand or name)
            return operand
        if operator in ("-", "?") and not present:
            if operator == "?":
                raise KeyError(operand or name)
            return operand
        return env.get(name, "")

    return _COMPOSE_VARIABLE.sub(replace, value)


def parse_unit_file(text: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]}; keys may repeat, as systemd allows."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: str | None = None
    pending = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if pending and line and line[0] in "#;":
            # systemd skips comment lines inside a continued value.
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        if current is None:
            raise ValueError(f"line {number}: assignment outside a section")
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"line {number}: not a key=value line: {raw!r}")
        sections[current].append((key.strip(), value.strip()))
    if pending:
        raise ValueError("unit file ends inside a continued line")
    return sections


def unit_values(unit: Mapping[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [value for name, value in unit.get(section, []) if name == key]


def exec_start_argv(value: str) -> list[str]:
    """Split an ExecStart= value into words, dropping systemd's special prefixes (-@:+!)."""
    words = shlex.split(value)
    if not words:
        raise ValueError("empty ExecStart")
    words[0] = words[0].lstrip("-@:+!")
    return words


def helm_worker_args(values: Mapping[str, Any]) -> list[str]:
    """The worker args the dask/dask chart's template renders from these values."""
    worker = values["worker"]
    address = worker.get("custom_scheduler_url") or "dask-scheduler:8786"
    args = [worker["image"]["dask_worker"], address]
    limits = worker.get("resources", {}).get("limits")
    if limits:
        threads = worker.get("threads_per_worker") or limits.get("cpu")
        args += ["--nthreads", str(threads), "--memory-limit", str(limits["memory"])]
    args += ["--no-dashboard", "--dashboard-address", "8790"]
    return args + list(worker.get("extraArgs", []))
