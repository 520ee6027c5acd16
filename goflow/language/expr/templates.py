"""Text templates (``template:`` on transform nodes).

A template is text with ``${...}`` placeholders (same scanning and ``\\${`` escape as
interpolation).  The inside of a placeholder is a full condition-language expression
(so a plain path like ``${user.name}``, ``${price * 2}`` and
``${if(count > 5, 'many', 'few')}`` all work), extended with the template helpers:

* ``upper(x)``, ``lower(x)``, ``capitalize(x)`` (first character), ``trim(x)`` --
  non-text arguments are rendered with ``to_text`` first
* ``length(x)`` -- string / list / map length; ``nil`` -> 0
* ``default(x, fallback)`` -- ``fallback`` when ``x`` is nil, ``""`` or an undefined
  variable
* ``join(list, sep=",")`` -- items rendered with ``to_text``
* ``formatNumber(num, precision)`` -- fixed decimals (``precision`` 0..20; both arguments
  are required, as in GoFlow)
* ``formatDate(value, layout)`` -- ``value``: datetime, RFC 3339 / ISO 8601 text, or
  epoch seconds (numbers above 1e11 are taken as milliseconds); ``layout``: a strftime
  format if it contains ``%``, otherwise a Go layout (``2006-01-02T15:04:05Z07:00``,
  ``Jan 2, 2006``, ``3:04PM`` ...); naive times are treated as UTC
* ``if(cond, a, b)`` -- ``cond`` must be a boolean; only the chosen branch is evaluated
* a placeholder that is just a path (``${step-1.result}``, ``${items[0]}``) is a
  reference, so hyphenated names work as in GoFlow; anything else is an expression
* plus every expression builtin (``len``, ``abs``, ``int``, ``string``, ``round``,
  ``map(xs, {# * 2})`` ...).

Each placeholder's value is rendered with ``to_text``; the result is always ``str``.
Missing variables raise UndefinedVariableError (strict; use ``default()`` for optional
values).  An unknown helper is an ExpressionError at compile time:
``unknown template function 'X'; known: ...``.
"""

from __future__ import annotations

import calendar
import re
import datetime as _dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from goflow.errors import ExpressionError, UndefinedVariableError
from goflow.language.expr.ast import Function, Node, Ref
from goflow.language.expr.builtins import EXPRESSION_FUNCTIONS
from goflow.language.expr.conditions import TypeCheck, evaluate_node
from goflow.language.expr.parser import KEYWORDS, parse_expression, root_names
from goflow.language.expr.semantics import is_num
from goflow.language.expr.paths import parse_path, type_name
from goflow.language.expr.scanner import scan
from goflow.language.expr.text import to_text

__all__ = ["Template", "compile_template", "render_template", "TEMPLATE_FUNCTIONS",
           "format_date"]


# --------------------------------------------------------------------------- helpers

def _text_fn(fn):
    return lambda x: fn(to_text(x))


def _capitalize(s: str) -> str:
    return s[:1].upper() + s[1:]


def _length(x):
    if x is None:
        return 0
    if isinstance(x, (str, list, tuple, Mapping)):
        return len(x)
    raise ExpressionError(f"needs a string, list or map, got {type_name(x)}")


def _join(items, sep=","):
    if not isinstance(items, (list, tuple)):
        raise ExpressionError(f"needs a list, got {type_name(items)}")
    if not isinstance(sep, str):
        raise ExpressionError(f"separator must be a string, got {type_name(sep)}")
    out = sep.join(to_text(i) for i in items)
    if len(out) > 1_000_000:
        raise ExpressionError("result too long")
    return out


def _format_number(num, precision):
    if isinstance(num, str):
        try:
            num = float(num.strip())
        except ValueError:
            raise ExpressionError(f"cannot format {num!r} as a number") from None
    if not is_num(num):
        raise ExpressionError(f"needs a number, got {type_name(num)}")
    if isinstance(precision, bool) or not isinstance(precision, int) or not 0 <= precision <= 20:
        raise ExpressionError("precision must be an integer between 0 and 20")
    if isinstance(num, int) and abs(num) >= 2 ** 53:
        return str(num) + ("." + "0" * precision if precision else "")
    return f"{float(num):.{precision}f}"


def _to_datetime(value: Any) -> _dt.datetime:
    if isinstance(value, _dt.datetime):
        return value
    if isinstance(value, _dt.date):
        return _dt.datetime(value.year, value.month, value.day)
    if is_num(value):
        secs = float(value)
        if abs(secs) > 1e11:
            secs /= 1000.0
        try:
            return _dt.datetime.fromtimestamp(secs, tz=_dt.timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise ExpressionError(f"timestamp {to_text(value)} is out of range") from None
    if isinstance(value, str):
        s = value.strip()
        try:
            return _to_datetime(float(s)) if s and s.lstrip("-").replace(".", "", 1).isdigit() \
                else _dt.datetime.fromisoformat(s)
        except ValueError:
            raise ExpressionError(f"cannot read {value!r} as a date/time (expected RFC 3339 / "
                                  "ISO 8601 text or epoch seconds)") from None
    raise ExpressionError(f"cannot read a date/time from {type_name(value)}")


_MONTHS = list(calendar.month_name)
_MONTHS_ABBR = list(calendar.month_abbr)
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _offset(d: _dt.datetime, colon: bool, z: bool, hours_only: bool = False) -> str:
    off = d.utcoffset() or _dt.timedelta(0)
    secs = int(off.total_seconds())
    if z and secs == 0:
        return "Z"
    sign = "+" if secs >= 0 else "-"
    secs = abs(secs)
    hh, mm = secs // 3600, (secs % 3600) // 60
    if hours_only:
        return f"{sign}{hh:02d}"
    return f"{sign}{hh:02d}:{mm:02d}" if colon else f"{sign}{hh:02d}{mm:02d}"


def _hour12(d):
    h = d.hour % 12
    return 12 if h == 0 else h


def _frac(d, digits, trim):
    s = f"{d.microsecond:06d}000"[:digits]
    if trim:
        s = s.rstrip("0")
        return "." + s if s else ""
    return "." + s


# Longest / most specific tokens first, as in Go's time package.
_GO_TOKENS: list[tuple[str, Any]] = [
    ("January", lambda d: _MONTHS[d.month]),
    ("Jan", lambda d: _MONTHS_ABBR[d.month]),
    ("Monday", lambda d: _DAYS[d.weekday()]),
    ("Mon", lambda d: _DAYS[d.weekday()][:3]),
    ("MST", lambda d: d.tzname() or "UTC"),
    ("2006", lambda d: f"{d.year:04d}"),
    ("Z07:00", lambda d: _offset(d, True, True)),
    ("Z0700", lambda d: _offset(d, False, True)),
    ("-07:00", lambda d: _offset(d, True, False)),
    ("-0700", lambda d: _offset(d, False, False)),
    ("-07", lambda d: _offset(d, False, False, True)),
    (".000000000", lambda d: _frac(d, 9, False)),
    (".000000", lambda d: _frac(d, 6, False)),
    (".000", lambda d: _frac(d, 3, False)),
    (".999999999", lambda d: _frac(d, 9, True)),
    (".999999", lambda d: _frac(d, 6, True)),
    (".999", lambda d: _frac(d, 3, True)),
    ("002", lambda d: f"{d.timetuple().tm_yday:03d}"),
    ("15", lambda d: f"{d.hour:02d}"),
    ("01", lambda d: f"{d.month:02d}"),
    ("02", lambda d: f"{d.day:02d}"),
    ("03", lambda d: f"{_hour12(d):02d}"),
    ("04", lambda d: f"{d.minute:02d}"),
    ("05", lambda d: f"{d.second:02d}"),
    ("06", lambda d: f"{d.year % 100:02d}"),
    ("_2", lambda d: f"{d.day:2d}"),
    ("PM", lambda d: "PM" if d.hour >= 12 else "AM"),
    ("pm", lambda d: "pm" if d.hour >= 12 else "am"),
    ("1", lambda d: str(d.month)),
    ("2", lambda d: str(d.day)),
    ("3", lambda d: str(_hour12(d))),
    ("4", lambda d: str(d.minute)),
    ("5", lambda d: str(d.second)),
]


def _go_format(d: _dt.datetime, layout: str) -> str:
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    out: list[str] = []
    i = 0
    while i < len(layout):
        for tok, fn in _GO_TOKENS:
            if layout.startswith(tok, i):
                out.append(fn(d))
                i += len(tok)
                break
        else:
            out.append(layout[i])
            i += 1
    return "".join(out)


def format_date(value: Any, layout: str = "2006-01-02T15:04:05Z07:00") -> str:
    """Format ``value`` with a Go layout or a strftime format (see the module docstring)."""
    if not isinstance(layout, str):
        raise ExpressionError(f"layout must be a string, got {type_name(layout)}")
    if len(layout) > 200:
        raise ExpressionError("layout too long (limit 200 characters)")
    d = _to_datetime(value)
    if "%" in layout:
        try:
            return d.strftime(layout)
        except ValueError as e:
            raise ExpressionError(f"invalid strftime layout {layout!r}: {e}") from None
    return _go_format(d, layout)


def _default(ctx, args, pos):
    try:
        v = args[0].ev(ctx)
    except UndefinedVariableError:
        v = None
    return args[1].ev(ctx) if v is None or v == "" else v


def _if(ctx, args, pos):
    c = args[0].ev(ctx)
    if not isinstance(c, bool):
        raise ExpressionError(f"if(): the condition must be a boolean, got {type_name(c)}",
                              source=ctx.source, position=pos)
    return args[1].ev(ctx) if c else args[2].ev(ctx)


TEMPLATE_FUNCTIONS: dict[str, Function] = {**EXPRESSION_FUNCTIONS, **{f.name: f for f in [
    Function("upper", 1, 1, _text_fn(str.upper)),
    Function("lower", 1, 1, _text_fn(str.lower)),
    Function("capitalize", 1, 1, _text_fn(_capitalize)),
    Function("trim", 1, 1, _text_fn(str.strip)),
    Function("length", 1, 1, _length),
    Function("default", 2, 2, _default, lazy=True),
    Function("join", 1, 2, _join),
    Function("formatNumber", 2, 2, _format_number),
    Function("formatDate", 1, 2, format_date),
    Function("if", 3, 3, _if, lazy=True),
]}}


# --------------------------------------------------------------------------- templates

@dataclass(frozen=True, eq=False)
class Template:
    """A compiled template.  ``names``: root variable names read by its placeholders."""
    source: str
    names: frozenset[str]
    _parts: tuple = field(repr=False)   # literal text, or (node, its TypeCheck)

    def render(self, variables: Mapping[str, Any]) -> str:
        out: list[str] = []
        total = 0
        for part in self._parts:
            s = part if isinstance(part, str) else to_text(evaluate_node(part[0], variables,
                                                                         self.source, part[1]))
            total += len(s)
            if total > 1_000_000:
                raise ExpressionError("template result too long (limit 1 000 000 characters)",
                                      source=self.source)
            out.append(s)
        return "".join(out)


def _path_node(content: str, pos: int) -> Node | None:
    """A plain path (``a.b``, ``step-1.out``) is a reference, as in GoFlow templates."""
    content = content.strip()
    if not _PATHLIKE.fullmatch(content):
        return None
    try:
        segs = parse_path(content)
    except ExpressionError:
        return None
    if segs[0] in KEYWORDS:
        return None
    return Ref(segs, pos)


_PATHLIKE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_][A-Za-z0-9_\-]*|\[[^\]]*\])*")


def compile_template(text: str) -> Template:
    """Compile ``text``; ExpressionError (with position in ``text``) on bad syntax."""
    if not isinstance(text, str):
        raise ExpressionError(f"a template must be text, got {type_name(text)}")
    return _compile_cached(text)


@lru_cache(maxsize=1024)
def _compile_cached(text: str) -> Template:
    parts: list[str | Node] = []
    names: set[str] = set()
    for p in scan(text):
        if isinstance(p, str):
            parts.append(p)
            continue
        node = _path_node(p.content, p.start)
        if node is None:
            node = parse_expression(p.content, TEMPLATE_FUNCTIONS, base=p.inner, source=text,
                                    kind="template function")
        names |= root_names(node)
        parts.append((node, TypeCheck(node)))
    return Template(text, frozenset(names), tuple(parts))


def render_template(text: str, variables: Mapping[str, Any]) -> str:
    """Compile (cached) and render ``text``."""
    return compile_template(text).render(variables)
