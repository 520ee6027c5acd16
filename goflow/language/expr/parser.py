"""The expression grammar: tokens (:mod:`~goflow.language.expr.lexer`) to an AST
(:mod:`~goflow.language.expr.ast`).

Grammar (lowest precedence first)::

    expr     := 'let' name '=' expr ';' expr | pipe ( '?' expr ':' expr )?
    pipe     := or ( '|' name '(' args ')' )*               (x | f(a) is f(x, a))
    or       := and ( ('||' | 'or') and )*
    and      := cmp ( ('&&' | 'and') cmp )*
    cmp      := add ( ('==' | '!=' | '<' | '<=' | '>' | '>=' | 'in' | 'not in'
                       | 'contains' | 'matches' | 'startsWith' | 'endsWith') add )*
    add      := mul ( ('+' | '-') mul )*
    mul      := coalesce ( ('*' | '/' | '%') coalesce )*
    coalesce := unary ( '??' unary )*
    unary    := ('!' | 'not' | '-' | '+') unary | power
    power    := postfix ( ('**' | '^') unary )?          (right associative)
    postfix  := primary ( '.' name | '?.' name | '[' expr ']' | '[' expr? ':' expr? ']' )*
    primary  := number | string | true | false | nil | null | name | name '(' args ')'
              | '${' path '}' | '$.' name | '#' | '#index' | '#acc' | '.' name
              | '(' expr ')' | '[' items ']' | '{' key ':' expr, ... '}'

A closure builtin's predicate argument may be wrapped in braces (``map(xs, {# * 2})``).
Ordering comparisons chain (``1 < x <= 10`` is ``1 < x && x <= 10``); a ``??`` expression
cannot be the left operand of another operator unless parenthesized (expr-lang's rules).
Checks made here, before any evaluation: unknown functions and argument counts, ``==``
between two literals of different types, and ``matches`` with a literal pattern that
RE2 rejects.  Limits: source length (10 000 characters) and nesting depth (64).
"""

from __future__ import annotations

from collections.abc import Mapping

from goflow.errors import ExpressionError
from goflow.language.expr.ast import (Access, Call, Chain, Function, Let, ListLit, Literal,
                                      MapLit, Name, Node, Pointer, Power, Ref, Ternary, Unary,
                                      walk)
from goflow.language.expr.builtins import EXPRESSION_FUNCTIONS
from goflow.language.expr.lexer import Token, tokenize
from goflow.language.expr.paths import type_name
from goflow.language.expr.semantics import compile_regex, is_num
from goflow.language.expr.text import to_text

__all__ = ["parse_expression", "root_names", "KEYWORDS", "MAX_SOURCE_LENGTH", "MAX_DEPTH"]

MAX_SOURCE_LENGTH = 10_000
MAX_DEPTH = 64

KEYWORDS = frozenset({"true", "false", "nil", "null", "and", "or", "not", "in", "contains",
                      "matches", "startsWith", "endsWith", "let"})

# Binary precedence (higher binds tighter).
_PREC = {
    "||": 2, "or": 2,
    "&&": 3, "and": 3,
    "==": 4, "!=": 4, "<": 4, "<=": 4, ">": 4, ">=": 4, "in": 4, "not in": 4,
    "contains": 4, "matches": 4, "startsWith": 4, "endsWith": 4,
    "+": 5, "-": 5,
    "*": 6, "/": 6, "%": 6,
    "??": 7,                     # binds tightest, as in expr-lang: 1 + x ?? 2 is 1 + (x ?? 2)
}
_CANON = {"or": "||", "and": "&&"}


class _Parser:
    def __init__(self, text: str, functions: Mapping[str, Function], *, base: int = 0,
                 source: str | None = None, kind: str = "function"):
        self.source = text if source is None else source
        self.base = base
        self.toks = tokenize(text, base, self.source)
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
        if start.kind == "ident" and start.value == "let":
            node = self.let()
            self.depth -= 1
            return node
        node = self.binary(1)
        while self.is_op("|"):
            self.next()
            name = self.next()
            if name.kind != "ident" or not self.is_op("("):
                raise self.err(f"expected a function call after '|' but found "
                               f"{self.describe(name)}", name)
            node = self.call(name, first=node)
        if self.is_op("?"):
            q = self.next()
            a = self.expr()
            self.expect(":")
            b = self.expr()
            node = Ternary(node, a, b, self.p(q))
        self.depth -= 1
        return node

    def let(self) -> Node:
        start = self.next()
        name = self.next()
        if name.kind != "ident" or name.value in KEYWORDS:
            raise self.err(f"expected a name after 'let' but found {self.describe(name)}", name)
        self.expect("=")
        value = self.expr()
        self.expect(";")
        return Let(name.value, value, self.expr(), self.p(start))

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
            self.check(op, lhs, rhs, tok)
            if isinstance(lhs, Chain) and lhs.prec == prec and not lhs.paren:
                lhs.rest.append((op, rhs, self.p(tok)))
            else:
                lhs = Chain(prec, lhs, [(op, rhs, self.p(tok))], lhs.pos)

    def check(self, op: str, lhs: Node, rhs: Node, tok: Token) -> None:
        """What can be refused while parsing: ``??`` mixed with other operators, bad patterns
        (literal type mismatches are checked once the tree is built)."""
        if op != "??" and isinstance(lhs, Chain) and not lhs.paren and lhs.rest[0][0] == "??":
            raise self.err(f"operator '{op}' and '??' cannot be mixed; wrap one of them in "
                           "parentheses", tok)
        if op == "matches" and isinstance(rhs, Literal) and isinstance(rhs.value, str):
            try:
                compile_regex(rhs.value)
            except ExpressionError as e:
                raise ExpressionError(f"{e.message} at position {self.p(tok)}",
                                      source=self.source, position=self.p(tok)) from None

    def unary(self) -> Node:
        t = self.peek()
        if (t.kind == "op" and t.value in ("!", "-", "+")) or (t.kind == "ident" and t.value == "not"):
            self.next()
            self.enter(t)
            operand = self.unary()
            self.depth -= 1
            op = "!" if t.value in ("!", "not") else t.value
            if op == "-" and isinstance(operand, Literal) and is_num(operand.value):
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

    def member_step(self, t: Token) -> tuple:
        name = self.peek()
        if name.kind == "ident" or (name.kind == "num" and isinstance(name.value, int)):
            self.next()
            return (Literal(name.value, self.p(name)), None, False, t.value == "?.",
                    self.p(name))
        raise self.err(f"expected a name after '{t.value}' but found {self.describe(name)}",
                       name)

    def postfix(self) -> Node:
        node = self.primary()
        steps: list = []
        while True:
            t = self.peek()
            if t.kind == "op" and t.value in (".", "?."):
                self.next()
                steps.append(self.member_step(t))
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
                    steps.append((lo, hi, True, False, self.p(t)))
                else:
                    steps.append((lo, None, False, False, self.p(t)))
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
        if t.kind == "ptr":
            return Pointer(t.value, self.p(t))
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
                if isinstance(node, Chain):
                    node.paren = True
                return node
            if t.value == ".":  # '.field' is '#.field' inside a closure
                return Access(Pointer("#", self.p(t)), [self.member_step(t)], self.p(t))
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

    def call(self, name_tok: Token, first: Node | None = None) -> Node:
        name = name_tok.value
        fn = self.functions.get(name)
        if fn is None:
            known = ", ".join(sorted(self.functions))
            raise ExpressionError(f"unknown {self.kind} '{name}'; known: {known} "
                                  f"(at position {self.p(name_tok)})", source=self.source,
                                  position=self.p(name_tok))
        self.enter(name_tok)
        self.expect("(")
        args: list[Node] = [first] if first is not None else []
        while not self.is_op(")"):
            if len(args) == fn.closure and self.is_op("{"):
                brace = self.next()
                self.enter(brace)
                args.append(self.expr())
                self.expect("}")
                self.depth -= 1
            else:
                args.append(self.expr())
            if not self.is_op(","):
                break
            self.next()
        self.expect(")")
        self.depth -= 1
        n = len(args)
        if n < fn.min_args or (fn.max_args is not None and n > fn.max_args):
            want = (str(fn.min_args) if fn.min_args == fn.max_args else
                    f"{fn.min_args} or more" if fn.max_args is None else
                    f"{fn.min_args} to {fn.max_args}")
            raise ExpressionError(f"{name}() requires {want} argument{'s' if want != '1' else ''}"
                                  f", got {n} (at position {self.p(name_tok)})",
                                  source=self.source, position=self.p(name_tok))
        return Call(fn, args, self.p(name_tok))


def parse_expression(text: str, functions: Mapping[str, Function] = EXPRESSION_FUNCTIONS, *,
                     base: int = 0, source: str | None = None, kind: str = "function") -> Node:
    """Parse ``text`` into an AST (used by conditions, templates and transforms).

    ``base``/``source`` let callers report positions relative to a larger text.
    """
    if not isinstance(text, str):
        raise ExpressionError(f"an expression must be text, got {type_name(text)}")
    if len(text) > MAX_SOURCE_LENGTH:
        raise ExpressionError(f"expression too long ({len(text)} characters; limit "
                              f"{MAX_SOURCE_LENGTH})", source=text[:200], position=0)
    ast = _Parser(text, functions, base=base, source=source, kind=kind).parse()
    for node in walk(ast):  # what is wrong whatever the variables: literal type mismatches
        if isinstance(node, (Chain, Power, Unary, Ternary)):
            node.check(None, None, text if source is None else source)
    return ast


def root_names(node: Node) -> frozenset[str]:
    """The variables an AST reads: bare names and the roots of ``${...}`` references
    (names bound by ``let`` are not variables)."""
    acc: set[str] = set()
    bound: set[str] = set()
    for n in walk(node):
        if isinstance(n, Name):
            acc.add(n.name)
        elif isinstance(n, Ref):
            acc.add(n.segments[0])
        elif isinstance(n, Let):
            bound.add(n.name)
    return frozenset(acc - bound)
