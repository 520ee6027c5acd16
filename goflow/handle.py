"""Start a run and hold it: :func:`start` returns a :class:`RunHandle` at once.

The handle has the execution id before the first node runs, iterators over the run's
events that miss nothing from its first event (sync :meth:`RunHandle.events` and async
:meth:`RunHandle.aevents`), a result to wait for and :meth:`RunHandle.cancel`. It talks to
an embedded coordinator (the default: this process starts one with local workers, as
``goflow run`` does) or to a ``goflow-coordinator`` daemon (``coordinator=``), with the
same semantics: both are reached through their event and control endpoints, so a handle
behaves like any other subscriber (``docs/events.md``).

History: an embedded run is recorded in the history database as ``goflow run`` records it
(``history=False`` to skip); a daemon records what it is submitted when it runs with
``--db``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

from goflow.coordinator.embedded import EmbeddedRuntime, ExecutionResult
from goflow.events import ids as execution_ids
from goflow.events.filter import EventFilter
from goflow.events.monitor import Monitor, Since
from goflow.events.types import TERMINAL_TYPES, Event
from goflow.language.loader import check, read
from goflow.language.model import Workflow
from goflow.errors import WorkflowError
from goflow.states import TERMINAL_STATUSES

EventCallback = Callable[[Event], None]
CANCEL_GRACE_S = 15.0
"""How long :meth:`RunHandle.result` waits for a cancelled run (Ctrl-C) to end."""
DAEMON_STATUS_EVERY_S = 2.0
"""Against a daemon, :meth:`RunHandle.result` also asks for the status this often."""


def _scoped(execution_id: str, filter: EventFilter | None) -> EventFilter:
    """``filter`` narrowed to one execution (its terminal events always match)."""
    filter = filter or EventFilter()
    return EventFilter(types=filter.types, executions=[execution_id], nodes=filter.nodes)


class RunHandle:
    """One execution, started by :func:`start`. Close it (or use ``with``) when done: an
    embedded run's coordinator and workers live until then, so its events stay
    replayable and its control endpoints keep answering after the run ended."""

    def __init__(self, execution_id: str, workflow: str, *, events: str, control: str,
                 curve: dict | None = None, runtime: EmbeddedRuntime | None = None,
                 future: Future | None = None):
        self.execution_id = execution_id
        self.workflow = workflow
        self.events_endpoint = events
        self.control_endpoint = control
        self.curve = curve
        self._runtime = runtime
        self._future = future
        self._result: ExecutionResult | None = None
        self._callback: threading.Thread | None = None
        self._callback_error: BaseException | None = None

    # -- events ------------------------------------------------------------------------------
    def _monitor(self) -> Monitor:
        return Monitor(self.events_endpoint, self.control_endpoint, curve=self.curve)

    def events(self, filter: EventFilter | None = None, *, since: Since = "start",
               timeout: float | None = None) -> Iterator[Event]:
        """This run's events in order, exactly once, from its first (``since="start"``)
        to its terminal event, where the iterator ends. ``filter``'s types and nodes narrow
        what is yielded (the terminal event always is). ``timeout``: stop after that many
        seconds without an event. Losses that cannot be repaired are counted, see
        :class:`~goflow.events.monitor.Monitor`. Any number of iterators may run at once."""
        monitor = self._monitor()
        try:
            yield from monitor.subscribe(_scoped(self.execution_id, filter), since=since, timeout=timeout,
                                         until=lambda event: event.is_terminal)
        finally:
            monitor.close()

    async def aevents(self, filter: EventFilter | None = None, *, since: Since = "start",
                      timeout: float | None = None) -> AsyncIterator[Event]:
        """The asyncio twin of :meth:`events` (``async for event in handle.aevents()``)."""
        monitor = self._monitor()
        try:
            async for event in monitor.asubscribe(_scoped(self.execution_id, filter), since=since,
                                                  timeout=timeout, until=lambda event: event.is_terminal):
                yield event
        finally:
            monitor.close()

    def _follow(self, callback: EventCallback, filter: EventFilter | None) -> None:
        """Call ``callback`` for every event on a background thread (what raises in it stops
        the deliveries and is re-raised by :meth:`result`)."""
        events = self.events(filter)

        def deliver() -> None:
            try:
                for event in events:
                    callback(event)
            except BaseException as exc:  # handed to result()
                self._callback_error = exc

        self._callback = threading.Thread(target=deliver, name="goflow-on-event", daemon=True)
        self._callback.start()

    def request(self, op: str, **fields: Any) -> dict:
        """One control request to the run's coordinator (``progress``, ``variables``, ...;
        ``execution_id`` is filled in), see ``docs/events.md`` §4."""
        with self._monitor() as monitor:
            return monitor.request(op, **{"execution_id": self.execution_id, **fields})

    # -- outcome -----------------------------------------------------------------------------
    def done(self) -> bool:
        """Whether the run has ended (a local check embedded, a status request otherwise)."""
        if self._result is not None:
            return True
        if self._future is not None:
            return self._future.done()
        return self.request("status").get("status") in TERMINAL_STATUSES

    def result(self, timeout: float | None = None) -> ExecutionResult:
        """Wait for the run to end and return its outcome (the object ``goflow run --json``
        prints). Ctrl-C while waiting cancels the run, then waits for it to end. With an
        ``on_event`` callback, returns once the callback has seen the terminal event (and
        re-raises what the callback raised). TimeoutError after ``timeout`` seconds."""
        if self._result is None:
            try:
                self._result = self._wait(timeout)
            except KeyboardInterrupt:
                self.cancel("interrupted (Ctrl-C)")
                self._result = self._wait(CANCEL_GRACE_S)
        if self._callback is not None:
            self._callback.join(timeout)
            if self._callback_error is not None:
                raise self._callback_error
        return self._result

    async def aresult(self, timeout: float | None = None) -> ExecutionResult:
        """The asyncio twin of :meth:`result` (waits in a thread)."""
        return await asyncio.to_thread(self.result, timeout)

    def _wait(self, timeout: float | None) -> ExecutionResult:
        if self._future is not None:
            return ExecutionResult.from_summary(self._future.result(timeout))
        deadline = None if timeout is None else time.monotonic() + timeout
        ends = EventFilter(types=sorted(TERMINAL_TYPES))
        since: Since = "start"
        while self.request("status").get("status") not in TERMINAL_STATUSES:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"execution {self.execution_id} did not end within {timeout:g}s")
            # Wake on the terminal event; the status check covers one published between two rounds.
            wait = DAEMON_STATUS_EVERY_S if deadline is None else \
                max(0.0, min(DAEMON_STATUS_EVERY_S, deadline - time.monotonic()))
            for _ in self.events(ends, since=since, timeout=wait):
                break
            since = "now"
        with self._monitor() as monitor:
            return result_from_control(monitor, self.execution_id)

    def cancel(self, reason: str = "cancelled by request") -> None:
        """Ask the coordinator to cancel the run (running nodes end with ``node.cancelled``)."""
        if self._runtime is not None:
            self._runtime.coordinator.cancel(self.execution_id, reason)
        else:
            self.request("cancel", reason=reason)

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Cancel the run if it still runs, then stop an embedded coordinator and its workers."""
        if self._runtime is None:
            return
        runtime, self._runtime = self._runtime, None
        try:
            if self._future is not None and not self._future.done():
                runtime.coordinator.cancel(self.execution_id, "the handle was closed")
                try:
                    self._future.result(CANCEL_GRACE_S)
                except Exception:
                    pass
            if self._callback is not None:
                self._callback.join(5)
        finally:
            runtime.close()

    def __enter__(self) -> "RunHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> "RunHandle":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.to_thread(self.close)

    def __repr__(self) -> str:
        where = "embedded" if self._runtime is not None or self._future is not None else self.control_endpoint
        return f"RunHandle({self.execution_id!r}, workflow={self.workflow!r}, {where})"




def result_from_control(client: Any, execution_id: str) -> ExecutionResult:
    """An ended execution's :class:`ExecutionResult` from its coordinator's control ops,
    once its outcome is recorded in the coordinator's history (or why it cannot be; at once
    when it keeps none). ``records``: the last 1,000 attempt records it holds."""
    delay = 0.02
    while True:
        history = client.request("status", execution_id=execution_id).get("history")
        if not history or history.get("recorded") or history.get("problem"):
            break
        time.sleep(delay)
        delay = min(0.5, delay * 1.5)
    execution = client.request("execution", execution_id=execution_id)
    variables = client.request("variables", execution_id=execution_id).get("variables") or {}
    started, finished = execution.get("started_at") or 0.0, execution.get("finished_at") or time.time()
    return ExecutionResult.from_summary({**execution, "variables": variables, "history": history,
                                         "duration_s": max(0.0, finished - started)})


def _load(source: str | os.PathLike | Workflow) -> tuple[Workflow, str | None, list[str], str]:
    """(workflow, YAML text or None, python paths for workers, file name)."""
    if isinstance(source, Workflow):
        return source, None, [], source.name
    path = Path(source)
    loaded = check(read(path))
    if loaded.errors:
        raise WorkflowError(loaded.problems)
    return loaded.workflow, loaded.text, [str(path.resolve().parent)], path.name


def start(source: str | os.PathLike | Workflow, variables: dict[str, Any] | None = None, *,
          timeout: float | None = None, execution_id: str | None = None,
          on_event: EventCallback | None = None, on_event_filter: EventFilter | None = None,
          workers: int | None = None, publish: Iterable[str] = (), control: Iterable[str] = (),
          history: bool = True, db: str | os.PathLike | None = None,
          coordinator: str | None = None, events: str | None = None, curve: dict | None = None) -> RunHandle:
    """Start a workflow (a path, or a loaded :class:`Workflow` when embedded) and return its
    handle at once.

    Embedded (default): a coordinator with ``workers`` local worker processes (default:
    CPU count) runs in this process until the handle is closed; ``publish``/``control``
    add event/control endpoints for other subscribers (e.g. ``tcp://127.0.0.1:5556``);
    the run is recorded in the history (``db``, default as ``goflow run``) unless
    ``history=False``.

    Daemon: ``coordinator`` (its control endpoint) and ``events`` (its event endpoint)
    name a ``goflow-coordinator``; ``curve`` is a Monitor-style key map for a CURVE one.
    The workflow file's text is submitted; the daemon's workers must be able to import
    the workflow's Python modules.

    ``on_event(event)`` is called for every event of the run (narrowed by
    ``on_event_filter``), in order, from the first, on a background thread.

    Raises :class:`~goflow.errors.WorkflowError` for an invalid workflow and ValueError
    for missing required variables, before anything starts.
    """
    workflow, text, paths, name = _load(source)
    execution_id = execution_ids.given_or_new(execution_id)  # ValueError before anything starts
    if coordinator is not None:
        handle = _submit_to_daemon(workflow, text, name, variables, timeout=timeout, execution_id=execution_id,
                                   coordinator=coordinator, events=events, curve=curve)
        if on_event is not None:
            handle._follow(on_event, on_event_filter)
        return handle
    if events is not None:
        raise ValueError("events= names a daemon's event endpoint: give coordinator= too")
    from goflow.coordinator.plan import initial_variables
    from goflow.history.store import default_db_path

    initial_variables(workflow, dict(variables or {}))   # fail before starting anything
    runtime = EmbeddedRuntime(workers=workers, publish=list(publish), control=list(control), python_paths=paths,
                              db=(db or default_db_path()) if history else None)
    runtime.__enter__()
    try:
        handle = RunHandle(execution_id, workflow.name, events=runtime.events_endpoint,
                           control=runtime.control_endpoint, runtime=runtime)
        if on_event is not None:
            handle._follow(on_event, on_event_filter)
        handle._future = runtime.submit(workflow, variables, timeout=timeout, execution_id=execution_id,
                                        source=text)
    except BaseException:
        runtime.close()
        raise
    return handle


async def astart(source: str | os.PathLike | Workflow, variables: dict[str, Any] | None = None,
                 **options: Any) -> RunHandle:
    """The asyncio form of :func:`start` (starting workers takes a moment: done in a thread)."""
    return await asyncio.to_thread(start, source, variables, **options)


def _submit_to_daemon(workflow: Workflow, text: str | None, name: str, variables: dict[str, Any] | None, *,
                      timeout: float | None, execution_id: str, coordinator: str, events: str | None,
                      curve: dict | None) -> RunHandle:
    if text is None:
        raise TypeError("a daemon is sent the workflow's text: pass the workflow file's path, not a Workflow")
    if events is None:
        raise ValueError("coordinator= needs events= too (the daemon's event endpoint, e.g. tcp://127.0.0.1:5556)")
    request: dict[str, Any] = {"workflow": text, "name": name, "variables": dict(variables or {}),
                               "execution_id": execution_id}
    if timeout is not None:
        request["timeout"] = timeout
    with Monitor(events, coordinator, curve=curve) as monitor:
        reply = monitor.request("submit", **request)
    return RunHandle(reply["execution_id"], reply.get("workflow") or workflow.name, events=events,
                     control=coordinator, curve=curve)


def run(source: str | os.PathLike | Workflow, variables: dict[str, Any] | None = None, *,
        workers: int | None = None, timeout: float | None = None, **options: Any) -> ExecutionResult:
    """Run a workflow (a path or a loaded :class:`Workflow`) to its end and return the result.

    ``options`` are :func:`start`'s (``on_event``, ``publish``, ``control``, ``history``,
    ``db``, ``coordinator``, ...). Raises :class:`~goflow.errors.WorkflowError` for an
    invalid workflow and ValueError for missing required variables, before anything starts.
    """
    with start(source, variables, workers=workers, timeout=timeout, **options) as handle:
        return handle.result()
