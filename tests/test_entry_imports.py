"""The click-free `--print-limit` path stays light: its start-up goal (within 3 times
`python -c pass`, docs/benchmarks.md) is measured by benchmarks/prestart_fast_path.py;
this test keeps the modules that would break it off the path.

`python -X importtime` prints the import tree, a child before its parent, so each heavy
module found there can be traced to the module of ours that imported it. It shows only a
module's first import, so each of our modules on the path is also read for module-level
imports of a heavy module (imports under `if TYPE_CHECKING:` and in functions are not
run at start).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

# Modules the fast path must not import, with what each costs here (roughly, with
# compiled bytecode): dataclasses brings inspect, ast, dis and tokenize (~6 ms), typing
# ~2 ms, click ~13 ms, json and importlib.metadata (zipfile, email, csv) ~12 ms,
# cgroupspy ~1 ms (only a v1 write needs it); distributed and dask are what the
# entrypoint never imports before exec (~330 ms).
HEAVY = (
    "dataclasses",
    "inspect",
    "ast",
    "typing",
    "click",
    "cgroupspy",
    "json",
    "importlib.metadata",
    "structlog",
    "psutil",
    "distributed",
    "dask",
)
# Heavy imports a module of ours may keep on the fast path, by module: none today.
ALLOWED_UNDER: dict[str, tuple[str, ...]] = {}

# entrypoints/host-prestart.sh's call; a tiny minimum, so that the plan is never refused
# and the fast path really answers (a refusal would go to the full command).
ARGS = ["--print-limit", "--cgroup-write", "never"]
ENV = {"DASK_SAFE_WORKER_RESERVE": "512MiB", "DASK_SAFE_WORKER_MIN_WORKER_MEMORY": "1MiB"}
PROGRAM = f"""
import sys
from dask_safe_worker.entry import fast_print_limit
budget = fast_print_limit({ARGS!r}, {{**__import__("os").environ}})
assert budget is not None and budget > 0, budget
print(" ".join(sorted(sys.modules)))
"""


def is_one_of(module: str, names: tuple[str, ...]) -> bool:
    """`module` is one of `names` or inside one of them."""
    return any(module == n or module.startswith(f"{n}.") for n in names)


def import_tree(stderr: str) -> list[tuple[int, str]]:
    """(depth, module) per `-X importtime` line, in the order printed."""
    tree = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or line.endswith("imported package"):
            continue
        name = line.rsplit("|", 1)[1]
        tree.append(((len(name) - len(name.lstrip())) // 2, name.strip()))
    return tree


def importers(tree: list[tuple[int, str]], index: int) -> list[str]:
    """The chain of modules that imported tree[index], innermost first: each parent is
    the next line below with a smaller depth."""
    depth, chain = tree[index][0], []
    for d, name in tree[index + 1 :]:
        if d < depth:
            chain.append(name)
            depth = d
    return chain


def fast_path_modules() -> tuple[set[str], str]:
    """The modules loaded by the fast path, and its `-X importtime` output."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", PROGRAM],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **ENV},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(proc.stdout.split())
    assert "dask_safe_worker.measure" in loaded  # it measured, not only parsed
    return loaded, proc.stderr


def test_the_print_limit_fast_path_imports_nothing_heavy() -> None:
    loaded, stderr = fast_path_modules()
    tree = import_tree(stderr)
    assert tree, "no -X importtime output"
    offenders = []
    for i, (_, name) in enumerate(tree):
        if not is_one_of(name, HEAVY):
            continue
        chain = importers(tree, i)
        if any(
            is_one_of(module, (owner,)) and is_one_of(name, allowed)
            for module in chain
            for owner, allowed in ALLOWED_UNDER.items()
        ):
            continue
        offenders.append(" <- ".join([name, *chain]))
    assert not offenders, "\n".join(offenders)
    # Also what a later import did (importtime lists each module once, at its first).
    assert not loaded & {"click", "cgroupspy", "distributed", "dask", "structlog", "psutil"}


def test_the_tree_reader_finds_an_importer() -> None:
    """The check above can fail: a heavy module under one of ours is reported with it."""
    stderr = "\n".join(
        [
            "import time: self [us] | cumulative | imported package",
            "import time:       100 |        100 |     inspect",
            "import time:       100 |        200 |   dataclasses",
            "import time:       100 |        300 | dask_safe_worker.plan",
        ]
    )
    tree = import_tree(stderr)
    assert tree == [(2, "inspect"), (1, "dataclasses"), (0, "dask_safe_worker.plan")]
    assert importers(tree, 0) == ["dataclasses", "dask_safe_worker.plan"]


def module_level_imports(source: str) -> list[str]:
    """The modules a file imports when it is imported: top-level and conditional imports,
    not those under `if TYPE_CHECKING:` or inside a function or class."""
    found: list[str] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append(node.module)
            elif isinstance(node, ast.If):
                test = node.test
                checking = isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
                if not checking:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(ast.parse(source).body)
    return found


def test_no_module_of_the_fast_path_imports_a_heavy_one() -> None:
    loaded, _ = fast_path_modules()
    offenders = []
    for module in sorted(m for m in loaded if is_one_of(m, ("dask_safe_worker",))):
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None, module
        path = Path(spec.origin)
        allowed = tuple(
            name
            for owner, names in ALLOWED_UNDER.items()
            if is_one_of(module, (owner,))
            for name in names
        )
        for name in module_level_imports(path.read_text()):
            if is_one_of(name, HEAVY) and not is_one_of(name, allowed):
                offenders.append(f"{module} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_the_source_reader_skips_type_checking_and_functions() -> None:
    source = """
import os
from typing import TYPE_CHECKING
TYPE_CHECKING = False
if TYPE_CHECKING:
    import dataclasses
else:
    import json
def f():
    import click
try:
    import structlog
except ImportError:
    import psutil
"""
    assert module_level_imports(source) == ["os", "typing", "json", "structlog", "psutil"]


# What the following supervisor imports before it forks the worker (launch → registered
# is a goal, docs/benchmarks.md): stdlib and our planning modules; json for the channel.
SUPERVISOR_PROGRAM = """
import sys
import dask_safe_worker.supervise
from dask_safe_worker.follow.watch import start_watch
print(" ".join(sorted(sys.modules)))
"""


def modules_loaded_by(program: str) -> set[str]:
    """The modules a fresh interpreter holds after `program`, which prints them."""
    proc = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(proc.stdout.split())


def test_the_following_supervisor_imports_nothing_heavy() -> None:
    loaded = modules_loaded_by(SUPERVISOR_PROGRAM)
    assert "dask_safe_worker.follow.watch" in loaded
    heavy = [name for name in HEAVY if name != "json"]
    assert not {m for m in loaded if is_one_of(m, tuple(heavy))}


def test_structlog_writes_the_audit_log_and_only_when_there_is_one() -> None:
    """structlog (the design's named writer) is loaded for a JSON line, never for
    `--log-format none`: its ~26 ms are paid only where the audit log is wanted."""
    program = (
        "import io, sys\n"
        "from dask_safe_worker.events import make_audit\n"
        "fmt = sys.argv[1]\n"
        "out = io.StringIO()\n"
        "make_audit(fmt, out)('cli.started', n=1)\n"
        "assert (fmt == 'none') == (out.getvalue() == ''), out.getvalue()\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    loaded = {}
    for fmt in ("json", "none"):
        proc = subprocess.run(
            [sys.executable, "-c", program, fmt],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        loaded[fmt] = set(proc.stdout.split())
    assert "structlog" in loaded["json"]
    assert not {m for m in loaded["none"] if is_one_of(m, ("structlog", "asyncio"))}


# What the planning process imports for following before it forks the worker: the
# channel and the spec (follow.setup), never the supervisor's watch with its cgroup
# readers, death watch and kernel wake-ups, which the supervisor imports after the fork,
# beside the worker's own start.
START_FOLLOWING_PROGRAM = """
import sys
import dask_safe_worker.cli
import dask_safe_worker.follow.setup
import dask_safe_worker.run_worker
import dask_safe_worker.supervise
print(" ".join(sorted(sys.modules)))
"""
WATCH_ONLY = (
    "dask_safe_worker.follow.watch",
    "dask_safe_worker.follow.death_watch",
    "dask_safe_worker.follow.wake",
    "dask_safe_worker.follow.metrics",
)


def test_the_start_leaves_the_watch_to_the_supervisor() -> None:
    loaded = modules_loaded_by(START_FOLLOWING_PROGRAM)
    assert "dask_safe_worker.follow.setup" in loaded
    assert not loaded & set(WATCH_ONLY)


# What the start imports before the worker's fork (following) or exec (--no-follow),
# with JSON lines: printed by an audit hook at the first fork or exec, then the start
# goes on (worker `true`, no kernel write).
START_PATH_PROGRAM = """
import os, sys
def at_start(event, args):
    if event in ("os.fork", "os.exec") and not hasattr(at_start, "seen"):
        at_start.seen = True
        os.write(1, (" ".join(sorted(sys.modules)) + "\\n").encode())
sys.addaudithook(at_start)
from dask_safe_worker.cli import main
main({args!r})
"""
START_ARGS = ["--cgroup-write", "never", "--log-format", "json", "--worker-command", "true"]
# Taken off the start path (each only for a rare case now): tempfile with shutil,
# random, bz2 and lzma (~8 ms; the temp directory is asked of tempfile only where the
# plain answer is not usable).
RARE_ON_THE_START = ("tempfile", "shutil", "random", "bz2", "lzma")


def test_the_start_leaves_rare_modules_off_its_way() -> None:
    for mode in ([], ["--no-follow"]):
        program = START_PATH_PROGRAM.format(args=[*mode, *START_ARGS, "tcp://127.0.0.1:1"])
        loaded = modules_loaded_by(program)
        assert "dask_safe_worker.cli" in loaded, mode
        assert not {m for m in loaded if is_one_of(m, RARE_ON_THE_START)}, mode
        if not mode:
            # Following: the start's lines are held until the worker is started.
            assert "structlog" not in loaded


def test_the_nanny_preload_leaves_the_death_watch_to_its_workers_start() -> None:
    """The nanny imports its preload before it starts its worker: death_watch (notes
    and records) is imported once the worker's process is there."""
    loaded = modules_loaded_by(
        "import sys\nimport dask_safe_worker.follow.nanny\nprint(' '.join(sorted(sys.modules)))\n"
    )
    assert "dask_safe_worker.follow.nanny_deaths" in loaded
    assert "dask_safe_worker.follow.death_watch" not in loaded
