"""The states a run and its nodes go through, named once for every layer.

``RunStatus`` is what ``status`` says in events, control replies, results and history; a
``str`` enum, so it compares equal to and serialises as its plain value.
"""

from __future__ import annotations

from enum import Enum


class RunStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    def __str__(self) -> str:
        return self.value


TERMINAL_STATUSES = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.TIMED_OUT})
"""A run in one of these has ended and will not change again."""
TERMINAL_EVENT_TYPES = frozenset({"execution.completed", "execution.failed", "execution.cancelled"})
"""The events that end an execution's stream (a timed-out run ends with ``execution.failed``)."""
