"""The expression AST: one class per construct, each evaluating itself over a :class:`Ctx`.

Operator meaning lives in :mod:`~goflow.language.expr.semantics`; nodes only dispatch.
``kind(variables)`` is a node's *static* type as expr-lang's checker sees it (``None`` when
it has none), used to refuse ``==`` between different known types; ``variables`` is
``None`` when checking at parse time, where only literals have known types.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from goflow.errors import ExpressionError, UndefinedVariableError
from goflow.language.expr import semantics as sem
from goflow.language.expr.semantics import Ctx

__all__ = ["Node", "Literal", "Name", "Ref", "Pointer", "Access", "ListLit", "MapLit",
           "Unary", "Ternary", "Power", "Chain", "Call", "Let", "Function", "walk"]


class Node:
    __slots__ = ("pos",)

    def ev(self, ctx: Ctx) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def children(self) -> tuple[Node, ...]:
        return ()

    def kind(self, variables: Mapping[str, Any] | None) -> str | None:
        return None


def walk(node: Node):
    """Every node of the tree (iterative; trees are depth-bounded by the parser anyway)."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(n.children())


class Literal(Node):
    __slots__ = ("value",)

    def __init__(self, value: Any, pos: int):
        self.value, self.pos = value, pos

    def ev(self, ctx):
        return self.value

    def kind(self, variables):
        return sem.kind_of(self.value)


class Name(Node):
    __slots__ = ("name",)

    def __init__(self, name: str, pos: int):
        self.name, self.pos = name, pos

    def ev(self, ctx):
        try:
            return ctx.variables[self.name]
        except KeyError:
            raise UndefinedVariableError(self.name, source=ctx.source, position=self.pos) from None

    def kind(self, variables):
        if variables is None or self.name not in variables:
            return None
        return sem.kind_of(variables[self.name])


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
            value = sem.member(ctx, value, seg, self.pos)
        return value

    def kind(self, variables):
        if len(self.segments) > 1 or variables is None or self.segments[0] not in variables:
            return None
        return sem.kind_of(variables[self.segments[0]])


class Pointer(Node):
    """``#`` (the current element), ``#index`` or ``#acc`` inside a closure argument."""
    __slots__ = ("slot",)
    SLOTS = {"#": 0, "#index": 1, "#acc": 2}

    def __init__(self, name: str, pos: int):
        self.slot, self.pos = self.SLOTS[name], pos

    def ev(self, ctx):
        if not ctx.scopes:
            raise ctx.err("'#' is only defined inside a closure such as map(xs, {# * 2})",
                          self.pos)
        return ctx.scopes[-1][self.slot]


class Access(Node):
    """``base.key``, ``base?.key``, ``base[expr]`` and ``base[lo:hi]`` steps, iteratively.

    Each step is ``(key, None, False, optional, pos)`` or ``(lo, hi, True, optional, pos)``.
    """
    __slots__ = ("base", "steps")

    def __init__(self, base: Node, steps: list, pos: int):
        self.base, self.steps, self.pos = base, steps, pos

    def children(self):
        out = [self.base]
        for a, b, _, _, _ in self.steps:
            out.extend(n for n in (a, b) if n is not None)
        return tuple(out)

    def ev(self, ctx):
        value = self.base.ev(ctx)
        for a, b, is_slice, optional, pos in self.steps:
            if value is None and optional:
                return None
            if is_slice:
                value = sem.slice_value(ctx, value, a.ev(ctx) if a is not None else None,
                                        b.ev(ctx) if b is not None else None, pos)
            else:
                value = sem.member(ctx, value, a.ev(ctx), pos)
        return value


class Let(Node):
    """``let name = value; body``: ``name`` is bound while ``body`` is evaluated."""
    __slots__ = ("name", "value", "body")

    def __init__(self, name: str, value: Node, body: Node, pos: int):
        self.name, self.value, self.body, self.pos = name, value, body, pos

    def children(self):
        return (self.value, self.body)

    def ev(self, ctx):
        outer = ctx.variables
        ctx.variables = ChainMap({self.name: self.value.ev(ctx)}, outer)
        try:
            return self.body.ev(ctx)
        finally:
            ctx.variables = outer

    def kind(self, variables):
        return self.body.kind(None)


class ListLit(Node):
    __slots__ = ("items",)

    def __init__(self, items, pos):
        self.items, self.pos = tuple(items), pos

    def children(self):
        return self.items

    def ev(self, ctx):
        return [it.ev(ctx) for it in self.items]

    def kind(self, variables):
        return "list"


class MapLit(Node):
    __slots__ = ("pairs",)

    def __init__(self, pairs, pos):
        self.pairs, self.pos = tuple(pairs), pos

    def children(self):
        return tuple(v for _, v in self.pairs)

    def ev(self, ctx):
        return {k: v.ev(ctx) for k, v in self.pairs}

    def kind(self, variables):
        return "map"


class Unary(Node):
    __slots__ = ("op", "operand")

    def __init__(self, op, operand, pos):
        self.op, self.operand, self.pos = op, operand, pos

    def children(self):
        return (self.operand,)

    def ev(self, ctx):
        v = self.operand.ev(ctx)
        if self.op == "!":
            return not sem.truthy_required(ctx, v, "!", self.pos)
        if not sem.is_num(v):
            raise ctx.err(f"unary '{self.op}' needs a number, got {sem.type_name(v)}", self.pos)
        return -v if self.op == "-" else v

    def check(self, ctx: Ctx | None, variables: Mapping[str, Any] | None,
              source: str | None = None) -> None:
        kind = self.operand.kind(variables)
        if kind is not None and kind != ("bool" if self.op == "!" else "number"):
            msg = (f"invalid operation: '{self.op}' needs a "
                   f"{'boolean' if self.op == '!' else 'number'}, got {kind}")
            raise ctx.err(msg, self.pos) if ctx is not None else ExpressionError(
                msg, source=source, position=self.pos)

    def kind(self, variables):
        return "bool" if self.op == "!" else self.operand.kind(variables)


class Ternary(Node):
    __slots__ = ("cond", "a", "b")

    def __init__(self, cond, a, b, pos):
        self.cond, self.a, self.b, self.pos = cond, a, b, pos

    def children(self):
        return (self.cond, self.a, self.b)

    def ev(self, ctx):
        c = sem.truthy_required(ctx, self.cond.ev(ctx), "?:", self.pos)
        return self.a.ev(ctx) if c else self.b.ev(ctx)

    def check(self, ctx: Ctx | None, variables: Mapping[str, Any] | None,
              source: str | None = None) -> None:
        kind = self.cond.kind(variables)
        if kind is not None and kind != "bool":
            msg = f"invalid operation: '?:' needs a boolean condition, got {kind}"
            raise ctx.err(msg, self.pos) if ctx is not None else ExpressionError(
                msg, source=source, position=self.pos)

    def kind(self, variables):
        ka = self.a.kind(variables)
        return ka if ka == self.b.kind(variables) else None


class Power(Node):
    __slots__ = ("base", "exp")

    def __init__(self, base, exp, pos):
        self.base, self.exp, self.pos = base, exp, pos

    def children(self):
        return (self.base, self.exp)

    def ev(self, ctx):
        return sem.power(ctx, self.base.ev(ctx), self.exp.ev(ctx), self.pos)

    def check(self, ctx: Ctx | None, variables: Mapping[str, Any] | None,
              source: str | None = None) -> str | None:
        return sem.check_operands(ctx, "**", self.base.kind(variables), self.exp.kind(variables),
                                  self.pos, source)

    def kind(self, variables):
        return "number"


_ORDERING = frozenset({"<", "<=", ">", ">="})
_COMPARISON_PREC = 4


class Chain(Node):
    """A left-associative run of same-precedence binary operators, evaluated iteratively.

    ``paren``: written in parentheses (expr-lang refuses ``??`` mixed with other operators
    unless one side is parenthesized).
    """
    __slots__ = ("prec", "first", "rest", "paren")

    def __init__(self, prec, first, rest, pos):
        self.prec, self.first, self.rest, self.pos = prec, first, rest, pos
        self.paren = False

    def children(self):
        return (self.first, *(n for _, n, _ in self.rest))

    def check(self, ctx: Ctx | None, variables: Mapping[str, Any] | None,
              source: str | None = None) -> str | None:
        """The static type check of every operator in the chain; the result's static type."""
        kind = prev = self.first.kind(variables)
        prev_op = None
        for op, node, pos in self.rest:
            right = node.kind(variables)
            if op == "??":
                kind = None
            elif op in _ORDERING and prev_op in _ORDERING:
                kind = sem.check_operands(ctx, op, prev, right, pos, source)  # chained
            else:
                kind = sem.check_operands(ctx, op, kind, right, pos, source)
            prev, prev_op = right, op
        return kind

    def ev(self, ctx):
        acc = self.first.ev(ctx)
        if self.prec == _COMPARISON_PREC:
            return self._comparisons(ctx, acc)
        for op, node, pos in self.rest:
            if op == "&&":
                if not sem.truthy_required(ctx, acc, "&&", pos):
                    acc = False
                    continue
                acc = sem.truthy_required(ctx, node.ev(ctx), "&&", pos)
            elif op == "||":
                if sem.truthy_required(ctx, acc, "||", pos):
                    acc = True
                    continue
                acc = sem.truthy_required(ctx, node.ev(ctx), "||", pos)
            elif op == "??":
                if acc is None:
                    acc = node.ev(ctx)
            else:
                acc = sem.binary(ctx, op, acc, node.ev(ctx), pos)
        return acc

    def _comparisons(self, ctx: Ctx, acc: Any) -> Any:
        """``a < b <= c`` is ``a < b && b <= c`` (expr-lang chains ordering comparisons)."""
        prev, prev_op, chained = acc, None, True
        for op, node, pos in self.rest:
            right = node.ev(ctx)
            if op in _ORDERING and prev_op in _ORDERING:
                chained = chained and sem.binary(ctx, op, prev, right, pos)
                acc = chained
            else:
                acc = chained = sem.binary(ctx, op, acc, right, pos)
            prev, prev_op = right, op
        return acc

    def kind(self, variables):
        try:
            return self.check(None, variables)
        except ExpressionError:
            return None  # reported when the chain itself is evaluated


@dataclass(frozen=True)
class Function:
    """A callable available in expressions.

    ``impl(*args)`` gets evaluated arguments; when ``lazy``, ``impl(ctx, arg_nodes, pos)``
    gets the unevaluated nodes (closures and short-circuiting helpers).  ``returns`` is
    the static type of the result (see :meth:`Node.kind`), ``None`` when it varies.
    ``closure`` marks the argument position whose ``{...}`` is a predicate, not a map.
    """
    name: str
    min_args: int
    max_args: int | None
    impl: Callable[..., Any]
    lazy: bool = False
    returns: str | None = None
    closure: int | None = None


class Call(Node):
    __slots__ = ("fn", "args")

    def __init__(self, fn: Function, args, pos):
        self.fn, self.args, self.pos = fn, tuple(args), pos

    def children(self):
        return self.args

    def kind(self, variables):
        return self.fn.returns

    def ev(self, ctx):
        try:
            if self.fn.lazy:
                return self.fn.impl(ctx, self.args, self.pos)
            return self.fn.impl(*[a.ev(ctx) for a in self.args])
        except ExpressionError as e:
            if e.position is None:
                raise ExpressionError(f"{self.fn.name}(): {e.message}", source=ctx.source,
                                      position=self.pos) from None
            raise
        except (TypeError, ValueError, OverflowError) as e:
            raise ctx.err(f"{self.fn.name}(): {e}", self.pos) from None
