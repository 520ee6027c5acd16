"""What a running task says while it runs: its output lines and progress, sent as it happens.

One :class:`Capture` per worker process (:data:`CAPTURE`, installed by the worker runtime)
collects, for the task in hand, a python node's ``sys.stdout``/``sys.stderr`` writes and
``logging`` records, an MCP server's ``notifications/message`` and stderr lines, and
progress reports (:func:`progress`, MCP ``notifications/progress``). A flusher thread of its
own sends them to the coordinator on a third DEALER socket, the **log lane** (identity
``<worker_id>.log``), as ``log`` messages (docs/protocol.md):

* batched: at most every :data:`FLUSH_INTERVAL_S` (sooner when :data:`MAX_BATCH_LINES`
  lines wait), so a chatty node costs a few messages per second, not one per line;
* bounded per task attempt: a token bucket of :data:`RATE_LINES_PER_S` lines per second
  (bursts up to :data:`BURST_LINES`), at most :data:`MAX_BYTES` of text, lines cut at
  :data:`MAX_LINE_CHARS`; every line left out is counted (``dropped``), never silently lost;
* progress is conflated: only the latest report travels with each batch.

The lines still waiting when the task ends travel inside its ``result`` (``logs``), together
with how many batches went on the log lane, so the coordinator publishes every line before
the node's outcome even though the two lanes are separate connections.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from typing import Any, Callable

from goflow import protocol

FLUSH_INTERVAL_S = 0.05
MAX_BATCH_LINES = 1000
RATE_LINES_PER_S = 1000.0
BURST_LINES = 5000
MAX_BYTES = 2 * 1024 * 1024
MAX_LINE_CHARS = 4096

LEVELS = ("debug", "info", "warning", "error", "critical")


def level_name(levelno: int) -> str:
    """A ``logging`` level number as one of :data:`LEVELS`."""
    if levelno >= logging.CRITICAL:
        return "critical"
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    if levelno >= logging.INFO:
        return "info"
    return "debug"


class _TaskOutput:
    """What one task attempt said so far (guarded by the Capture's lock)."""

    __slots__ = ("task_id", "lines", "dropped", "bytes", "tokens", "refilled", "batches", "progress",
                 "logging")

    def __init__(self, task_id: Any, capture_logging: bool):
        self.task_id = task_id
        self.lines: list[dict] = []
        self.dropped = 0
        self.bytes = 0
        self.tokens = float(BURST_LINES)
        self.refilled = time.monotonic()
        self.batches = 0
        self.progress: dict | None = None
        self.logging = capture_logging

    def admit(self, size: int) -> bool:
        """Whether one more line of ``size`` characters fits the bounds (counts it if not)."""
        if self.tokens < 1.0:  # refill only when the bucket runs dry (cheap while it is not)
            now = time.monotonic()
            self.tokens = min(float(BURST_LINES), self.tokens + (now - self.refilled) * RATE_LINES_PER_S)
            self.refilled = now
        if self.tokens < 1.0 or self.bytes + size > MAX_BYTES:
            self.dropped += 1
            return False
        self.tokens -= 1.0
        self.bytes += size
        return True

    def take(self) -> dict | None:
        """The pending batch (and reset it), or None when there is nothing to send."""
        if not self.lines and not self.dropped and self.progress is None:
            return None
        batch: dict[str, Any] = {"lines": self.lines}
        if self.dropped:
            batch["dropped"] = self.dropped
        if self.progress is not None:
            batch["progress"] = self.progress
        self.lines, self.dropped, self.progress = [], 0, None
        return batch


class _StreamProxy(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` while the worker runs: lines go to the running task."""

    def __init__(self, capture: "Capture", stream: str, original: Any):
        self._capture = capture
        self._stream = stream
        self._level = "error" if stream == "stderr" else "info"
        self._original = original
        self._partial = ""  # the line being written (at most MAX_LINE_CHARS + 1 characters kept)
        self._cut = 0       # characters of it beyond those

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self._capture.current is None:
            return self._original.write(text)
        if text == "\n":  # print() writes its text and its end separately
            self._end_line()
        elif "\n" not in text:
            self._append(text)
        else:
            first, *middle, last = text.split("\n")
            self._append(first)
            self._end_line()
            for line in middle:
                self._capture.emit(self._stream, self._level, line)
            self._append(last)
        return len(text)

    def _append(self, text: str) -> None:
        room = MAX_LINE_CHARS + 1 - len(self._partial)
        if len(text) <= room:
            self._partial += text
        else:
            self._partial += text[:max(0, room)]
            self._cut += len(text) - max(0, room)

    def _end_line(self) -> None:
        line, cut, self._partial, self._cut = self._partial, self._cut, "", 0
        self._capture.emit(self._stream, self._level, line, cut=cut)

    def flush(self) -> None:
        if self._partial or self._cut:
            self._end_line()
        if self._capture.current is None:
            self._original.flush()

    def fileno(self) -> int:
        return self._original.fileno()

    def isatty(self) -> bool:
        return False


class _LoggingHandler(logging.Handler):
    """Forwards the running python node's ``logging`` records (not goflow's own)."""

    def __init__(self, capture: "Capture"):
        super().__init__(logging.DEBUG)
        self._capture = capture

    def emit(self, record: logging.LogRecord) -> None:
        current = self._capture.current
        if current is None or not current.logging or record.name.startswith("goflow"):
            # Not a node's record: what Python does without us (a process with no other
            # handler prints warnings and worse to stderr).
            if record.levelno >= logging.WARNING and logging.getLogger().handlers == [self]:
                logging.lastResort.handle(record)
            return
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
        except Exception:  # a bad format string in user code must not break the node
            text = str(record.msg)
        self._capture.emit("log", level_name(record.levelno), text, logger=record.name, ts=record.created)


class Capture:
    """Collects the running task's lines and progress; a thread sends them (see module doc)."""

    def __init__(self) -> None:
        self.current: _TaskOutput | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._streams: list[_StreamProxy] = []
        self._handler: _LoggingHandler | None = None

    # -- lifecycle (worker runtime) ----------------------------------------------------------
    def start(self, socket_factory: Callable[[bytes], Any], identity: bytes) -> None:
        """Redirect stdout/stderr and ``logging``, start the flusher thread (its own socket)."""
        self._streams = [_StreamProxy(self, "stdout", sys.stdout), _StreamProxy(self, "stderr", sys.stderr)]
        sys.stdout, sys.stderr = self._streams  # type: ignore[assignment]
        root = logging.getLogger()
        if root.level > logging.DEBUG or root.level == logging.NOTSET:
            # Let a node's debug records reach our handler; the worker's own handlers keep
            # the threshold they had through the root level.
            for handler in root.handlers:
                if handler.level == logging.NOTSET:
                    handler.setLevel(root.level or logging.WARNING)
            root.setLevel(logging.DEBUG)
        self._handler = _LoggingHandler(self)
        root.addHandler(self._handler)
        self._thread = threading.Thread(target=self._flush_loop, args=(socket_factory, identity),
                                        name="goflow-worker-logs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
        if self._streams:
            sys.stdout, sys.stderr = self._streams[0]._original, self._streams[1]._original

    def begin(self, task_id: Any, kind: str) -> None:
        """The worker starts ``task_id`` (``logging`` records are taken from python nodes only)."""
        with self._lock:
            self.current = _TaskOutput(task_id, kind == "python")

    def end(self) -> dict | None:
        """The task finished: what its result carries (``{"batches", "lines", ...}``) or None."""
        for stream in self._streams:
            stream.flush()
        with self._lock:
            current, self.current = self.current, None
        if current is None:
            return None
        tail = current.take()
        if tail is None and not current.batches:
            return None
        return {"batches": current.batches, **(tail or {"lines": []})}

    # -- producers (any thread) --------------------------------------------------------------
    def emit(self, stream: str, level: str, text: str, *, logger: str | None = None,
             ts: float | None = None, cut: int = 0) -> None:
        """One line from the running task (a no-op when none runs); ``cut``: characters of
        it the caller already left out."""
        current = self.current
        if current is None:
            return
        size = len(text) + cut
        if size > MAX_LINE_CHARS:
            text = f"{text[:MAX_LINE_CHARS]}… [{size - MAX_LINE_CHARS} characters cut]"
        line = {"ts": ts or time.time(), "stream": stream, "level": level, "text": text}
        if logger:
            line["logger"] = logger
        with self._lock:
            if self.current is not current or not current.admit(len(text)):
                return
            lines = current.lines
            lines.append(line)
        if len(lines) >= MAX_BATCH_LINES:
            self._wake.set()

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """The running task's latest progress (conflated; a no-op when none runs)."""
        current = self.current
        if current is None:
            return
        report: dict[str, Any] = {"progress": done, "ts": time.time()}
        if total is not None:
            report["total"] = total
        if message is not None:
            report["message"] = str(message)[:MAX_LINE_CHARS]
        with self._lock:
            if self.current is current:
                current.progress = report

    # -- the flusher -------------------------------------------------------------------------
    def _flush_loop(self, socket_factory: Callable[[bytes], Any], identity: bytes) -> None:
        sock = socket_factory(identity)
        try:
            while not self._stopping.is_set():
                self._wake.wait(FLUSH_INTERVAL_S)
                self._wake.clear()
                with self._lock:
                    current = self.current
                    batch = current.take() if current is not None else None
                    if batch is not None:
                        current.batches += 1
                        batch["t"], batch["id"], batch["n"] = protocol.LOG, current.task_id, current.batches
                if batch is not None:
                    sock.send(protocol.encode(batch))
        finally:
            sock.close(linger=500)


CAPTURE = Capture()
"""This process's capture (active once a worker runtime has started it)."""


def progress(done: float, total: float | None = None, message: str | None = None) -> None:
    """Report a python node's progress (``node.progress`` events); a no-op outside a worker.

    Reports are conflated: only the latest one per flush interval reaches subscribers.
    """
    CAPTURE.progress(done, total, message)
