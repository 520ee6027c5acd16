"""Expressions, conditions, interpolation, templates and transforms.

See the submodules for the exact rules:

* :mod:`goflow.expr.conditions`    -- the condition / expression language
* :mod:`goflow.expr.paths`         -- ``a.b[0]["k"]`` paths, strict resolution
* :mod:`goflow.expr.interpolation` -- ``${path}`` interpolation of workflow values
* :mod:`goflow.expr.templates`     -- ``template:`` text with helper functions
* :mod:`goflow.expr.transforms`    -- jq / JSONPath / expression / template transforms
* :mod:`goflow.expr.text`          -- :func:`to_text`
"""

from goflow.errors import ExpressionError, UndefinedVariableError
from goflow.expr.conditions import Condition, parse_condition
from goflow.expr.interpolation import (check_interpolation, interpolate,
                                       interpolation_references, render_text)
from goflow.expr.paths import parse_path, resolve_path
from goflow.expr.templates import Template, compile_template, render_template
from goflow.expr.text import to_text
from goflow.expr.transforms import Transform, compile_transform

__all__ = [
    "ExpressionError", "UndefinedVariableError",
    "Condition", "parse_condition",
    "interpolate", "interpolation_references", "check_interpolation", "render_text",
    "Transform", "compile_transform",
    "Template", "compile_template", "render_template",
    "parse_path", "resolve_path",
    "to_text",
]
