"""Splitting text into literal pieces and ``${...}`` placeholders.

The one ``${...}`` scanner: interpolation, templates and the expression lexer all use it.
Rules:

* ``${`` opens a placeholder; it ends at the matching ``}``.  Quotes inside the
  placeholder (``'``, ``"`` and backticks) are respected (``${a["}"]}`` works) and nested
  ``{...}`` are balanced (``${map(xs, {# * 2})}``).
* ``\\${`` is an escape: it produces a literal ``${`` and opens nothing.  A backslash
  anywhere else (including ``\\$`` not followed by ``{``) is kept as-is, so text that
  contains no ``${`` is never changed.
* An unclosed ``${`` or an empty ``${}`` is an ExpressionError with its position.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from goflow.errors import ExpressionError

__all__ = ["Placeholder", "scan", "placeholder_end", "MAX_TEXT_LENGTH"]

MAX_TEXT_LENGTH = 1_000_000


@dataclass(frozen=True, slots=True)
class Placeholder:
    content: str   # text between '${' and '}'
    start: int     # index of '$'
    inner: int     # index of the first content character
    end: int       # index just after '}'


def placeholder_end(text: str, i: int) -> int:
    """Index of the ``}`` closing a ``${`` whose content starts at ``text[i]``; -1 if none."""
    depth = 0
    quote = None
    n = len(text)
    while i < n:
        c = text[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "'\"`":
            quote = c
        elif c == "{":
            depth += 1
        elif c == "}":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    return -1


@lru_cache(maxsize=2048)
def scan(text: str) -> tuple[str | Placeholder, ...]:
    """Split ``text`` into literal strings and :class:`Placeholder` objects."""
    if len(text) > MAX_TEXT_LENGTH:
        raise ExpressionError(f"text too long ({len(text)} characters; limit {MAX_TEXT_LENGTH})",
                              source=text[:200], position=0)
    parts: list[str | Placeholder] = []
    buf: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        j = text.find("${", i)
        if j < 0:
            buf.append(text[i:])
            break
        if j > 0 and text[j - 1] == "\\":
            buf.append(text[i:j - 1])
            buf.append("${")
            i = j + 2
            continue
        buf.append(text[i:j])
        end = placeholder_end(text, j + 2)
        if end < 0:
            raise ExpressionError(f"unclosed '${{' at position {j}", source=text, position=j)
        content = text[j + 2:end]
        if not content.strip():
            raise ExpressionError(f"empty reference '${{}}' at position {j}", source=text,
                                  position=j)
        if buf:
            lit = "".join(buf)
            if lit:
                parts.append(lit)
            buf = []
        parts.append(Placeholder(content, j, j + 2, end + 1))
        i = end + 1
    lit = "".join(buf)
    if lit:
        parts.append(lit)
    return tuple(parts)
