"""docs/audit-log.md documents exactly the events the code emits."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# audit("name", ...), cli._fail(code, message, audit, "name") and exec_worker(..., event="name").
EMIT = re.compile(
    r'(?<![\w])audit\(\s*"([a-z_.]+)"|audit,\s*"([a-z_.]+)",?\s*\)|event(?::\s*str)?\s*=\s*"([a-z_.]+)"'
)


def emitted() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "src/dask_safe_worker").glob("*.py"):
        if path.name.startswith("audit_"):
            continue
        for match in EMIT.finditer(path.read_text()):
            names.update(g for g in match.groups() if g)
    return names


def documented() -> set[str]:
    text = (ROOT / "docs/audit-log.md").read_text()
    return set(re.findall(r"^### `([a-z_.]+)`$", text, flags=re.M))


def test_every_emitted_event_is_documented() -> None:
    assert emitted() - documented() == set()


def test_every_documented_event_is_emitted() -> None:
    assert documented() - emitted() == set()


def test_examples_are_json_with_the_common_fields() -> None:
    text = (ROOT / "docs/audit-log.md").read_text()
    blocks = re.findall(r"```json\n(.*?)\n```", text, flags=re.S)
    assert len(blocks) >= 20
    for block in blocks:
        event = json.loads(block)
        assert event["schema"] == 1 and event["event"] in documented()
        assert {"pid", "level", "timestamp"} <= event.keys()
