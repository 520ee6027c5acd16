"""The functions expressions can call: expr-lang v1.17's builtins, as GoFlow's transforms see them.

Closures take a predicate as their second argument, written ``{# * 2}``, ``# * 2`` or
``.field`` (short for ``#.field``); inside it ``#`` is the element, ``#index`` its index
and (in ``reduce``) ``#acc`` the accumulator.  Predicates of ``all any none one filter
count find findIndex findLast findLastIndex`` must give booleans.

goflow's additions, listed in docs/compatibility.md: ``length`` (alias of ``len``),
``round(x, digits)``.  Left out: ``now``, ``date``, ``duration``, ``timezone`` (time values
have no JSON form) and ``get`` (GoFlow's denylist refuses it).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import statistics
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from goflow.errors import ExpressionError
from goflow.language.expr.ast import Function, Node
from goflow.language.expr.paths import type_name
from goflow.language.expr.semantics import (MAX_LIST, MAX_STRING, Ctx, equal, is_num,
                                            truthy_required)
from goflow.language.expr.text import to_text

__all__ = ["EXPRESSION_FUNCTIONS", "go_json"]


# --------------------------------------------------------------------------- checks

def _list(x: Any, what: str = "a list") -> list | tuple:
    if not isinstance(x, (list, tuple)):
        raise ExpressionError(f"needs {what}, got {type_name(x)}")
    return x


def _str(x: Any) -> str:
    if not isinstance(x, str):
        raise ExpressionError(f"needs a string, got {type_name(x)}")
    return x


def _int(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise ExpressionError(f"needs an integer, got {type_name(x)}")
    return x


def _num(x: Any) -> int | float:
    if not is_num(x):
        raise ExpressionError(f"needs a number, got {type_name(x)}")
    return x


def _capped(v: Any) -> Any:
    if isinstance(v, str) and len(v) > MAX_STRING:
        raise ExpressionError(f"result too long (limit {MAX_STRING} characters)")
    if isinstance(v, list) and len(v) > MAX_LIST:
        raise ExpressionError(f"result too long (limit {MAX_LIST} items)")
    return v


# --------------------------------------------------------------------------- closures

def _closure(name: str, run):
    """A lazy builtin ``name(collection, predicate, *rest)``; ``run(each, items, rest)``.

    ``each(i)`` evaluates the predicate for element ``i`` (``#``, ``#index`` bound).
    """
    def impl(ctx: Ctx, args: tuple[Node, ...], pos: int) -> Any:
        items = args[0].ev(ctx)
        if not isinstance(items, (list, tuple)):
            raise ctx.err(f"{name}(): needs a list, got {type_name(items)}", pos)
        rest = [a.ev(ctx) for a in args[2:]]
        body = args[1] if len(args) > 1 else None
        scope: list[Any] = [None, 0, None]
        ctx.scopes.append(scope)

        def each(i: int) -> Any:
            scope[0], scope[1] = items[i], i
            return body.ev(ctx) if body is not None else items[i]

        try:
            return run(each, items, rest, scope, ctx, pos)
        finally:
            ctx.scopes.pop()
    return impl


def _pred(name: str):
    def check(each, ctx, pos):
        return lambda i: truthy_required(ctx, each(i), f"{name}() predicate", pos)
    return check


def _c_all(each, items, rest, scope, ctx, pos):
    p = _pred("all")(each, ctx, pos)
    return all(p(i) for i in range(len(items)))


def _c_any(each, items, rest, scope, ctx, pos):
    p = _pred("any")(each, ctx, pos)
    return any(p(i) for i in range(len(items)))


def _c_none(each, items, rest, scope, ctx, pos):
    p = _pred("none")(each, ctx, pos)
    return not any(p(i) for i in range(len(items)))


def _c_one(each, items, rest, scope, ctx, pos):
    p = _pred("one")(each, ctx, pos)
    return sum(1 for i in range(len(items)) if p(i)) == 1


def _c_count(each, items, rest, scope, ctx, pos):
    p = _pred("count")(each, ctx, pos)
    return sum(1 for i in range(len(items)) if p(i))


def _c_map(each, items, rest, scope, ctx, pos):
    return [each(i) for i in range(len(items))]


def _c_filter(each, items, rest, scope, ctx, pos):
    p = _pred("filter")(each, ctx, pos)
    return [items[i] for i in range(len(items)) if p(i)]


def _finder(last: bool, index: bool):
    def run(each, items, rest, scope, ctx, pos):
        p = _pred("find")(each, ctx, pos)
        order = range(len(items) - 1, -1, -1) if last else range(len(items))
        for i in order:
            if p(i):
                return i if index else items[i]
        return -1 if index else None
    return run


def _c_sum(each, items, rest, scope, ctx, pos):
    total: Any = 0
    for i in range(len(items)):
        v = each(i)
        if not is_num(v):
            raise ctx.err(f"sum(): needs numbers, got {type_name(v)}", pos)
        total += v
    return total


def _c_group_by(each, items, rest, scope, ctx, pos):
    groups: dict[str, list] = {}
    for i in range(len(items)):
        groups.setdefault(to_text(each(i)), []).append(items[i])
    return groups


def _sort_key_check(keys: list, ctx, pos, name):
    if not (all(is_num(k) for k in keys) or all(isinstance(k, str) for k in keys)):
        raise ctx.err(f"{name}(): can only sort numbers or strings", pos)


def _order(rest, ctx, pos, name) -> bool:
    order = rest[0] if rest else "asc"
    if order not in ("asc", "desc"):
        raise ctx.err(f"{name}(): order must be \"asc\" or \"desc\", got {to_text(order)!r}", pos)
    return order == "desc"


def _c_sort_by(each, items, rest, scope, ctx, pos):
    keys = [each(i) for i in range(len(items))]
    _sort_key_check(keys, ctx, pos, "sortBy")
    desc = _order(rest, ctx, pos, "sortBy")
    idx = sorted(range(len(items)), key=lambda i: keys[i], reverse=desc)
    return [items[i] for i in idx]


def _c_reduce(each, items, rest, scope, ctx, pos):
    if rest:
        acc, start = rest[0], 0
    elif items:
        acc, start = items[0], 1
    else:
        raise ctx.err("reduce(): an empty list needs an initial value", pos)
    for i in range(start, len(items)):
        scope[2] = acc
        acc = each(i)
    return acc


# --------------------------------------------------------------------------- numbers

def _len(x):
    if isinstance(x, (str, list, tuple, Mapping)):
        return len(x)
    raise ExpressionError(f"needs a string, list or map, got {type_name(x)}")


def _round(x, digits=0):
    """Half away from zero, like Go's math.Round (and expr-lang's round); a float."""
    _num(x)
    if isinstance(digits, bool) or not isinstance(digits, int) or not 0 <= digits <= 20:
        raise ExpressionError("precision must be an integer between 0 and 20")
    x = float(x)
    if math.isnan(x) or math.isinf(x):
        return x
    if digits == 0:
        t = float(math.trunc(x))
        if abs(x - t) >= 0.5:
            t += 1 if x > 0 else -1
        return t
    return float(Decimal(repr(x)).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def _to_int(x):
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            raise ExpressionError(f"cannot convert {to_text(x)} to int")
        return int(x)
    if isinstance(x, str):
        s = x.strip()
        if len(s) > 1000:
            raise ExpressionError("number text too long")
        try:
            return int(s)
        except ValueError:
            try:
                return _to_int(float(s))
            except ValueError:
                raise ExpressionError(f"cannot convert {x!r} to int") from None
    raise ExpressionError(f"cannot convert {type_name(x)} to int")


def _to_float(x):
    if is_num(x):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x.strip())
        except ValueError:
            raise ExpressionError(f"cannot convert {x!r} to float") from None
    raise ExpressionError(f"cannot convert {type_name(x)} to float")


def _minmax(fn):
    def impl(*args):
        items = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        if not items:
            return None
        if not all(is_num(v) for v in items):
            raise ExpressionError("needs numbers")
        return fn(items)
    return impl


def _numbers(xs) -> list:
    xs = _list(xs)
    if not xs or not all(is_num(v) for v in xs):
        raise ExpressionError("needs a non-empty list of numbers")
    return list(xs)


def _bit(fn, arity=2):
    return lambda *a: fn(*[_int(v) for v in a[:arity]])


# --------------------------------------------------------------------------- strings

def _trim(s, chars=None):
    return _str(s).strip() if chars is None else _str(s).strip(_str(chars))


def _split(s, sep, n=-1, keep=False):
    s, sep, n = _str(s), _str(sep), _int(n)
    if n == 0:
        return []
    if sep == "":
        parts = list(s)
        if n > 0 and len(parts) > n:
            parts = parts[:n - 1] + ["".join(parts[n - 1:])]
        return parts
    parts = s.split(sep, n - 1) if n > 0 else s.split(sep)
    if keep:
        parts = [p + sep for p in parts[:-1]] + parts[-1:]
    return _capped(parts)


def _repeat(s, n):
    s, n = _str(s), _int(n)
    if n < 0:
        raise ExpressionError("negative repeat count")
    if len(s) * n > MAX_STRING:
        raise ExpressionError(f"result too long (limit {MAX_STRING} characters)")
    return s * n


def _join(items, sep=""):
    items = _list(items)
    return _capped(_str(sep).join(_str(i) for i in items))


def _trim_prefix(s, p):
    s, p = _str(s), _str(p)
    return s[len(p):] if p and s.startswith(p) else s


def _trim_suffix(s, p):
    s, p = _str(s), _str(p)
    return s[:-len(p)] if p and s.endswith(p) else s


# --------------------------------------------------------------------------- JSON, base64

def _go_float(x: float) -> str:
    if math.isnan(x) or math.isinf(x):
        raise ExpressionError(f"cannot encode {to_text(x)} as JSON")
    if x == int(x) and abs(x) < 1e21:
        return str(int(x))
    a = abs(x)
    if 1e-6 <= a < 1e21:
        return format(Decimal(repr(x)), "f")
    r = repr(x)                              # 1e-07 / 1e+21, as Go writes them
    mant, _, exp = r.partition("e")
    sign = exp[0] if exp[0] in "+-" else "+"
    digits = exp.lstrip("+-").lstrip("0") or "0"
    return f"{mant}e{sign}{digits.zfill(2)}"


def go_json(value: Any, indent: str = "  ") -> str:
    """JSON as Go's ``json.MarshalIndent`` writes it (expr-lang's ``toJSON``): sorted keys,
    HTML characters escaped, whole floats without a fraction."""
    out: list[str] = []
    size = [0]

    def emit(piece: str) -> None:
        size[0] += len(piece)
        if size[0] > MAX_STRING:
            raise ExpressionError(f"result too long (limit {MAX_STRING} characters)")
        out.append(piece)

    def enc(v: Any, depth: int) -> None:
        if depth > 200:
            raise ExpressionError("value nested too deeply to encode")
        pad = "\n" + indent * (depth + 1)
        if isinstance(v, Mapping):
            if not v:
                return emit("{}")
            emit("{")
            items = {to_text(k): x for k, x in v.items()}
            for n, k in enumerate(sorted(items)):
                emit(("," if n else "") + pad + _go_string(k) + ": ")
                enc(items[k], depth + 1)
            return emit("\n" + indent * depth + "}")
        if isinstance(v, (list, tuple)):
            if not v:
                return emit("[]")
            emit("[")
            for n, x in enumerate(v):
                emit(("," if n else "") + pad)
                enc(x, depth + 1)
            return emit("\n" + indent * depth + "]")
        if v is None:
            return emit("null")
        if isinstance(v, bool):
            return emit("true" if v else "false")
        if isinstance(v, int):
            return emit(str(v))
        if isinstance(v, float):
            return emit(_go_float(v))
        return emit(_go_string(to_text(v)))

    enc(value, 0)
    return "".join(out)


def _go_string(s: str) -> str:
    text = json.dumps(s, ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _from_json(s):
    try:
        return json.loads(_str(s))
    except ValueError as e:
        raise ExpressionError(f"invalid JSON: {e}") from None


def _from_base64(s):
    try:
        return base64.b64decode(_str(s), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError) as e:
        raise ExpressionError(f"invalid base64 text: {e}") from None


# --------------------------------------------------------------------------- lists, maps

def _map_arg(m) -> Mapping:
    if not isinstance(m, Mapping):
        raise ExpressionError(f"needs a map, got {type_name(m)}")
    return m


def _from_pairs(pairs):
    out = {}
    for p in _list(pairs):
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise ExpressionError("needs a list of [key, value] pairs")
        out[to_text(p[0])] = p[1]
    return out


def _sort(xs, order="asc"):
    xs = list(_list(xs))
    if not (all(is_num(v) for v in xs) or all(isinstance(v, str) for v in xs)):
        raise ExpressionError("can only sort numbers or strings")
    if order not in ("asc", "desc"):
        raise ExpressionError(f"order must be \"asc\" or \"desc\", got {to_text(order)!r}")
    return sorted(xs, reverse=order == "desc")


def _uniq(xs):
    out: list = []
    for v in _list(xs):
        if not any(equal(v, u) for u in out):
            out.append(v)
    return out


def _concat(*lists):
    out: list = []
    for xs in lists:
        out.extend(_list(xs))
        _capped(out)
    return out


def _flatten(xs):
    out: list = []
    stack = [iter(_list(xs))]
    while stack:
        for v in stack[-1]:
            if isinstance(v, (list, tuple)):
                if len(stack) > 200:
                    raise ExpressionError("list nested too deeply")
                stack.append(iter(v))
                break
            out.append(v)
            if len(out) > MAX_LIST:
                raise ExpressionError(f"result too long (limit {MAX_LIST} items)")
        else:
            stack.pop()
    return out


def _take(xs, n):
    return list(_list(xs)[:max(_int(n), 0)])


def _type(v):
    if v is None:
        return "nil"
    name = type_name(v)
    return {"list": "array", "null": "nil"}.get(name, name)


def _lazy(fn, lo, hi=None, returns=None, closure: int | None = 1):
    return lo, hi, fn, True, returns, closure


_SPECS: dict[str, tuple] = {
    # closures (the predicate is argument 1)
    "all": _lazy(_closure("all", _c_all), 2, 2, "bool"),
    "any": _lazy(_closure("any", _c_any), 2, 2, "bool"),
    "none": _lazy(_closure("none", _c_none), 2, 2, "bool"),
    "one": _lazy(_closure("one", _c_one), 2, 2, "bool"),
    "count": _lazy(_closure("count", _c_count), 1, 2, "number"),
    "map": _lazy(_closure("map", _c_map), 2, 2, "list"),
    "filter": _lazy(_closure("filter", _c_filter), 2, 2, "list"),
    "find": _lazy(_closure("find", _finder(False, False)), 2, 2),
    "findIndex": _lazy(_closure("findIndex", _finder(False, True)), 2, 2, "number"),
    "findLast": _lazy(_closure("findLast", _finder(True, False)), 2, 2),
    "findLastIndex": _lazy(_closure("findLastIndex", _finder(True, True)), 2, 2, "number"),
    "sum": _lazy(_closure("sum", _c_sum), 1, 2),
    "groupBy": _lazy(_closure("groupBy", _c_group_by), 2, 2, "map"),
    "sortBy": _lazy(_closure("sortBy", _c_sort_by), 2, 3, "list"),
    "reduce": _lazy(_closure("reduce", _c_reduce), 2, 3),
    # numbers
    "len": (1, 1, _len, False, "number", None),
    "length": (1, 1, _len, False, "number", None),
    "abs": (1, 1, lambda x: abs(_num(x)), False, "number", None),
    "ceil": (1, 1, lambda x: float(math.ceil(_num(x))), False, "number", None),
    "floor": (1, 1, lambda x: float(math.floor(_num(x))), False, "number", None),
    "round": (1, 2, _round, False, "number", None),
    "int": (1, 1, _to_int, False, "number", None),
    "float": (1, 1, _to_float, False, "number", None),
    "max": (1, None, _minmax(max), False, "number", None),
    "min": (1, None, _minmax(min), False, "number", None),
    "mean": (1, 1, lambda xs: statistics.fmean(_numbers(xs)), False, "number", None),
    "median": (1, 1, lambda xs: statistics.median(_numbers(xs)), False, "number", None),
    "bitand": (2, 2, _bit(lambda a, b: a & b), False, "number", None),
    "bitor": (2, 2, _bit(lambda a, b: a | b), False, "number", None),
    "bitxor": (2, 2, _bit(lambda a, b: a ^ b), False, "number", None),
    "bitnand": (2, 2, _bit(lambda a, b: a & ~b), False, "number", None),
    "bitnot": (1, 1, _bit(lambda a: ~a, 1), False, "number", None),
    "bitshl": (2, 2, _bit(lambda a, b: (a << min(b, 63)) & (2 ** 64 - 1)
                          if b >= 0 else a), False, "number", None),
    "bitshr": (2, 2, _bit(lambda a, b: a >> b if b >= 0 else a), False, "number", None),
    "bitushr": (2, 2, _bit(lambda a, b: (a % 2 ** 64) >> b if b >= 0 else a), False,
                "number", None),
    # strings
    "string": (1, 1, to_text, False, "string", None),
    "trim": (1, 2, _trim, False, "string", None),
    "trimPrefix": (2, 2, _trim_prefix, False, "string", None),
    "trimSuffix": (2, 2, _trim_suffix, False, "string", None),
    "upper": (1, 1, lambda s: _str(s).upper(), False, "string", None),
    "lower": (1, 1, lambda s: _str(s).lower(), False, "string", None),
    "split": (2, 3, _split, False, "list", None),
    "splitAfter": (2, 3, lambda s, sep, n=-1: _split(s, sep, n, keep=True), False, "list", None),
    "replace": (3, 3, lambda s, a, b: _capped(_str(s).replace(_str(a), _str(b))), False,
                "string", None),
    "repeat": (2, 2, _repeat, False, "string", None),
    "indexOf": (2, 2, lambda s, sub: _str(s).find(_str(sub)), False, "number", None),
    "lastIndexOf": (2, 2, lambda s, sub: _str(s).rfind(_str(sub)), False, "number", None),
    "hasPrefix": (2, 2, lambda s, p: _str(s).startswith(_str(p)), False, "bool", None),
    "hasSuffix": (2, 2, lambda s, p: _str(s).endswith(_str(p)), False, "bool", None),
    "join": (1, 2, _join, False, "string", None),
    # encoding
    "toJSON": (1, 1, go_json, False, "string", None),
    "fromJSON": (1, 1, _from_json, False, None, None),
    "toBase64": (1, 1, lambda s: base64.b64encode(_str(s).encode()).decode(), False,
                 "string", None),
    "fromBase64": (1, 1, _from_base64, False, "string", None),
    # lists and maps
    "first": (1, 1, lambda xs: _list(xs)[0] if _list(xs) else None, False, None, None),
    "last": (1, 1, lambda xs: _list(xs)[-1] if _list(xs) else None, False, None, None),
    "take": (2, 2, _take, False, "list", None),
    "keys": (1, 1, lambda m: list(_map_arg(m).keys()), False, "list", None),
    "values": (1, 1, lambda m: list(_map_arg(m).values()), False, "list", None),
    "toPairs": (1, 1, lambda m: [[k, v] for k, v in _map_arg(m).items()], False, "list", None),
    "fromPairs": (1, 1, _from_pairs, False, "map", None),
    "sort": (1, 2, _sort, False, "list", None),
    "reverse": (1, 1, lambda xs: list(reversed(_list(xs))), False, "list", None),
    "uniq": (1, 1, _uniq, False, "list", None),
    "concat": (1, None, _concat, False, "list", None),
    "flatten": (1, 1, _flatten, False, "list", None),
    "type": (1, 1, _type, False, "string", None),
}

EXPRESSION_FUNCTIONS: dict[str, Function] = {
    name: Function(name, lo, hi, fn, lazy=lazy, returns=returns, closure=closure)
    for name, (lo, hi, fn, lazy, returns, closure) in _SPECS.items()}
