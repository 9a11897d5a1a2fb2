"""`dask worker`'s own click command, read without importing distributed (~330 ms+).

Arguments `dask worker` would refuse must be refused before anything is written. The
rules come from the installed release's click command: `option_table()` reads the
decorators of `main` in `distributed/cli/dask_worker.py` with the `ast` module, and only
where that source cannot be read (a zip import, a missing .py) asks a subprocess to import
the real command and list `main.params`. tests/test_worker_cli.py and tests/test_parity.py
check the two tables against each other and the verdicts of `check_argv` against
`main.make_context`.

The trade-off, measured by benchmarks/worker_args_check.py (docs/benchmarks.md): the ast
read adds about 10 ms to the start path; importing `distributed.cli.dask_worker`, in
process or in a subprocess, costs 330 ms on a quiet machine and about a second on a busy
one, more than the whole start path, on every start. So the import is only the fallback.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .dask_compat.dask_worker import WorkerArgsError


@dataclass(frozen=True)
class Param:
    """One click parameter of `dask worker`, as much as argv checking needs."""

    kind: str  # "option" | "argument"
    opts: tuple[str, ...] = ()
    secondary_opts: tuple[str, ...] = ()
    is_flag: bool = False
    multiple: bool = False
    nargs: int = 1
    type: str = "text"  # "text" | "integer" | "float" | "existing_path"
    name: str = ""


@dataclass(frozen=True)
class OptionTable:
    params: tuple[Param, ...]
    help_names: tuple[str, ...] = ("--help",)
    ignore_unknown_options: bool = True
    source: str = ""
    by_name: dict[str, Param] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for p in self.params:
            if p.kind == "option":
                for name in (*p.opts, *p.secondary_opts):
                    self.by_name[name] = p

    def as_json(self) -> list[dict[str, Any]]:
        return [p.__dict__ | {"opts": list(p.opts)} for p in self.params]


# --- from the source, with ast ---------------------------------------------------------


def _const(node: Any) -> Any:
    return node.value if isinstance(node, ast.Constant) else None


def _callee(node: Any) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def _type_name(node: Any, assigned: dict[str, Any]) -> str:
    if isinstance(node, ast.Name) and node.id in assigned:
        node = assigned[node.id]
    if isinstance(node, ast.Name):
        return {"int": "integer", "float": "float"}.get(node.id, "text")
    if isinstance(node, ast.Call) and _callee(node) == "Path":
        exists = any(k.arg == "exists" and _const(k.value) is True for k in node.keywords)
        return "existing_path" if exists else "text"
    if isinstance(node, ast.Call) and _callee(node) == "IntRange":
        return "integer"
    return "text"


def _param_from_decorator(call: Any, assigned: dict[str, Any]) -> Param | None:
    callee = _callee(call)
    keywords = {k.arg: k.value for k in call.keywords if k.arg}
    decls = [_const(a) for a in call.args if isinstance(_const(a), str)]
    if callee == "version_option":
        return Param("option", opts=("--version",), is_flag=True, name="version")
    if callee == "help_option":
        return None
    if callee == "argument":
        nargs = _const(keywords["nargs"]) if "nargs" in keywords else 1
        if isinstance(keywords.get("nargs"), ast.UnaryOp):  # nargs=-1
            nargs = -1
        return Param("argument", nargs=int(nargs), name=decls[0] if decls else "")
    if not callee.endswith("option"):
        return None
    opts: list[str] = []
    secondary: list[str] = []
    name = ""
    for decl in decls:
        if not decl.startswith("-"):
            name = decl
            continue
        first, slash, second = decl.partition("/")
        opts.append(first.strip())
        if slash:
            secondary.append(second.strip())
    is_flag = (
        bool(secondary)
        or any(_const(keywords.get(k)) is True for k in ("is_flag", "count"))
        or ("flag_value" in keywords)
    )
    return Param(
        "option",
        opts=tuple(opts),
        secondary_opts=tuple(secondary),
        is_flag=is_flag,
        multiple=_const(keywords.get("multiple")) is True,
        type=_type_name(keywords["type"], assigned) if "type" in keywords else "text",
        name=name or opts[0].lstrip("-").replace("-", "_"),
    )


def _ignores_unknown_options(command: ast.Call) -> bool:
    """`context_settings=dict(ignore_unknown_options=True)` or the `{...}` spelling."""
    for keyword in command.keywords:
        if keyword.arg != "context_settings":
            continue
        for node in ast.walk(keyword.value):
            if isinstance(node, ast.keyword) and node.arg == "ignore_unknown_options":
                return _const(node.value) is True
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if key is not None and _const(key) == "ignore_unknown_options":
                        return _const(value) is True
    return False


def table_from_source(text: str, function: str = "main") -> OptionTable:
    """The parameters of the click command `function` in `text`, in click's order
    (click lists them top to bottom). ValueError when no such command is there."""
    tree = ast.parse(text)
    assigned = {
        t.id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    for node in tree.body:
        if not (isinstance(node, ast.FunctionDef) and node.name == function):
            continue
        params: list[Param] = []
        ignore_unknown = False
        for deco in node.decorator_list:
            if not isinstance(deco, ast.Call):
                continue
            if _callee(deco) == "command":
                ignore_unknown = _ignores_unknown_options(deco)
                continue
            param = _param_from_decorator(deco, assigned)
            if param is not None:
                params.append(param)
        if not params:
            break
        return OptionTable(tuple(params), ignore_unknown_options=ignore_unknown, source="ast")
    raise ValueError(f"no click command {function!r} found")


# --- from the imported command, in a subprocess ------------------------------------------

_DUMP = """
import json, click
from distributed.cli.dask_worker import main
out = []
for p in main.params:
    t = p.type
    kind = ("integer" if isinstance(t, click.types.IntParamType) else
            "float" if isinstance(t, click.types.FloatParamType) else
            "existing_path" if isinstance(t, click.Path) and t.exists else "text")
    out.append(dict(kind=p.param_type_name, opts=list(p.opts),
                    secondary_opts=list(p.secondary_opts),
                    is_flag=bool(getattr(p, "is_flag", False) or getattr(p, "count", False)),
                    multiple=bool(p.multiple), nargs=p.nargs, type=kind, name=p.name or ""))
ctx = main.context_settings or {}
print(json.dumps(dict(params=out, ignore=bool(ctx.get("ignore_unknown_options")))))
"""


def table_from_params(dump: dict[str, Any]) -> OptionTable:
    params = tuple(
        Param(
            kind=p["kind"],
            opts=tuple(p["opts"]) if p["kind"] == "option" else (),
            secondary_opts=tuple(p["secondary_opts"]),
            is_flag=p["is_flag"],
            multiple=p["multiple"],
            nargs=p["nargs"],
            type=p["type"],
            name=p["name"],
        )
        for p in dump["params"]
    )
    return OptionTable(params, ignore_unknown_options=dump["ignore"], source="import")


def table_by_import(python: str = sys.executable) -> OptionTable:
    import subprocess

    out = subprocess.run(
        [python, "-c", _DUMP], capture_output=True, text=True, timeout=120, check=True
    )
    return table_from_params(json.loads(out.stdout))


def source_file() -> str | None:
    """`distributed/cli/dask_worker.py` of the distributed that `python -m` would run."""
    for entry in sys.path:
        path = os.path.join(entry or ".", "distributed", "cli", "dask_worker.py")
        if os.path.isfile(path):
            return path
    return None


def option_table() -> OptionTable:
    """The installed release's table; OSError/ValueError/subprocess errors when neither
    way works (distributed missing or broken)."""
    path = source_file()
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                return table_from_source(f.read())
        except (OSError, ValueError, SyntaxError, UnicodeDecodeError):
            pass
    return table_by_import()


# --- checking argv -----------------------------------------------------------------------


def check_argv(args: Sequence[str], table: OptionTable) -> None:
    """Raise WorkerArgsError where `dask worker`'s click parsing would fail (exit 2).

    The same walk click makes: an option that takes a value takes the next token
    whatever it looks like; `--` ends options; with ignore_unknown_options an unknown
    option becomes a positional argument. Positionals fill the arguments in order; what
    is left over goes to PRELOAD_ARGV, which dask accepts only with a --preload module
    (whose own click command we cannot judge without importing it). An option name in
    the SCHEDULER position is refused too: dask would try to connect to `--dryrun`.
    """
    positionals: list[tuple[str, bool]] = []  # (token, looked like an option)
    preload = False
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token == "--":
            positionals.extend((t, False) for t in args[i:])
            break
        if token in table.help_names:
            continue
        if not token.startswith("-") or token == "-":
            positionals.append((token, False))
            continue
        name, eq, inline = token.partition("=") if token.startswith("--") else (token, "", "")
        param = table.by_name.get(name)
        if param is None:
            if not table.ignore_unknown_options:
                raise WorkerArgsError(f"no such option: {name}")
            positionals.append((token, True))
            continue
        if param.is_flag:
            if eq:
                raise WorkerArgsError(f"option {name} does not take a value")
            continue
        if eq:
            value = inline
        elif i < len(args):
            value = args[i]
            i += 1
        else:
            raise WorkerArgsError(f"option {name} requires a value")
        _check_value(name, value, param)
        if param.name == "preload":
            preload = True
    rest = _fill_arguments(positionals, table)
    if rest and not preload:
        unknown = [t for t, looked in rest if looked or t.startswith("-")]
        if unknown:
            raise WorkerArgsError(f"no such option: {unknown[0].split('=')[0]}")
        raise WorkerArgsError(
            f"unexpected extra argument(s) {' '.join(t for t, _ in rest)!r} (the scheduler "
            f"address is given once; values for a module need --preload)"
        )


def _fill_arguments(
    positionals: list[tuple[str, bool]], table: OptionTable
) -> list[tuple[str, bool]]:
    """Positionals left over after the single-valued arguments took theirs."""
    rest = list(positionals)
    for param in table.params:
        if param.kind != "argument" or param.nargs < 0:
            continue
        for _ in range(param.nargs):
            if not rest:
                break
            token, looked = rest.pop(0)
            if looked:
                raise WorkerArgsError(f"no such option: {token.split('=')[0]}")
            if param.name == "scheduler" and not looks_like_address(token):
                raise WorkerArgsError(
                    f"{token!r} is not a scheduler address (HOST:PORT or "
                    "PROTOCOL://HOST:PORT); a worker command given first must be one of "
                    "`dask worker`, `dask-worker`, `dask cuda worker`, `dask-cuda-worker`"
                )
    return rest


def looks_like_address(text: str) -> bool:
    """`tcp://host:port`, `ucx://host:port`, `host:port`, `[::1]:port`: dask needs the
    port (without one it stops with "missing port number in address")."""
    scheme, sep, rest = text.partition("://")
    if sep:
        return bool(scheme) and bool(rest)
    host, colon, port = text.rpartition(":")
    return bool(colon and host and port.isdigit())


def _check_value(name: str, value: str, param: Param) -> None:
    if param.type == "integer":
        try:
            int(value)
        except ValueError:
            raise WorkerArgsError(f"{name}: {value!r} is not a valid integer") from None
    elif param.type == "float":
        try:
            float(value)
        except ValueError:
            raise WorkerArgsError(f"{name}: {value!r} is not a valid float") from None
    elif param.type == "existing_path" and not _path_exists(value):
        raise WorkerArgsError(f"{name}: path {value!r} does not exist")


def _path_exists(value: str) -> bool:
    # realpath as dask's click.Path(resolve_path=True) does: "" is the cwd there. A NUL
    # byte makes os.stat raise ValueError; no such path can exist.
    try:
        return os.path.exists(os.path.realpath(value))
    except ValueError:
        return False
