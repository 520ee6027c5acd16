"""Variable references in fields that name a value: transform ``input`` and loop ``collection``.

Both GoFlow dialects are accepted: a bare path (``items``, ``data.orders[0]``) and one
``${...}`` reference (``"${items}"``).
"""

from __future__ import annotations

from typing import Any, Mapping

from goflow.errors import ExpressionError
from goflow.language.expr.paths import parse_path, resolve_path


def _path_text(text: str) -> str:
    stripped = text.strip()
    if stripped.startswith("${") and stripped.endswith("}"):
        stripped = stripped[2:-1].strip()
    if stripped.startswith("$."):
        stripped = stripped[2:]
    if not stripped:
        raise ExpressionError(f"empty reference {text!r}; name a variable, e.g. 'items' or '${{items}}'", source=text)
    return stripped


def reference_root(text: str) -> str:
    """The variable name at the root of reference ``text`` (ExpressionError if malformed)."""
    return str(parse_path(_path_text(text))[0])


def resolve_reference(text: str, variables: Mapping[str, Any]) -> Any:
    """The value ``text`` refers to (UndefinedVariableError naming what is missing)."""
    return resolve_path(variables, _path_text(text))
