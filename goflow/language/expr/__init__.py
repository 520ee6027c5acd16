"""Expressions, conditions, interpolation, templates and transforms.

See the submodules for the exact rules:

* :mod:`goflow.language.expr.conditions`    -- conditions and expressions: the entry points
* :mod:`goflow.language.expr.lexer`, :mod:`~goflow.language.expr.parser`,
  :mod:`~goflow.language.expr.ast` -- tokens, grammar and AST of the expression language
* :mod:`goflow.language.expr.semantics`     -- what its operators mean (expr-lang v1.17)
* :mod:`goflow.language.expr.builtins`      -- its functions (expr-lang's builtins, closures)
* :mod:`goflow.language.expr.scanner`       -- the one ``${...}`` scanner
* :mod:`goflow.language.expr.paths`         -- ``a.b[0]["k"]`` paths, strict resolution
* :mod:`goflow.language.expr.interpolation` -- ``${path}`` interpolation of workflow values
* :mod:`goflow.language.expr.templates`     -- ``template:`` text with helper functions
* :mod:`goflow.language.expr.transforms`    -- jq / JSONPath / expression / template transforms
* :mod:`goflow.language.expr.text`          -- :func:`to_text`
"""

from goflow.errors import ExpressionError, UndefinedVariableError
from goflow.language.expr.conditions import Condition, parse_condition
from goflow.language.expr.interpolation import (check_interpolation, interpolate,
                                       interpolation_references, render_text)
from goflow.language.expr.paths import parse_path, resolve_path
from goflow.language.expr.templates import Template, compile_template, render_template
from goflow.language.expr.text import to_text
from goflow.language.expr.transforms import Transform, compile_transform

__all__ = [
    "ExpressionError", "UndefinedVariableError",
    "Condition", "parse_condition",
    "interpolate", "interpolation_references", "check_interpolation", "render_text",
    "Transform", "compile_transform",
    "Template", "compile_template", "render_template",
    "parse_path", "resolve_path",
    "to_text",
]
