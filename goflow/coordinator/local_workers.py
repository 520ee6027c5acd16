"""Local worker processes beside a coordinator (``goflow run``, ``--local-workers``).

A :class:`~goflow.supervisor.WorkerProcesses` with the command and environment local
workers need; the broker polls it on its liveness timer (exits become ``worker.lost``,
restarts follow the supervisor's backoff) and stops it when the coordinator stops.
"""

from __future__ import annotations

import logging
import os
import sys

from goflow import protocol
from goflow.supervisor import WorkerProcesses


class LocalWorkerPool(WorkerProcesses):
    """``count`` worker processes connected to ``endpoint``."""

    def __init__(self, endpoint: str, count: int, *, python_paths: list[str] | None = None,
                 credits: int = protocol.DEFAULT_CREDITS, heartbeat_interval: float = 0.25, extra_args: list[str] | None = None):
        self.endpoint = endpoint
        self.python_paths = python_paths or []
        self.credits = credits
        self.heartbeat_interval = heartbeat_interval
        self.extra_args = list(extra_args or [])
        """More ``goflow.workers`` flags, e.g. the CURVE key files of a daemon's local workers."""
        super().__init__(count, self._command, prefix=f"local-{os.getpid()}", env=self._env(),
                         log=logging.getLogger("goflow.coordinator.local_workers"), exit_level=logging.INFO)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        paths = [p for p in self.python_paths if p] + [os.getcwd()]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        # `command: python` in a workflow means goflow's own interpreter (and its venv's tools).
        env["PATH"] = os.pathsep.join(filter(None, [os.path.dirname(sys.executable), env.get("PATH")]))
        return env

    def _command(self, name: str) -> list[str]:
        return [sys.executable, "-m", "goflow.workers", "--single", "--connect", self.endpoint, "--name", name,
                "--credits", str(self.credits), "--heartbeat-interval", str(self.heartbeat_interval),
                *self.extra_args]
