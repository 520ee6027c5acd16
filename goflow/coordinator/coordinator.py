"""The coordinator: the execution registry, composed with a reactor, a broker and a publisher.

The reactor (:mod:`.reactor`) owns the thread; the broker (:mod:`.broker`) the workers'
socket and task queue; the publisher (:mod:`goflow.events.publisher`) the event stream; the
control ops (:mod:`.control_ops`) the control socket's requests. This class keeps what ties
them together: the executions, the :class:`~.execution.Host` interface they run against,
and the thread-safe public operations (submit, resume, cancel, drain, stop). Nothing else
touches execution state, so there are no locks around it.

While executions run, the objects that existed when the first of them started are frozen
out of the cyclic garbage collector (``gc.freeze``; see :func:`_running_changed`): a
process-wide setting, counted over every coordinator of the process, undone whenever no
execution runs in it.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Protocol

import zmq

from goflow import protocol
from goflow.control.framing import DEFAULT_MAX_MESSAGE_BYTES, ControlError, ControlServer, publisher_handlers
from goflow.coordinator.broker import WorkerBroker, apply_server_curve
from goflow.coordinator.control_ops import ControlOps
from goflow.coordinator.execution import Execution, Restored
from goflow.coordinator.local_workers import LocalWorkerPool
from goflow.coordinator.node_output import NodeOutput
from goflow.coordinator.plan import Plan, compile_plan, initial_variables
from goflow.coordinator.reactor import Reactor, Timer
from goflow.coordinator.server_registry import ServerRegistry
from goflow.coordinator.task import Task
from goflow.errors import ErrorKind
from goflow.events import ids as execution_ids
from goflow.events.codec import DEFAULT_MAX_VALUE_BYTES
from goflow.events.publisher import EventPublisher
from goflow.language.model import Workflow
from goflow.servers import expand_secret_refs

log = logging.getLogger("goflow.coordinator")


class History(Protocol):
    """What the coordinator asks of its history store (:class:`goflow.history.store.Store`)."""

    def record_submission(self, execution_id: str, workflow_name: str | None, workflow_text: Any,
                          variables: dict | None, *, secrets: Any = ()) -> None: ...
    def set_relief(self, callback: Callable[[], None]) -> None: ...
    def backlogged(self) -> bool: ...
    def after_written(self, execution_id: str, callback: Callable[[str | None], None]) -> None: ...
    def history_problem(self, execution_id: str) -> str | None: ...


class Coordinator:
    """Schedules executions onto workers and publishes every event.

    ``workers_endpoint``: where workers connect (ROUTER). ``event_endpoints``: where the
    XPUB binds. ``control_endpoints``: where the control ROUTER binds. All bound at
    construction, so a failure to bind surfaces before anything starts.

    ``history`` (the store fed by ``sink``, or None): every accepted submission (control op
    or :meth:`submit`) is recorded there, one path for all; dispatch holds while the store
    is backlogged; a finished execution is reported to its waiter and leaves memory only
    once it is recorded; control ops answer executions no longer in memory from it.
    """

    def __init__(self, *, workers_endpoint: str, event_endpoints: list[str], control_endpoints: list[str],
                 context: zmq.Context | None = None, sndhwm: int | None = None,
                 worker_liveness: float = 3.0, heartbeat_interval: float = 1.0,
                 progress_interval: float = 0.1, keep_finished: int = 200,
                 servers: ServerRegistry | None = None, curve: dict | None = None,
                 sink: Callable[[str | None, bytes, bytes], None] | None = None,
                 history: History | None = None,
                 max_message_bytes: int = protocol.MAX_MESSAGE_BYTES,
                 max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES, trace_context: bool = False):
        self.context = context or zmq.Context.instance()
        self.epoch = uuid.uuid4().hex
        self.heartbeat_interval = heartbeat_interval
        self.progress_interval = progress_interval
        self.keep_finished = keep_finished
        self._forgotten = 0
        """Executions dropped from memory since the last :func:`collect_garbage`."""
        self.servers = servers or ServerRegistry()
        self.history = history
        self.accepting = True
        self.max_value_bytes = max_value_bytes
        """Values in events larger than this (msgpack bytes) become ``$omitted`` markers."""

        self.reactor = Reactor()
        options = {"sndhwm": sndhwm} if sndhwm is not None else {}
        self.publisher = EventPublisher(self.context, event_endpoints, epoch=self.epoch, sink=sink,
                                        curve={"secret": curve["secret"], "domain": "events"} if curve else None,
                                        **options)
        self.node_output = NodeOutput(self, progress_interval)
        self.broker = WorkerBroker(self.context, workers_endpoint, reactor=self.reactor, publisher=self.publisher,
                                   epoch=self.epoch, curve=curve, max_message_bytes=max_message_bytes,
                                   worker_liveness=worker_liveness, heartbeat_interval=heartbeat_interval,
                                   node_output=self.node_output, trace_context=trace_context,
                                   backlogged=history.backlogged if history is not None else None)
        if history is not None:
            history.set_relief(lambda: self.call_soon(self.broker.pump))
        self.workers_endpoint = self.broker.endpoint
        self.control_socket = self.context.socket(zmq.ROUTER)
        self.control_socket.setsockopt(zmq.LINGER, 0)
        # Requests over the control limit get an error reply; absurd ones are cut by libzmq.
        self.control_socket.setsockopt(zmq.MAXMSGSIZE, 4 * DEFAULT_MAX_MESSAGE_BYTES)
        apply_server_curve(self.control_socket, curve, "control")
        for endpoint in control_endpoints:
            self.control_socket.bind(endpoint)
        self.control_ops = ControlOps(self)
        self.control = ControlServer(self.control_socket, {**publisher_handlers(self.publisher),
                                                           **self.control_ops.handlers()},
                                     call_soon=self.call_soon)

        self.executions: dict[str, Execution] = {}
        self.futures: dict[str, Future] = {}
        self.finished_order: deque[str] = deque()
        self.progress_due: dict[str, Timer] = {}
        self.progress_last: dict[str, float] = {}

        self.reactor.add_reader(self.control_socket, self.control.on_readable)
        self._events_socket = self.publisher.socket
        self.reactor.add_reader(self._events_socket, self.publisher.on_readable)
        # Registered after the broker's dispatch pump, so it runs last in every turn.
        self.reactor.after_each_turn(self._end_turn)
        self.reactor.on_start(lambda: self.call_later(self.heartbeat_interval, self._heartbeat))
        # Let workers' goodbyes arrive and flush the last events before the loop exits.
        self.reactor.on_exit(self.publisher.heartbeat)

    # -- threading -------------------------------------------------------------------------
    def start(self) -> None:
        """Run the reactor in a background thread."""
        self.reactor.start()

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the reactor thread (safe from any thread)."""
        self.reactor.call_soon(callback)

    def call(self, function: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``function`` on the reactor thread and return its result (from another thread)."""
        return self.reactor.call(function, timeout)

    def attach_local_pool(self, pool: LocalWorkerPool) -> None:
        self.broker.local_pool = pool

    # -- public operations (thread-safe) -----------------------------------------------------
    def submit(self, workflow: Workflow, variables: dict[str, Any] | None = None, *,
               timeout: float | None = None, execution_id: str | None = None,
               source: str | None = None) -> tuple[str, Future]:
        """Start an execution; returns its id and a Future resolving to its summary dict.

        ``source`` is the workflow's YAML text, recorded for resume (the model otherwise).
        Raises ValueError (missing required variables) before anything starts.
        """
        initial_variables(workflow, dict(variables or {}))  # fail fast, in the caller's thread
        plan = compile_plan(workflow)  # in the caller's thread too, not on the reactor
        execution_id = execution_ids.given_or_new(execution_id)
        future: Future = Future()
        self.call_soon(lambda: self.start_execution(workflow, variables, timeout=timeout, execution_id=execution_id,
                                                    future=future, source=source, plan=plan))
        return execution_id, future

    def resume(self, execution_id: str, workflow: Workflow, variables: dict[str, Any],
               completed: dict[str, Any], writes: dict[str, dict[str, Any]] | None = None, *,
               timeout: float | None = None) -> Future:
        """Restart an execution a previous coordinator left unfinished (thread-safe).

        ``completed`` maps main-graph node ids to their recorded outputs: those nodes are
        not run again (their events say ``meta.resumed``); nodes that were in flight run
        again as new attempts. ``writes`` maps some of them to the other changes they made to
        the execution's variables (merges, a sequential loop's body), written again as they
        are restored. An ``execution.resumed`` event comes first.
        """
        future: Future = Future()
        restored = Restored(dict(completed), dict(writes or {}))
        self.call_soon(lambda: self.start_execution(workflow, variables, timeout=timeout, execution_id=execution_id,
                                                    future=future, restored=restored))
        return future

    def fail_unresumable(self, execution_id: str, workflow_name: str, message: str) -> None:
        """Record (as an ``execution.failed`` event) that a previous coordinator's execution is lost."""

        def fail() -> None:
            self.publisher.open_execution(execution_id, workflow_name)
            self.publisher.emit("execution.failed", execution_id, status="failed",
                                error={"type": ErrorKind.UNRESUMABLE, "message": message, "node_id": None}, meta={})
            self.publisher.close_execution(execution_id)

        self.call_soon(fail)

    def start_execution(self, workflow: Workflow, variables: dict[str, Any] | None, *, timeout: float | None,
                        execution_id: str | None, future: Future | None = None,
                        restored: Restored | None = None, source: str | None = None,
                        plan: Plan | None = None) -> tuple[str, Future]:
        """Create, record and start an execution (reactor thread only; ``plan``: compiled already, off it)."""
        try:
            execution_id = execution_ids.given_or_new(execution_id)
        except ValueError as exc:
            raise ControlError("bad_request", str(exc)) from None
        if execution_id in self.executions:
            raise ControlError("bad_request", f"execution id {execution_id!r} is already in use")
        future = future or Future()
        plan = plan or compile_plan(workflow)
        supplied = dict(variables or {})
        execution = Execution(execution_id, plan, initial_variables(workflow, supplied), self,
                              timeout=timeout, restored=restored)
        self.executions[execution_id] = execution
        self.futures[execution_id] = future
        if self.history is not None and restored is None:
            # Secret texts in the source (a secret's default) are masked like everything else;
            # recovery then knows the execution cannot be resumed from it.
            text = execution.public(source if source is not None else workflow.source_text())
            self.history.record_submission(execution_id, workflow.name, text, supplied, secrets=plan.secrets)
        self.publisher.open_execution(execution_id, workflow.name)
        _running_changed(+1)
        execution.start()
        return execution_id, future


    def cancel(self, execution_id: str, reason: str = "cancelled by request") -> None:
        def cancel() -> None:
            execution = self.executions.get(execution_id)
            if execution is not None and execution.active:
                execution.cancel(reason)

        self.call_soon(cancel)

    def drain(self, grace: float) -> list[str]:
        """Stop accepting executions and wait up to ``grace`` seconds for running nodes to finish.

        Executions still running after that are cancelled (reason: shutdown). Returns their ids.
        Safe from any thread; used by the daemon on SIGTERM before :meth:`stop`.
        """
        def stop_dispatching() -> None:
            self.accepting = False
            self.broker.dispatching = False

        self.call(stop_dispatching)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.call(self.broker.busy):
            time.sleep(0.05)

        def cancel_rest() -> list[str]:
            unfinished = [e.id for e in self.executions.values() if e.active]
            for execution_id in unfinished:
                self.executions[execution_id].cancel("the coordinator shut down before the execution finished")
            return unfinished

        return self.call(cancel_rest)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what runs, shut the workers down, flush events and close every socket.

        Also right for a coordinator that never started (it only closes its sockets).
        """
        if self.control_socket.closed:
            return
        if self.reactor.started:
            self.call_soon(self._shutdown)
            self.reactor.join(timeout)
        self.control_ops.close()
        if self.history is not None:
            self.history.set_relief(None)
        if self.broker.local_pool is not None:
            self.broker.local_pool.stop()
        self.publisher.close(linger_ms=1000)
        self.broker.close()
        self.control_socket.close(0)

    def _shutdown(self) -> None:
        for execution in list(self.executions.values()):
            if execution.active:
                execution.cancel("the coordinator is shutting down")
        self.broker.shutdown_workers()
        self.reactor.stop()

    def _end_turn(self) -> None:
        """Publish the turn's events in one burst (see goflow/events/publisher.py), and poll the
        publisher's new socket if it re-created it to shed a subscription flood."""
        self.publisher.flush()
        if self.publisher.socket is not self._events_socket:
            self.reactor.replace_reader(self._events_socket, self.publisher.socket, self.publisher.on_readable)
            self._events_socket = self.publisher.socket

    def _heartbeat(self) -> None:
        self.publisher.heartbeat()
        self.call_later(self.heartbeat_interval, self._heartbeat)

    # -- Host interface for executions -----------------------------------------------------
    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.reactor.call_later(delay, callback)

    def dispatch(self, task: Task) -> None:
        self.broker.dispatch(task)

    def cancel_task(self, task: Task) -> None:
        self.broker.cancel_task(task)

    def server_spec(self, execution: Execution, server_id: str) -> dict:
        """The spec of ``server_id`` for a task of ``execution`` (``${secret}`` references expanded)."""
        spec = next((server.model_dump(exclude={"description"}) for server in execution.workflow.servers
                     if server.id == server_id), None) or self.servers.spec(server_id)
        secrets = {name: execution.variables[name] for name in execution.plan.secrets
                   if execution.variables.get(name) is not None}
        return expand_secret_refs(spec, secrets)

    def progress(self, execution: Execution, force: bool) -> None:
        """Publish ``progress.update`` at most every ``progress_interval`` per execution
        (always when ``force``); a suppressed update is sent when the interval ends."""
        if not force:
            self._progress_later(execution)
            return
        self.progress_last[execution.id] = time.monotonic()
        self.emit(execution, "progress.update", meta=execution.progress_meta())

    def emit(self, execution: Execution, type: str, run: Any = None, status: str | None = None,
             error: dict | None = None, meta: dict | None = None, snapshot_change: bool = False) -> None:
        if run is not None:
            self.publisher.emit(type, execution.id, node_id=run.node.id, node_type=run.node.type,
                                status=status, attempt=run.attempt, snapshot_change=snapshot_change,
                                error=error, meta=meta)
        else:
            self.publisher.emit(type, execution.id, status=status or execution.status,
                                snapshot_change=snapshot_change, error=error, meta=meta)

    def _progress_later(self, execution: Execution) -> None:
        if execution.id in self.progress_due:
            return
        last = self.progress_last.get(execution.id, 0.0)
        delay = max(0.0, last + self.progress_interval - time.monotonic())

        def fire() -> None:
            self.progress_due.pop(execution.id, None)
            if execution.active:
                execution.progress(force=True)

        self.progress_due[execution.id] = self.call_later(delay, fire)

    def execution_finished(self, execution: Execution) -> None:
        _running_changed(-1)
        self.publisher.close_execution(execution.id)
        timer = self.progress_due.pop(execution.id, None)
        if timer is not None:
            timer.cancel()
        self.progress_last.pop(execution.id, None)
        future = self.futures.pop(execution.id, None)
        outcome = execution.outcome()
        if self.history is None:
            self._forget_finished(execution.id)
            if future is not None and not future.done():
                future.set_result(outcome)
            return

        def recorded(problem: str | None) -> None:   # on a store thread, once the terminal event is committed
            execution.history = {"recorded": problem is None, "problem": problem}
            if future is not None and not future.done():
                future.set_result({**outcome, "history": execution.history})
            self.call_soon(lambda: self._forget_finished(execution.id))

        execution.history = {"recorded": False, "problem": None}
        self.history.after_written(execution.id, recorded)

    def _forget_finished(self, execution_id: str) -> None:
        """Keep the ``keep_finished`` newest finished executions in memory (older: from history).

        A forgotten execution is cyclic garbage (its frames, runs and tasks refer to each
        other); every ``FORGOTTEN_PER_COLLECTION`` of them, a full collection frees them.
        """
        self.finished_order.append(execution_id)
        while len(self.finished_order) > self.keep_finished:
            self.executions.pop(self.finished_order.popleft(), None)
            self._forgotten += 1
        if self._forgotten >= FORGOTTEN_PER_COLLECTION:
            self._forgotten = 0
            collect_garbage()


_running_lock = threading.Lock()
_running = 0
"""Executions started and not finished, over every coordinator of this process."""

FORGOTTEN_PER_COLLECTION = 100
"""Finished executions dropped from memory between two full collections. Without them, a
daemon that always has something running (the collector frozen, below) never freed a
forgotten execution: 114 KB each, growing without bound (found by audit). A collection
walks what is alive, so its cost is spread over this many executions."""


def collect_garbage() -> None:
    """A full collection, frozen objects included; frozen again after it while executions run."""
    with _running_lock:
        gc.unfreeze()
        gc.collect()
        if _running:
            gc.freeze()


def _running_changed(delta: int) -> None:
    """Count running executions; freeze the GC's tracked objects from the first start to the last finish.

    A workflow's model and plan are a few tracked objects per node that live as long as its
    execution; every full collection walked all of them again while the execution's own
    state grew (a 20k-node fan-out: 2-3 full collections over ~175k objects, 0.25-0.3 s of
    the reactor's CPU). Frozen (``gc.freeze``, O(1)), collections walk only what was made
    since. Unfrozen (O(1)) once nothing runs, so cyclic garbage among those objects is
    collected as before: it waits at most until the process is next idle.
    """
    global _running
    with _running_lock:
        _running += delta
        if delta > 0 and _running == 1:
            gc.freeze()
        elif delta < 0 and _running == 0:
            gc.unfreeze()
