"""Variable paths: ``orders[0].items[1].sku``.

A path starts with a variable name (the *root*) and continues with any number of
segments:

* ``.key``      -- a key of a map (``key`` is letters, digits, ``_`` and ``-``)
* ``[3]``       -- an index into a list (negative indexes count from the end)
* ``["key"]`` / ``['key']`` -- a map key written as a string (any characters)

:func:`parse_path` turns the text into a tuple ``(root, seg, ...)`` where each
``seg`` is a ``str`` (map key) or an ``int`` (list index).  :func:`resolve_path`
looks a path up **strictly**: anything missing raises
:class:`~goflow.errors.UndefinedVariableError` whose message names the full path and
says what was missing.  The error's ``name`` is the root variable name when the root
itself is missing, otherwise the path prefix that could not be resolved (e.g.
``"a.b"``).

Lookups only ever use mapping keys and sequence indexes, never Python attributes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from goflow.errors import ExpressionError, UndefinedVariableError

__all__ = ["parse_path", "resolve_path", "format_path", "type_name", "MAX_PATH_LENGTH"]

MAX_PATH_LENGTH = 2000

_ROOT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
_INT_RE = re.compile(r"-?[0-9]+")

Segment = str | int


def type_name(value: Any) -> str:
    """A user-facing (JSON-ish) name for the type of ``value``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "map"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def _read_quoted(text: str, i: int) -> tuple[str, int]:
    """Read a '..' or ".." string starting at ``text[i]``; return (value, index after)."""
    quote = text[i]
    out: list[str] = []
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == "\\" and j + 1 < len(text):
            nxt = text[j + 1]
            out.append({"n": "\n", "t": "\t", "r": "\r"}.get(nxt, nxt))
            j += 2
            continue
        if c == quote:
            return "".join(out), j + 1
        out.append(c)
        j += 1
    raise ExpressionError(f"unterminated string in path {text!r}", source=text, position=i)


@lru_cache(maxsize=4096)
def parse_path(text: str) -> tuple[Segment, ...]:
    """Parse ``text`` into ``(root, segment, ...)``; raise ExpressionError on bad syntax."""
    if not isinstance(text, str):
        raise ExpressionError(f"a path must be text, got {type_name(text)}")
    if len(text) > MAX_PATH_LENGTH:
        raise ExpressionError(f"path is too long ({len(text)} characters, limit {MAX_PATH_LENGTH})",
                              source=text[:100], position=0)
    m = _ROOT_RE.match(text)
    if not m:
        raise ExpressionError(
            f"invalid path {text!r}: it must start with a variable name", source=text, position=0)
    segs: list[Segment] = [m.group()]
    i = m.end()
    n = len(text)
    while i < n:
        c = text[i]
        if c == ".":
            km = _KEY_RE.match(text, i + 1)
            if not km:
                raise ExpressionError(f"invalid path {text!r}: expected a key after '.'",
                                      source=text, position=i + 1)
            segs.append(km.group())
            i = km.end()
        elif c == "[":
            j = i + 1
            if j < n and text[j] in "'\"":
                key, j = _read_quoted(text, j)
                segs.append(key)
            else:
                im = _INT_RE.match(text, j)
                if not im:
                    raise ExpressionError(
                        f"invalid path {text!r}: expected a number or a quoted key inside []",
                        source=text, position=j)
                segs.append(int(im.group()))
                j = im.end()
            if j >= n or text[j] != "]":
                raise ExpressionError(f"invalid path {text!r}: expected ']'", source=text, position=j)
            i = j + 1
        else:
            raise ExpressionError(f"invalid path {text!r}: unexpected {c!r}", source=text, position=i)
    return tuple(segs)


def format_path(segments: Sequence[Segment]) -> str:
    """The canonical text of a parsed path (inverse of :func:`parse_path`)."""
    out = [str(segments[0])] if segments else []
    for seg in segments[1:]:
        if isinstance(seg, int):
            out.append(f"[{seg}]")
        elif _KEY_RE.fullmatch(seg):
            out.append(f".{seg}")
        else:
            escaped = seg.replace("\\", "\\\\").replace('"', '\\"')
            out.append(f'["{escaped}"]')
    return "".join(out)


def resolve_path(variables: Mapping[str, Any], path: str | Sequence[Segment], *,
                 source: str | None = None, position: int | None = None) -> Any:
    """Look ``path`` up in ``variables`` strictly (see the module docstring)."""
    segs = parse_path(path) if isinstance(path, str) else tuple(path)
    full = format_path(segs)
    root = segs[0]
    if not isinstance(root, str) or root not in variables:
        raise UndefinedVariableError(str(root), source=source, position=position,
                                     detail=f"undefined variable '{root}'")
    value = variables[root]
    for k in range(1, len(segs)):
        seg = segs[k]
        parent = format_path(segs[:k])
        here = format_path(segs[: k + 1])
        if isinstance(value, Mapping):
            key = seg if isinstance(seg, str) else str(seg)
            if key not in value:
                raise UndefinedVariableError(
                    here, source=source, position=position,
                    detail=f"'{full}' not found: '{parent}' has no key '{key}'")
            value = value[key]
        elif isinstance(value, (list, tuple)):
            idx = seg
            if isinstance(idx, str):
                if not _INT_RE.fullmatch(idx):
                    raise UndefinedVariableError(
                        here, source=source, position=position,
                        detail=f"'{full}' not found: '{parent}' is a list, not a map "
                               f"(cannot look up key '{idx}')")
                idx = int(idx)
            if not -len(value) <= idx < len(value):
                raise UndefinedVariableError(
                    here, source=source, position=position,
                    detail=f"'{here}' is out of range ({parent} has {len(value)} items)"
                           + ("" if here == full else f" while resolving '{full}'"))
            value = value[idx]
        else:
            raise UndefinedVariableError(
                here, source=source, position=position,
                detail=f"'{full}' not found: '{parent}' is {type_name(value)}, not a map or list")
    return value
