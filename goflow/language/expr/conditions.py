"""Conditions and expressions: the public entry points of the expression language.

The language is expr-lang v1.17 as GoFlow evaluates it (its grammar is in
:mod:`~goflow.language.expr.parser`, operator meaning in
:mod:`~goflow.language.expr.semantics`, functions in :mod:`~goflow.language.expr.builtins`),
plus goflow's ``${path}`` references: ``${a.b[0]}`` means the same as ``a.b[0]`` (a
*reference*, never text splicing), and ``$.name`` also reads variable ``name``.

A missing **root variable** raises :class:`UndefinedVariableError` naming it; a missing
map key is ``nil``.  Nothing here uses ``eval``/``exec``/``compile``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from goflow.errors import ExpressionError
from goflow.language.expr.ast import Chain, Node, Power, Ternary, Unary, walk
from goflow.language.expr.parser import parse_expression, root_names
from goflow.language.expr.paths import type_name
from goflow.language.expr.semantics import Ctx, kind_of

__all__ = ["Condition", "parse_condition", "evaluate_node", "TypeCheck"]


class TypeCheck:
    """expr-lang's compile-time type check of one AST against the variables' types.

    expr-lang compiles an expression against its environment before running it, so a type
    error in a branch that would not be evaluated is still an error.  The check depends
    only on the types of the variables the AST reads, so it runs once per combination of
    those types (at most 64 remembered) and a hot condition pays for it once.
    """
    __slots__ = ("ops", "names", "passed")
    MAX_REMEMBERED = 64

    def __init__(self, node: Node):
        self.ops = tuple(n for n in walk(node) if isinstance(n, (Chain, Power, Unary, Ternary)))
        self.names = tuple(sorted(root_names(node)))
        self.passed: set[tuple] = set()

    def run(self, ctx: Ctx, variables: Mapping[str, Any]) -> None:
        if not self.ops:
            return
        signature = tuple(kind_of(variables.get(name)) for name in self.names)
        if signature in self.passed:
            return
        for op in self.ops:
            op.check(ctx, variables)
        if len(self.passed) < self.MAX_REMEMBERED:
            self.passed.add(signature)


def evaluate_node(node: Node, variables: Mapping[str, Any], source: str,
                  check: TypeCheck | None = None) -> Any:
    """Type-check (:class:`TypeCheck`) and evaluate a parsed AST over ``variables``
    (internal; templates use it too)."""
    if not isinstance(variables, Mapping):
        raise ExpressionError(f"variables must be a mapping, got {type_name(variables)}")
    ctx = Ctx(variables, source)
    (check or TypeCheck(node)).run(ctx, variables)
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
    _check: TypeCheck = field(repr=False)

    def evaluate(self, variables: Mapping[str, Any]) -> Any:
        """Evaluate and return the value (any type).

        Raises UndefinedVariableError for a missing root variable, ExpressionError for
        type errors and exceeded limits.
        """
        return evaluate_node(self._ast, variables, self.source, self._check)

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
    return Condition(text, root_names(ast), ast, TypeCheck(ast))
