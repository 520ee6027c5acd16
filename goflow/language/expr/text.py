"""Turning values into text: :func:`to_text` (and :func:`to_jsonable`).

Rules (never Python ``repr``):

* ``str``            -> as-is
* ``None``           -> ``""`` (like GoFlow's engine interpolation)
* ``bool``           -> ``"true"`` / ``"false"``
* ``int``            -> decimal digits (``36``)
* ``float``          -> JSON number text (``36.0`` -> ``"36.0"``, ``1e+20`` -> ``"1e+20"``;
  NaN / infinities -> ``"NaN"`` / ``"Infinity"`` / ``"-Infinity"``)
* ``dict`` / ``list`` / ``tuple`` -> compact JSON (``{"a":1}``, ``[1,2]``), non-ASCII kept
* ``datetime`` / ``date`` -> ISO 8601; ``bytes`` -> UTF-8 text; sets -> JSON list;
  anything else -> ``str(value)``
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping, Set
from decimal import Decimal
from typing import Any

__all__ = ["to_text", "to_jsonable", "float_text"]


def float_text(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return json.dumps(value)


def to_jsonable(value: Any, _depth: int = 0) -> Any:
    """A JSON-serialisable copy of ``value`` (dict keys become text)."""
    if _depth > 200:
        raise ValueError("value nested too deeply to convert to JSON")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {(k if isinstance(k, str) else to_text(k)): to_jsonable(v, _depth + 1)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, _depth + 1) for v in value]
    if isinstance(value, Set):
        items = [to_jsonable(v, _depth + 1) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def to_text(value: Any) -> str:
    """Render ``value`` as text (see the module docstring for the rules)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return float_text(value)
    if isinstance(value, (Mapping, list, tuple, Set)):
        return json.dumps(to_jsonable(value), separators=(",", ":"), ensure_ascii=False)
    j = to_jsonable(value)
    return j if isinstance(j, str) else to_text(j)
