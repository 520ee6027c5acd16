"""What ``goflow run`` prints off a terminal: one line per node and execution event (on a
terminal it shows :mod:`goflow.cli.run_view`)."""

from __future__ import annotations

from goflow.cli.event_lines import log_line
from goflow.events.types import Event

NODE_EVENTS = ("node.started", "node.completed", "node.failed", "node.skipped", "node.retrying", "node.cancelled")


def plain_line(event: Event, started: float) -> str | None:
    """The log line of a node or execution event (None for the others)."""
    if event.type not in NODE_EVENTS and not event.type.startswith("execution."):
        return None
    return log_line(event, started)
