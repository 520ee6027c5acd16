"""What running nodes say: ``log`` batches from workers become ``node.log`` / ``node.progress``.

Workers send a running task's output lines and progress on their log lane
(goflow/workers/capture.py); the lines left when the task ends ride in its result with the
number of batches sent before. Because the log lane and the task lane are separate
connections, a result can overtake the last batches: :meth:`NodeOutput.finish` then holds
the result until they arrive (at most :data:`HOLD_RESULT_S`), so subscribers always see a
node's lines before its outcome. Secret values are masked here, where lines enter the
coordinator, with the execution's redaction (``Execution.public``, goflow/redaction.py).

``node.progress`` is conflated per task like ``progress.update`` per execution: at most one
event per ``progress_interval``, the latest report winning, the last one sent before the
node's outcome. Everything here runs on the reactor thread; a batch costs O(1) Python work
(O(lines) only to mask secrets) plus encoding.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from goflow.coordinator.task import Task

HOLD_RESULT_S = 2.0
"""How long a result waits for log batches that it says were sent before it."""


class NodeOutput:
    """Publishes node output for the coordinator (``host`` gives ``publisher``, ``call_later``)."""

    def __init__(self, host: Any, progress_interval: float):
        self.host = host
        self.progress_interval = progress_interval
        self.held: dict[Any, tuple["Task", dict, Any]] = {}
        """Results waiting for their log batches: task id -> (task, result, timer)."""
        self.stats = {"log_batches": 0, "log_lines": 0, "late_batches": 0}

    # -- worker messages -------------------------------------------------------------------
    def on_batch(self, task: "Task | None", message: dict) -> None:
        """A ``log`` message from a worker's log lane (``task`` None: it is not known any more)."""
        held = self.held.get(message.get("id"))
        if task is None and held is not None:
            task = held[0]
        if task is None or not _wanted(task):
            self.stats["late_batches"] += 1
            return
        task.log_batches += 1
        self._publish(task, message)
        if held is not None and task.log_batches >= int((held[1].get("logs") or {}).get("batches") or 0):
            self._release(task.id)

    def finish(self, task: "Task", message: dict, complete: Callable[["Task", dict], None]) -> None:
        """``task``'s result arrived: publish its last lines, then ``complete`` it (maybe later)."""
        logs = message.get("logs")
        if not isinstance(logs, dict) or not _wanted(task):  # nothing said, or no longer wanted
            if task.progress_pending is not None:
                self._flush_progress(task)
            complete(task, message)
            return
        expected = int(logs.get("batches") or 0)
        if task.log_batches < expected:
            timer = self.host.call_later(HOLD_RESULT_S, lambda: self._release(task.id))
            self.held[task.id] = (task, message, (timer, complete))
            return
        self._finish(task, message, complete)

    # -- internals -------------------------------------------------------------------------
    def _release(self, task_id: Any) -> None:
        entry = self.held.pop(task_id, None)
        if entry is None:
            return
        task, message, (timer, complete) = entry
        timer.cancel()
        missing = int(message["logs"].get("batches") or 0) - task.log_batches
        if missing > 0:  # lost on the way (never expected on a healthy connection): say so
            message["logs"]["lost_batches"] = missing
        self._finish(task, message, complete)

    def _finish(self, task: "Task", message: dict, complete: Callable[["Task", dict], None]) -> None:
        if _wanted(task):  # not cancelled while its result waited
            self._publish(task, message["logs"])
        self._flush_progress(task)
        complete(task, message)

    def _publish(self, task: "Task", batch: dict) -> None:
        run = task.run
        execution = run.frame.execution
        lines = batch.get("lines")
        if not isinstance(lines, list):
            lines = []
        dropped = batch.get("dropped") or 0
        if lines or dropped or batch.get("lost_batches"):
            # The worker's line maps are published as they came (no per-line work here
            # unless the execution has secrets to mask).
            lines = execution.public(lines)
            meta: dict[str, Any] = {"lines": lines, "dropped": dropped, **run.frame.context}
            if batch.get("lost_batches"):
                meta["lost_batches"] = batch["lost_batches"]
            self.stats["log_batches"] += 1
            self.stats["log_lines"] += len(lines)
            self.host.publisher.emit("node.log", execution.id, node_id=run.node.id, node_type=run.node.type,
                                     status="running", attempt=task.attempt, meta=meta)
        report = batch.get("progress")
        if isinstance(report, dict):
            task.progress_pending = report
            now = time.monotonic()
            due = task.progress_sent + self.progress_interval
            if now >= due:
                self._flush_progress(task)
            elif not task.progress_timer:
                task.progress_timer = True
                self.host.call_later(due - now, lambda: self._progress_due(task))

    def _progress_due(self, task: "Task") -> None:
        task.progress_timer = False
        if not task.done:
            self._flush_progress(task)

    def _flush_progress(self, task: "Task") -> None:
        report, task.progress_pending = task.progress_pending, None
        if report is None or not _wanted(task):
            return
        task.progress_sent = time.monotonic()
        run = task.run
        execution = run.frame.execution
        meta: dict[str, Any] = {"progress": report.get("progress"), "total": report.get("total"),
                                **run.frame.context}
        total = report.get("total")
        if isinstance(total, (int, float)) and total > 0 and isinstance(report.get("progress"), (int, float)):
            meta["percent"] = round(100.0 * min(report["progress"], total) / total, 2)
        if report.get("message") is not None:
            message = report["message"]
            meta["message"] = execution.public(message)
        self.host.publisher.emit("node.progress", execution.id, node_id=run.node.id, node_type=run.node.type,
                                 status="running", attempt=task.attempt, meta=meta)


def _wanted(task: "Task") -> bool:
    """Whether ``task`` is still its node's running attempt (what it says is published only
    then: never after the node's ``node.cancelled``)."""
    run = task.run
    return run is not None and run.task is task and run.state == "running" and run.frame.execution.active
