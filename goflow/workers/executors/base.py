"""What every executor shares: its output type and the two ways a task ends early."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


class TaskError(Exception):
    """A task failed; ``error_type`` is the class retry policies match on."""

    def __init__(self, error_type: str, message: str, *, detail: dict | None = None):
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.detail = detail or {}


class TaskCancelled(BaseException):
    """Raised inside a running task when the coordinator cancels it.

    A BaseException so user code's ``except Exception`` does not swallow it.
    """


@dataclass
class ExecutorOutput:
    """A task's value plus extra facts for the node record (e.g. an MCP raw result)."""

    value: Any
    meta: dict = field(default_factory=dict)


Executor = Callable[[dict], Any]
