"""Every event type's ``meta`` is declared once (goflow/events/meta.py) and documented."""

from __future__ import annotations

import re

from goflow.errors import ErrorKind
from goflow.events.meta import CONTEXT_FIELDS, META_FIELDS, undeclared
from goflow.events.types import EVENT_TYPES

from tests.conftest import REPO_ROOT


def _doc_rows() -> dict[str, str]:
    """docs/events.md's event-type table: type -> the text of its row."""
    rows = {}
    for line in (REPO_ROOT / "docs" / "events.md").read_text().splitlines():
        match = re.match(r"\| `([a-z.]+)`(?: / `([a-z.]+)`)? \|", line)
        if match:
            for name in filter(None, match.groups()):
                rows[name] = line
    return rows


def test_every_type_is_declared():
    assert set(META_FIELDS) == set(EVENT_TYPES)


def test_every_declared_field_is_documented_in_its_row():
    rows = _doc_rows()
    missing = {t: sorted(f for f in fields if f"`{f}`" not in rows.get(t, "")) for t, fields in META_FIELDS.items()}
    assert {t: f for t, f in missing.items() if f} == {}


def test_context_fields_are_documented():
    text = (REPO_ROOT / "docs" / "events.md").read_text()
    assert all(f"`{field}`" in text for field in CONTEXT_FIELDS)


def test_undeclared_keys_are_found():
    assert undeclared("node.skipped", {"reason": "x", "index": 1}) == set()
    assert undeclared("node.skipped", {"reason": "x", "surprise": 1}) == {"surprise"}


def test_every_error_kind_is_documented():
    text = (REPO_ROOT / "docs" / "events.md").read_text()
    table = text[text.index("**Errors.**"):text.index("`meta` is type-specific")]
    assert [kind.value for kind in ErrorKind if f"`{kind.value}`" not in table] == []
