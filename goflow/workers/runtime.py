"""The worker process: connect to a coordinator, run tasks, report results (docs/protocol.md).

DEALER sockets: the task lane (this process's main thread: receive tasks, execute,
send results) and the control lane, served by a process of its own
(:mod:`goflow.workers.control_lane`) so heartbeats never depend on this interpreter getting
the GIL: a node that holds it for minutes does not make its worker look dead, while a
stopped or dead worker still falls silent. A thread here applies what the control process
forwards (cancel, shutdown, reconnect). The log lane (goflow/workers/capture.py) carries the
running task's output.

SIGTERM drains: the worker tells the coordinator (``drain``), which sends it nothing new and
answers ``drained``; the worker finishes every task it holds, says ``bye`` and exits 0.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
import uuid
from collections import deque
from typing import Any

import msgpack
import zmq

from goflow import protocol
from goflow.errors import ErrorKind
from goflow.workers.capture import CAPTURE
from goflow.workers.control_lane import CONTROL_LOST, CONTROL_REFUSED, ControlLane
from goflow.supervisor import EXIT_COORDINATOR_LOST, EXIT_KEY_REFUSED, EXIT_SECURITY_MISMATCH
from goflow.workers.lifetime import die_with_parent
from goflow.workers.executors import ExecutorRegistry, TaskCancelled

_POLLIN = int(zmq.POLLIN)
RESULT_BATCH_S = 0.002
"""The longest a finished task's result waits to travel with the next ones."""


class Worker:
    """One worker: runs tasks one at a time, holding up to ``credits`` in hand."""

    def __init__(self, endpoint: str, *, worker_id: str | None = None, credits: int = protocol.DEFAULT_CREDITS,
                 labels: dict[str, str] | None = None, heartbeat_interval: float = 0.5,
                 coordinator_liveness: float = 10.0, cancel_grace: float = 2.0,
                 curve: dict[str, bytes] | None = None, context: zmq.Context | None = None):
        self.endpoint = endpoint
        self.worker_id = worker_id or f"w-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.credits = credits
        self.labels = labels or {}
        self.heartbeat_interval = heartbeat_interval
        self.coordinator_liveness = coordinator_liveness
        self.cancel_grace = cancel_grace
        self.curve = curve
        self.context = context or zmq.Context.instance()
        self.executors = ExecutorRegistry()
        self.queue: deque[dict] = deque()
        self.cancelled: set[int] = set()
        self.current: dict | None = None
        self.stopping = threading.Event()
        self.drain_requested = False
        """Set by :meth:`drain` (SIGTERM): finish what is held, take nothing new, leave."""
        self.drain_sent = False
        self.drained = False
        """The coordinator confirmed it sends nothing more (``drained``)."""
        self.main_thread_id = threading.get_ident()
        self.lane: ControlLane | None = None
        self.welcomed: str | None = None
        """The epoch of the coordinator that welcomed us (None until then)."""
        self.packer = msgpack.Packer(use_bin_type=True)

    # -- sockets ---------------------------------------------------------------------------
    def _socket(self, identity: bytes) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        if self.curve:  # {"server_public", "public", "secret"}, as goflow.control.framing clients take it
            sock.curve_secretkey = self.curve["secret"]
            sock.curve_publickey = self.curve["public"]
            sock.curve_serverkey = self.curve["server_public"]
        sock.connect(self.endpoint)
        return sock

    # -- control lane ----------------------------------------------------------------------
    def _control_loop(self) -> None:
        """Apply what the control process forwards; it beats and watches the coordinator."""
        lane = self.lane
        while True:
            message = lane.receive()
            if message is None:  # the control process is gone: we are deaf, start over
                if not self.stopping.is_set():
                    os._exit(EXIT_COORDINATOR_LOST)
                return
            kind = message["t"]
            if kind == protocol.CANCEL:
                self._cancel(message.get("id"))
            elif kind == protocol.RECONNECT and self.welcomed is not None and (
                    message.get("lost") or message.get("epoch") != self.welcomed):
                os._exit(EXIT_COORDINATOR_LOST)  # a new coordinator, or we were declared lost
            elif kind == CONTROL_LOST:
                # The coordinator is gone; exit so a supervisor (or the operator) restarts us.
                os._exit(EXIT_COORDINATOR_LOST)
            elif kind == CONTROL_REFUSED:
                # Our READY can never leave (the failed connection is not retried): say why, exit.
                refused = message.get("why") == "key"
                why = "refused this worker's CURVE key" if refused else \
                    "and this worker disagree on CURVE (one side has keys, the other none)"
                os.write(2, f"goflow-worker {self.worker_id}: the coordinator at {self.endpoint} {why}\n".encode())
                os._exit(EXIT_KEY_REFUSED if refused else EXIT_SECURITY_MISMATCH)
            elif kind == protocol.SHUTDOWN:
                self._shut_down(message)

    def drain(self) -> None:
        """Finish the tasks in hand, accept no new ones, then leave (safe in a signal handler)."""
        self.drain_requested = True

    def _cancel(self, task_id: Any) -> None:
        """Cancel a held task; the control process enforces ``cancel_grace`` for a running one."""
        current = self.current
        if current is None or current.get("id") != task_id:
            self.cancelled.add(task_id)
            return
        if not self.executors.cancel(current.get("kind", "")):
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.main_thread_id),
                                                       ctypes.py_object(TaskCancelled))

    # -- task lane -------------------------------------------------------------------------
    def _execute(self, task: dict) -> dict:
        started = time.time()
        result: dict[str, Any] = {"t": protocol.RESULT, "id": task.get("id"), "started": started}
        CAPTURE.begin(task.get("id"), task.get("kind", ""))
        try:
            if task.get("id") in self.cancelled:
                raise TaskCancelled()
            result.update(self.executors.run(task.get("kind", ""), task.get("spec") or {}))
        except TaskCancelled:
            result.update(ok=False, error={"type": ErrorKind.CANCELLED, "message": "cancelled by the coordinator"})
        finally:
            logs = CAPTURE.end()
            if logs is not None:
                result["logs"] = logs  # the lines not yet sent on the log lane (goflow/workers/capture.py)
        result["finished"] = time.time()
        return result

    def _pack(self, result: dict) -> bytes:
        """``result`` encoded; a result that cannot be encoded, or that the coordinator's
        socket would refuse (over ``protocol.MAX_RESULT_BYTES``), becomes its node's error."""
        try:
            frame = self.packer.pack(result)
        except (TypeError, ValueError, OverflowError) as exc:
            self.packer.reset()
            value_type = type(result.get("value")).__name__
            return self._pack_error(result, ErrorKind.SERIALIZATION,
                                    f"the result ({value_type}) cannot be sent: {exc}; return "
                                    f"JSON-like data (dict, list, str, int, float, bool, None)")
        if len(frame) > protocol.MAX_RESULT_BYTES:
            return self._pack_error(result, ErrorKind.RESULT_TOO_LARGE,
                                    f"the result is {len(frame):,} bytes encoded, over the {protocol.MAX_RESULT_BYTES:,}"
                                    f"-byte limit for one result (the workers socket's MAXMSGSIZE, "
                                    f"{protocol.MAX_MESSAGE_BYTES:,} bytes, less room for the envelope); write "
                                    f"big data to a file or store and return a reference to it")
        return frame

    def _pack_error(self, result: dict, error_type: str, message: str) -> bytes:
        result.pop("value", None)
        result.pop("meta", None)
        result.update(ok=False, error={"type": error_type, "message": message})
        return self.packer.pack(result)

    def run(self) -> int:
        """Serve until told to shut down, or drained. Returns the process exit code."""
        self.lane = ControlLane.start(self.endpoint, self.worker_id.encode() + protocol.CONTROL_SUFFIX,
                                      heartbeat_interval=self.heartbeat_interval,
                                      coordinator_liveness=self.coordinator_liveness,
                                      cancel_grace=self.cancel_grace, curve=self.curve)
        control = threading.Thread(target=self._control_loop, name="goflow-worker-control", daemon=True)
        control.start()
        CAPTURE.start(self._socket, self.worker_id.encode() + protocol.LOG_SUFFIX)
        sock = self._socket(self.worker_id.encode())
        sock.send(protocol.encode({"t": protocol.READY, "v": protocol.VERSION, "worker": self.worker_id,
                                   "pid": os.getpid(), "credits": self.credits, "labels": self.labels,
                                   "host": os.uname().nodename}))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self.stopping.is_set():
                try:
                    self._announce_drain(sock)
                    if self.drained and not self.queue:
                        break  # everything held is done and the coordinator sends nothing more
                    if not self.queue:
                        if not poller.poll(200):
                            continue
                    self._receive(sock)
                    unsent: list[bytes] = []
                    unsent_bytes = 0
                    batch_started = 0.0
                    while self.queue and not self.stopping.is_set():
                        task = self.queue.popleft()
                        self.current = task
                        self.lane.running(task.get("id"))
                        try:
                            result = self._execute(task)
                        finally:
                            self.current = None
                            self.lane.running(None)
                        self.cancelled.discard(task.get("id"))
                        frame = self._pack(result)
                        if unsent and unsent_bytes + len(frame) > protocol.MAX_RESULT_BYTES:
                            self._send_results(sock, unsent)  # a batch stays under the message limit too
                            unsent = []
                        if not unsent:
                            batch_started = time.monotonic()
                            unsent_bytes = 0
                        unsent.append(frame)
                        unsent_bytes += len(frame)
                        self._receive(sock)
                        # Results of a quick run of tasks travel together; a result never waits
                        # longer than RESULT_BATCH_S, nor behind a task that is not in hand yet.
                        if not self.queue or time.monotonic() - batch_started > RESULT_BATCH_S:
                            self._send_results(sock, unsent)
                            unsent = []
                    if unsent:
                        self._send_results(sock, unsent)
                except TaskCancelled:
                    continue  # a cancellation that arrived just after its task finished
        finally:
            self.stopping.set()
            try:
                # Every result was sent before this on the same lane, so the coordinator knows
                # that whatever it still counts as held here was never run.
                sock.send(protocol.encode({"t": protocol.BYE}), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            sock.close(linger=500)
            self.executors.close()
            CAPTURE.stop()
            self.lane.stop()
            control.join(timeout=2)
        return 0

    def _announce_drain(self, sock: zmq.Socket) -> None:
        """Send ``drain`` once, as soon as asked: before any further result, so the results
        that free our credits cannot earn us a new task."""
        if self.drain_requested and not self.drain_sent:
            self.drain_sent = True
            sock.send(protocol.encode({"t": protocol.DRAIN}))

    def _send_results(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        self._announce_drain(sock)
        sock.send(frames[0] if len(frames) == 1 else protocol.batch(protocol.RESULTS, frames))

    def _receive(self, sock: zmq.Socket) -> None:
        """Take every message waiting on the task lane (tasks join the queue). Called after
        every task: asking the socket first is half the cost of the ``Again`` a bare
        non-blocking receive raises when nothing waits."""
        while sock.getsockopt(zmq.EVENTS) & _POLLIN:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = protocol.decode(frame)
            except protocol.ProtocolError:
                continue
            kind = message["t"]
            if kind == protocol.TASK:
                self.queue.append(message)
            elif kind == protocol.TASKS:
                self.queue.extend(item for item in message.get("items") or () if isinstance(item, dict))
            elif kind == protocol.WELCOME:
                self.welcomed = message.get("epoch")
            elif kind == protocol.DRAINED:
                self.drained = True
            elif kind == protocol.SHUTDOWN:
                self._shut_down(message)
                return

    def _shut_down(self, message: dict) -> None:
        """The coordinator told this worker to stop; a refusal (bad name, other protocol
        version) comes with its reason, which the operator must see."""
        if message.get("reason"):
            os.write(2, f"goflow-worker {self.worker_id[:80]}: the coordinator at {self.endpoint} shut this worker "
                        f"down: {message['reason']}\n".encode())
        self.stopping.set()


def serve(endpoint: str, **options: Any) -> int:
    """Entry point for a local worker process started by the coordinator."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    die_with_parent()
    return Worker(endpoint, **options).run()
