"""goflow: run GoFlow-compatible workflows on worker processes, observable in real time.

The public API is small and imported lazily, so a worker process that only needs the
protocol does not pay for pydantic and the loader:

* :func:`load` / :func:`validate`: read and check a workflow file.
* :func:`start` / :func:`astart`: start a run and get its :class:`RunHandle` at once
  (execution id, events from the first, result, cancel), embedded or on a daemon.
* :func:`run`: run a workflow to its end and return its :class:`ExecutionResult`.
* :class:`Monitor`, :class:`EventFilter`: subscribe to the event stream.
* :func:`progress`: report a python node's progress from inside it (``node.progress``).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": ("goflow.language.loader", "load"),
    "validate": ("goflow.language.loader", "validate_file"),
    "Workflow": ("goflow.language.model", "Workflow"),
    "Problem": ("goflow.language.problems", "Problem"),
    "run": ("goflow.handle", "run"),
    "start": ("goflow.handle", "start"),
    "astart": ("goflow.handle", "astart"),
    "RunHandle": ("goflow.handle", "RunHandle"),
    "ExecutionResult": ("goflow.coordinator.embedded", "ExecutionResult"),
    "Monitor": ("goflow.events.monitor", "Monitor"),
    "EventFilter": ("goflow.events.filter", "EventFilter"),
    "Event": ("goflow.events.types", "Event"),
    "progress": ("goflow.workers.capture", "progress"),
    "GoflowError": ("goflow.errors", "GoflowError"),
    "WorkflowError": ("goflow.errors", "WorkflowError"),
    "ExpressionError": ("goflow.errors", "ExpressionError"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'goflow' has no attribute {name!r}")
    import importlib

    module_name, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module_name), attribute)
    globals()[name] = value
    return value
