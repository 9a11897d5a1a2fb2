"""docs/audit-log.md documents exactly the events the code emits."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dask_safe_worker.event_line import SCHEMA_VERSION, STAMP_FIELDS

ROOT = Path(__file__).resolve().parent.parent
# audit("name", ...), Refused(code, message, event="name") and _exec(..., event="name").
EMIT = re.compile(
    r'(?<![\w])audit\(\s*"([a-z_.]+)"|audit,\s*"([a-z_.]+)",?\s*\)|event(?::\s*str)?\s*=\s*"([a-z_.]+)"'
)


def emitted() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "src/dask_safe_worker").rglob("*.py"):
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
        assert event["schema"] == SCHEMA_VERSION and event["event"] in documented()
        assert {"pid", "host", "start_id", "level", "timestamp"} <= event.keys()
        # The stamps close every line, in the order event_line writes them.
        stamps = [k for k in event if k in STAMP_FIELDS]
        assert stamps == [k for k in STAMP_FIELDS if k in event]
        assert list(event)[-len(stamps) :] == stamps


def test_routine_examples_carry_no_failure_words() -> None:
    # Launchers such as dask-jobqueue's local runner fail a worker on "error" in its output.
    text = (ROOT / "docs/audit-log.md").read_text()
    for block in re.findall(r"```json\n(.*?)\n```", text, flags=re.S):
        event = json.loads(block)
        if event["level"] == "info":
            assert "error" not in block.lower(), block


def test_schema_history_names_the_current_version() -> None:
    text = (ROOT / "docs/audit-log.md").read_text()
    assert f"now `{SCHEMA_VERSION}`" in text and f"`{SCHEMA_VERSION}`: " in text
