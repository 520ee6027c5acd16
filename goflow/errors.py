"""The goflow error hierarchy.

Every error a user can see derives from :class:`GoflowError` and carries a message that
says what is wrong and, where possible, how to fix it.
"""

from __future__ import annotations

from enum import Enum


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


class ErrorKind(str, Enum):
    """Every ``error.type`` goflow reports: in node and execution errors, events, history
    and control replies. Workers, the coordinator and the docs (docs/events.md) use these
    names and no others; retry policies (``retry.on``) match them.
    """

    # a node's own failure, reported by a worker
    PYTHON_ERROR = "python_error"
    IMPORT_ERROR = "import_error"
    TRANSFORM_ERROR = "transform_error"
    TOOL_ERROR = "tool_error"
    TOOL_NOT_FOUND = "tool_not_found"
    INVALID_ARGUMENTS = "invalid_arguments"
    CONNECTION = "connection"
    SERVER_LOST = "server_lost"
    SERIALIZATION = "serialization"
    RESULT_TOO_LARGE = "result_too_large"
    WORKER_ERROR = "worker_error"
    # decided by the coordinator
    TIMEOUT = "timeout"
    WORKER_LOST = "worker_lost"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    EXPRESSION_ERROR = "expression_error"
    UNDEFINED_VARIABLE = "undefined_variable"
    UNSUPPORTED = "unsupported"
    UNRESUMABLE = "unresumable"
    # control replies
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    NOT_FOUND = "not_found"
    INVALID_WORKFLOW = "invalid_workflow"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    # HTTP gateway replies
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"

    def __str__(self) -> str:
        return self.value


CONTROL_ERROR_KINDS = frozenset({ErrorKind.BAD_REQUEST, ErrorKind.UNKNOWN_OP, ErrorKind.NOT_FOUND,
                                 ErrorKind.INVALID_WORKFLOW, ErrorKind.UNAVAILABLE, ErrorKind.INTERNAL,
                                 ErrorKind.TIMEOUT})
"""The kinds a control reply's ``error.type`` may take."""
