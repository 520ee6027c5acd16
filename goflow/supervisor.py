"""One supervisor for worker processes: start them, notice exits, restart with backoff, stop.

Used by ``goflow-worker`` (its own loop polls it) and by the coordinator for the local
workers of ``goflow run`` and ``goflow-coordinator --local-workers`` (the broker polls it on
its liveness timer), so both restart, name and stop workers the same way:

* children are named ``PREFIX-N``, with ``.G`` from their second start on: a fresh identity
  per start, because the coordinator may still hold the previous connection;
* a child that exits is restarted after 0.5 s doubling up to ``max_backoff``, reset once it
  stayed up for a minute; exit code 75 (it lost the coordinator) restarts it at once, 77
  and 78 (its handshake failed) with the backoff, as the key may be admitted later;
* stopping sends SIGTERM to every child at once (a worker finishes what it holds and says
  goodbye; one still starting holds nothing) and SIGKILL to what is left after the grace.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from typing import Callable

EXIT_COORDINATOR_LOST = 75
"""A worker's exit code when it heard nothing from the coordinator for its liveness time."""
EXIT_KEY_REFUSED = 77
"""A worker's exit code when the coordinator refused its CURVE key (sysexits' EX_NOPERM): a
socket refused in the handshake is never retried by ZeroMQ, so only a new process can try."""
EXIT_SECURITY_MISMATCH = 78
"""A worker's exit code when its handshake failed on the security mechanism (sysexits'
EX_CONFIG): CURVE on one side only, or the endpoint is not a goflow coordinator's."""
HANDSHAKE_FAILURES = {
    EXIT_KEY_REFUSED: "was refused by the coordinator (its CURVE key is not authorized there)",
    EXIT_SECURITY_MISMATCH: "failed its handshake (CURVE on one side only, or not a goflow workers endpoint)",
}
BACKOFF_BASE = 0.5
STABLE_AFTER = 60.0
"""A child up this long counts as healthy again: its backoff starts over."""


class Child:
    """One supervised process slot."""

    __slots__ = ("index", "generation", "process", "started", "failures", "restart_at", "name")

    def __init__(self, index: int):
        self.index = index
        self.generation = 0
        self.process: subprocess.Popen | None = None
        self.started = 0.0
        self.failures = 0
        self.restart_at = 0.0
        self.name = ""


class WorkerProcesses:
    """``count`` worker processes made by ``command(name)``, kept running until :meth:`stop`.

    ``env``: the children's environment (None: inherited). ``log``/``exit_level``: where and
    how loudly exits and restarts are told.
    """

    def __init__(self, count: int, command: Callable[[str], list[str]], *, prefix: str,
                 env: dict[str, str] | None = None, max_backoff: float = 30.0,
                 log: logging.Logger | None = None, exit_level: int = logging.WARNING):
        self.command = command
        self.prefix = prefix
        self.env = env
        self.max_backoff = max_backoff
        self.log = log or logging.getLogger("goflow.worker")
        self.exit_level = exit_level
        self.children = [Child(i + 1) for i in range(count)]
        self.closing = False
        self.restarts = 0

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        child.generation += 1
        child.name = f"{self.prefix}-{child.index}" + (f".{child.generation}" if child.generation > 1 else "")
        child.process = subprocess.Popen(self.command(child.name), env=self.env, stdin=subprocess.DEVNULL)
        child.started = time.monotonic()
        self.log.info("started worker %s (pid %d)", child.name, child.process.pid,
                      extra={"fields": {"worker": child.name, "pid": child.process.pid}})

    def poll(self) -> list[tuple[str, int]]:
        """Notice children that exited (returned as ``(name, exit code)``) and restart the
        ones whose backoff is over; nothing restarts once :meth:`stop` began."""
        exited = []
        now = time.monotonic()
        for child in self.children:
            if child.process is not None:
                code = child.process.poll()
                if code is not None:
                    exited.append((child.name, code))
                    self._exited(child, code)
            if child.process is None and not self.closing and now >= child.restart_at:
                self._spawn(child)
        return exited

    def _exited(self, child: Child, code: int) -> None:
        uptime = time.monotonic() - child.started
        child.process = None
        if self.closing:
            return
        if uptime >= STABLE_AFTER:
            child.failures = 0
        if code == EXIT_COORDINATOR_LOST:
            delay = 0.0 if child.failures == 0 else min(self.max_backoff, BACKOFF_BASE * 2 ** (child.failures - 1))
            why = "lost the coordinator; reconnecting"
        else:
            delay = min(self.max_backoff, BACKOFF_BASE * 2 ** child.failures)
            if code in HANDSHAKE_FAILURES:
                why = HANDSHAKE_FAILURES[code]
            else:
                why = f"exited with code {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"
        child.failures += 1
        child.restart_at = time.monotonic() + delay
        self.restarts += 1
        self.log.log(self.exit_level, "worker %s %s after %.1fs; restarting in %.1fs", child.name, why, uptime,
                     delay, extra={"fields": {"worker": child.name, "code": code, "uptime_s": round(uptime, 3),
                                              "restart_in_s": delay}})

    def owns(self, name: str) -> bool:
        return any(child.name == name and child.process is not None for child in self.children)

    def alive(self) -> list[Child]:
        return [c for c in self.children if c.process is not None and c.process.poll() is None]

    def kill(self, name: str | None = None) -> None:
        """SIGKILL the child named ``name`` (every child when None); :meth:`poll` sees the exit."""
        for child in self.alive():
            if name is None or child.name == name:
                child.process.kill()

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM every child at once, wait up to ``grace`` seconds, then SIGKILL what is left."""
        self.closing = True
        alive = self.alive()
        for child in alive:
            try:
                child.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for child in alive:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log.warning("worker %s did not stop within the grace period; killing it", child.name)
                child.process.kill()
                child.process.wait()
        for child in self.children:
            child.process = None
