"""Durations as workflows write them: ``500ms``, ``30s``, ``2m``, ``1h30m``, or a number of seconds."""

from __future__ import annotations

import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")


def parse_duration(value: str | int | float) -> float:
    """Seconds in ``value``. Raises ValueError with an example of the accepted forms."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: use a number of seconds or text like '500ms', '30s', '2m'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"invalid duration {value!r}: must not be negative")
        return float(value)
    text = str(value).strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    position, total = 0, 0.0
    for match in _PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(text) or not text:
        raise ValueError(f"invalid duration {value!r}: use a number of seconds or text like '500ms', '30s', '2m', '1h30m'")
    return total
