"""The reactor: one thread that polls sockets, runs timers and runs calls from other threads.

Everything that owns execution state runs on this thread, so none of it needs locks;
other threads reach it only through :meth:`Reactor.call_soon` / :meth:`Reactor.call`.
Handlers are registered per socket; ``after_turn`` callbacks run once per loop turn
(the broker's dispatch pump), so a burst of work costs one pass, not one per message.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

import zmq

log = logging.getLogger("goflow.coordinator")


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


class Reactor:
    """Poll loop, timer heap and cross-thread call queue."""

    def __init__(self, name: str = "goflow-coordinator") -> None:
        self.name = name
        self.timers: list[Timer] = []
        self._handlers: dict[Any, Callable[[], None]] = {}
        self._after_turn: list[Callable[[], None]] = []
        self._on_start: list[Callable[[], None]] = []
        self._on_exit: list[Callable[[], None]] = []
        self._calls: deque[Callable[[], None]] = deque()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        self._wake_lock = threading.Lock()
        """Guards the wake pipe against :meth:`join` closing it: other threads (the history
        writer's callbacks) may call :meth:`call_soon` after the reactor stopped, and a
        closed descriptor number may already belong to another file."""
        self.running = False
        self._poller: zmq.Poller | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    # -- wiring (before start) ---------------------------------------------------------
    def add_reader(self, source: Any, handler: Callable[[], None]) -> None:
        """Call ``handler`` on the reactor thread whenever ``source`` (socket or fd) is readable."""
        self._handlers[source] = handler

    def replace_reader(self, old: Any, new: Any, handler: Callable[[], None]) -> None:
        """Poll ``new`` instead of ``old`` (reactor thread; e.g. a socket reset and re-created)."""
        self._handlers.pop(old, None)
        self._handlers[new] = handler
        if self._poller is not None:
            self._poller.unregister(old)
            self._poller.register(new, zmq.POLLIN)

    def after_each_turn(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` at the end of every loop turn (callbacks run in registration order)."""
        self._after_turn.append(callback)

    def on_start(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` first thing on the reactor thread (to arm periodic timers)."""
        self._on_start.append(callback)

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the reactor thread after the loop ends (final flushes)."""
        self._on_exit.append(callback)

    # -- threading -----------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self.running = True
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
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

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` on the reactor thread after ``delay`` seconds (reactor thread only)."""
        timer = Timer(time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self.timers, timer)
        return timer

    def stop(self) -> None:
        """Leave the loop at the end of this turn (reactor thread only)."""
        self.running = False

    def join(self, timeout: float) -> None:
        """Wait for the loop to end, then release the wake-up pipe (from another thread)."""
        if self._thread is None:
            return
        self._stopped.wait(timeout)
        self._thread.join(timeout)
        self._thread = None
        with self._wake_lock:
            os.close(self._wake_read)
            os.close(self._wake_write)
            self._wake_read = self._wake_write = -1

    # -- the loop ------------------------------------------------------------------------
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
        poller = self._poller = zmq.Poller()
        handlers = self._handlers
        handlers[self._wake_read] = self._run_calls
        for source in handlers:
            poller.register(source, zmq.POLLIN)
        try:
            for callback in self._on_start:
                callback()
            while self.running:
                wait = max(0, int((self.timers[0].due - time.monotonic()) * 1000) + 1) if self.timers else 1000
                for source, _ in poller.poll(min(wait, 1000)):
                    handler = handlers.get(source)
                    if handler is None:   # replaced during this turn
                        continue
                    try:
                        handler()
                    except Exception:
                        log.exception("reactor handler failed")
                try:
                    self._run_timers()
                    for callback in self._after_turn:
                        callback()
                except Exception:
                    log.exception("timer or dispatch failed")
            for callback in self._on_exit:
                callback()
        finally:
            self._stopped.set()
