"""The worker process: connect to a coordinator, run tasks, report results (docs/protocol.md).

Two DEALER sockets: the task lane (main thread: receive tasks, execute, send results) and
the control lane (a thread of its own: heartbeats both ways, cancel, shutdown). Heartbeats
therefore never depend on the executor being idle, and a task stuck in C code can still be
cancelled: when cooperative cancellation does not take within ``cancel_grace`` seconds,
the process exits hard and its supervisor replaces it.
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
from goflow.workers.capture import CAPTURE
from goflow.workers.executors import ExecutorOutput, ExecutorRegistry, TaskCancelled, TaskError

RESULT_BATCH_S = 0.002
"""The longest a finished task's result waits to travel with the next ones."""
EXIT_CANCEL_STUCK = 70
EXIT_COORDINATOR_LOST = 75


def _die_with_parent() -> None:
    """Linux: have the kernel kill this process when its parent dies (no orphans)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Worker:
    """One worker: runs tasks one at a time, holding up to ``credits`` in hand."""

    def __init__(self, endpoint: str, *, worker_id: str | None = None, credits: int = 4,
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
        self.main_thread_id = threading.get_ident()
        self.last_heard = time.monotonic()
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
        sock = self._socket(self.worker_id.encode() + protocol.CONTROL_SUFFIX)
        heartbeat = protocol.encode({"t": protocol.HEARTBEAT})
        sock.send(heartbeat)
        next_beat = time.monotonic() + self.heartbeat_interval
        try:
            while not self.stopping.is_set():
                timeout = max(0.0, next_beat - time.monotonic())
                if sock.poll(int(timeout * 1000) + 1):
                    try:
                        message = protocol.decode(sock.recv())
                    except protocol.ProtocolError:
                        continue
                    self.last_heard = time.monotonic()
                    kind = message["t"]
                    if kind == protocol.CANCEL:
                        self._cancel(message.get("id"))
                    elif kind == protocol.RECONNECT and self.welcomed is not None and (
                            message.get("lost") or message.get("epoch") != self.welcomed):
                        os._exit(EXIT_COORDINATOR_LOST)  # a new coordinator, or we were declared lost
                    elif kind == protocol.SHUTDOWN:
                        self.stopping.set()
                now = time.monotonic()
                if now >= next_beat:
                    sock.send(heartbeat)
                    next_beat = now + self.heartbeat_interval
                if now - self.last_heard > self.coordinator_liveness:
                    # The coordinator is gone; exit so a supervisor (or the operator) restarts us.
                    os._exit(EXIT_COORDINATOR_LOST)
        finally:
            sock.close(0)

    def _cancel(self, task_id: Any) -> None:
        current = self.current
        if current is None or current.get("id") != task_id:
            self.cancelled.add(task_id)
            return
        kind = current.get("kind", "")
        if not self.executors.cancel(kind):
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.main_thread_id),
                                                       ctypes.py_object(TaskCancelled))
        deadline = time.monotonic() + self.cancel_grace
        while time.monotonic() < deadline:
            if self.current is not current:
                return
            time.sleep(0.01)
        # Cooperative cancellation failed (e.g. stuck in C code): only a new process frees us.
        os._exit(EXIT_CANCEL_STUCK)

    # -- task lane -------------------------------------------------------------------------
    def _execute(self, task: dict) -> dict:
        started = time.time()
        result: dict[str, Any] = {"t": protocol.RESULT, "id": task.get("id"), "started": started}
        CAPTURE.begin(task.get("id"), task.get("kind", ""))
        try:
            if task.get("id") in self.cancelled:
                raise TaskCancelled()
            output = self.executors.get(task.get("kind", ""))(task.get("spec") or {})
            if isinstance(output, ExecutorOutput):
                result["value"], result["meta"] = output.value, output.meta
            else:
                result["value"] = output
            result["ok"] = True
        except TaskCancelled:
            result.update(ok=False, error={"type": "cancelled", "message": "cancelled by the coordinator"})
        except TaskError as exc:
            result.update(ok=False, error={"type": exc.error_type, "message": exc.message, **exc.detail})
        except Exception as exc:  # an executor bug must not kill the worker
            result.update(ok=False, error={"type": "worker_error", "message": f"{type(exc).__name__}: {exc}"})
        finally:
            logs = CAPTURE.end()
            if logs is not None:
                result["logs"] = logs  # the lines not yet sent on the log lane (goflow/workers/capture.py)
        result["finished"] = time.time()
        return result

    def _pack(self, result: dict) -> bytes:
        try:
            return self.packer.pack(result)
        except (TypeError, ValueError, OverflowError) as exc:
            self.packer.reset()
            value_type = type(result.get("value")).__name__
            result.pop("value", None)
            result.pop("meta", None)
            result.update(ok=False, error={"type": "serialization",
                                           "message": f"the result ({value_type}) cannot be sent: {exc}; return "
                                                      f"JSON-like data (dict, list, str, int, float, bool, None)"})
            return self.packer.pack(result)

    def run(self) -> int:
        """Serve until told to shut down. Returns the process exit code."""
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
                    if not self.queue:
                        if not poller.poll(200):
                            continue
                    self._drain(sock)
                    unsent: list[bytes] = []
                    batch_started = 0.0
                    while self.queue and not self.stopping.is_set():
                        task = self.queue.popleft()
                        self.current = task
                        try:
                            result = self._execute(task)
                        finally:
                            self.current = None
                        self.cancelled.discard(task.get("id"))
                        if not unsent:
                            batch_started = time.monotonic()
                        unsent.append(self._pack(result))
                        self._drain(sock)
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
                sock.send(protocol.encode({"t": protocol.BYE}), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            sock.close(linger=500)
            self.executors.close()
            CAPTURE.stop()
            control.join(timeout=2)
        return 0

    @staticmethod
    def _send_results(sock: zmq.Socket, frames: list[bytes]) -> None:
        sock.send(frames[0] if len(frames) == 1 else protocol.batch(protocol.RESULTS, frames))

    def _drain(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = protocol.decode(frame)
            except protocol.ProtocolError:
                continue
            self.last_heard = time.monotonic()
            kind = message["t"]
            if kind == protocol.TASK:
                self.queue.append(message)
            elif kind == protocol.TASKS:
                self.queue.extend(item for item in message.get("items") or () if isinstance(item, dict))
            elif kind == protocol.WELCOME:
                self.welcomed = message.get("epoch")
            elif kind == protocol.SHUTDOWN:
                self.stopping.set()
                return


def serve(endpoint: str, **options: Any) -> int:
    """Entry point for a local worker process started by the coordinator."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    _die_with_parent()
    return Worker(endpoint, **options).run()
