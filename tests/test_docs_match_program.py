"""README.md and docs/ against the program (issue 22 item 4): every command they show runs
as shown, and every option, event, exit code and module they name exists.

Commands run with `--dry-run --cgroup-write never` (or `--print-limit`), so nothing is
written; error transcripts that need no scheduler are run for real and compared line by line.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from distributed.cli import dask_worker

from dask_safe_worker import cli, exits
from dask_safe_worker.cluster_audit import cli as audit_cli

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(
    r"^(?P<env>(?:[A-Z_]+=\S+\s+)*)(?P<tool>dask-safe-worker|python -m dask_safe_worker|"
    r"dask-safe-audit)(?=\s|$)(?P<args>.*)$"
)
EVENT_NAMESPACES = frozenset(
    {"cgroup", "cli", "follow", "init", "kernel", "measure", "plan", "pool", "worker", "live"}
)
# Files and keys of other programs that share an event namespace's first word.
NOT_EVENTS = frozenset(
    {"cgroup.controllers", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"}
    | {"cgroup.event_control"}
    | {"worker.resources.limits", "worker.image.dask_worker", "live.json"}
)
FILE_SUFFIXES = (".py", ".sh", ".json", ".toml", ".conf", ".yaml", ".lock", ".md")
# Options of other programs the docs quote: docker/podman, virtme-ng, pip, and dask's
# removed options that docs/compatibility.md and the audit log describe on purpose.
FOREIGN_OPTIONS = frozenset(
    {"--build-arg", "--cap-add", "--cgroup-parent", "--cgroupns", "--memory", "--memory-swap"}
    | {"--mount", "--network", "--privileged", "--read-only", "--read-only-tmpfs", "--tmpfs"}
    | {"--security-opt", "--ulimit", "--user", "--cgroup", "--disable-kvm", "--rwdir"}
    | {"--require-hashes", "--bokeh", "--bokeh-port", "--no-bokeh", "--nprocs", "--dryrun"}
    | {"--reconnect", "--no-reconnect", "--jobs", "--build", "--rm", "--change"}
    | {"--customize-hook", "--include", "--variant"}
    # podman's network create, kube play and pod stop (docs/containers.md)
    | {"--internal", "--subnet", "--ip", "--time"}
    # systemctl enable --now; podman run --systemd (docs/containers.md's systemd part)
    | {"--now", "--systemd"}
)


def _transcripts(text: str) -> Iterator[tuple[int, str, list[str]]]:
    """(line, command, output lines) for each of our tools' command lines in a fenced
    block: in `console` blocks the lines after `$ `, elsewhere every line."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        i += 1
        if not fence.startswith("```"):
            continue
        console = fence.startswith("```console")
        body: list[tuple[int, str]] = []
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append((i + 1, lines[i]))
            i += 1
        i += 1
        for k, (number, line) in enumerate(body):
            if console and not line.startswith("$ "):
                continue
            command = line[2:] if console else line.strip()
            while command.endswith("\\") and k + 1 < len(body):
                k += 1
                command = command[:-1] + " " + body[k][1].strip()
            output = []
            if console:
                for _, after in body[k + 1 :]:
                    if after.startswith("$ "):
                        break
                    output.append(after)
            # A synopsis (`[OPTIONS]`) is not a command line.
            if COMMAND.match(command) and "[OPTIONS]" not in command:
                yield number, command, output


def documented_commands() -> list[tuple[str, str, list[str]]]:
    return [
        (f"{page.name}:{number}", command, output)
        for page in PAGES
        for number, command, output in _transcripts(page.read_text())
    ]


def _words(command: str) -> tuple[dict[str, str], str, list[str]]:
    """The environment, the tool and its argv, without comments, `&` and redirections."""
    match = COMMAND.match(command)
    assert match is not None
    env = dict(pair.split("=", 1) for pair in match["env"].split())
    words = [w for w in shlex.split(match["args"], comments=True) if w not in ("&", "2>&1")]
    kept: list[str] = []
    for word in words:
        if kept and kept[-1] == ">":
            kept.pop()  # `> file`: where the output goes, not an argument
            continue
        kept.append(word)
    return env, match["tool"], kept


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=120, cwd=cwd, env={**os.environ, **env}
    )


COMMANDS = documented_commands()


def test_the_extractor_finds_the_commands_the_pages_show() -> None:
    shown = {command for _, command, _ in COMMANDS}
    assert (
        "dask-safe-worker --print-limit                   # the budget in bytes, for host scripts"
        in shown
    )
    assert len([c for c in shown if c.startswith("dask-safe-audit")]) >= 5
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize(("where", "command", "output"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_documented_command_runs_as_shown(
    where: str, command: str, output: list[str], tmp_path: Path
) -> None:
    env, tool, args = _words(command)
    shown = [line for line in output if line.strip()]
    if tool == "dask-safe-audit":
        _audit_as_shown(where, args, env, shown, tmp_path)
        return
    base = [sys.executable, "-m", "dask_safe_worker"]
    if shown and shown[0].startswith("dask-safe-worker: "):
        # An error this machine cannot reproduce without writing (EROFS, exit 4): the
        # command line itself must still be one the program accepts.
        cli.command.make_context("dask-safe-worker", [*args, "--dry-run"])
        return
    extra = ["--cgroup-write", "never"]
    if "--print-limit" not in args:
        extra += ["--dry-run", "--log-format", "none"]
    proc = _run([*base, *args, *extra], env, tmp_path)
    assert proc.returncode == 0, f"{where}: {command}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr


def _audit_as_shown(
    where: str, args: list[str], env: dict[str, str], shown: list[str], tmp_path: Path
) -> None:
    errors = [ln for ln in shown if ln.startswith(("dask-safe-audit:", "Usage:", "Error:"))]
    if not errors:
        # Needs a scheduler: the options and the address must parse; the files the
        # example names (/shared/scheduler.json, ca.pem) are stood in for.
        audit_cli.command.make_context("dask-safe-audit", _stand_in_files(args, tmp_path))
        return
    if "scheduler.json" in args:
        # The two scheduler files the transcript describes: empty, and cut off.
        text = "" if "is empty" in errors[0] else '{"address": "tcp://127.0.0.1:87'
        (tmp_path / "scheduler.json").write_text(text)
    proc = _run([sys.executable, "-m", "dask_safe_worker.cluster_audit.cli", *args], env, tmp_path)
    assert proc.returncode != 0, where
    got = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert got == [ln for ln in shown if ln.strip()], f"{where}:\n{proc.stderr}"


def _stand_in_files(args: list[str], tmp_path: Path) -> list[str]:
    files = {
        name
        for param in audit_cli.command.params
        if isinstance(param.type, click.Path | click.File)
        for name in param.opts
    }
    out = list(args)
    for at, word in enumerate(out[:-1]):
        if word in files:
            out[at + 1] = str(tmp_path / Path(out[at + 1]).name)
            Path(out[at + 1]).write_text('{"address": "tcp://127.0.0.1:1"}')
    return out


def _option_names(command: click.Command) -> set[str]:
    return {
        name
        for param in command.params
        for name in [*param.opts, *param.secondary_opts]
        if name.startswith("--")
    }


def _program_options() -> set[str]:
    literals = set()
    for tree in ("src", "benchmarks", "scripts"):
        for path in (ROOT / tree).rglob("*.py"):
            literals |= set(re.findall(r"[\"'](--[a-z][a-z0-9-]*)[\"'=]", path.read_text()))
    return (
        _option_names(cli.command)
        | _option_names(audit_cli.command)
        | _option_names(dask_worker.main)
        | literals
        | {"--help"}
    )


def unknown_options(text: str, known: set[str]) -> set[str]:
    """Options named in the page's code (inline or fenced) that no program here has."""
    code = re.findall(r"```.*?```|`[^`\n]+`", text, flags=re.S)
    named = {o for span in code for o in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", span)}
    return {o for o in named if o not in known and o not in FOREIGN_OPTIONS}


def test_every_option_the_docs_name_exists() -> None:
    known = _program_options()
    missing = {p.name: unknown_options(p.read_text(), known) for p in PAGES}
    # `--tls-` is the prefix of dask's TLS options in docs/configuration.md's prose.
    missing = {page: opts - {"--tls-"} for page, opts in missing.items()}
    assert not {page: opts for page, opts in missing.items() if opts}


def test_the_option_check_catches_an_option_no_program_has() -> None:
    known = _program_options()
    assert unknown_options("run `dask-safe-worker --reserve-ratio 2`", known) == {"--reserve-ratio"}
    assert unknown_options("```sh\ndask-safe-worker --reserve 1GiB\n```", known) == set()


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


def _documented_events() -> set[str]:
    text = (ROOT / "docs" / "audit-log.md").read_text()
    return set(re.findall(r"^### `([a-z_.]+)`$", text, flags=re.M))


def unknown_names(text: str, events: set[str]) -> set[str]:
    """Dotted names in backticks that look like our events or modules and are neither an
    event of the audit log nor something `dask_safe_worker` has."""
    bad = set()
    for name in set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)+)`", text)):
        if name in events or name in NOT_EVENTS or name.endswith(FILE_SUFFIXES):
            continue
        first = name.split(".")[0]
        if first == "dask_safe_worker":
            if not _resolves(name):
                bad.add(name)
        elif first in EVENT_NAMESPACES and not _resolves(f"dask_safe_worker.{name}"):
            bad.add(name)
    return bad


def test_every_event_and_module_the_docs_name_exists() -> None:
    events = _documented_events()
    missing = {p.name: unknown_names(p.read_text(), events) for p in PAGES}
    assert not {page: names for page, names in missing.items() if names}


def test_the_name_check_catches_a_renamed_event_and_module() -> None:
    events = _documented_events()
    text = "`follow.chnaged`, `dask_safe_worker.follow_worker`, `plan.made`, `plan.make_plan`"
    assert unknown_names(text, events) == {"follow.chnaged", "dask_safe_worker.follow_worker"}


EXIT_PHRASE = re.compile(
    r"\bexit(?:s|ed)?(?: with)?(?: code| status)? (\d+)\b(?! \+)", flags=re.IGNORECASE
)


def program_exit_codes() -> set[int]:
    codes = {v for k, v in vars(exits).items() if k.startswith("EXIT_") and isinstance(v, int)}
    # 0 and the shell's 128 + signal (the supervisor's and a cancelled start's).
    return codes | {0, 128, 128 + 2, 128 + 15}


def unknown_exit_codes(text: str) -> set[int]:
    return {int(n) for n in EXIT_PHRASE.findall(text)} - program_exit_codes()


def test_every_exit_code_the_docs_name_is_the_programs() -> None:
    missing = {p.name: unknown_exit_codes(p.read_text()) for p in PAGES}
    assert not {page: codes for page, codes in missing.items() if codes}


def test_the_exit_code_check_catches_a_code_no_program_has() -> None:
    assert unknown_exit_codes("then it exits 6, or exit code 4") == {6}
    assert unknown_exit_codes("exits with 128 + the signal") == set()
