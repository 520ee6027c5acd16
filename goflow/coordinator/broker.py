"""The worker broker: the workers' ROUTER socket, the task queue, credits and liveness.

Runs on the reactor thread. Tasks are queued by :meth:`WorkerBroker.dispatch` and handed
to workers once per reactor turn (:meth:`pump`); every task's result reaches its
``deliver`` route exactly once: the worker's answer, or the failure the broker decided on
(timeout, worker lost, inputs that cannot be encoded).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Callable

import msgpack
import zmq

from goflow import protocol
from goflow.coordinator.task import Task
from goflow.coordinator.workers import WorkerInfo, WorkerTable
from goflow.errors import ErrorKind

if TYPE_CHECKING:
    from goflow.coordinator.local_workers import LocalWorkerPool
    from goflow.coordinator.node_output import NodeOutput
    from goflow.coordinator.reactor import Reactor
    from goflow.events.publisher import EventPublisher

log = logging.getLogger("goflow.coordinator")

_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_NOBLOCK = int(zmq.NOBLOCK)
PREFETCH_BELOW_S = 0.005
"""Tasks measured shorter than this may wait in a busy worker's hand (saves a round trip)."""
PREFETCH_BUDGET_S = 0.02
"""How much expected work of such tasks a worker's hand holds at most (within its credits):
a 20 us call fills the hand (32 by default: batches of tasks in, of results out), a 4 ms one
waits behind at most 5 others, so the tail of a fan-out stays balanced across workers."""


def apply_server_curve(sock: zmq.Socket, curve: dict | None, domain: str) -> None:
    """Make ``sock`` a CURVE server with the coordinator's key pair (``{"secret", "public"}``).

    Client keys are checked by the ZAP authenticator running on the same context
    (:mod:`goflow.security`); ``domain`` names the socket's role there.
    """
    if curve:
        sock.zap_domain = domain.encode()
        sock.curve_server = True
        sock.curve_secretkey = curve["secret"]
        sock.curve_publickey = curve["public"]


class WorkerBroker:
    """Hands tasks to workers and turns worker messages into task results."""

    def __init__(self, context: zmq.Context, endpoint: str, *, reactor: "Reactor", publisher: "EventPublisher",
                 epoch: str, curve: dict | None, max_message_bytes: int,
                 worker_liveness: float, heartbeat_interval: float, node_output: "NodeOutput",
                 backlogged: Callable[[], bool] | None = None, trace_context: bool = False):
        self.reactor = reactor
        self.publisher = publisher
        self.epoch = epoch
        self.worker_liveness = worker_liveness
        self.heartbeat_interval = heartbeat_interval
        self.node_output = node_output
        self.trace_context = trace_context
        """Tracing is on: MCP tasks carry their call's ``traceparent`` (goflow/observability/tracing.py)."""
        self.backlogged = backlogged
        """Back-pressure: while it answers True (the history store is behind), nothing is dispatched."""
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        apply_server_curve(self.socket, curve, "workers")
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.bind(endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

        self.dispatching = True
        self.local_pool: "LocalWorkerPool | None" = None
        self.workers = WorkerTable()
        self.lost_names: deque[str] = deque(maxlen=1000)
        self.queue: deque[Task] = deque()
        self.tasks: dict[int, Task] = {}
        self.task_ids = itertools.count(1)
        self.durations: dict[tuple, float] = {}
        """Moving average of task run time by task profile, to decide when to prefetch."""
        self.stats = {"bad_worker_frames": 0, "tasks_dispatched": 0, "workers_lost": 0}
        self._pump_wanted = False
        self._packer = msgpack.Packer(use_bin_type=True)
        reactor.add_reader(self.socket, self._on_socket)
        reactor.after_each_turn(self._pump_if_wanted)
        reactor.on_start(self._arm_timers)

    def _arm_timers(self) -> None:
        self.reactor.call_later(self.heartbeat_interval, self._heartbeat)
        self.reactor.call_later(0.1, self._check_liveness)

    # -- tasks -----------------------------------------------------------------------------
    def dispatch(self, task: Task) -> None:
        """Queue ``task``; queued tasks go out once per reactor turn (or per result)."""
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

    def busy(self) -> bool:
        """Whether any worker holds a task."""
        return any(worker.in_hand for worker in self.workers.workers.values())

    def shutdown_workers(self) -> None:
        """Tell every worker to stop; a local pool stops replacing the ones that exit."""
        if self.local_pool is not None:
            self.local_pool.closing = True
        for worker in list(self.workers.workers.values()):
            self._send(worker.identity, {"t": protocol.SHUTDOWN})
            self._send(worker.control_identity, {"t": protocol.SHUTDOWN})

    def describe_workers(self) -> list[dict]:
        return [worker.describe() for worker in self.workers.workers.values()]

    def close(self) -> None:
        self.socket.close(0)

    # -- dispatch --------------------------------------------------------------------------
    def _send(self, identity: bytes, message: dict) -> None:
        try:
            self.socket.send_multipart([identity, protocol.encode(message)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _pump_if_wanted(self) -> None:
        if self._pump_wanted:
            self.pump()

    def pump(self) -> None:
        """Hand queued tasks to workers with free credits, one message per worker."""
        self._pump_wanted = False
        if not self.dispatching:
            return
        if self.backlogged is not None and self.backlogged():
            return   # the store's relief callback pumps again
        queue = self.queue
        blocked: list[Task] = []
        outgoing: dict[bytes, list[bytes]] = {}
        while queue:
            task = queue.popleft()
            if task.done:
                continue
            depth = self._depth(task)
            worker = self.workers.pick(task, depth=depth, behind_s=PREFETCH_BUDGET_S)
            if worker is None:
                blocked.append(task)
                if not task.labels or not self.workers.has_capacity():
                    break
                continue
            task.short = depth > 1
            frame = self._hand_to(worker, task)
            if frame is not None:
                outgoing.setdefault(worker.identity, []).append(frame)
        if blocked:
            queue.extendleft(reversed(blocked))
        for identity, frames in outgoing.items():
            # Several tasks for one worker travel as one "tasks" message: one wake-up, not N.
            payload = frames[0] if len(frames) == 1 else protocol.batch(protocol.TASKS, frames)
            try:
                self.socket.send(identity, _SNDMORE_NOBLOCK)
                self.socket.send(payload, _NOBLOCK)
            except zmq.ZMQError:
                pass  # the worker is gone; liveness notices and requeues what it held

    def _depth(self, task: Task) -> int:
        """How many tasks a worker may hold to be given ``task``: 1 (only an idle worker) unless
        tasks like it were measured short, then as many as fit :data:`PREFETCH_BUDGET_S`."""
        estimate = self.durations.get(task.profile)
        if estimate is None or estimate >= PREFETCH_BELOW_S:
            return 1
        return 1 + int(PREFETCH_BUDGET_S / max(estimate, 1e-6))

    def _measured(self, task: Task, message: dict) -> None:
        """Fold one result's run time into its profile's estimate (a moving average). Called
        once per worker message, with its last result: a batch is a run of like tasks, and one
        sample per message keeps this off the per-result path."""
        started, finished = message.get("started"), message.get("finished")
        if isinstance(started, (int, float)) and isinstance(finished, (int, float)):
            previous = self.durations.get(task.profile)
            sample = max(0.0, finished - started)
            self.durations[task.profile] = sample if previous is None else 0.8 * previous + 0.2 * sample

    def _hand_to(self, worker: WorkerInfo, task: Task) -> bytes | None:
        """Assign ``task`` to ``worker``; returns the encoded task message (None if it cannot be sent)."""
        task.worker = worker.identity
        task.worker_name = worker.name
        worker.in_hand.append(task)
        self.stats["tasks_dispatched"] += 1
        message = {"t": protocol.TASK, "id": task.id, "kind": task.kind, "spec": task.spec,
                   "execution_id": task.execution_id, "node_id": task.node_id, "attempt": task.attempt}
        if self.trace_context and task.kind == "mcp_tool" and task.run is not None:
            from goflow.observability.tracing import mcp_traceparent

            message["spec"] = {**task.spec, "traceparent": mcp_traceparent(
                task.execution_id, task.node_id, task.run.frame.context, task.attempt)}
        try:
            frame = self._packer.pack(message)
        except (TypeError, ValueError, OverflowError) as exc:
            self._packer.reset()
            worker.in_hand.pop()
            task.worker = None
            self.tasks.pop(task.id, None)
            task.done = True
            task.deliver(task, {"ok": False, "error": {
                "type": ErrorKind.SERIALIZATION, "message": f"the node's inputs cannot be sent to a worker: {exc}"}})
            return None
        if len(worker.in_hand) == 1:
            self._task_started(task)
        return frame

    def _task_started(self, task: Task) -> None:
        task.started_at = time.monotonic()
        if task.timeout and not task.done:
            task.timer = self.reactor.call_later(task.timeout, lambda: self._task_timed_out(task))

    def _task_timed_out(self, task: Task) -> None:
        task.timer = None
        if task.done:
            return
        self.cancel_task(task)
        task.deliver(task, task.timed_out())

    # -- worker messages -------------------------------------------------------------------
    def _on_socket(self) -> None:
        sock = self.socket
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
                self._on_message(identity, message)
            except Exception:  # a malformed field must never stop the reactor
                self.stats["bad_worker_frames"] += 1
                log.exception("bad message from worker %r", identity)

    def _on_message(self, identity: bytes, message: dict) -> None:
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
        if kind in (protocol.RESULT, protocol.RESULTS) and worker is not None:
            last: tuple[Task, dict] | None = None
            for item in (message,) if kind == protocol.RESULT else message.get("items") or ():
                if isinstance(item, dict):
                    task = self._on_result(worker, item)
                    if task is not None:
                        last = task, item
            if last is not None:
                self._measured(*last)
            self.pump()
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
        problem = protocol.ready_problem(name, message.get("labels"))
        if problem is not None:
            self.stats["bad_worker_frames"] += 1
            log.warning("refused a worker: %s", problem)
            self._send(identity, {"t": protocol.SHUTDOWN, "reason": f"refused: {problem}"})
            return
        credits = max(1, min(int(message.get("credits") or 1), 1024))
        labels = message.get("labels") or {}
        host = message.get("host")
        worker = WorkerInfo(identity, name, credits, {str(k): str(v) for k, v in labels.items()},
                            pid=pid if isinstance(pid := message.get("pid"), int) else None, host=str(host)[:255] if host is not None else None,
                            local=bool(self.local_pool and self.local_pool.owns(name)))
        self.workers.add(worker)
        self._send(identity, {"t": protocol.WELCOME, "epoch": self.epoch, "heartbeat_interval": self.heartbeat_interval})
        self.publisher.emit("worker.joined", None, worker_id=name, meta={"worker_id": name, **worker.describe()})
        self.pump()

    def _on_result(self, worker: WorkerInfo, message: dict) -> Task | None:
        """Settle the task ``message`` reports on; returns it (None if it is not known)."""
        task_id = message.get("id")
        task = self.tasks.pop(task_id, None)
        in_hand = worker.in_hand
        if task is not None and in_hand:
            if in_hand[0] is task:   # results come in the order tasks were handed
                in_hand.popleft()
            elif task in in_hand:
                in_hand.remove(task)
        worker.completed += 1
        if in_hand:
            head = in_hand[0]
            if head.started_at is None:
                self._task_started(head)
        if task is not None:
            if task.timer is not None:
                task.timer.cancel()
            if not task.done:
                task.done = True
                message["worker"] = worker.name
                self.node_output.finish(task, message, task.deliver)
        return task

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
                task.deliver(task, {"ok": False, "worker": worker.name, "error": {
                    "type": ErrorKind.WORKER_LOST, "message": f"worker {worker.name} was lost while running the node "
                                                      f"({reason})"}})
            else:
                task.worker = None
                task.started_at = None
                task.id = next(self.task_ids)
                self.tasks[task.id] = task
                requeue.append(task)
        self.queue.extendleft(reversed(requeue))
        self.pump()

    def _check_liveness(self) -> None:
        now = time.monotonic()
        if self.local_pool is not None:
            for name, code in self.local_pool.poll():   # it restarts them, with backoff
                worker = self.workers.by_name(name)
                if worker is not None:
                    self._worker_lost(worker, f"process exited with code {code}")
        for worker in list(self.workers.workers.values()):
            if now - worker.last_seen > self.worker_liveness:
                self._worker_lost(worker, f"silent for {now - worker.last_seen:.1f}s")
                if worker.local and self.local_pool is not None:
                    self.local_pool.kill(worker.name)
        self.reactor.call_later(0.1 if self.local_pool is not None else 0.25, self._check_liveness)

    def _heartbeat(self) -> None:
        beat = protocol.encode({"t": protocol.HEARTBEAT})
        for worker in self.workers.workers.values():
            try:
                self.socket.send_multipart([worker.control_identity, beat], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self.reactor.call_later(self.heartbeat_interval, self._heartbeat)
