"""A unit of work sent to a worker, and where its result goes.

Tasks are made by executions (one per node attempt) and by the MCP preflight (one per
server's tool list); the broker hands them to workers and calls ``deliver`` exactly once
with the worker's result, or with the failure the coordinator decided on (timeout, worker
lost, unsendable inputs). Nothing here knows what a node is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

from goflow.errors import ErrorKind

if TYPE_CHECKING:
    from goflow.coordinator.execution import NodeRun


NO_LABELS: Mapping[str, str] = MappingProxyType({})
"""The labels of a task any worker may run (shared: a fan-out queues one task per node)."""


@dataclass(eq=False, slots=True)
class Task:
    """``deliver(task, message)`` receives the result message (``{"ok": ..., ...}``)."""

    execution_id: str
    node_id: str | None
    attempt: int
    kind: str
    spec: dict
    timeout: float | None
    deliver: Callable[["Task", dict], None]
    run: "NodeRun | None" = None
    """The node attempt this task runs, whose live output (node.log/node.progress) it carries;
    None for the execution's own tasks (the MCP preflight)."""
    labels: Mapping[str, str] = field(default_factory=dict)
    id: int = 0
    worker: bytes | None = None
    worker_name: str | None = None
    """The name of the worker it was handed to (what events call ``worker``)."""
    started_at: float | None = None
    short: bool = False
    """Handed as a task measured short (prefetched); one that is not may run long, and no
    task is queued behind it (:meth:`~goflow.coordinator.workers.WorkerTable.pick`)."""
    timer: Any = None
    done: bool = False
    log_batches: int = 0
    """Log-lane batches received for this task (:mod:`goflow.coordinator.node_output`)."""
    progress_sent: float = 0.0
    progress_pending: dict | None = None
    progress_timer: bool = False
    profile: tuple = field(init=False)
    """What tasks of the same expected duration share (for the dispatch estimate): the kind
    and what it runs (python call, MCP tool, transform text). Set once: read per pick and result."""

    def __post_init__(self) -> None:
        spec = self.spec
        self.profile = (self.kind, spec.get("call") or spec.get("tool") or spec.get("expression")
                        or spec.get("template"))

    def timed_out(self) -> dict:
        """The result a task gets when it outruns its ``timeout`` (whichever host enforces it)."""
        return {"ok": False, "error": {
            "type": ErrorKind.TIMEOUT, "message": f"node '{self.node_id}' exceeded its timeout of {self.timeout:g}s"}}

