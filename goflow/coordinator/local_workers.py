"""Local worker processes for the embedded coordinator: start, watch, replace, stop."""

from __future__ import annotations

import os
import subprocess
import sys
import time


class LocalWorkerPool:
    """``count`` worker processes connected to ``endpoint``; dead ones are replaced on request."""

    def __init__(self, endpoint: str, count: int, *, python_paths: list[str] | None = None,
                 credits: int = 4, heartbeat_interval: float = 0.25, extra_args: list[str] | None = None):
        self.endpoint = endpoint
        self.count = count
        self.python_paths = python_paths or []
        self.credits = credits
        self.heartbeat_interval = heartbeat_interval
        self.extra_args = list(extra_args or [])
        """More ``goflow.workers`` flags, e.g. the CURVE key files of a daemon's local workers."""
        self.processes: dict[str, subprocess.Popen] = {}
        self._serial = 0
        self.closing = False

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        paths = [p for p in self.python_paths if p] + [os.getcwd()]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        # `command: python` in a workflow means goflow's own interpreter (and its venv's tools).
        env["PATH"] = os.pathsep.join(filter(None, [os.path.dirname(sys.executable), env.get("PATH")]))
        return env

    def spawn(self) -> str:
        self._serial += 1
        name = f"local-{os.getpid()}-{self._serial}"
        command = [sys.executable, "-m", "goflow.workers", "--single", "--connect", self.endpoint, "--name", name,
                   "--credits", str(self.credits), "--heartbeat-interval", str(self.heartbeat_interval),
                   *self.extra_args]
        self.processes[name] = subprocess.Popen(command, env=self._env(), stdin=subprocess.DEVNULL,
                                                start_new_session=False)
        return name

    def start(self) -> None:
        for _ in range(self.count):
            self.spawn()

    def reap(self) -> list[tuple[str, int]]:
        """Names and exit codes of workers that exited since the last call."""
        dead = [(name, proc.returncode) for name, proc in self.processes.items() if proc.poll() is not None]
        for name, _ in dead:
            del self.processes[name]
        return dead

    def owns(self, name: str) -> bool:
        return name in self.processes

    def kill(self, name: str) -> None:
        proc = self.processes.get(name)
        if proc is not None and proc.poll() is None:
            proc.kill()

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM every worker at once, wait up to ``grace`` seconds, then kill what is left.

        A worker finishes the task at hand on SIGTERM and says goodbye; one still starting
        holds nothing and simply exits, so stopping never waits on workers that never joined.
        """
        self.closing = True
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()
