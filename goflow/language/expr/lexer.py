"""Tokens of the expression language (expr-lang's lexical syntax plus ``${path}`` references).

* numbers (``3``, ``2.5``, ``1e3``), strings in ``'...'``, ``"..."`` (with escapes) or
  backticks (raw), names, ``#`` / ``#index`` / ``#acc`` (closure pointers), operators;
* ``${a.b[0]}`` is one ``ref`` token holding the parsed path; it closes where the shared
  scanner (:func:`~goflow.language.expr.scanner.placeholder_end`) says, so the lexer,
  interpolation and templates agree on quotes, backticks and nested braces;
* ``$.name`` (GoFlow's JSONPath-style spelling in conditions) is the name ``name``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from goflow.errors import ExpressionError
from goflow.language.expr.paths import parse_path
from goflow.language.expr.scanner import placeholder_end

__all__ = ["Token", "tokenize"]


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # num, str, ident, ref, ptr, op, eof
    value: Any
    pos: int


_SYMBOLS = ["**", "==", "!=", "<=", ">=", "&&", "||", "??", "?.",
            "+", "-", "*", "/", "%", "<", ">", "!", "(", ")", "[", "]", ",", ".", "?", ":",
            "{", "}", "^", "|", "=", ";"]
_NUM_RE = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_POINTER_RE = re.compile(r"#(?:index|acc)?(?![A-Za-z0-9_])")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", "'": "'", '"': '"',
            "`": "`", "$": "$", "/": "/", "b": "\b", "f": "\f"}


def tokenize(text: str, base: int, source: str) -> list[Token]:
    """Tokens of ``text``; positions are offsets in ``source`` (``text`` starts at ``base``)."""
    return _Lexer(text, base, source).tokens()


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
                               and not (out and out[-1].kind in ("ident", "ref", "ptr")
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
            if c == "#":
                m = _POINTER_RE.match(text, i)
                if not m:
                    raise self.err("unexpected '#' (closures know '#', '#index' and '#acc')", i)
                out.append(Token("ptr", m.group(), i))
                i = m.end()
                continue
            if c == "$":
                if i + 1 < n and text[i + 1] == "{":
                    tok, i = self._ref(i)
                    out.append(tok)
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

    def _ref(self, i: int) -> tuple[Token, int]:
        """The ``ref`` token of the ``${path}`` at ``i``, and the index after its ``}``."""
        text = self.text
        end = placeholder_end(text, i + 2)
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
        return Token("ref", segs, i), end + 1

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
