"""An in-process :class:`~goflow.coordinator.execution.Host`: scheduling semantics without
processes or sockets (as dramatiq's stub broker stands in for a real broker).

Only the host is replaced, i.e. the boundary the coordinator's broker and reactor own; the
execution, its plan, the retry decision and the executors are goflow's own code:

* **Tasks run in-process** through a :class:`~goflow.workers.executors.ExecutorRegistry`
  (``python`` nodes import ``module:function`` and call it with the node's args and kwargs,
  ``transform`` nodes run goflow's transform code), and their results are shaped by
  :meth:`ExecutorRegistry.run`, the same code a worker uses: ``python_error`` with the
  exception's name, ``transform_error``, ``import_error``. Specs and values make the msgpack
  round trip they make on the wire (tuples arrive as lists).
* **A fake clock**: nothing sleeps. A task takes ``durations`` seconds of fake time (0 unless
  the test says otherwise; ``math.inf``: it never returns), and its function is called when
  that time has passed, so a task cancelled or timed out before then never runs it. A task's
  ``timeout`` fails it with the broker's ``timeout`` error. Timers (retry backoff, the
  execution timeout, the scheduler's turns) fire in deadline order, ties in the order they
  were set, when the test calls :meth:`TestHost.step`, :meth:`advance` or :meth:`run`.
* **Every event is recorded** as an :class:`Event` (type, node, attempt, status, meta,
  error, fake time), counted by type in :attr:`counts`; ``keep`` filters what is kept (the
  100k-node scale tests keep only what they assert on).

What needs real processes or sockets (a worker killed mid-task, a task stuck in C, values
that cannot be encoded, real overlap, signals, the published stream) is tested on real
workers instead (tests/test_engine.py and the others).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import msgpack

from goflow.coordinator.execution import Execution, Task
from goflow.coordinator.plan import compile_plan, initial_variables
from goflow.language.model import Workflow
from goflow.workers.executors import ExecutorRegistry


@dataclass(frozen=True, slots=True)
class Event:
    """One emitted event as the test host saw it (``time``: the fake clock's reading)."""

    type: str
    node_id: str | None
    attempt: int | None
    status: str | None
    meta: dict
    error: dict | None
    time: float


class _Timer:
    """What :meth:`TestHost.call_later` returns: the execution may ``cancel()`` it."""

    def __init__(self, callback: Callable[[], None]):
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def _wire(value: Any) -> Any:
    """``value`` after the msgpack round trip a task's spec or result makes between processes."""
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)


class TestHost:
    """Runs executions against a fake clock and in-process executors; see the module doc.

    ``durations``: fake seconds a task takes, by node id or as a function of the task.
    ``keep``: which events :attr:`events` keeps (all by default; :attr:`counts` counts all).
    """

    __test__ = False  # not a pytest test class
    max_value_bytes = 1024

    def __init__(self, *, durations: Mapping[str, float] | Callable[[Task], float] | None = None,
                 keep: Callable[[Event], bool] | None = None) -> None:
        self.durations = durations or {}
        self.keep = keep
        self.now = 0.0
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._executors = ExecutorRegistry()
        self.events: list[Event] = []
        self.counts: Counter[str] = Counter()
        self.dispatched: list[str | None] = []
        """The node id of every task handed to the host, in order (a retry is a new task)."""
        self.cancelled: list[str | None] = []
        """The node ids of tasks cancelled before they returned (their functions never ran)."""
        self._pending: dict[int, Task] = {}
        self.max_in_flight = 0
        self.timers_fired = 0
        self.finished: list[Execution] = []

    # -- Host protocol -----------------------------------------------------------------------
    def dispatch(self, task: Task) -> None:
        task.spec = _wire(task.spec)
        task.started_at = self.now
        self.dispatched.append(task.node_id)
        self._pending[id(task)] = task
        self.max_in_flight = max(self.max_in_flight, len(self._pending))
        duration = self._duration(task)
        if duration != math.inf:
            self._at(self.now + duration, lambda: self._complete(task))
        if task.timeout:
            self._at(self.now + task.timeout, lambda: self._time_out(task))

    def cancel_task(self, task: Task) -> None:
        if not task.done:
            self._settle(task)
            self.cancelled.append(task.node_id)

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(callback)

        def fire() -> None:
            if not timer.cancelled:
                self.timers_fired += 1
                callback()

        self._at(self.now + max(delay, 0.0), fire)
        return timer

    def emit(self, execution: Execution, type: str, run: Any = None, status: str | None = None,
             error: dict | None = None, meta: dict | None = None, snapshot_change: bool = False) -> None:
        self.counts[type] += 1
        event = Event(type, run.node.id if run else None, run.attempt if run else None, status,
                      meta or {}, error, self.now)
        if self.keep is None or self.keep(event):
            self.events.append(event)

    def progress(self, execution: Execution, force: bool) -> None:
        pass

    def execution_finished(self, execution: Execution) -> None:
        self.finished.append(execution)

    def server_spec(self, execution: Execution, server_id: str) -> dict:
        raise KeyError(f"the test host runs no MCP servers (asked for '{server_id}')")

    # -- the fake clock ----------------------------------------------------------------------
    def step(self) -> bool:
        """Do the next due thing (a task returning, a timer firing), moving the clock to it;
        False when nothing is pending."""
        if not self._due:
            return False
        when, _, action = heapq.heappop(self._due)
        self.now = max(self.now, when)
        action()
        return True

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` on, doing everything due by then in deadline order."""
        until = self.now + seconds
        while self._due and self._due[0][0] <= until:
            self.step()
        self.now = until

    # -- driving -----------------------------------------------------------------------------
    def start(self, workflow: Workflow, variables: dict | None = None, *, timeout: float | None = None,
              prepare: Callable[[Execution], None] | None = None) -> Execution:
        """Create and start an execution of ``workflow`` (``variables`` as a caller passes them;
        ``prepare`` sees the execution before it starts)."""
        execution = Execution("test", compile_plan(workflow), initial_variables(workflow, variables or {}), self,
                              timeout=timeout)
        if prepare is not None:
            prepare(execution)
        execution.start()
        return execution

    def run(self, workflow: Workflow, variables: dict | None = None, *, timeout: float | None = None,
            prepare: Callable[[Execution], None] | None = None) -> Execution:
        """Start an execution and step until it finishes (or nothing is left to do: then it
        is still running, e.g. waiting on a task that never returns)."""
        execution = self.start(workflow, variables, timeout=timeout, prepare=prepare)
        while execution.active and self.step():
            pass
        return execution

    def pending(self) -> list[Task]:
        """The dispatched tasks that have not returned, been cancelled or timed out."""
        return list(self._pending.values())

    def answer(self, task: Task, message: dict) -> None:
        """Return ``message`` (``{"ok": ..., ...}``) for the pending ``task`` now, instead of
        running it: for tests that decide every outcome themselves."""
        assert not task.done, f"task for '{task.node_id}' already settled"
        self._settle(task)
        task.deliver(task, {**message, "started": task.started_at, "finished": self.now, "worker": "test-host"})

    def of(self, type: str, node_id: str | None = None) -> list[Event]:
        """The kept events of ``type`` (for ``node_id``, if given), in emission order."""
        return [e for e in self.events if e.type == type and (node_id is None or e.node_id == node_id)]

    # -- tasks -------------------------------------------------------------------------------
    def _at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._due, (when, next(self._order), action))

    def _duration(self, task: Task) -> float:
        if callable(self.durations):
            return float(self.durations(task))
        return float(self.durations.get(task.node_id or "", 0.0))

    def _settle(self, task: Task) -> None:
        task.done = True
        del self._pending[id(task)]

    def _complete(self, task: Task) -> None:
        if task.done:
            return
        self.answer(task, _wire(self._executors.run(task.kind, task.spec)))

    def _time_out(self, task: Task) -> None:
        if task.done:
            return
        self.cancel_task(task)
        task.deliver(task, task.timed_out())
