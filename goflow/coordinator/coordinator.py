"""The coordinator: one reactor thread that owns all execution state.

It polls three kinds of socket (the workers' ROUTER, the control ROUTER, the events XPUB)
plus a wake-up pipe for calls from other threads, and runs timers (retries, timeouts,
liveness, heartbeats, progress conflation). Nothing else touches execution state, so
there are no locks around it: other threads talk to it only through :meth:`call_soon`
(thread-safe) or the control socket.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import msgpack
import zmq

from goflow import protocol
from goflow.control.framing import DEFAULT_MAX_MESSAGE_BYTES, ControlError, ControlServer, publisher_handlers
from goflow.coordinator import from_history
from goflow.coordinator.execution import Execution, Task
from goflow.coordinator.local_workers import LocalWorkerPool
from goflow.coordinator.node_output import NodeOutput
from goflow.coordinator.plan import Plan, compile_plan, initial_variables
from goflow.coordinator.workers import WorkerInfo, WorkerTable
from goflow.events import ids as execution_ids
from goflow.events.codec import DEFAULT_MAX_VALUE_BYTES
from goflow.events.publisher import EventPublisher
from goflow.language.model import Workflow

log = logging.getLogger("goflow.coordinator")


_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_NOBLOCK = int(zmq.NOBLOCK)
PREFETCH_BELOW_S = 0.005
"""Tasks measured shorter than this may wait in a busy worker's hand (saves a round trip)."""


def _apply_server_curve(sock: zmq.Socket, curve: dict | None, domain: str) -> None:
    """Make ``sock`` a CURVE server with the coordinator's key pair (``{"secret", "public"}``).

    Client keys are checked by the ZAP authenticator running on the same context
    (:mod:`goflow.security`); ``domain`` names the socket's role there.
    """
    if curve:
        sock.zap_domain = domain.encode()
        sock.curve_server = True
        sock.curve_secretkey = curve["secret"]
        sock.curve_publickey = curve["public"]


class Timer:
    """A cancellable timer on the reactor's heap."""

    __slots__ = ("due", "callback", "cancelled")

    def __init__(self, due: float, callback: Callable[[], None]):
        self.due = due
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: "Timer") -> bool:
        return self.due < other.due



def _load_submission(text: str, name: str, variables: dict[str, Any]) -> Plan:
    """Parse, validate and compile a submitted workflow (any thread); ControlError if refused."""
    from goflow.language.loader import check, parse

    loaded = check(parse(text, name))
    if loaded.errors:
        raise ControlError("invalid_workflow", f"{len(loaded.errors)} problem(s) in {name}",
                           details={"problems": [p.to_dict() for p in loaded.problems]})
    try:
        initial_variables(loaded.workflow, variables)
    except ValueError as exc:
        raise ControlError("bad_request", str(exc)) from None
    return compile_plan(loaded.workflow)


def _settle(future: Future, function: Callable[[Plan], None], plan: Plan) -> None:
    """Run ``function(plan)``; an exception it raises becomes ``future``'s."""
    try:
        function(plan)
    except BaseException as exc:
        future.set_exception(exc)

class Coordinator:
    """Schedules executions onto workers and publishes every event.

    ``workers_endpoint``: where workers connect (ROUTER). ``event_endpoints``: where the
    XPUB binds. ``control_endpoints``: where the control ROUTER binds. All bound at
    construction, so a failure to bind surfaces before anything starts.
    """

    def __init__(self, *, workers_endpoint: str, event_endpoints: list[str], control_endpoints: list[str],
                 context: zmq.Context | None = None, sndhwm: int | None = None,
                 worker_liveness: float = 3.0, heartbeat_interval: float = 1.0,
                 progress_interval: float = 0.1, keep_finished: int = 200,
                 servers: dict[str, dict] | None = None, curve: dict | None = None,
                 sink: Callable[[str | None, bytes, bytes], None] | None = None,
                 history: Any = None,
                 max_message_bytes: int = protocol.MAX_MESSAGE_BYTES,
                 max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES, trace_context: bool = False):
        self.context = context or zmq.Context.instance()
        self.epoch = uuid.uuid4().hex
        self.worker_liveness = worker_liveness
        self.heartbeat_interval = heartbeat_interval
        self.progress_interval = progress_interval
        self.keep_finished = keep_finished
        self.history = history
        """The history store (:class:`goflow.history.store.Store`) fed by ``sink``, or None.

        With it: dispatch holds while the store is backlogged (:meth:`_pump`), a finished
        execution is reported to its waiter and leaves memory only once it is recorded
        (:meth:`execution_finished`), and control ops answer executions no longer in
        memory from it (:mod:`goflow.coordinator.from_history`)."""
        if history is not None:
            history.set_relief(lambda: self.call_soon(self._pump))
        self.registered_servers = servers or {}
        self.trace_context = trace_context
        """Tracing is on: MCP tasks carry their call's ``traceparent`` (goflow/observability/tracing.py)."""

        self.accepting = True
        self.dispatching = True
        self._pump_wanted = False
        self._packer = msgpack.Packer(use_bin_type=True)
        self.worker_socket = self.context.socket(zmq.ROUTER)
        self.worker_socket.setsockopt(zmq.LINGER, 0)
        self.worker_socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.worker_socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        _apply_server_curve(self.worker_socket, curve, "workers")
        self.worker_socket.setsockopt(zmq.SNDHWM, 0)
        self.worker_socket.setsockopt(zmq.RCVHWM, 0)
        self.worker_socket.bind(workers_endpoint)
        self.workers_endpoint = self.worker_socket.getsockopt_string(zmq.LAST_ENDPOINT)

        self.max_value_bytes = max_value_bytes
        """Values in events larger than this (msgpack bytes) become ``$omitted`` markers."""
        options = {"sndhwm": sndhwm} if sndhwm is not None else {}
        self.publisher = EventPublisher(self.context, event_endpoints, epoch=self.epoch, sink=sink,
                                        curve={"secret": curve["secret"], "domain": "events"} if curve else None,
                                        **options)
        self.control_socket = self.context.socket(zmq.ROUTER)
        self.control_socket.setsockopt(zmq.LINGER, 0)
        # Requests over the control limit get an error reply; absurd ones are cut by libzmq.
        self.control_socket.setsockopt(zmq.MAXMSGSIZE, 4 * DEFAULT_MAX_MESSAGE_BYTES)
        _apply_server_curve(self.control_socket, curve, "control")
        for endpoint in control_endpoints:
            self.control_socket.bind(endpoint)
        self.control = ControlServer(self.control_socket, {
            **publisher_handlers(self.publisher),
            "progress": self._op_progress, "variables": self._op_variables, "execution": self._op_execution,
            "executions": self._op_executions, "cancel": self._op_cancel, "workers": self._op_workers,
            "submit": self._op_submit, "status": self._op_status, "list": self._op_executions,
            "graph": self._op_graph,
        }, call_soon=self.call_soon)

        self.workers = WorkerTable()
        self.lost_names: deque[str] = deque(maxlen=1000)
        self.local_pool: LocalWorkerPool | None = None
        self.queue: deque[Task] = deque()
        self.tasks: dict[int, Task] = {}
        self.task_ids = itertools.count(1)
        self.executions: dict[str, Execution] = {}
        self.futures: dict[str, Future] = {}
        self.finished_order: deque[str] = deque()
        self.timers: list[Timer] = []
        self.progress_due: dict[str, Timer] = {}
        self.progress_last: dict[str, float] = {}
        self.node_output = NodeOutput(self, progress_interval)
        self.durations: dict[tuple, float] = {}
        """Moving average of task run time by task profile, to decide when to prefetch."""
        self.stats = {"bad_worker_frames": 0, "tasks_dispatched": 0, "workers_lost": 0}

        self._calls: deque[Callable[[], None]] = deque()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        self._wake_lock = threading.Lock()
        """Guards the wake pipe against :meth:`stop` closing it: other threads (the history
        writer's callbacks) may call :meth:`call_soon` after the reactor stopped, and a
        closed descriptor number may already belong to another file."""
        self._running = False
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._loading: ThreadPoolExecutor | None = None

    # -- threading -------------------------------------------------------------------------
    def start(self) -> None:
        """Run the reactor in a background thread."""
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="goflow-coordinator", daemon=True)
        self._thread.start()

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the reactor thread (safe from any thread)."""
        self._calls.append(callback)
        with self._wake_lock:
            if self._wake_write < 0:
                return   # stopped: nothing runs callbacks any more
            try:
                os.write(self._wake_write, b"x")
            except OSError:
                pass

    def call(self, function: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``function`` on the reactor thread and return its result (from another thread)."""
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(function())
            except BaseException as exc:  # handed back to the caller
                future.set_exception(exc)

        self.call_soon(run)
        return future.result(timeout)

    def attach_local_pool(self, pool: LocalWorkerPool) -> None:
        self.local_pool = pool

    # -- public operations (thread-safe) -----------------------------------------------------
    def submit(self, workflow: Workflow, variables: dict[str, Any] | None = None, *,
               timeout: float | None = None, execution_id: str | None = None) -> tuple[str, Future]:
        """Start an execution; returns its id and a Future resolving to its summary dict.

        Raises ValueError (missing required variables) before anything starts.
        """
        initial_variables(workflow, dict(variables or {}))  # fail fast, in the caller's thread
        plan = compile_plan(workflow)  # in the caller's thread too, not on the reactor
        execution_id = execution_ids.given_or_new(execution_id)
        future: Future = Future()
        self.call_soon(lambda: self._start(workflow, variables, timeout=timeout, execution_id=execution_id,
                                           future=future, plan=plan))
        return execution_id, future

    def resume(self, execution_id: str, workflow: Workflow, variables: dict[str, Any],
               completed: dict[str, Any], *, timeout: float | None = None) -> Future:
        """Restart an execution a previous coordinator left unfinished (thread-safe).

        ``completed`` maps main-graph node ids to their recorded outputs: those nodes are
        not run again (their events say ``meta.resumed``); nodes that were in flight run
        again as new attempts. An ``execution.resumed`` event comes first.
        """
        future: Future = Future()
        self.call_soon(lambda: self._start(workflow, variables, timeout=timeout, execution_id=execution_id,
                                           future=future, restored=dict(completed)))
        return future

    def fail_unresumable(self, execution_id: str, workflow_name: str, message: str) -> None:
        """Record (as an ``execution.failed`` event) that a previous coordinator's execution is lost."""

        def fail() -> None:
            self.publisher.open_execution(execution_id, workflow_name)
            self.publisher.emit("execution.failed", execution_id, status="failed",
                                error={"type": "unresumable", "message": message, "node_id": None}, meta={})
            self.publisher.close_execution(execution_id)

        self.call_soon(fail)

    def _start(self, workflow: Workflow, variables: dict[str, Any] | None, *, timeout: float | None,
               execution_id: str | None, future: Future | None = None,
               restored: dict[str, Any] | None = None, plan: Plan | None = None) -> tuple[str, Future]:
        """Create and start an execution (reactor thread only; ``plan``: compiled already, off it)."""
        try:
            execution_id = execution_ids.given_or_new(execution_id)
        except ValueError as exc:
            raise ControlError("bad_request", str(exc)) from None
        if execution_id in self.executions:
            raise ControlError("bad_request", f"execution id {execution_id!r} is already in use")
        future = future or Future()
        plan = plan or compile_plan(workflow)
        execution = Execution(execution_id, plan, initial_variables(workflow, dict(variables or {})), self,
                              timeout=timeout, restored=restored)
        self.executions[execution_id] = execution
        self.futures[execution_id] = future
        self.publisher.open_execution(execution_id, workflow.name)
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
            self.dispatching = False

        self.call(stop_dispatching)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            busy = self.call(lambda: any(worker.in_hand for worker in self.workers.workers.values()))
            if not busy:
                break
            time.sleep(0.05)

        def cancel_rest() -> list[str]:
            unfinished = [e.id for e in self.executions.values() if e.active]
            for execution_id in unfinished:
                self.executions[execution_id].cancel("the coordinator shut down before the execution finished")
            return unfinished

        return self.call(cancel_rest)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what runs, shut the workers down, flush events and close every socket."""
        if self._thread is None:
            return
        self.call_soon(self._shutdown)
        self._stopped.wait(timeout)
        self._thread.join(timeout)
        if self._loading is not None:
            self._loading.shutdown(wait=False, cancel_futures=True)
        if self.local_pool is not None:
            self.local_pool.stop()
        self.publisher.close(linger_ms=1000)
        for sock in (self.worker_socket, self.control_socket):
            sock.close(0)
        if self.history is not None:
            self.history.set_relief(None)
        with self._wake_lock:
            os.close(self._wake_read)
            os.close(self._wake_write)
            self._wake_read = self._wake_write = -1
        self._thread = None

    # -- Host interface for executions -----------------------------------------------------
    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self.timers, timer)
        return timer

    def progress(self, execution: Execution, force: bool) -> None:
        """Publish ``progress.update`` at most every ``progress_interval`` per execution
        (always when ``force``); a suppressed update is sent when the interval ends."""
        if not force:
            self._progress_later(execution)
            return
        self.progress_last[execution.id] = time.monotonic()
        self.emit(execution, "progress.update", meta=execution.progress_meta())

    def emit(self, execution: Execution, type: str, *, run: Any = None, status: str | None = None,
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

    def server_spec(self, execution: Execution, server_id: str) -> dict:
        """The spec of ``server_id`` for a task of ``execution`` (``${secret}`` references expanded)."""
        from goflow.servers import expand_secret_refs

        secrets = {name: execution.variables[name] for name in execution.plan.secrets
                   if execution.variables.get(name) is not None}
        return expand_secret_refs(self._server_spec(execution, server_id), secrets)

    def _server_spec(self, execution: Execution, server_id: str) -> dict:
        for server in execution.workflow.servers:
            if server.id == server_id:
                return server.model_dump(exclude={"description"})
        if server_id in self.registered_servers:
            return dict(self.registered_servers[server_id])
        from goflow.servers import load_registry

        registry = load_registry()
        if server_id in registry:
            return dict(registry[server_id])
        raise ControlError("not_found", f"server '{server_id}' is neither declared nor registered")

    def dispatch(self, task: Task) -> None:
        """Queue ``task``; the reactor hands queued tasks to workers once per loop turn
        (or per result), so a burst of ready nodes costs one pass, not one per node."""
        task.id = next(self.task_ids)
        self.tasks[task.id] = task
        self.queue.append(task)
        self._pump_wanted = True

    def cancel_task(self, task: Task) -> None:
        task.done = True
        if task.timer is not None:
            task.timer.cancel()
        if task.worker is not None:
            worker = self.workers.get(task.worker)
            if worker is not None:
                self._send(worker.control_identity, {"t": protocol.CANCEL, "id": task.id})
        else:
            self.tasks.pop(task.id, None)

    def execution_finished(self, execution: Execution) -> None:
        self.publisher.close_execution(execution.id)
        timer = self.progress_due.pop(execution.id, None)
        if timer is not None:
            timer.cancel()
        self.progress_last.pop(execution.id, None)
        future = self.futures.pop(execution.id, None)
        summary = self.result_of(execution)
        if self.history is None:
            self._forget_finished(execution.id)
            if future is not None and not future.done():
                future.set_result(summary)
            return

        def recorded(problem: str | None) -> None:   # the writer thread, once the terminal event is committed
            execution.history = {"recorded": problem is None, "problem": problem}
            if future is not None and not future.done():
                future.set_result({**summary, "history": execution.history})
            self.call_soon(lambda: self._forget_finished(execution.id))

        execution.history = {"recorded": False, "problem": None}
        self.history.after_written(execution.id, recorded)

    def _forget_finished(self, execution_id: str) -> None:
        """Keep the ``keep_finished`` newest finished executions in memory (older: from history)."""
        self.finished_order.append(execution_id)
        while len(self.finished_order) > self.keep_finished:
            self.executions.pop(self.finished_order.popleft(), None)

    def result_of(self, execution: Execution) -> dict:
        return {"execution_id": execution.id, "workflow": execution.workflow.name, "status": execution.status,
                "result": execution.result, "variables": execution.redact(execution.variables),
                "error": execution.error, "duration_s": (execution.finished_at or time.time()) - execution.started_at,
                "records": list(execution.records)}

    # -- dispatch --------------------------------------------------------------------------
    def _send(self, identity: bytes, message: dict) -> None:
        try:
            self.worker_socket.send_multipart([identity, protocol.encode(message)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _pump(self) -> None:
        self._pump_wanted = False
        if not self.dispatching:
            return
        if self.history is not None and self.history.backlogged():
            return   # back-pressure: the store's relief callback pumps again
        queue = self.queue
        blocked: list[Task] = []
        outgoing: dict[bytes, list[bytes]] = {}
        while queue:
            task = queue.popleft()
            if task.done:
                continue
            worker = self.workers.pick(task, prefetch=self._is_short(task))
            if worker is None:
                blocked.append(task)
                if not task.labels or not self.workers.has_capacity():
                    break
                continue
            frame = self._hand_to(worker, task)
            if frame is not None:
                outgoing.setdefault(worker.identity, []).append(frame)
        if blocked:
            queue.extendleft(reversed(blocked))
        for identity, frames in outgoing.items():
            # Several tasks for one worker travel as one "tasks" message: one wake-up, not N.
            payload = frames[0] if len(frames) == 1 else protocol.batch(protocol.TASKS, frames)
            try:
                self.worker_socket.send(identity, _SNDMORE_NOBLOCK)
                self.worker_socket.send(payload, _NOBLOCK)
            except zmq.ZMQError:
                pass  # the worker is gone; liveness notices and requeues what it held

    def _is_short(self, task: Task) -> bool:
        """Whether tasks like ``task`` are known to be short enough to queue on a busy worker."""
        estimate = self.durations.get(task.profile)
        return estimate is not None and estimate < PREFETCH_BELOW_S

    def _measured(self, task: Task, message: dict) -> None:
        started, finished = message.get("started"), message.get("finished")
        if isinstance(started, (int, float)) and isinstance(finished, (int, float)):
            previous = self.durations.get(task.profile)
            sample = max(0.0, finished - started)
            self.durations[task.profile] = sample if previous is None else 0.8 * previous + 0.2 * sample

    def _hand_to(self, worker: WorkerInfo, task: Task) -> bytes | None:
        """Assign ``task`` to ``worker``; returns the encoded task message (None if it cannot be sent)."""
        task.worker = worker.identity
        worker.in_hand.append(task)
        self.stats["tasks_dispatched"] += 1
        message = {"t": protocol.TASK, "id": task.id, "kind": task.kind, "spec": task.spec,
                   "execution_id": task.execution.id, "node_id": task.node_id, "attempt": task.attempt}
        if self.trace_context and task.kind == "mcp_tool" and task.run is not None:
            from goflow.observability.tracing import mcp_traceparent

            message["spec"] = {**task.spec, "traceparent": mcp_traceparent(
                task.execution.id, task.run.node.id, task.run.frame.context, task.attempt)}
        try:
            frame = self._packer.pack(message)
        except (TypeError, ValueError, OverflowError) as exc:
            self._packer.reset()
            worker.in_hand.pop()
            task.worker = None
            self.tasks.pop(task.id, None)
            task.execution.task_result(task, {"ok": False, "error": {
                "type": "serialization", "message": f"the node's inputs cannot be sent to a worker: {exc}"}})
            return None
        if len(worker.in_hand) == 1:
            self._task_started(task)
        return frame

    def _task_started(self, task: Task) -> None:
        task.started_at = time.monotonic()
        if task.timeout and not task.done:
            task.timer = self.call_later(task.timeout, lambda: self._task_timed_out(task))

    def _task_timed_out(self, task: Task) -> None:
        task.timer = None
        if task.done:
            return
        self.cancel_task(task)
        task.execution.task_result(task, {"ok": False, "error": {
            "type": "timeout", "message": f"node '{task.node_id}' exceeded its timeout of {task.timeout:g}s"}})

    # -- worker messages -------------------------------------------------------------------
    def _on_worker_socket(self) -> None:
        sock = self.worker_socket
        for _ in range(10_000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self.stats["bad_worker_frames"] += 1
                continue
            identity, frame = frames
            try:
                message = protocol.decode(frame)
            except protocol.ProtocolError:
                self.stats["bad_worker_frames"] += 1
                continue
            try:
                self._on_worker_message(identity, message)
            except Exception:  # a malformed field must never stop the reactor
                self.stats["bad_worker_frames"] += 1
                log.exception("bad message from worker %r", identity)

    def _on_worker_message(self, identity: bytes, message: dict) -> None:
        kind = message["t"]
        control = identity.endswith(protocol.CONTROL_SUFFIX)
        base = identity[: -len(protocol.CONTROL_SUFFIX)] if control else identity
        if kind == protocol.LOG and identity.endswith(protocol.LOG_SUFFIX):
            if self.workers.get(identity[: -len(protocol.LOG_SUFFIX)]) is not None:
                self.node_output.on_batch(self.tasks.get(message.get("id")), message)
            return
        worker = self.workers.get(base)
        if worker is not None:
            worker.last_seen = time.monotonic()
        if kind == protocol.RESULT and worker is not None:
            self._on_result(worker, message)
            self._pump()
        elif kind == protocol.RESULTS and worker is not None:
            for item in message.get("items") or ():
                if isinstance(item, dict):
                    self._on_result(worker, item)
            self._pump()
        elif kind == protocol.READY and not control:
            self._on_ready(identity, message)
        elif kind == protocol.DRAIN and not control:
            if worker is not None and not worker.draining:
                worker.draining = True
                log.info("worker %s is draining (%d task(s) in hand)", worker.name, len(worker.in_hand))
            # After every task sent to it on this lane (ZeroMQ keeps the order): nothing more comes.
            self._send(identity, {"t": protocol.DRAINED})
        elif kind == protocol.BYE and worker is not None:
            # Its results all came before the goodbye: what it still holds was never run.
            self._worker_lost(worker, "the worker said goodbye", ran_nothing=True)
        elif kind == protocol.HEARTBEAT and worker is None:
            # A worker we do not know: from before a restart (its epoch differs) or one we
            # declared lost (named in ``lost_names``); a worker that is still registering
            # ignores this (same epoch, not lost).
            self._send(identity, {"t": protocol.RECONNECT, "epoch": self.epoch,
                                  "lost": base.decode(errors="replace") in self.lost_names})

    def _on_ready(self, identity: bytes, message: dict) -> None:
        if message.get("v") != protocol.VERSION:
            self._send(identity, {"t": protocol.SHUTDOWN, "reason": f"protocol version {message.get('v')} "
                                                                    f"unsupported; this coordinator speaks "
                                                                    f"{protocol.VERSION}"})
            return
        previous = self.workers.get(identity)
        if previous is not None:
            self._worker_lost(previous, "the worker reconnected")
        name = str(message.get("worker") or identity.decode(errors="replace"))
        credits = max(1, min(int(message.get("credits") or 1), 1024))
        labels = message.get("labels") if isinstance(message.get("labels"), dict) else {}
        worker = WorkerInfo(identity, name, credits, {str(k): str(v) for k, v in labels.items()},
                            pid=message.get("pid"), host=message.get("host"),
                            local=bool(self.local_pool and self.local_pool.owns(name)))
        self.workers.add(worker)
        self._send(identity, {"t": protocol.WELCOME, "epoch": self.epoch, "heartbeat_interval": self.heartbeat_interval})
        self.publisher.emit("worker.joined", None, worker_id=name, meta={"worker_id": name, **worker.describe()})
        self._pump()

    def _on_result(self, worker: WorkerInfo, message: dict) -> None:
        task_id = message.get("id")
        task = self.tasks.pop(task_id, None)
        if task is not None and task in worker.in_hand:
            worker.in_hand.remove(task)
        worker.completed += 1
        if worker.in_hand:
            head = worker.in_hand[0]
            if head.started_at is None:
                self._task_started(head)
        if task is not None:
            self._measured(task, message)
            if task.timer is not None:
                task.timer.cancel()
            if not task.done:
                task.done = True
                message["worker"] = worker.name
                self.node_output.finish(task, message, task.execution.task_result)

    def _worker_lost(self, worker: WorkerInfo, reason: str, *, ran_nothing: bool = False) -> None:
        """Forget ``worker``: its running task fails as ``worker_lost`` (an attempt), the tasks
        it held but had not started are requeued at no cost; with ``ran_nothing`` (it said
        goodbye after its last result) every task it held is requeued at no cost."""
        if self.workers.remove(worker.identity) is None:
            return
        self.lost_names.append(worker.identity.decode(errors="replace"))
        self.stats["workers_lost"] += 1
        log.log(logging.INFO if ran_nothing else logging.WARNING, "worker.lost %s: %s (%d task(s) in hand)",
                worker.name, reason, len(worker.in_hand))
        self.publisher.emit("worker.lost", None, worker_id=worker.name,
                            meta={"worker_id": worker.name, "reason": reason, "in_hand": len(worker.in_hand)})
        tasks = list(worker.in_hand)
        worker.in_hand.clear()
        requeue = []
        for position, task in enumerate(tasks):
            self.tasks.pop(task.id, None)
            if task.timer is not None:
                task.timer.cancel()
            if task.done:
                continue
            if position == 0 and task.started_at is not None and not ran_nothing:
                task.done = True
                task.execution.task_result(task, {"ok": False, "worker": worker.name, "error": {
                    "type": "worker_lost", "message": f"worker {worker.name} was lost while running the node "
                                                      f"({reason})"}})
            else:
                task.worker = None
                task.started_at = None
                task.id = next(self.task_ids)
                self.tasks[task.id] = task
                requeue.append(task)
        self.queue.extendleft(reversed(requeue))
        self._pump()

    def _check_liveness(self) -> None:
        now = time.monotonic()
        if self.local_pool is not None:
            for name, code in self.local_pool.reap():
                worker = self.workers.by_name(name)
                if worker is not None:
                    self._worker_lost(worker, f"process exited with code {code}")
                if not self.local_pool.closing and self._running:
                    self.local_pool.spawn()
        for worker in list(self.workers.workers.values()):
            if now - worker.last_seen > self.worker_liveness:
                self._worker_lost(worker, f"silent for {now - worker.last_seen:.1f}s")
                if worker.local and self.local_pool is not None:
                    self.local_pool.kill(worker.name)
        self.call_later(0.1 if self.local_pool is not None else 0.25, self._check_liveness)

    def _heartbeat(self) -> None:
        self.publisher.heartbeat()
        beat = protocol.encode({"t": protocol.HEARTBEAT})
        for worker in self.workers.workers.values():
            try:
                self.worker_socket.send_multipart([worker.control_identity, beat], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self.call_later(self.heartbeat_interval, self._heartbeat)

    # -- control ops -----------------------------------------------------------------------
    def _execution(self, request: dict) -> Execution:
        execution_id = request.get("execution_id")
        execution = self.executions.get(execution_id) if isinstance(execution_id, str) else None
        if execution is None and isinstance(execution_id, str) and len(execution_id) >= 4:
            matches = [e for key, e in self.executions.items() if key.startswith(execution_id)]
            if len(matches) == 1:
                execution = matches[0]
        if execution is None:
            raise ControlError("not_found", f"no execution {execution_id!r}")
        return execution

    def _in_memory(self, request: dict) -> Execution | None:
        """The execution a control request names, if it is in memory; ControlError if not
        and there is no history to ask."""
        try:
            return self._execution(request)
        except ControlError:
            if self.history is None:
                raise
            return None

    def _op_progress(self, request: dict) -> dict:
        execution = self._in_memory(request)
        if execution is None:   # finished long ago: its final state, nothing in progress
            recorded = from_history.status_from_history(self.history, request.get("execution_id"))
            return {key: recorded[key] for key in ("execution_id", "status", "progress", "source")}
        return {"execution_id": execution.id, "status": execution.status, "progress": execution.progress_meta()}

    def _op_variables(self, request: dict) -> dict:
        execution = self._in_memory(request)
        if execution is None:
            return from_history.variables_from_history(self.history, request.get("execution_id"))
        # vseq/eseq: the version of this snapshot, so a subscriber can apply the events after it
        # (one reactor thread: no event is published between reading the three).
        return {"execution_id": execution.id, "variables": execution.redact(execution.variables),
                "vseq": self.publisher.vseq(execution.id), "eseq": self.publisher.last_eseq(execution.id)}

    def _op_execution(self, request: dict) -> dict:
        execution = self._in_memory(request)
        if execution is None:
            return from_history.execution_from_history(self.history, request.get("execution_id"))
        nodes = {}
        if execution.root is not None:
            for node_id, run in execution.root.runs.items():
                nodes[node_id] = {"status": run.state, "attempt": run.attempt}
        return {**self._with_history(execution, execution.summary()), "result": execution.result, "nodes": nodes,
                "running": sorted(execution.running_nodes), "records": list(execution.records)[-1000:]}

    def _op_graph(self, request: dict) -> dict:
        """The execution's workflow as nodes and edges (``goflow.language.graph``)."""
        from goflow.language.graph import workflow_graph

        execution = self._execution(request)
        return {"execution_id": execution.id, **workflow_graph(execution.plan.workflow)}

    def _op_executions(self, request: dict) -> dict:
        return {"executions": [execution.summary() for execution in self.executions.values()]}

    def _op_cancel(self, request: dict) -> dict:
        execution = self._in_memory(request)
        if execution is None:   # finished long ago: nothing to cancel
            recorded = from_history.status_from_history(self.history, request.get("execution_id"))
            return {"execution_id": recorded["execution_id"], "status": recorded["status"]}
        if execution.active:
            execution.cancel(str(request.get("reason") or "cancelled by request"))
        return {"execution_id": execution.id, "status": execution.status}

    def _op_submit(self, request: dict) -> Future:
        """``submit {workflow: YAML text, name?: file name, variables?: {...}, timeout?: s}``.

        Validated before acceptance: an invalid workflow is refused with every problem in
        ``error.details.problems``; a missing required variable with ``bad_request``.
        Parsing, validation and compiling run on the loader thread, never on the reactor,
        so a big submission does not stall heartbeats or other executions; the reply is
        sent once the execution has started (or was refused).
        """
        if not self.accepting:
            raise ControlError("unavailable", "the coordinator is shutting down and accepts no new executions")
        text, name = request.get("workflow"), request.get("name") or "<submitted>"
        if not isinstance(text, str):
            raise ControlError("bad_request", "'workflow' must be the workflow's YAML text")
        variables = request.get("variables") or {}
        timeout = request.get("timeout")
        if not isinstance(variables, dict) or (timeout is not None and not isinstance(timeout, (int, float))):
            raise ControlError("bad_request", "'variables' must be a map and 'timeout' a number of seconds")
        reply: Future = Future()

        def start(plan: Plan) -> None:  # back on the reactor
            if not self.accepting:
                raise ControlError("unavailable", "the coordinator is shutting down and accepts no new executions")
            execution_id, _ = self._start(plan.workflow, variables, timeout=timeout, plan=plan,
                                          execution_id=request.get("execution_id") or None)
            reply.set_result({"execution_id": execution_id, "workflow": plan.workflow.name})

        def load() -> None:  # on the loader thread
            try:
                plan = _load_submission(text, str(name), variables)
            except BaseException as exc:  # handed to the reply
                self._on_reactor(lambda error=exc: reply.set_exception(error))
                return
            self._on_reactor(lambda: _settle(reply, start, plan))

        self._loader().submit(load)
        return reply

    def _loader(self) -> ThreadPoolExecutor:
        """The thread that loads submissions (created on first use)."""
        if self._loading is None:
            self._loading = ThreadPoolExecutor(max_workers=1, thread_name_prefix="goflow-load")
        return self._loading

    def _on_reactor(self, callback: Callable[[], None]) -> None:
        """:meth:`call_soon`, unless the reactor has stopped (then ``callback`` is dropped)."""
        if self._running:
            self.call_soon(callback)

    def _op_status(self, request: dict) -> dict:
        execution = self._in_memory(request)
        if execution is None:
            return from_history.status_from_history(self.history, request.get("execution_id"))
        return self._with_history(execution, execution.summary())

    def _with_history(self, execution: Execution, answer: dict) -> dict:
        """``answer`` plus ``history`` (recorded / problem) when there is a history store."""
        if self.history is None:
            return answer
        recorded = execution.history
        if recorded is None:   # still running: complete so far unless the store says otherwise
            problem = self.history.history_problem(execution.id)
            recorded = {"recorded": False, "problem": problem}
        return {**answer, "history": recorded}

    def _op_workers(self, request: dict) -> dict:
        return {"workers": [worker.describe() for worker in self.workers.workers.values()]}

    # -- the loop --------------------------------------------------------------------------
    def _shutdown(self) -> None:
        for execution in list(self.executions.values()):
            if execution.active:
                execution.cancel("the coordinator is shutting down")
        if self.local_pool is not None:
            self.local_pool.closing = True
        for worker in list(self.workers.workers.values()):
            self._send(worker.identity, {"t": protocol.SHUTDOWN})
            self._send(worker.control_identity, {"t": protocol.SHUTDOWN})
        self._running = False

    def _run_calls(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while self._calls:
            try:
                self._calls.popleft()()
            except Exception:
                log.exception("call on the reactor failed")

    def _run_timers(self) -> None:
        now = time.monotonic()
        timers = self.timers
        while timers and timers[0].due <= now:
            timer = heapq.heappop(timers)
            if not timer.cancelled:
                timer.callback()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.worker_socket, zmq.POLLIN)
        poller.register(self.control_socket, zmq.POLLIN)
        events_socket = self.publisher.socket
        poller.register(events_socket, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        self.call_later(self.heartbeat_interval, self._heartbeat)
        self.call_later(0.1, self._check_liveness)
        handlers = {self.worker_socket: self._on_worker_socket, self.control_socket: self.control.on_readable,
                    events_socket: self.publisher.on_readable, self._wake_read: self._run_calls}
        try:
            while self._running:
                if self.timers:
                    wait = max(0, int((self.timers[0].due - time.monotonic()) * 1000) + 1)
                else:
                    wait = 1000
                for sock, _ in poller.poll(min(wait, 1000)):
                    try:
                        handlers[sock]()
                    except Exception:
                        log.exception("reactor handler failed")
                if self.publisher.socket is not events_socket:  # reset by a subscription flood
                    poller.unregister(events_socket)
                    del handlers[events_socket]
                    events_socket = self.publisher.socket
                    poller.register(events_socket, zmq.POLLIN)
                    handlers[events_socket] = self.publisher.on_readable
                try:
                    self._run_timers()
                    if self._pump_wanted:
                        self._pump()
                except Exception:
                    log.exception("timer or dispatch failed")
            # Drain: let workers' goodbyes arrive, flush the last events.
            self.publisher.heartbeat()
        finally:
            self._stopped.set()
