"""``${path}`` interpolation of workflow values (tool parameters, return values, ...).

Rules:

* :func:`interpolate` walks str / list / tuple / dict values deeply (dict **keys** are
  left untouched; tuples come back as lists; other values are returned as they are).
* A string that is *exactly* one reference -- ``"${x}"`` with nothing around it, not
  even whitespace -- becomes the referenced value **with its type** (int, dict, ...).
* Any other string renders each reference as text with :func:`~goflow.language.expr.to_text`:
  str as-is, ``None`` -> ``""``, bools -> ``true``/``false``, numbers as JSON numbers
  (``36.0`` stays ``"36.0"``), maps and lists as compact JSON.
* The inside of ``${...}`` is a path (see :mod:`goflow.language.expr.paths`): ``a.b``,
  ``items[0]``, ``m["odd key"]``; whitespace just inside the braces is ignored.
  Expressions are not allowed here (templates allow them).
* ``\\${`` produces a literal ``${``.  No other escapes exist; text without ``${`` is
  returned unchanged.
* Resolution is strict: a missing variable, key or index raises
  :class:`~goflow.errors.UndefinedVariableError` naming the path.
* Substitution happens once: a value that itself contains ``${...}`` is inserted
  verbatim and never re-interpreted.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from goflow.errors import ExpressionError
from goflow.language.expr.paths import parse_path, resolve_path, type_name
from goflow.language.expr.scanner import MAX_TEXT_LENGTH, scan
from goflow.language.expr.text import to_text

__all__ = ["interpolate", "interpolation_references", "check_interpolation", "render_text"]

_MAX_DEPTH = 200


@lru_cache(maxsize=2048)
def _compile(text: str) -> tuple[str | tuple[tuple, int], ...]:
    """Literal strings and (segments, position) pairs."""
    out: list[str | tuple[tuple, int]] = []
    for part in scan(text):
        if isinstance(part, str):
            out.append(part)
            continue
        content = part.content.strip()
        try:
            segs = parse_path(content)
        except ExpressionError as e:
            hint = ""
            if "(" in content or any(op in content for op in " +*/<>=!?"):
                hint = " (only variable paths are allowed here; use a template for expressions)"
            raise ExpressionError(
                f"invalid reference '${{{part.content}}}' at position {part.start}: "
                f"{e.message}{hint}", source=text, position=part.start) from None
        out.append((segs, part.start))
    return tuple(out)


def check_interpolation(text: str) -> None:
    """Raise ExpressionError if ``text`` has an unclosed ``${``, an empty ``${}`` or a bad path."""
    if not isinstance(text, str):
        raise ExpressionError(f"expected text, got {type_name(text)}")
    _compile(text)


def _render(text: str, parts, variables: Mapping[str, Any]) -> Any:
    if len(parts) == 1 and not isinstance(parts[0], str):
        segs, pos = parts[0]
        return resolve_path(variables, segs, source=text, position=pos)
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append(p)
        else:
            segs, pos = p
            out.append(to_text(resolve_path(variables, segs, source=text, position=pos)))
    return "".join(out)


def render_text(text: str, variables: Mapping[str, Any]) -> str:
    """Interpolate ``text`` and always return text (a lone ``${x}`` gives ``to_text(x)``)."""
    if not isinstance(text, str):
        raise ExpressionError(f"expected text, got {type_name(text)}")
    if "${" not in text:
        return text
    return to_text(_render(text, _compile(text), variables))


def interpolate(value: Any, variables: Mapping[str, Any], _depth: int = 0) -> Any:
    """Interpolate ``value`` deeply (see the module docstring for the rules)."""
    if _depth > _MAX_DEPTH:
        raise ExpressionError(f"value nested too deeply to interpolate (more than {_MAX_DEPTH} levels)")
    if isinstance(value, str):
        if "${" not in value:
            return value
        return _render(value, _compile(value), variables)
    if isinstance(value, Mapping):
        return {k: interpolate(v, variables, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [interpolate(v, variables, _depth + 1) for v in value]
    return value


def interpolation_references(value: Any) -> set[str]:
    """Root variable names referenced anywhere in ``value`` (deep; dict keys ignored).

    Raises ExpressionError on the first string (in order) that :func:`check_interpolation`
    refuses, so one walk both checks a value and lists its references.
    """
    names: set[str] = set()
    _collect_references(value, names, 0)
    return names


def _collect_references(value: Any, names: set[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ExpressionError(f"value nested too deeply (more than {_MAX_DEPTH} levels)")
    if isinstance(value, str):
        if "${" in value or len(value) > MAX_TEXT_LENGTH:  # other text has no references and is valid
            for p in _compile(value):
                if not isinstance(p, str):
                    names.add(p[0][0])
    elif type(value) in _SCALARS:  # the common leaves, before the slower Mapping check
        return
    elif isinstance(value, (list, tuple)):
        _collect_all(value, names, depth + 1)
    elif isinstance(value, Mapping):
        _collect_all(value.values(), names, depth + 1)


def _collect_all(values: Any, names: set[str], depth: int) -> None:
    for v in values:
        if type(v) not in _SCALARS or depth > _MAX_DEPTH:  # a scalar leaf needs no call (`args: [1, 2]`)
            _collect_references(v, names, depth)


_SCALARS = frozenset({int, float, bool, type(None)})
