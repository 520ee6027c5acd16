"""An in-process :class:`~goflow.coordinator.execution.Host` for pure scheduling tests.

Worker tasks are answered by the host itself (a ``python`` node returns its first argument),
in FIFO order, one per :meth:`TestHost.run` turn, like results arriving on the reactor; timers
fire in deadline order without sleeping. Events are counted by type (``variable.changed`` also logged); nothing is encoded.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from typing import Any, Callable

from goflow.coordinator.execution import Execution, Task
from goflow.coordinator.plan import compile_plan, initial_variables
from goflow.language.model import Workflow


class _Timer:
    def __init__(self, callback: Callable[[], None]):
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class TestHost:
    __test__ = False  # not a pytest test class
    max_value_bytes = 1024

    def __init__(self) -> None:
        self.tasks: deque[Task] = deque()
        self.timers: list[tuple[float, int, _Timer]] = []
        self.order = itertools.count()
        self.events: Counter[str] = Counter()
        self.log: list[tuple[str, str | None, str | None]] = []
        """``variable.changed`` events as ``(type, scope, name)``."""
        self.finished: list[Execution] = []
        self.max_in_flight = 0
        self.timers_fired = 0

    # -- Host protocol -----------------------------------------------------------------------
    def dispatch(self, task: Task) -> None:
        self.tasks.append(task)
        self.max_in_flight = max(self.max_in_flight, len(self.tasks))

    def cancel_task(self, task: Task) -> None:
        task.done = True

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(callback)
        heapq.heappush(self.timers, (delay, next(self.order), timer))
        return timer

    def emit(self, execution: Execution, type: str, **fields: Any) -> None:
        self.events[type] += 1
        if type == "variable.changed":
            meta = fields.get("meta") or {}
            self.log.append((type, meta.get("scope"), meta.get("name")))

    def progress(self, execution: Execution, force: bool) -> None:
        pass

    def execution_finished(self, execution: Execution) -> None:
        self.finished.append(execution)

    def server_spec(self, execution: Execution, server_id: str) -> dict:
        raise KeyError(server_id)

    # -- driving -----------------------------------------------------------------------------
    def run(self, workflow: Workflow, variables: dict | None = None,
            prepare: Callable[[Execution], None] | None = None) -> Execution:
        """Run ``workflow`` to its end and return the finished execution (``prepare`` sees it
        before it starts)."""
        execution = Execution("test", compile_plan(workflow), initial_variables(workflow, variables or {}), self)
        if prepare is not None:
            prepare(execution)
        execution.start()
        while execution.active and (self.tasks or self.timers):
            if self.tasks:
                task = self.tasks.popleft()
                if not task.done:
                    task.done = True
                    args = task.spec.get("args") or [None]
                    task.deliver(task, {"ok": True, "value": args[0]})
            else:
                _, _, timer = heapq.heappop(self.timers)
                if not timer.cancelled:
                    self.timers_fired += 1
                    timer.callback()
        return execution
