"""What the expression operators mean: expr-lang v1.17's semantics, as GoFlow evaluates them.

One place for every operator rule (the AST in :mod:`~goflow.language.expr.ast` only
dispatches here):

* **Static types**: literals, variables, and results of operators and typed builtins have
  a *known* type; a value read out of a map or list has none.  As expr-lang's type checker
  does before evaluating anything, an operator between known types it cannot take is an
  error even where it would not be evaluated: ``"5" == 5``, ``count == "5"``,
  ``true == 1``, ``n && true``, ``s - 1``.  ``user.age == "5"`` is simply ``false``.
* **Equality** ``==`` / ``!=``: ints and floats compare numerically; ``true`` never equals
  ``1``; ``nil`` compares with anything.
* **Ordering** ``< <= > >=``: two numbers or two strings; anything else is an error.
* **Member access and indexing**: a missing map key gives ``nil``; an index out of range,
  a non-integer list index, a non-string map key, indexing a string (slice it instead)
  or accessing anything on ``nil`` / a number / a bool is an error.  ``a?.b`` gives
  ``nil`` when ``a`` is ``nil`` (and ends the chain there).  Only map keys and list
  indexes are ever used, never Python attributes.
* **Arithmetic**: ``+`` adds numbers, concatenates strings and (goflow's extension)
  lists; ``/`` is true division; ``%`` needs ints and takes the sign of the dividend;
  division by zero is an error.
* ``a in b``: element of a list, key of a map, (goflow's extension) substring of a
  string; ``contains`` is the reverse.  ``matches`` is an RE2 search (Go's regular
  expression syntax, linear time), so no pattern can backtrack catastrophically.
* ``**`` gives a float, as do ``/``, ``round``, ``ceil`` and ``floor``.
* Limits: integer size (<= 4096 bits), strings (<= 1 000 000
  characters), lists (<= 100 000 items), regex pattern (<= 1000) and input (<= 100 000).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import re2

from goflow.errors import ExpressionError
from goflow.language.expr.paths import type_name
from goflow.language.expr.text import to_text

__all__ = ["Ctx", "is_num", "truthy_required", "member", "slice_value", "equal",
           "check_operands", "kind_of", "binary", "power", "contains", "compile_regex",
           "MAX_STRING", "MAX_LIST"]

MAX_INT_BITS = 4096
MAX_STRING = 1_000_000
MAX_LIST = 100_000
MAX_REGEX_PATTERN = 1000
MAX_REGEX_INPUT = 100_000


class Ctx:
    """One evaluation: the variables, the source text (for errors) and the closure scopes.

    ``scopes`` holds one ``[item, index, acc]`` list per enclosing closure (``#``,
    ``#index``, ``#acc``), innermost last.
    """
    __slots__ = ("variables", "source", "scopes")

    def __init__(self, variables: Mapping[str, Any], source: str):
        self.variables = variables
        self.source = source
        self.scopes: list[list[Any]] = []

    def err(self, msg: str, pos: int | None) -> ExpressionError:
        return ExpressionError(msg, source=self.source, position=pos)


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def truthy_required(ctx: Ctx, v: Any, op: str, pos: int) -> bool:
    if isinstance(v, bool):
        return v
    raise ctx.err(f"operator '{op}' needs a boolean, got {type_name(v)}", pos)


# --------------------------------------------------------------------------- access

def member(ctx: Ctx, obj: Any, key: Any, pos: int) -> Any:
    """``obj.key`` / ``obj[key]`` (see the module docstring)."""
    if isinstance(obj, Mapping):
        if not isinstance(key, str):
            raise ctx.err(f"cannot use {type_name(key)} to get an element from a map "
                          "(map keys are strings)", pos)
        return obj.get(key)
    if isinstance(obj, (list, tuple)):
        if isinstance(key, bool) or not isinstance(key, int):
            raise ctx.err(f"list elements can only be selected with an integer (got "
                          f"{type_name(key)}{f' {key!r}' if isinstance(key, str) else ''})", pos)
        if -len(obj) <= key < len(obj):
            return obj[key]
        raise ctx.err(f"index out of range: {key} (list length is {len(obj)})", pos)
    if obj is None:
        raise ctx.err(f"cannot fetch {to_text(key)!r} from nil (use '?.' for an optional "
                      "value)", pos)
    if isinstance(obj, str) and isinstance(key, int) and not isinstance(key, bool):
        raise ctx.err("cannot index a string (slice it instead: s[0:1])", pos)
    raise ctx.err(f"cannot fetch {to_text(key)!r} from a {type_name(obj)} value", pos)


def slice_value(ctx: Ctx, obj: Any, lo: Any, hi: Any, pos: int) -> Any:
    for bound in (lo, hi):
        if bound is not None and (not isinstance(bound, int) or isinstance(bound, bool)):
            raise ctx.err(f"slice bounds must be integers, got {type_name(bound)}", pos)
    if isinstance(obj, str):
        return obj[lo:hi]
    if isinstance(obj, (list, tuple)):
        return list(obj[lo:hi])
    raise ctx.err(f"cannot slice {type_name(obj)}", pos)


# --------------------------------------------------------------------------- equality

def kind_of(value: Any) -> str | None:
    """The static type expr-lang gives a value of this kind; ``None`` = no static type."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if is_num(value):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "map"
    if isinstance(value, (list, tuple)):
        return "list"
    return None


_COMPARISONS = {"<", "<=", ">", ">="}
_NUMERIC = {"-", "*", "/", "%", "**"}  # '**' is checked by the Power node
_TEXT = {"startsWith", "endsWith", "matches"}
_BOOLEAN_RESULT = {"==", "!=", "&&", "||", "in", "not in", "contains"} | _COMPARISONS | _TEXT


def _operands_fit(op: str, ka: str | None, kb: str | None) -> bool:
    known = {k for k in (ka, kb) if k is not None}
    if op in ("==", "!="):
        return len(known) < 2 or ka == kb
    if op in ("&&", "||"):
        return known <= {"bool"}
    if op in _NUMERIC:
        return known <= {"number"}
    if op in _COMPARISONS:
        return known <= {"number"} or known <= {"string"}
    if op == "+":  # lists too: goflow's extension
        return known <= {"number"} or known <= {"string"} or known <= {"list"}
    if op in _TEXT:
        return known <= {"string"}
    if op in ("in", "not in"):  # a substring test on strings: goflow's extension
        return kb is None or kb in ("list", "map", "string")
    if op == "contains":  # membership in lists and maps: goflow's extension
        return ka in (None, "list", "map") or (ka == "string" and kb in (None, "string"))
    return True


def check_operands(ctx: Ctx | None, op: str, ka: str | None, kb: str | None, pos: int,
                   source: str | None = None) -> str | None:
    """Refuse an operator between known types it cannot take, as expr-lang's type checker
    does before evaluating anything (so a branch that is never evaluated is checked too).

    Returns the static type of the result (``None`` when unknown).
    """
    if not _operands_fit(op, ka, kb):
        msg = (f"invalid operation: '{op}' (mismatched types {ka or 'any'} and {kb or 'any'})"
               + ("; convert one side with string(), int() or float()" if op in ("==", "!=")
                  else ""))
        raise (ctx.err(msg, pos) if ctx is not None
               else ExpressionError(msg, source=source, position=pos))
    if op in _BOOLEAN_RESULT:
        return "bool"
    if op in _NUMERIC or (op == "+" and "number" in (ka, kb)):
        return "number"
    if op == "+":
        return ka or kb
    return None


def equal(a: Any, b: Any, depth: int = 0) -> bool:
    if depth > 200:
        return False
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if is_num(a) and is_num(b):
        return a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(equal(a[k], b[k], depth + 1) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y, depth + 1) for x, y in zip(a, b))
    if type(a) is not type(b) and not (isinstance(a, str) and isinstance(b, str)):
        return False
    return a == b


# --------------------------------------------------------------------------- arithmetic

def check_int(ctx: Ctx, v: Any, pos: int) -> Any:
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > MAX_INT_BITS:
        raise ctx.err(f"integer result too large (more than {MAX_INT_BITS} bits)", pos)
    return v


def power(ctx: Ctx, a: Any, b: Any, pos: int) -> float:
    """``a ** b`` (and ``a ^ b``): a float, as in expr-lang."""
    if not (is_num(a) and is_num(b)):
        raise ctx.err(f"operator '**' needs numbers, got {type_name(a)} and {type_name(b)}", pos)
    try:
        r = float(a) ** float(b)
    except ZeroDivisionError:
        raise ctx.err("zero cannot be raised to a negative power", pos) from None
    except OverflowError:
        raise ctx.err("numeric overflow in '**'", pos) from None
    if isinstance(r, complex):
        raise ctx.err("negative number raised to a fractional power", pos)
    return r


def binary(ctx: Ctx, op: str, a: Any, b: Any, pos: int) -> Any:
    """Every binary operator except the short-circuiting ``&& || ??``."""
    if op == "==":
        return equal(a, b)
    if op == "!=":
        return not equal(a, b)
    if op in ("<", "<=", ">", ">="):
        if (is_num(a) and is_num(b)) or (isinstance(a, str) and isinstance(b, str)):
            return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
        raise ctx.err(f"cannot compare {type_name(a)} and {type_name(b)} with '{op}'", pos)
    if op in ("in", "not in"):
        r = contains(ctx, b, a, op, pos)
        return r if op == "in" else not r
    if op == "contains":
        return contains(ctx, a, b, op, pos)
    if op == "matches":
        return regex_search(ctx, a, b, pos)
    if op in ("startsWith", "endsWith"):
        if not (isinstance(a, str) and isinstance(b, str)):
            raise ctx.err(f"operator '{op}' needs strings, got {type_name(a)} and {type_name(b)}",
                          pos)
        return a.startswith(b) if op == "startsWith" else a.endswith(b)
    if op == "+":
        if is_num(a) and is_num(b):
            return check_int(ctx, a + b, pos)
        if isinstance(a, str) and isinstance(b, str):
            if len(a) + len(b) > MAX_STRING:
                raise ctx.err(f"string result too long (limit {MAX_STRING} characters)", pos)
            return a + b
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            if len(a) + len(b) > MAX_LIST:
                raise ctx.err(f"list result too long (limit {MAX_LIST} items)", pos)
            return [*a, *b]
        raise ctx.err(f"operator '+' cannot combine {type_name(a)} and {type_name(b)}"
                      + (" (use string() to convert)" if isinstance(a, str) or isinstance(b, str)
                         else ""), pos)
    if not (is_num(a) and is_num(b)):
        raise ctx.err(f"operator '{op}' needs numbers, got {type_name(a)} and {type_name(b)}", pos)
    if op == "-":
        return check_int(ctx, a - b, pos)
    if op == "*":
        return check_int(ctx, a * b, pos)
    if op == "/":
        if b == 0:
            raise ctx.err("division by zero", pos)
        try:
            return a / b
        except OverflowError:
            raise ctx.err("numeric overflow in '/'", pos) from None
    if op == "%":
        if not (isinstance(a, int) and isinstance(b, int)):
            raise ctx.err(f"operator '%' needs integers, got {type_name(a)} and {type_name(b)}",
                          pos)
        if b == 0:
            raise ctx.err("modulo by zero", pos)
        r = abs(a) % abs(b)  # Go semantics: the result takes the sign of the dividend
        return r if a >= 0 else -r
    raise ctx.err(f"unknown operator '{op}'", pos)  # pragma: no cover


def contains(ctx: Ctx, container: Any, item: Any, op: str, pos: int) -> bool:
    if isinstance(container, str):
        if not isinstance(item, str):
            raise ctx.err(f"operator '{op}' on a string needs a string, got {type_name(item)}", pos)
        return item in container
    if isinstance(container, Mapping):
        return isinstance(item, str) and item in container
    if isinstance(container, (list, tuple)):
        return any(equal(item, x) for x in container)
    if container is None:
        return False
    raise ctx.err(f"operator '{op}' needs a list, map or string, got {type_name(container)}", pos)


# --------------------------------------------------------------------------- regex

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


@lru_cache(maxsize=256)
def compile_regex(pattern: str) -> Any:
    """Compile an RE2 pattern (Go's syntax); ExpressionError if RE2 rejects it."""
    if len(pattern) > MAX_REGEX_PATTERN:
        raise ExpressionError(f"regular expression too long ({len(pattern)} characters, limit "
                              f"{MAX_REGEX_PATTERN})")
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as e:
        detail = e.args[0] if e.args else e
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise ExpressionError(f"invalid regular expression {pattern!r} (RE2 syntax): "
                              f"{detail}") from None


def regex_search(ctx: Ctx, text: Any, pattern: Any, pos: int) -> bool:
    if not isinstance(text, str) or not isinstance(pattern, str):
        raise ctx.err(f"operator 'matches' needs strings, got {type_name(text)} and "
                      f"{type_name(pattern)}", pos)
    if len(text) > MAX_REGEX_INPUT:
        raise ctx.err(f"text too long for 'matches' ({len(text)} characters, limit "
                      f"{MAX_REGEX_INPUT})", pos)
    try:
        rx = compile_regex(pattern)
    except ExpressionError as e:
        raise ctx.err(e.message, pos) from None
    return rx.search(text) is not None
