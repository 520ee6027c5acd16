"""Secret masking: the one policy for keeping secret values out of everything goflow shows.

A workflow's ``secret: true`` variables are masked by name (their own value) and by value
(their text wherever it appears inside another value: a tool's echo, an error message, a
log line). Executions keep raw values internally, because nodes need them; everything that
leaves an execution (events, control replies, results, records, history, logs) passes
through its :class:`Redactor`.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

SECRET_MASK = "***"
MIN_SECRET_TEXT = 4
"""Shorter secret texts are masked by name only: masking ``"ab"`` everywhere would garble text."""
MAX_DEPTH = 32


def secret_texts(values: Iterable[Any]) -> tuple[str, ...]:
    """The texts to mask wherever they appear, longest first, from secret variables' values."""
    texts = set()
    for value in values:
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
        if len(text) >= MIN_SECRET_TEXT:
            texts.add(text)
    return tuple(sorted(texts, key=len, reverse=True))


def redact_secret_text(value: Any, texts: tuple[str, ...], _depth: int = 0) -> Any:
    """``value`` with every occurrence of a secret text replaced by ``***`` (deep, bounded depth)."""
    if not texts:
        return value
    if isinstance(value, str):
        for text in texts:
            if text in value:
                value = value.replace(text, SECRET_MASK)
        return value
    if _depth > MAX_DEPTH:
        return value
    if isinstance(value, list):
        return [redact_secret_text(item, texts, _depth + 1) for item in value]
    if isinstance(value, dict):
        return {key: redact_secret_text(item, texts, _depth + 1) for key, item in value.items()}
    if isinstance(value, (int, float)) and not isinstance(value, bool) and str(value) in texts:
        return SECRET_MASK
    return value


class Redactor:
    """Masks one execution's secrets: ``names`` by name, their ``values`` by text."""

    __slots__ = ("names", "texts")

    def __init__(self, names: Iterable[str] = (), values: Iterable[Any] = ()):
        self.names = frozenset(names)
        self.texts = secret_texts(values)

    def __bool__(self) -> bool:
        return bool(self.names or self.texts)

    def value(self, value: Any) -> Any:
        """``value`` with every secret text masked."""
        if not self.texts or value is None or isinstance(value, bool):
            return value
        return redact_secret_text(value, self.texts)

    def variables(self, variables: dict[str, Any]) -> dict[str, Any]:
        """A variables mapping as it may be shown: secret names masked, secret texts masked."""
        if not self:
            return dict(variables)
        return {name: SECRET_MASK if name in self.names else self.value(value)
                for name, value in variables.items()}
