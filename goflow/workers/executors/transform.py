"""``transform`` nodes: jq, JSONPath, templates and expressions over the node's input."""

from __future__ import annotations

from typing import Any

from goflow.errors import ErrorKind, ExpressionError, UndefinedVariableError
from goflow.language.expr import Transform, compile_transform
from goflow.workers.executors.base import TaskError


class TransformExecutor:
    """Compiles each distinct transform once per worker and applies it.

    Task spec: ``expression`` or ``template``, ``input`` (the input value, may be absent),
    ``variables`` (the variables the transform references). Errors: ``undefined_variable``,
    ``transform_error``.
    """

    def __init__(self) -> None:
        self._compiled: dict[tuple[str | None, str | None], Transform] = {}

    def __call__(self, spec: dict) -> Any:
        key = (spec.get("expression"), spec.get("template"))
        try:
            transform = self._compiled.get(key)
            if transform is None:
                transform = self._compiled[key] = compile_transform(expression=key[0], template=key[1])
            return transform.apply(spec.get("input"), spec.get("variables") or {})
        except UndefinedVariableError as exc:
            raise TaskError(ErrorKind.UNDEFINED_VARIABLE, exc.message) from None
        except ExpressionError as exc:
            raise TaskError(ErrorKind.TRANSFORM_ERROR, exc.message) from None
        except (ValueError, TypeError, ArithmeticError) as exc:  # e.g. jq runtime errors
            raise TaskError(ErrorKind.TRANSFORM_ERROR, f"{type(exc).__name__}: {exc}") from None
