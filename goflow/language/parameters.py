"""Scalar ``mcp_tool`` parameters converted to the type the tool's input schema asks for.

GoFlow sends every argument as text (``level: 9`` arrives as ``"9"``); goflow keeps the
YAML type.  So that both kinds of server work, a top-level **scalar** argument whose type
the tool's JSON Schema does not accept is converted when the schema asks for a type it can
be read as -- and only then:

* a number or boolean where only ``string`` is accepted -> its text (``9`` -> ``"9"``,
  ``true`` -> ``"true"``);
* text where ``integer`` / ``number`` / ``boolean`` is accepted -> that value, when the
  text is one (``"40"`` -> ``40``, ``"2.5"`` -> ``2.5``, ``"true"`` -> ``true``).

Anything else (maps, lists, ``null``, text that is not a number, a property the schema does
not type) is passed as it is, and the schema check reports a real mismatch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from goflow.language.expr.text import to_text

__all__ = ["coerce_arguments"]

_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def _types(schema: Any) -> set[str]:
    """The JSON types a property schema accepts (``type``, or the ``anyOf``/``oneOf`` arms)."""
    if not isinstance(schema, Mapping):
        return set()
    declared = schema.get("type")
    types = {declared} if isinstance(declared, str) else {t for t in declared or () if isinstance(t, str)}
    for key in ("anyOf", "oneOf"):
        for arm in schema.get(key) or ():
            types |= _types(arm)
    return types


def _accepted(value: Any, types: set[str]) -> bool:
    if isinstance(value, bool):
        return "boolean" in types
    if isinstance(value, int):
        return bool(types & {"integer", "number"})
    if isinstance(value, float):
        return "number" in types or ("integer" in types and value.is_integer())
    if isinstance(value, str):
        return "string" in types
    return True  # not a scalar: never converted


def _convert(value: Any, types: set[str]) -> Any:
    if value is None or _accepted(value, types):
        return value
    if isinstance(value, str):
        text = value.strip()
        if "integer" in types and _INT_TEXT.fullmatch(text):
            return int(text)
        if "number" in types:
            if _INT_TEXT.fullmatch(text):
                return int(text)
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
        if "boolean" in types and text in ("true", "false"):
            return text == "true"
        return value
    if "string" in types:
        return to_text(value)
    return value


def coerce_arguments(input_schema: Any, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """``arguments`` with each top-level scalar converted as the module docstring says."""
    properties = input_schema.get("properties") if isinstance(input_schema, Mapping) else None
    if not isinstance(properties, Mapping):
        return dict(arguments)
    out = {}
    for key, value in arguments.items():
        types = _types(properties.get(key))
        out[key] = _convert(value, types) if types else value
    return out
