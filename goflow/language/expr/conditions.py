"""The condition / expression language (a safe subset of expr-lang, as GoFlow uses it).

Grammar (lowest precedence first)::

    expr     := coalesce ( '?' expr ':' expr )?
    coalesce := or ( '??' or )*
    or       := and ( ('||' | 'or') and )*
    and      := cmp ( ('&&' | 'and') cmp )*
    cmp      := add ( ('==' | '!=' | '<' | '<=' | '>' | '>=' | 'in' | 'not in'
                       | 'contains' | 'matches' | 'startsWith' | 'endsWith') add )*
    add      := mul ( ('+' | '-') mul )*
    mul      := unary ( ('*' | '/' | '%') unary )*
    unary    := ('!' | 'not' | '-' | '+') unary | power
    power    := postfix ( ('**' | '^') unary )?          (right associative)
    postfix  := primary ( '.' name | '?.' name | '[' expr ']' | '[' expr? ':' expr? ']' )*
    primary  := number | string | true | false | nil | null | name | name '(' args ')'
              | '${' path '}' | '$.' name | '(' expr ')' | '[' items ']' | '{' key ':' expr, ... '}'

Semantics:

* A bare name reads a variable; ``${a.b[0]}`` is the same as ``a.b[0]`` (it is a
  *reference*, never text splicing); ``$.name`` (GoFlow's JSONPath-style spelling) also
  reads variable ``name``.
* A missing **root variable** raises :class:`UndefinedVariableError` naming it.
* Member access / indexing is **lenient**: a missing map key, an out-of-range index or
  any access on ``nil`` gives ``nil`` (like expr-lang's ``?.``), so
  ``user.email != nil`` works when ``email`` is absent.  Accessing a member of a number,
  bool or string is an error.  Only map keys and list/string indexes are ever used --
  never Python attributes -- so ``x.__class__`` is simply a missing key (``nil``).
* ``&&``, ``||``, ``!`` / ``not`` and the ternary condition need booleans.
* ``==`` never equates ``true`` with ``1``; ints and floats compare numerically.
* ``+`` adds numbers, concatenates strings and concatenates lists; ``/`` is true
  division (float); ``%`` needs ints; division by zero is an error.
* ``a in b``: element of a list, key of a map, substring of a string.
  ``contains`` is the reverse (``b contains a``).  ``matches`` is a regex search
  (Python ``re``) with capped pattern / input sizes and a guard against nested
  quantifiers.
* Limits: source length (10 000 chars), nesting depth (64), ``**`` exponent (<= 1000)
  and result size (<= 4096 bits), string results (<= 1 000 000 chars), list results
  (<= 100 000 items).

Nothing here uses ``eval``/``exec``/``compile``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

from goflow.errors import ExpressionError, UndefinedVariableError
from goflow.language.expr.paths import parse_path, type_name
from goflow.language.expr.text import to_text

__all__ = ["Condition", "parse_condition", "parse_expression", "CONDITION_FUNCTIONS",
           "MAX_SOURCE_LENGTH", "MAX_DEPTH", "truthy_required", "Function"]

MAX_SOURCE_LENGTH = 10_000
MAX_DEPTH = 64
MAX_EXPONENT = 1000
MAX_INT_BITS = 4096
MAX_STRING = 1_000_000
MAX_LIST = 100_000
MAX_REGEX_PATTERN = 1000
MAX_REGEX_INPUT = 100_000

KEYWORDS = frozenset({"true", "false", "nil", "null", "and", "or", "not", "in", "contains",
                      "matches", "startsWith", "endsWith"})
_WORD_OPS = {"in", "contains", "matches", "startsWith", "endsWith"}

# Binary precedence (higher binds tighter).
_PREC = {
    "??": 1,
    "||": 2, "or": 2,
    "&&": 3, "and": 3,
    "==": 4, "!=": 4, "<": 4, "<=": 4, ">": 4, ">=": 4, "in": 4, "not in": 4,
    "contains": 4, "matches": 4, "startsWith": 4, "endsWith": 4,
    "+": 5, "-": 5,
    "*": 6, "/": 6, "%": 6,
}
_CANON = {"or": "||", "and": "&&"}


# --------------------------------------------------------------------------- lexer

@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # num, str, ident, ref, op, eof
    value: Any
    pos: int


_SYMBOLS = ["**", "==", "!=", "<=", ">=", "&&", "||", "??", "?.",
            "+", "-", "*", "/", "%", "<", ">", "!", "(", ")", "[", "]", ",", ".", "?", ":",
            "{", "}", "^"]
_NUM_RE = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", "'": "'", '"': '"',
            "`": "`", "$": "$", "/": "/", "b": "\b", "f": "\f"}


def _find_ref_end(text: str, start: int) -> int:
    """Index of the '}' closing a ``${`` whose content starts at ``start`` (quote-aware)."""
    i = start
    quote = None
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "}":
            return i
        i += 1
    return -1


class _Lexer:
    def __init__(self, text: str, base: int, source: str):
        self.text = text
        self.base = base
        self.source = source

    def err(self, msg: str, pos: int) -> ExpressionError:
        return ExpressionError(f"{msg} at position {pos + self.base}", source=self.source,
                               position=pos + self.base)

    def tokens(self) -> list[Token]:
        text = self.text
        out: list[Token] = []
        i, n = 0, len(text)
        while i < n:
            c = text[i]
            if c.isspace():
                i += 1
                continue
            if c.isdigit() or (c == "." and i + 1 < n and text[i + 1].isdigit()
                               and not (out and out[-1].kind in ("ident", "ref")
                                        or out and out[-1].value in (")", "]"))):
                m = _NUM_RE.match(text, i)
                raw = m.group()
                if m.end() < n and (text[m.end()].isalpha() or text[m.end()] == "_"):
                    raise self.err(f"invalid number {text[i:m.end() + 1]!r}", i)
                val: Any = float(raw) if any(ch in raw for ch in ".eE") else int(raw)
                out.append(Token("num", val, i))
                i = m.end()
                continue
            if c in "'\"`":
                s, j = self._string(i)
                out.append(Token("str", s, i))
                i = j
                continue
            if c.isalpha() or c == "_":
                m = _IDENT_RE.match(text, i)
                out.append(Token("ident", m.group(), i))
                i = m.end()
                continue
            if c == "$":
                if i + 1 < n and text[i + 1] == "{":
                    end = _find_ref_end(text, i + 2)
                    if end < 0:
                        raise self.err("unclosed '${'", i)
                    inner = text[i + 2:end]
                    stripped = inner.strip()
                    if not stripped:
                        raise self.err("empty reference '${}'", i)
                    try:
                        segs = parse_path(stripped)
                    except ExpressionError as e:
                        raise self.err(f"invalid reference '${{{inner}}}': {e.message}", i) from None
                    out.append(Token("ref", segs, i))
                    i = end + 1
                    continue
                if i + 1 < n and text[i + 1] == ".":
                    m = _IDENT_RE.match(text, i + 2)
                    if m:
                        out.append(Token("ident", m.group(), i))
                        i = m.end()
                        continue
                raise self.err("unexpected '$' (use a name, '${name}' or '$.name')", i)
            for sym in _SYMBOLS:
                if text.startswith(sym, i):
                    if sym == "?." and i + 2 < n and text[i + 2].isdigit():
                        continue
                    out.append(Token("op", "**" if sym == "^" else sym, i))
                    i += len(sym)
                    break
            else:
                raise self.err(f"unexpected character {c!r}", i)
        out.append(Token("eof", None, n))
        return out

    def _string(self, i: int) -> tuple[str, int]:
        text = self.text
        quote = text[i]
        j = i + 1
        buf: list[str] = []
        while j < len(text):
            c = text[j]
            if c == quote:
                return "".join(buf), j + 1
            if c == "\\" and quote != "`":
                if j + 1 >= len(text):
                    break
                e = text[j + 1]
                if e == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[j + 2:j + 6] or ""):
                    buf.append(chr(int(text[j + 2:j + 6], 16)))
                    j += 6
                    continue
                if e not in _ESCAPES:
                    raise self.err(f"invalid escape '\\{e}' in string", j)
                buf.append(_ESCAPES[e])
                j += 2
                continue
            buf.append(c)
            j += 1
        raise self.err("unterminated string", i)


# --------------------------------------------------------------------------- AST

class _Ctx:
    __slots__ = ("variables", "source", "base")

    def __init__(self, variables: Mapping[str, Any], source: str):
        self.variables = variables
        self.source = source

    def err(self, msg: str, pos: int) -> ExpressionError:
        return ExpressionError(msg, source=self.source, position=pos)


class Node:
    __slots__ = ("pos",)

    def ev(self, ctx: _Ctx) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def roots(self, acc: set[str]) -> None:
        for child in self.children():
            child.roots(acc)

    def children(self) -> tuple[Node, ...]:
        return ()


class Literal(Node):
    __slots__ = ("value",)

    def __init__(self, value: Any, pos: int):
        self.value, self.pos = value, pos

    def ev(self, ctx):
        return self.value


class Name(Node):
    __slots__ = ("name",)

    def __init__(self, name: str, pos: int):
        self.name, self.pos = name, pos

    def ev(self, ctx):
        try:
            return ctx.variables[self.name]
        except KeyError:
            raise UndefinedVariableError(self.name, source=ctx.source, position=self.pos) from None

    def roots(self, acc):
        acc.add(self.name)


class Ref(Node):
    """``${a.b[0]}`` -- same semantics as the member/index chain ``a.b[0]``."""
    __slots__ = ("segments",)

    def __init__(self, segments: tuple, pos: int):
        self.segments, self.pos = segments, pos

    def ev(self, ctx):
        root = self.segments[0]
        try:
            value = ctx.variables[root]
        except KeyError:
            raise UndefinedVariableError(root, source=ctx.source, position=self.pos) from None
        for seg in self.segments[1:]:
            value = _member(ctx, value, seg, self.pos)
        return value

    def roots(self, acc):
        acc.add(self.segments[0])


class Access(Node):
    """``base.key``, ``base[expr]`` and ``base[lo:hi]`` steps, evaluated iteratively.

    Each step is ``(key, None, False, pos)`` or ``(lo, hi, True, pos)`` (slice).
    """
    __slots__ = ("base", "steps")

    def __init__(self, base: Node, steps: list, pos: int):
        self.base, self.steps, self.pos = base, steps, pos

    def children(self):
        out = [self.base]
        for a, b, _, _ in self.steps:
            out.extend(n for n in (a, b) if n is not None)
        return tuple(out)

    def ev(self, ctx):
        value = self.base.ev(ctx)
        for a, b, is_slice, pos in self.steps:
            if is_slice:
                value = _slice(ctx, value, a.ev(ctx) if a is not None else None,
                               b.ev(ctx) if b is not None else None, pos)
            else:
                value = _member(ctx, value, a.ev(ctx), pos)
        return value


def _slice(ctx, obj, lo, hi, pos):
    for bound in (lo, hi):
        if bound is not None and (not isinstance(bound, int) or isinstance(bound, bool)):
            raise ctx.err(f"slice bounds must be integers, got {type_name(bound)}", pos)
    if obj is None:
        return None
    if isinstance(obj, str):
        return obj[lo:hi]
    if isinstance(obj, (list, tuple)):
        return list(obj[lo:hi])
    raise ctx.err(f"cannot slice {type_name(obj)}", pos)


class ListLit(Node):
    __slots__ = ("items",)

    def __init__(self, items, pos):
        self.items, self.pos = tuple(items), pos

    def children(self):
        return self.items

    def ev(self, ctx):
        return [it.ev(ctx) for it in self.items]


class MapLit(Node):
    __slots__ = ("pairs",)

    def __init__(self, pairs, pos):
        self.pairs, self.pos = tuple(pairs), pos

    def children(self):
        return tuple(v for _, v in self.pairs)

    def ev(self, ctx):
        return {k: v.ev(ctx) for k, v in self.pairs}


class Unary(Node):
    __slots__ = ("op", "operand")

    def __init__(self, op, operand, pos):
        self.op, self.operand, self.pos = op, operand, pos

    def children(self):
        return (self.operand,)

    def ev(self, ctx):
        v = self.operand.ev(ctx)
        if self.op == "!":
            return not truthy_required(ctx, v, "!", self.pos)
        if not _is_num(v):
            raise ctx.err(f"unary '{self.op}' needs a number, got {type_name(v)}", self.pos)
        return -v if self.op == "-" else v


class Ternary(Node):
    __slots__ = ("cond", "a", "b")

    def __init__(self, cond, a, b, pos):
        self.cond, self.a, self.b, self.pos = cond, a, b, pos

    def children(self):
        return (self.cond, self.a, self.b)

    def ev(self, ctx):
        c = truthy_required(ctx, self.cond.ev(ctx), "?:", self.pos)
        return self.a.ev(ctx) if c else self.b.ev(ctx)


class Power(Node):
    __slots__ = ("base", "exp")

    def __init__(self, base, exp, pos):
        self.base, self.exp, self.pos = base, exp, pos

    def children(self):
        return (self.base, self.exp)

    def ev(self, ctx):
        return _power(ctx, self.base.ev(ctx), self.exp.ev(ctx), self.pos)


class Chain(Node):
    """A left-associative run of same-precedence binary operators, evaluated iteratively."""
    __slots__ = ("prec", "first", "rest")

    def __init__(self, prec, first, rest, pos):
        self.prec, self.first, self.rest, self.pos = prec, first, rest, pos

    def children(self):
        return (self.first, *(n for _, n, _ in self.rest))

    def ev(self, ctx):
        acc = self.first.ev(ctx)
        for op, node, pos in self.rest:
            if op == "&&":
                if not truthy_required(ctx, acc, "&&", pos):
                    acc = False
                    continue
                acc = truthy_required(ctx, node.ev(ctx), "&&", pos)
            elif op == "||":
                if truthy_required(ctx, acc, "||", pos):
                    acc = True
                    continue
                acc = truthy_required(ctx, node.ev(ctx), "||", pos)
            elif op == "??":
                if acc is None:
                    acc = node.ev(ctx)
            else:
                acc = _binary(ctx, op, acc, node.ev(ctx), pos)
        return acc


@dataclass(frozen=True)
class Function:
    """A callable available in expressions.

    ``impl(ctx, args)`` gets evaluated arguments, or the unevaluated nodes when ``lazy``.
    """
    name: str
    min_args: int
    max_args: int | None
    impl: Callable[..., Any]
    lazy: bool = False


class Call(Node):
    __slots__ = ("fn", "args")

    def __init__(self, fn: Function, args, pos):
        self.fn, self.args, self.pos = fn, tuple(args), pos

    def children(self):
        return self.args

    def ev(self, ctx):
        if self.fn.lazy:
            return self.fn.impl(ctx, self.args, self.pos)
        args = [a.ev(ctx) for a in self.args]
        try:
            return self.fn.impl(*args)
        except ExpressionError as e:
            if e.position is None:
                raise ExpressionError(f"{self.fn.name}(): {e.message}", source=ctx.source,
                                      position=self.pos) from None
            raise
        except (TypeError, ValueError, OverflowError) as e:
            raise ctx.err(f"{self.fn.name}(): {e}", self.pos) from None


# --------------------------------------------------------------------------- semantics

def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def truthy_required(ctx: _Ctx, v: Any, op: str, pos: int) -> bool:
    if isinstance(v, bool):
        return v
    raise ctx.err(f"operator '{op}' needs a boolean, got {type_name(v)}", pos)


def _member(ctx: _Ctx, obj: Any, key: Any, pos: int) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise ctx.err(f"map keys are strings, got {type_name(key)}", pos)
        k = key if isinstance(key, str) else str(key)
        return obj[k] if k in obj else None
    if isinstance(obj, (list, tuple, str)):
        if isinstance(key, str) and re.fullmatch(r"-?[0-9]+", key):
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, int):
            raise ctx.err(f"a {type_name(obj)} index must be an integer, got {type_name(key)}"
                          + (f" ('{key}')" if isinstance(key, str) else ""), pos)
        if -len(obj) <= key < len(obj):
            return obj[key]
        return None
    raise ctx.err(f"cannot access {to_text(key)!r} on a {type_name(obj)} value", pos)


def _equal(a: Any, b: Any, depth: int = 0) -> bool:
    if depth > 200:
        return False
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_num(a) and _is_num(b):
        return a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal(a[k], b[k], depth + 1) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y, depth + 1) for x, y in zip(a, b))
    if type(a) is not type(b) and not (isinstance(a, str) and isinstance(b, str)):
        return False
    return a == b


def _check_int(ctx, v, pos):
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > MAX_INT_BITS:
        raise ctx.err(f"integer result too large (more than {MAX_INT_BITS} bits)", pos)
    return v


def _power(ctx: _Ctx, a: Any, b: Any, pos: int) -> Any:
    if not (_is_num(a) and _is_num(b)):
        raise ctx.err(f"operator '**' needs numbers, got {type_name(a)} and {type_name(b)}", pos)
    if abs(b) > MAX_EXPONENT:
        raise ctx.err(f"exponent too large ({to_text(b)}; limit {MAX_EXPONENT})", pos)
    if isinstance(a, int) and isinstance(b, int) and b >= 0:
        if a not in (0, 1, -1) and (abs(a).bit_length() - 1) * b > MAX_INT_BITS:
            raise ctx.err(f"integer result too large (more than {MAX_INT_BITS} bits)", pos)
        return _check_int(ctx, a ** b, pos)
    try:
        r = float(a) ** float(b)
    except ZeroDivisionError:
        raise ctx.err("zero cannot be raised to a negative power", pos) from None
    except OverflowError:
        raise ctx.err("numeric overflow in '**'", pos) from None
    if isinstance(r, complex):
        raise ctx.err("negative number raised to a fractional power", pos)
    return r


def _regex(ctx: _Ctx, text: Any, pattern: Any, pos: int) -> bool:
    if not isinstance(text, str) or not isinstance(pattern, str):
        raise ctx.err(f"operator 'matches' needs strings, got {type_name(text)} and "
                      f"{type_name(pattern)}", pos)
    if len(pattern) > MAX_REGEX_PATTERN:
        raise ctx.err(f"regular expression too long ({len(pattern)} characters, limit "
                      f"{MAX_REGEX_PATTERN})", pos)
    if len(text) > MAX_REGEX_INPUT:
        raise ctx.err(f"text too long for 'matches' ({len(text)} characters, limit "
                      f"{MAX_REGEX_INPUT})", pos)
    try:
        rx = _compile_regex(pattern)
    except re.error as e:
        raise ctx.err(f"invalid regular expression {pattern!r}: {e}", pos) from None
    except ValueError as e:
        raise ctx.err(str(e), pos) from None
    return rx.search(text) is not None


# A group that itself contains a quantifier (or an alternation) and is repeated without a
# small bound, e.g. (a+)+, (a|aa)*, (\w*)*, (.*a){20} -- the classic catastrophic
# backtracking shapes.  Small fixed repeats such as (\d{1,3}\.){3} are allowed.
_NESTED_QUANT = re.compile(
    r"\((?:[^()\\]|\\.)*(?:[+*}]|\|)(?:[^()\\]|\\.)*\)\s*([+*]|\{(\d*)(,?)(\d*)\})")
_BACKREF = re.compile(r"\\[1-9]|\(\?P=")
_MAX_GROUP_REPEAT = 10


def _dangerous_regex(pattern: str) -> bool:
    if _BACKREF.search(pattern):
        return True
    for m in _NESTED_QUANT.finditer(pattern):
        quant, lo, comma, hi = m.groups()
        if quant in "+*":
            return True
        top = hi if comma else lo
        if not top or int(top) > _MAX_GROUP_REPEAT:
            return True
    return False


@lru_cache(maxsize=256)
def _compile_regex(pattern: str) -> re.Pattern:
    if _dangerous_regex(pattern):
        raise ValueError(f"regular expression {pattern!r} is refused: a repeated group that "
                         "contains a quantifier or alternation, or a backreference, can take "
                         "exponential time")
    return re.compile(pattern)


def _cap(ctx, v, pos):
    if isinstance(v, str) and len(v) > MAX_STRING:
        raise ctx.err(f"string result too long (limit {MAX_STRING} characters)", pos)
    if isinstance(v, list) and len(v) > MAX_LIST:
        raise ctx.err(f"list result too long (limit {MAX_LIST} items)", pos)
    return v


def _binary(ctx: _Ctx, op: str, a: Any, b: Any, pos: int) -> Any:
    if op == "==":
        return _equal(a, b)
    if op == "!=":
        return not _equal(a, b)
    if op in ("<", "<=", ">", ">="):
        if (_is_num(a) and _is_num(b)) or (isinstance(a, str) and isinstance(b, str)):
            return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
        raise ctx.err(f"cannot compare {type_name(a)} and {type_name(b)} with '{op}'", pos)
    if op in ("in", "not in"):
        r = _contains(ctx, b, a, op, pos)
        return r if op == "in" else not r
    if op == "contains":
        return _contains(ctx, a, b, op, pos)
    if op == "matches":
        return _regex(ctx, a, b, pos)
    if op in ("startsWith", "endsWith"):
        if not (isinstance(a, str) and isinstance(b, str)):
            raise ctx.err(f"operator '{op}' needs strings, got {type_name(a)} and {type_name(b)}",
                          pos)
        return a.startswith(b) if op == "startsWith" else a.endswith(b)
    if op == "+":
        if _is_num(a) and _is_num(b):
            return _check_int(ctx, a + b, pos)
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
    if not (_is_num(a) and _is_num(b)):
        raise ctx.err(f"operator '{op}' needs numbers, got {type_name(a)} and {type_name(b)}", pos)
    if op == "-":
        return _check_int(ctx, a - b, pos)
    if op == "*":
        return _check_int(ctx, a * b, pos)
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


def _contains(ctx: _Ctx, container: Any, item: Any, op: str, pos: int) -> bool:
    if isinstance(container, str):
        if not isinstance(item, str):
            raise ctx.err(f"operator '{op}' on a string needs a string, got {type_name(item)}", pos)
        return item in container
    if isinstance(container, Mapping):
        return isinstance(item, str) and item in container
    if isinstance(container, (list, tuple)):
        return any(_equal(item, x) for x in container)
    if container is None:
        return False
    raise ctx.err(f"operator '{op}' needs a list, map or string, got {type_name(container)}", pos)


# --------------------------------------------------------------------------- builtins

def _len(x):
    if isinstance(x, (str, list, tuple, Mapping)):
        return len(x)
    raise ExpressionError(f"needs a string, list or map, got {type_name(x)}")


def _str_fn(fn):
    def impl(x):
        if not isinstance(x, str):
            raise ExpressionError(f"needs a string, got {type_name(x)}")
        return fn(x)
    return impl


def _num_arg(x):
    if not _is_num(x):
        raise ExpressionError(f"needs a number, got {type_name(x)}")
    return x


def _to_int(x):
    if isinstance(x, bool):
        return int(x)
    if isinstance(x, int):
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
    if _is_num(x):
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
            raise ExpressionError("needs at least one value")
        if not (all(_is_num(v) for v in items) or all(isinstance(v, str) for v in items)):
            raise ExpressionError("needs numbers or strings")
        return fn(items)
    return impl


def _round(x, n=0):
    _num_arg(x)
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 20:
        raise ExpressionError("precision must be an integer between 0 and 20")
    return round(x) if n == 0 and isinstance(x, float) and abs(x) < 2 ** 62 else round(x, n)


def _keys(m):
    if not isinstance(m, Mapping):
        raise ExpressionError(f"needs a map, got {type_name(m)}")
    return list(m.keys())


def _values(m):
    if not isinstance(m, Mapping):
        raise ExpressionError(f"needs a map, got {type_name(m)}")
    return list(m.values())


CONDITION_FUNCTIONS: dict[str, Function] = {f.name: f for f in [
    Function("len", 1, 1, _len),
    Function("length", 1, 1, _len),
    Function("lower", 1, 1, _str_fn(str.lower)),
    Function("upper", 1, 1, _str_fn(str.upper)),
    Function("trim", 1, 1, _str_fn(str.strip)),
    Function("abs", 1, 1, lambda x: abs(_num_arg(x))),
    Function("int", 1, 1, _to_int),
    Function("float", 1, 1, _to_float),
    Function("string", 1, 1, to_text),
    Function("min", 1, None, _minmax(min)),
    Function("max", 1, None, _minmax(max)),
    Function("round", 1, 2, _round),
    Function("floor", 1, 1, lambda x: math.floor(_num_arg(x))),
    Function("ceil", 1, 1, lambda x: math.ceil(_num_arg(x))),
    Function("keys", 1, 1, _keys),
    Function("values", 1, 1, _values),
]}


# --------------------------------------------------------------------------- parser

class _Parser:
    def __init__(self, text: str, functions: Mapping[str, Function], *, base: int = 0,
                 source: str | None = None, kind: str = "function"):
        self.source = text if source is None else source
        self.base = base
        self.toks = _Lexer(text, base, self.source).tokens()
        self.i = 0
        self.depth = 0
        self.functions = functions
        self.kind = kind

    # helpers
    def peek(self, k: int = 0) -> Token:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def next(self) -> Token:
        t = self.toks[self.i]
        self.i += 1
        return t

    def p(self, tok: Token) -> int:
        return tok.pos + self.base

    def err(self, msg: str, tok: Token) -> ExpressionError:
        if tok.kind != "eof":
            msg = f"{msg} at position {self.p(tok)}"
        elif not msg.endswith("end of expression"):
            msg = f"{msg} at end of expression"
        return ExpressionError(msg, source=self.source, position=self.p(tok))

    def is_op(self, value: str, k: int = 0) -> bool:
        t = self.peek(k)
        return t.kind == "op" and t.value == value

    def expect(self, value: str) -> Token:
        t = self.peek()
        if not (t.kind == "op" and t.value == value):
            raise self.err(f"expected '{value}' but found {self.describe(t)}", t)
        return self.next()

    @staticmethod
    def describe(t: Token) -> str:
        if t.kind == "eof":
            return "end of expression"
        if t.kind == "str":
            return f"string {t.value!r}"
        if t.kind == "ref":
            return "a ${...} reference"
        return f"'{t.value}'"

    def enter(self, tok: Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExpressionError(f"expression nested too deeply (more than {MAX_DEPTH} levels) "
                                  f"at position {self.p(tok)}", source=self.source,
                                  position=self.p(tok))

    # grammar
    def parse(self) -> Node:
        if not self.toks or self.peek().kind == "eof":
            raise ExpressionError("empty expression", source=self.source, position=self.base)
        node = self.expr()
        t = self.peek()
        if t.kind != "eof":
            raise self.err(f"unexpected {self.describe(t)}", t)
        return node

    def expr(self) -> Node:
        start = self.peek()
        self.enter(start)
        node = self.binary(1)
        if self.is_op("?"):
            q = self.next()
            a = self.expr()
            self.expect(":")
            b = self.expr()
            node = Ternary(node, a, b, self.p(q))
        self.depth -= 1
        return node

    def binop(self) -> tuple[str, int] | None:
        t = self.peek()
        if t.kind == "op" and t.value in _PREC:
            return t.value, 1
        if t.kind == "ident":
            if t.value in _PREC:
                return t.value, 1
            if t.value == "not" and self.peek(1).kind == "ident" and self.peek(1).value == "in":
                return "not in", 2
        return None

    def binary(self, min_prec: int) -> Node:
        lhs = self.unary()
        while True:
            found = self.binop()
            if found is None:
                return lhs
            op, width = found
            prec = _PREC[op]
            if prec < min_prec:
                return lhs
            tok = self.peek()
            self.i += width
            rhs = self.binary(prec + 1)
            op = _CANON.get(op, op)
            if isinstance(lhs, Chain) and lhs.prec == prec:
                lhs.rest.append((op, rhs, self.p(tok)))
            else:
                lhs = Chain(prec, lhs, [(op, rhs, self.p(tok))], lhs.pos)

    def unary(self) -> Node:
        t = self.peek()
        if (t.kind == "op" and t.value in ("!", "-", "+")) or (t.kind == "ident" and t.value == "not"):
            self.next()
            self.enter(t)
            operand = self.unary()
            self.depth -= 1
            op = "!" if t.value in ("!", "not") else t.value
            if op == "-" and isinstance(operand, Literal) and _is_num(operand.value):
                return Literal(-operand.value, self.p(t))
            return Unary(op, operand, self.p(t))
        return self.power()

    def power(self) -> Node:
        base = self.postfix()
        if self.is_op("**"):
            t = self.next()
            self.enter(t)
            exp = self.unary()
            self.depth -= 1
            return Power(base, exp, self.p(t))
        return base

    def postfix(self) -> Node:
        node = self.primary()
        steps: list = []
        while True:
            t = self.peek()
            if t.kind == "op" and t.value in (".", "?."):
                self.next()
                name = self.peek()
                if name.kind == "ident" or (name.kind == "num" and isinstance(name.value, int)):
                    self.next()
                    steps.append((Literal(name.value, self.p(name)), None, False, self.p(name)))
                else:
                    raise self.err(f"expected a name after '{t.value}' but found "
                                   f"{self.describe(name)}", name)
            elif t.kind == "op" and t.value == "[":
                self.next()
                self.enter(t)
                lo = hi = None
                if not self.is_op(":"):
                    lo = self.expr()
                if self.is_op(":"):
                    self.next()
                    if not self.is_op("]"):
                        hi = self.expr()
                    steps.append((lo, hi, True, self.p(t)))
                else:
                    steps.append((lo, None, False, self.p(t)))
                self.expect("]")
                self.depth -= 1
            else:
                return Access(node, steps, node.pos) if steps else node

    def primary(self) -> Node:
        t = self.next()
        if t.kind in ("num", "str"):
            return Literal(t.value, self.p(t))
        if t.kind == "ref":
            return Ref(t.value, self.p(t))
        if t.kind == "ident":
            v = t.value
            if v == "true":
                return Literal(True, self.p(t))
            if v == "false":
                return Literal(False, self.p(t))
            if v in ("nil", "null"):
                return Literal(None, self.p(t))
            if self.is_op("("):
                return self.call(t)
            if v in KEYWORDS:
                raise self.err(f"unexpected keyword '{v}'", t)
            return Name(v, self.p(t))
        if t.kind == "op":
            if t.value == "(":
                node = self.expr()
                self.expect(")")
                return node
            if t.value == "[":
                self.enter(t)
                items = []
                while not self.is_op("]"):
                    items.append(self.expr())
                    if not self.is_op(","):
                        break
                    self.next()
                self.expect("]")
                self.depth -= 1
                return ListLit(items, self.p(t))
            if t.value == "{":
                self.enter(t)
                pairs = []
                while not self.is_op("}"):
                    k = self.next()
                    if k.kind not in ("ident", "str", "num"):
                        raise self.err(f"expected a map key but found {self.describe(k)}", k)
                    self.expect(":")
                    pairs.append((to_text(k.value), self.expr()))
                    if not self.is_op(","):
                        break
                    self.next()
                self.expect("}")
                self.depth -= 1
                return MapLit(pairs, self.p(t))
        raise self.err(f"unexpected {self.describe(t)}", t)

    def call(self, name_tok: Token) -> Node:
        name = name_tok.value
        fn = self.functions.get(name)
        if fn is None:
            known = ", ".join(sorted(self.functions))
            raise ExpressionError(f"unknown {self.kind} '{name}'; known: {known} "
                                  f"(at position {self.p(name_tok)})", source=self.source,
                                  position=self.p(name_tok))
        self.enter(name_tok)
        self.expect("(")
        args = []
        while not self.is_op(")"):
            args.append(self.expr())
            if not self.is_op(","):
                break
            self.next()
        self.expect(")")
        self.depth -= 1
        n = len(args)
        if n < fn.min_args or (fn.max_args is not None and n > fn.max_args):
            want = (str(fn.min_args) if fn.min_args == fn.max_args else
                    f"{fn.min_args}+" if fn.max_args is None else f"{fn.min_args}-{fn.max_args}")
            raise ExpressionError(f"{name}() takes {want} argument(s), got {n} "
                                  f"(at position {self.p(name_tok)})", source=self.source,
                                  position=self.p(name_tok))
        return Call(fn, args, self.p(name_tok))


def parse_expression(text: str, functions: Mapping[str, Function] = CONDITION_FUNCTIONS, *,
                     base: int = 0, source: str | None = None, kind: str = "function") -> Node:
    """Parse ``text`` into an AST (internal; used by conditions, templates and transforms).

    ``base``/``source`` let callers report positions relative to a larger text.
    """
    if not isinstance(text, str):
        raise ExpressionError(f"an expression must be text, got {type_name(text)}")
    if len(text) > MAX_SOURCE_LENGTH:
        raise ExpressionError(f"expression too long ({len(text)} characters; limit "
                              f"{MAX_SOURCE_LENGTH})", source=text[:200], position=0)
    return _Parser(text, functions, base=base, source=source, kind=kind).parse()


def root_names(node: Node) -> frozenset[str]:
    acc: set[str] = set()
    # Iterative walk: ASTs are depth-bounded, but stay safe anyway.
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, Name):
            acc.add(n.name)
        elif isinstance(n, Ref):
            acc.add(n.segments[0])
        stack.extend(n.children())
    return frozenset(acc)


def evaluate_node(node: Node, variables: Mapping[str, Any], source: str) -> Any:
    if not isinstance(variables, Mapping):
        raise ExpressionError(f"variables must be a mapping, got {type_name(variables)}")
    ctx = _Ctx(variables, source)
    try:
        return node.ev(ctx)
    except RecursionError:  # pragma: no cover - depth is bounded by the parser
        raise ExpressionError("expression nested too deeply", source=source) from None


@dataclass(frozen=True, eq=False)
class Condition:
    """A parsed condition / expression.  Immutable and reusable.

    ``names`` are the root variable names the expression reads (bare names, the root of
    ``${a.b}`` references and ``$.name``), never keywords, literals or function names.
    """
    source: str
    names: frozenset[str]
    _ast: Node = field(repr=False)

    def evaluate(self, variables: Mapping[str, Any]) -> Any:
        """Evaluate and return the value (any type).

        Raises UndefinedVariableError for a missing root variable, ExpressionError for
        type errors and exceeded limits.  Missing map keys / indexes give ``None``.
        """
        return evaluate_node(self._ast, variables, self.source)

    def evaluate_bool(self, variables: Mapping[str, Any]) -> bool:
        """Evaluate and require a boolean result."""
        v = self.evaluate(variables)
        if not isinstance(v, bool):
            raise ExpressionError(f"condition must evaluate to a boolean, got {type_name(v)}",
                                  source=self.source, position=0)
        return v


def parse_condition(text: str) -> Condition:
    """Parse a condition-language expression; ExpressionError (with position) on bad syntax."""
    if not isinstance(text, str):
        raise ExpressionError(f"a condition must be text, got {type_name(text)}")
    return _parse_condition_cached(text)


@lru_cache(maxsize=1024)
def _parse_condition_cached(text: str) -> Condition:
    ast = parse_expression(text)
    return Condition(text, root_names(ast), ast)
