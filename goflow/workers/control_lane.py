"""A worker's control lane, served by a process of its own (docs/protocol.md, "Liveness").

Why a process and not a thread: a node can hold the GIL for many seconds in one C call
(``sum(range(10**9))``, a jq program that builds a huge array). No thread of the worker's
interpreter runs meanwhile, so a heartbeat thread would fall silent and the coordinator
would declare a busy worker lost. The control process is forked by the worker before the
worker opens any socket, so node code never runs in its interpreter. It:

* sends ``heartbeat`` every ``heartbeat_interval`` while the worker process is alive and
  not stopped (SIGSTOP, a debugger): a busy worker keeps beating, a hung or dead one falls
  silent and is declared lost after the coordinator's liveness window;
* forwards every other control message (``cancel``, ``shutdown``, ``reconnect``) to the
  worker over a pipe, which a thread of the worker reads;
* enforces the cancellation grace: a task still running ``cancel_grace`` seconds after its
  ``cancel`` (stuck in C code) is freed by SIGKILL of the worker process, which its
  supervisor replaces;
* tells the worker to exit with code 75 when the coordinator is silent for
  ``coordinator_liveness`` (the worker's supervisor then reconnects it at once); and as soon
  as the handshake fails, with code 77 when the coordinator refused the CURVE key, 78 when
  the two sides disagree on security (CURVE on one side only, or not a goflow endpoint).
  ZeroMQ does not retry such a connection: only a new process can, once it is fixed. A
  handshake that fails with no reason given (the peer closed the connection: what a CURVE
  coordinator does to a plain worker as often as it says why, and all that a port that
  speaks no ZMTP does) counts as a disagreement once no handshake has succeeded for
  ``HANDSHAKE_RETRY_S`` since; ZeroMQ retries those meanwhile, so a one-off reset passes.

It exits when the worker process does (parent-death signal, and a parent check per beat).
The worker publishes the id of the task it is running in a shared 8-byte word (a memory
write per task, no system call), which is how the grace is enforced for the right task.
"""

from __future__ import annotations

import mmap
import os
import signal
import struct
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from goflow import protocol

CONTROL_LOST = "_control_lost"
"""Pseudo message type the lane forwards when the coordinator has been silent too long."""
CONTROL_REFUSED = "_control_refused"
"""Pseudo message type the lane forwards when the handshake failed (``why``: ``key`` when the
coordinator refused the CURVE key, ``mechanism`` when the two sides' security differs)."""

HANDSHAKE_RETRY_S = 2.0
"""How long handshakes may keep failing with no reason given before the lane gives up."""
_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED)

_NONE = -1
_WORD = struct.Struct("q")
_LENGTH = struct.Struct("!I")


class ControlLane:
    """The worker's handle on its control process: start it, read what it forwards."""

    def __init__(self, pid: int, read_fd: int, shared: mmap.mmap):
        self.pid = pid
        self._read_fd = read_fd
        self._shared = shared

    @classmethod
    def start(cls, endpoint: str, identity: bytes, *, heartbeat_interval: float, coordinator_liveness: float,
              cancel_grace: float, curve: dict[str, bytes] | None) -> "ControlLane":
        """Fork the control process. Call before this process opens any ZeroMQ socket."""
        shared = mmap.mmap(-1, _WORD.size)  # anonymous and MAP_SHARED: both processes see writes
        _WORD.pack_into(shared, 0, _NONE)
        read_fd, write_fd = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the control process: never returns into the worker's code
            code = 0
            try:
                os.close(read_fd)
                _serve(parent, endpoint, identity, write_fd, shared, heartbeat_interval=heartbeat_interval,
                       coordinator_liveness=coordinator_liveness, cancel_grace=cancel_grace, curve=curve)
            except BaseException:  # noqa: BLE001 - nothing may unwind into the worker's stack
                code = 1
            os._exit(code)
        os.close(write_fd)
        return cls(pid, read_fd, shared)

    def running(self, task_id: Any) -> None:
        """Publish the task now running (None when idle), for the cancellation grace."""
        _WORD.pack_into(self._shared, 0, task_id if isinstance(task_id, int) and 0 <= task_id < 2 ** 63 else _NONE)

    def receive(self) -> dict | None:
        """The next forwarded control message; None once the control process is gone."""
        header = self._read_exactly(_LENGTH.size)
        if header is None:
            return None
        frame = self._read_exactly(_LENGTH.unpack(header)[0])
        if frame is None:
            return None
        try:
            return protocol.decode(frame)
        except protocol.ProtocolError:
            return {"t": "_ignored"}

    def _read_exactly(self, size: int) -> bytes | None:
        chunks, missing = [], size
        while missing:
            try:
                chunk = os.read(self._read_fd, missing)
            except InterruptedError:
                continue
            if not chunk:
                return None
            chunks.append(chunk)
            missing -= len(chunk)
        return b"".join(chunks)

    def stop(self) -> None:
        """End the control process (the worker is leaving) and reap it."""
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _runnable(pid: int) -> bool:
    """Whether ``pid`` is alive and not stopped (Linux /proc; elsewhere: alive)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True  # no /proc: trust the parent-death signal
    return state not in (b"T", b"t", b"Z", b"X")


def _serve(parent: int, endpoint: str, identity: bytes, write_fd: int, shared: mmap.mmap, *,
           heartbeat_interval: float, coordinator_liveness: float, cancel_grace: float,
           curve: dict[str, bytes] | None) -> None:
    from goflow.workers.lifetime import die_with_parent

    for signum in (signal.SIGTERM, signal.SIGINT):  # a worker's stop is the worker's to handle
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent()
    if os.getppid() != parent:
        return
    os.set_blocking(write_fd, False)
    context = zmq.Context()  # never the parent's: ZeroMQ contexts do not survive fork
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 1024 * 1024)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    if curve:
        sock.curve_secretkey = curve["secret"]
        sock.curve_publickey = curve["public"]
        sock.curve_serverkey = curve["server_public"]
    handshake = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
    poller.register(handshake, zmq.POLLIN)
    sock.connect(endpoint)
    heartbeat = protocol.encode({"t": protocol.HEARTBEAT})
    pending = bytearray()
    grace: dict[int, float] = {}  # task id -> when the worker is killed if still running it
    last_heard = time.monotonic()
    next_beat = last_heard
    lost = False
    failing_since: float | None = None   # the first reasonless handshake failure since a success

    def forward(frame: bytes) -> None:
        pending.extend(_LENGTH.pack(len(frame)) + frame)

    def refused(why: str) -> None:
        nonlocal lost
        forward(protocol.encode({"t": CONTROL_REFUSED, "why": why}))
        lost = True   # the worker exits (77 or 78); its supervisor retries with backoff

    while os.getppid() == parent:
        now = time.monotonic()
        wake = min([next_beat, *grace.values()]) if not lost else now + heartbeat_interval
        if failing_since is not None and not lost:
            wake = min(wake, failing_since + HANDSHAKE_RETRY_S)
        if pending:
            poller.register(write_fd, zmq.POLLOUT)
        ready = dict(poller.poll(max(0, int((wake - now) * 1000)) + 1))
        if pending:
            poller.unregister(write_fd)
        if ready.get(sock):
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    message = protocol.decode(frame)
                except protocol.ProtocolError:
                    continue
                last_heard = time.monotonic()
                if message["t"] == protocol.HEARTBEAT:
                    continue
                forward(frame)
                task_id = message.get("id")
                if message["t"] == protocol.CANCEL and isinstance(task_id, int) \
                        and _WORD.unpack_from(shared, 0)[0] == task_id:
                    grace[task_id] = time.monotonic() + cancel_grace
        if ready.get(handshake) and not lost:
            event = recv_monitor_message(handshake)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                failing_since = None
            elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                failing_since = failing_since or time.monotonic()
            else:
                refused("key" if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "mechanism")
        if failing_since is not None and not lost and time.monotonic() - failing_since >= HANDSHAKE_RETRY_S:
            refused("mechanism")
        if pending:
            try:
                del pending[:os.write(write_fd, pending)]
            except BlockingIOError:
                pass  # the worker is busy: keep the messages, keep beating
        now = time.monotonic()
        running = _WORD.unpack_from(shared, 0)[0]
        for task_id, deadline in list(grace.items()):
            if running != task_id:
                del grace[task_id]  # cancelled in time, or finished
            elif now >= deadline:
                # Cooperative cancellation failed (stuck in C code): only a new process frees it.
                os.kill(parent, signal.SIGKILL)
                return
        if lost:
            continue
        if now - last_heard > coordinator_liveness:
            forward(protocol.encode({"t": CONTROL_LOST}))
            lost = True  # stop beating; the worker exits (code 75) and its supervisor reconnects it
        elif now >= next_beat:
            if _runnable(parent):
                try:
                    sock.send(heartbeat, zmq.NOBLOCK)
                except zmq.Again:
                    pass  # not connected (yet): the next beat tries again
            next_beat = now + heartbeat_interval
