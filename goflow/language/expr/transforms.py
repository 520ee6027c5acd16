"""Transform programs (``expression:`` / ``template:`` on transform nodes).

:func:`compile_transform` picks the kind from the text:

``jq``
    The whole expression is ``jq(<program>)``.  The program runs with the ``jq``
    library on the input value.  ``${path}`` inside the program (outside jq string
    literals) is **not** spliced as text: each one becomes a jq variable ``$__v0``,
    ``$__v1`` ... bound to the resolved value.  ``env``, ``$ENV``, ``input`` and
    ``inputs`` are disabled.  Result: one output -> that value, none -> ``None``,
    several -> a list of them (at most 100 000).
``jsonpath``
    The expression starts with ``$.``, ``$[`` or is exactly ``$``; evaluated with
    python-jsonpath (RFC 9535 plus extensions) on the input value.  GoFlow's
    ``[?(...)]`` filters and RFC 9535 ``[?...]`` filters are both accepted, as is a
    trailing ``.length()``.  Result: a *singular* query (only names and indexes, no
    wildcard / filter / descent / slice) gives the single value or ``None``; any other
    query gives the list of matches (possibly empty).  With ``.length()`` the result
    is the length of that value (``len`` of a list / map / string; 0 for ``None``).
``template``
    Given as ``template=``, or an ``expression:`` holding ``${...}`` (GoFlow's template
    form: ``Hello ${user.name}``, ``'${trim(text)}'``, ``{"name": "${name}"}``,
    ``${a} * 3``): as in GoFlow the whole text is rendered, quotes and all.  See
    :mod:`goflow.language.expr.templates`.  Always returns ``str``.
``expression``
    Anything else: an expression (:mod:`goflow.language.expr.conditions`) evaluated over
    the variables, where ``input`` means the input value unless a variable named
    ``input`` exists; a text that is exactly one ``${path}`` is that value, typed.
    The result keeps its type.

For jq and JSONPath, an input that is text holding JSON is parsed first.

``Transform.names`` are the root variable names the transform reads, excluding
``input`` (for jq: roots of its ``${...}`` references; for JSONPath: none).
"""

from __future__ import annotations

import json
import re
from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from goflow.errors import ExpressionError
from goflow.language.expr.conditions import parse_condition
from goflow.language.expr.paths import parse_path, resolve_path, type_name
from goflow.language.expr.scanner import Placeholder, placeholder_end, scan
from goflow.language.expr.templates import compile_template
from goflow.language.expr.text import to_jsonable

__all__ = ["Transform", "compile_transform", "MAX_JQ_RESULTS"]

MAX_JQ_RESULTS = 100_000
INPUT_NAME = "input"

_JQ_PRELUDE = ('def env: {}; def input: error("input is not available"); '
               'def inputs: empty; def input_filename: null; {} as $ENV | ')


@dataclass(frozen=True, eq=False)
class Transform:
    """A compiled transform.  Use :meth:`apply`."""
    source: str
    kind: str                      # "jq" | "jsonpath" | "expression" | "template"
    names: frozenset[str]
    _impl: Any = field(repr=False)

    def apply(self, input_value: Any, variables: Mapping[str, Any]) -> Any:
        """Run the transform on ``input_value`` with ``variables`` available."""
        return self._impl(input_value, variables)


def _maybe_json(value: Any) -> Any:
    """Text that holds JSON is parsed when a JSON query is applied to it."""
    if isinstance(value, str):
        s = value.strip()
        if s:
            try:
                return json.loads(s)
            except ValueError:
                if s[0] in "{[":
                    raise ExpressionError("input text looks like JSON but does not parse") from None
    return value


def _bind_input(input_value: Any, variables: Mapping[str, Any]) -> Mapping[str, Any]:
    if INPUT_NAME in variables:
        return variables
    return ChainMap(variables, {INPUT_NAME: input_value})


# --------------------------------------------------------------------------- jq

def _rewrite_jq(program: str) -> tuple[str, list[tuple[str, tuple, int]]]:
    """Replace ``${path}`` outside jq strings with ``$__vN``; return (program, refs)."""
    out: list[str] = []
    refs: list[tuple[str, tuple, int]] = []
    i, n = 0, len(program)
    in_str = False
    while i < n:
        c = program[i]
        if in_str:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(program[i + 1])
                i += 2
                continue
            if c == '"':
                in_str = False
            i += 1
            continue
        if c == '"':
            in_str = True
            out.append(c)
            i += 1
            continue
        if c == "#":  # comment to end of line
            j = program.find("\n", i)
            j = n if j < 0 else j
            out.append(program[i:j])
            i = j
            continue
        if program.startswith("${", i):
            j = placeholder_end(program, i + 2)
            if j < 0:
                raise ExpressionError(f"unclosed '${{' at position {i} in jq program",
                                      source=program, position=i)
            inner = program[i + 2:j].strip()
            if not inner:
                raise ExpressionError(f"empty reference '${{}}' at position {i} in jq program",
                                      source=program, position=i)
            try:
                segs = parse_path(inner)
            except ExpressionError as e:
                raise ExpressionError(f"invalid reference '${{{inner}}}' in jq program: "
                                      f"{e.message}", source=program, position=i) from None
            var = f"__v{len(refs)}"
            refs.append((var, segs, i))
            out.append("$" + var)
            i = j + 1
            continue
        out.append(c)
        i += 1
    return "".join(out), refs


def _compile_jq(source: str, program: str) -> Transform:
    import jq  # imported lazily: only jq transforms need it

    rewritten, refs = _rewrite_jq(program)
    dummy = {var: None for var, _, _ in refs}
    try:
        jq.compile(rewritten, args=dummy)
        jq.compile(_JQ_PRELUDE + "(" + rewritten + "\n)", args=dummy)
    except ValueError as e:
        msg = str(e).strip()
        raise ExpressionError(f"invalid jq program: {msg}", source=source, position=None) from None
    full = _JQ_PRELUDE + "(" + rewritten + "\n)"
    static = jq.compile(full) if not refs else None  # no arguments: compile once

    def execute(data: Any, args: dict) -> Any:
        program = static if static is not None else jq.compile(full, args=args)
        try:
            results = []
            for v in program.input_value(data):
                results.append(v)
                if len(results) > MAX_JQ_RESULTS:
                    raise ExpressionError(f"jq program produced more than {MAX_JQ_RESULTS} results",
                                          source=source)
        except ValueError as e:
            raise ExpressionError(f"jq error: {str(e).strip()}", source=source) from None
        if not results:
            return None
        return results[0] if len(results) == 1 else results

    def run(input_value: Any, variables: Mapping[str, Any]) -> Any:
        args = {var: to_jsonable(resolve_path(variables, segs, source=source, position=pos))
                for var, segs, pos in refs}
        data = to_jsonable(_maybe_json(input_value))
        result = execute(data, args)
        if _contains(result, _is_int) and (_contains(data, _is_float) or _contains(args, _is_float)):
            # jq prints whole doubles as integers (36.0 -> 36). Re-run on slightly perturbed
            # floats: a whole number that moves was computed from floats and stays a float.
            result = _restore_floats(result, execute(_perturb(data), _perturb(args)))
        return result

    names = frozenset(segs[0] for _, segs, _ in refs) - {INPUT_NAME}
    return Transform(source, "jq", names, run)


_PERTURB = 1.0 + 2.0 ** -20


def _contains(value: Any, wanted: Any, depth: int = 0) -> bool:
    """Whether ``wanted(item)`` holds for ``value`` or anything nested in it (bounded depth)."""
    if wanted(value):
        return True
    if depth > 64:
        return False
    if isinstance(value, list):
        return any(_contains(v, wanted, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(_contains(v, wanted, depth + 1) for v in value.values())
    return False


def _is_float(value: Any) -> bool:
    return isinstance(value, float)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _perturb(value: Any) -> Any:
    if isinstance(value, float):
        return value * _PERTURB if value else 2.0 ** -30
    if isinstance(value, list):
        return [_perturb(v) for v in value]
    if isinstance(value, dict):
        return {k: _perturb(v) for k, v in value.items()}
    return value


def _restore_floats(result: Any, probe: Any) -> Any:
    """``result`` with each int that differs in ``probe`` (same shape) turned into a float."""
    if isinstance(result, int) and not isinstance(result, bool):
        moved = isinstance(probe, (int, float)) and not isinstance(probe, bool) and probe != result
        return float(result) if moved else result
    if isinstance(result, list) and isinstance(probe, list) and len(result) == len(probe):
        return [_restore_floats(r, p) for r, p in zip(result, probe)]
    if isinstance(result, dict) and isinstance(probe, dict) and result.keys() == probe.keys():
        return {k: _restore_floats(v, probe[k]) for k, v in result.items()}
    return result


# --------------------------------------------------------------------------- JSONPath

_LENGTH_SUFFIX = re.compile(r"\.length\(\)\s*$")
# GoFlow's filter spelling '@.roles[*] contains 'x'' is RFC 9535's '@.roles contains 'x''.
_WILDCARD_CONTAINS = re.compile(r"(@(?:\.[A-Za-z_][\w-]*|\[[^\]]*\])*)\[\*\](\s+contains\b)")


def _index_type_error(text: str, data: Any) -> str | None:
    """Why a singular query that found nothing is a type error (``[0]`` on a non-list)."""
    try:
        segs = parse_path("_" + text[1:])[1:]
    except ExpressionError:
        return None
    value = data
    for seg in segs:
        if isinstance(seg, int):
            if not isinstance(value, list):
                return (None if value is None else
                        f"type mismatch in JSONPath {text!r}: index [{seg}] on a "
                        f"{type_name(value)}")
            if not -len(value) <= seg < len(value):
                return None
            value = value[seg]
        elif isinstance(value, dict) and seg in value:
            value = value[seg]
        else:
            return None
    return None


def _compile_jsonpath(source: str) -> Transform:
    import jsonpath  # python-jsonpath

    text = _WILDCARD_CONTAINS.sub(r"\1\2", source.strip())
    want_length = bool(_LENGTH_SUFFIX.search(text))
    if want_length:
        text = _LENGTH_SUFFIX.sub("", text) or "$"
    try:
        path = jsonpath.compile(text)
    except jsonpath.JSONPathError as e:
        raise ExpressionError(f"invalid JSONPath {source!r}: {e}", source=source) from None
    singular = bool(getattr(path, "singular_query", lambda: False)())

    def run(input_value: Any, variables: Mapping[str, Any]) -> Any:
        data = _maybe_json(input_value)
        if data is None:
            raise ExpressionError(f"JSONPath {source!r} cannot query null data (the input is "
                                  "null)", source=source)
        if isinstance(data, str):
            # Plain text: only the root query finds anything.
            matches = [data] if text == "$" else []
        else:
            try:
                matches = path.findall(to_jsonable(data))
            except jsonpath.JSONPathError as e:
                raise ExpressionError(f"JSONPath {source!r} failed: {e}", source=source) from None
        if singular and not matches:
            problem = _index_type_error(text, data)
            if problem:
                raise ExpressionError(problem, source=source)
        result: Any = (matches[0] if matches else None) if singular else matches
        if want_length:
            if result is None:
                return 0
            if isinstance(result, (list, dict, str)):
                return len(result)
            raise ExpressionError(f"length() needs a list, map or string, got {type_name(result)}",
                                  source=source)
        return result

    return Transform(source, "jsonpath", frozenset(), run)


# --------------------------------------------------------------------------- expressions

def _template_form(source: str) -> bool:
    """GoFlow's rule: an expression holding ``${...}`` is a template -- except a text that
    is exactly one ``${path}``, which is a typed reference (as in interpolation)."""
    if "${" not in source:
        return False
    try:
        parts = scan(source)
    except ExpressionError:
        return False  # reported by the expression parser, with its position
    if not any(isinstance(p, Placeholder) for p in parts):
        return False
    if len(parts) == 1:
        try:
            parse_path(parts[0].content.strip())
        except ExpressionError:
            return True
        return False
    return True


def _compile_expression(source: str) -> Transform:
    if _template_form(source):
        return _compile_template(source)
    try:
        cond = parse_condition(source)
    except ExpressionError as first:
        if "[*]" in source or "[?(" in source or ".." in source:
            raise ExpressionError(f"{first.message} (JSONPath queries must start with '$', "
                                  f"e.g. '$.items[*].name')", source=source,
                                  position=first.position) from None
        raise

    def run(input_value: Any, variables: Mapping[str, Any]) -> Any:
        return cond.evaluate(_bind_input(input_value, variables))

    return Transform(source, "expression", cond.names - {INPUT_NAME}, run)


def _compile_template(source: str) -> Transform:
    tpl = compile_template(source)

    def run(input_value: Any, variables: Mapping[str, Any]) -> str:
        return tpl.render(_bind_input(input_value, variables))

    return Transform(source, "template", tpl.names - {INPUT_NAME}, run)


_JQ_RE = re.compile(r"^\s*jq\s*\((.*)\)\s*$", re.DOTALL)


def compile_transform(expression: str | None = None, template: str | None = None) -> Transform:
    """Compile a transform from exactly one of ``expression`` / ``template``.

    Raises ExpressionError on bad syntax (with a position where known). Compiled transforms
    are immutable and cached by source text (bounded), so a workflow with many identical
    transforms compiles each distinct one once (a jq program costs milliseconds).
    """
    if (expression is None) == (template is None):
        raise ExpressionError("a transform needs exactly one of 'expression' or 'template'")
    if template is not None:
        if not isinstance(template, str):
            raise ExpressionError(f"a template must be text, got {type_name(template)}")
        return _compile_template(template)  # compile_template caches the parsed template
    if not isinstance(expression, str):
        raise ExpressionError(f"an expression must be text, got {type_name(expression)}")
    return _compile_expression_text(expression)


@lru_cache(maxsize=1024)
def _compile_expression_text(expression: str) -> Transform:
    text = expression.strip()
    if not text:
        raise ExpressionError("empty transform expression", source=expression, position=0)
    m = _JQ_RE.match(expression)
    if m:
        return _compile_jq(expression, m.group(1))
    if text == "$" or text.startswith("$.") or text.startswith("$["):
        return _compile_jsonpath(expression)
    return _compile_expression(expression)
