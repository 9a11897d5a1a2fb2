"""Mirrors where `dask/config.py` (dask 2022.9.2 through 2026.8.0) may find the
`scheduler-address` key, which `dask worker` (`distributed/cli/dask_worker.py`) uses
when it is given neither an address nor `--scheduler-file`. Without any of the three it
raises ValueError ("Need to provide scheduler address like ...") with a traceback, exit 1.

dask reads its configuration from the YAML and JSON files in `DASK_ROOT_CONFIG` (default
/etc/dask), `<prefix>/etc/dask` for `sys.prefix` and each of `site.PREFIXES`,
`~/.config/dask` and `DASK_CONFIG`; then from the serialized `DASK_INTERNAL_INHERIT_CONFIG`
and every `DASK_*` variable (lower-cased, `__` for nesting, `-` and `_` alike, the value
read by `ast.literal_eval`, "none"/"null" as None). Parsing YAML would cost an import of
yaml on every start, so a file is read as text: one that names the key anywhere counts
as possibly setting it. The answer errs towards "configured": a start is refused only
when no source can hold an address.
"""

from __future__ import annotations

import ast
import base64
import binascii
import json
import os
from collections.abc import Iterable, Mapping

KEYS = ("scheduler-address", "scheduler_address")
_EXTENSIONS = (".json", ".yaml", ".yml")
# A config file larger than this is read only up to here: the key of a real file sits
# in its first lines, and no start should read a huge file.
_MAX_READ = 1 << 20


def config_paths(environ: Mapping[str, str], prefixes: Iterable[str], home: str) -> list[str]:
    """The files and directories dask reads its configuration from, in its order."""
    paths = [
        environ.get("DASK_ROOT_CONFIG", "/etc/dask"),
        *(os.path.join(prefix, "etc", "dask") for prefix in prefixes),
        os.path.join(home, ".config", "dask"),
    ]
    if "DASK_CONFIG" in environ:
        paths.append(environ["DASK_CONFIG"])
    return list(dict.fromkeys(paths))


def _interpret(value: str) -> object:
    """dask.config.interpret_value."""
    try:
        return ast.literal_eval(value)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        pass
    return {"none": None, "null": None, "false": False, "true": True}.get(value.lower(), value)


def _canonical(name: str) -> str:
    return name.replace("_", "-")


def in_environment(environ: Mapping[str, str]) -> bool:
    """Whether a `DASK_*` variable (or the inherited config) sets the key to a value."""
    key = _canonical(KEYS[0])
    inherited = environ.get("DASK_INTERNAL_INHERIT_CONFIG")
    if inherited is not None:
        try:
            data = json.loads(base64.urlsafe_b64decode(inherited.encode()).decode())
        except (ValueError, binascii.Error, UnicodeError):
            return True  # dask fails on it in its own way; not ours to judge
        if isinstance(data, dict) and any(
            _canonical(str(k)) == key and v is not None for k, v in data.items()
        ):
            return True
    return any(
        name.startswith("DASK_")
        and _canonical(name[5:].lower()) == key
        and _interpret(value) is not None
        for name, value in environ.items()
    )


def _config_files(path: str) -> list[str]:
    if os.path.isdir(path):
        try:
            names = sorted(os.listdir(path))
        except OSError:
            return []
        return [
            os.path.join(path, n) for n in names if os.path.splitext(n)[1].lower() in _EXTENSIONS
        ]
    return [path] if os.path.exists(path) else []


def in_files(paths: Iterable[str]) -> bool:
    """Whether a config file in `paths` may set the key (or cannot be read to tell)."""
    for path in paths:
        for name in _config_files(path):
            try:
                with open(name, "rb") as f:
                    text = f.read(_MAX_READ).decode("utf-8", "replace").lower()
            except OSError:
                return True
            if any(key in text for key in KEYS):
                return True
    return False


def scheduler_address_configured(
    environ: Mapping[str, str], prefixes: Iterable[str], home: str
) -> bool:
    """Whether dask's configuration may give `dask worker` a scheduler address."""
    return in_environment(environ) or in_files(config_paths(environ, prefixes, home))
