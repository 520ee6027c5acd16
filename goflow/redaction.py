"""Secret masking: the one policy for keeping secret values out of everything goflow shows.

A workflow's ``secret: true`` variables are masked by name (their own value) and by value
(their text wherever it appears inside another value: a tool's echo, an error message, a
log line). A structured secret (an object or a list) is masked by its JSON text and by each
of its scalar leaves, since nodes use its fields one by one (``${creds.password}``). A
secret text cut short and marked with ``...`` (jq and most error messages shorten long
values so) is masked too. Executions keep raw values internally, because nodes need them; everything that
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


TRUNCATION = "..."


def _texts_of(value: Any, texts: set[str], depth: int = 0) -> None:
    """Add ``value``'s text and, for an object or a list, its scalar leaves' texts (not its keys)."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
    if len(text) >= MIN_SECRET_TEXT:
        texts.add(text)
    if depth < MAX_DEPTH and isinstance(value, (dict, list)):
        for item in value.values() if isinstance(value, dict) else value:
            _texts_of(item, texts, depth + 1)


def secret_texts(values: Iterable[Any]) -> tuple[str, ...]:
    """The texts to mask wherever they appear, longest first, from secret variables' values."""
    texts: set[str] = set()
    for value in values:
        if value is not None and not isinstance(value, bool):
            _texts_of(value, texts)
    return tuple(sorted(texts, key=len, reverse=True))


def _redact_truncated(value: str, texts: tuple[str, ...]) -> str:
    """Mask each ``PREFIX...`` where PREFIX is the start of a secret text, at least
    MIN_SECRET_TEXT long (``"ghp_S3CRETabcdefghijklmn..."`` from jq's error messages)."""
    out, start = [], 0
    at = value.find(TRUNCATION)
    while at != -1:
        cut = 0
        for text in texts:
            longest = min(len(text) - 1, at - start)
            cut = next((k for k in range(longest, MIN_SECRET_TEXT - 1, -1) if value.endswith(text[:k], start, at)), 0)
            if cut:
                break
        if cut:
            out.append(value[start:at - cut] + SECRET_MASK)
            start = at + len(TRUNCATION)
        at = value.find(TRUNCATION, at + len(TRUNCATION))
    return "".join(out) + value[start:] if out else value


def redact_secret_text(value: Any, texts: tuple[str, ...], _depth: int = 0) -> Any:
    """``value`` with every occurrence of a secret text, whole or cut short before ``...``,
    replaced by ``***`` (deep, bounded depth)."""
    if not texts:
        return value
    if isinstance(value, str):
        for text in texts:
            if text in value:
                value = value.replace(text, SECRET_MASK)
        return _redact_truncated(value, texts) if TRUNCATION in value else value
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
