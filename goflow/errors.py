"""The goflow error hierarchy.

Every error a user can see derives from :class:`GoflowError` and carries a message that
says what is wrong and, where possible, how to fix it.
"""

from __future__ import annotations


class GoflowError(Exception):
    """Base class of every error goflow raises on purpose."""


class ExpressionError(GoflowError):
    """An expression, condition, template or interpolation that cannot be parsed or evaluated.

    ``position`` is the 0-based character offset in ``source`` where the problem was found,
    when known.
    """

    def __init__(self, message: str, *, source: str | None = None, position: int | None = None):
        super().__init__(message)
        self.message = message
        self.source = source
        self.position = position


class UndefinedVariableError(ExpressionError):
    """A reference names a variable (or a path inside one) that does not exist."""

    def __init__(self, name: str, *, source: str | None = None, position: int | None = None,
                 detail: str | None = None):
        message = detail or f"undefined variable '{name}'"
        super().__init__(message, source=source, position=position)
        self.name = name


class WorkflowError(GoflowError):
    """A workflow file that cannot be loaded or does not validate.

    ``problems`` holds every :class:`goflow.language.validation.Problem` found, errors and warnings.
    """

    def __init__(self, problems: list, message: str | None = None):
        self.problems = problems
        errors = [p for p in problems if p.severity == "error"]
        super().__init__(message or "\n".join(str(p) for p in errors) or "invalid workflow")
