"""Run workflows on an embedded coordinator with local worker processes.

:class:`EmbeddedRuntime` owns a private temporary directory (for the ipc:// endpoints), a
:class:`~goflow.coordinator.coordinator.Coordinator` on a background thread and a pool of
local worker processes; leaving it stops the workers and removes the directory.
The Python API over it is :mod:`goflow.handle`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from typing import Any

from goflow import protocol
from goflow.coordinator.runtime import Runtime
from goflow.language.model import Workflow

EXIT_CODES = {"completed": 0, "failed": 1, "timed_out": 1, "cancelled": 130}
HISTORY_INCOMPLETE_EXIT = 4
"""Exit code of a run that completed but whose history could not be recorded completely."""


@dataclass
class ExecutionResult:
    """The outcome of one execution (``goflow run --json`` prints :meth:`to_dict`)."""

    execution_id: str
    workflow: str
    status: str
    result: Any = None
    variables: dict[str, Any] = field(default_factory=dict)
    error: dict | None = None
    duration_s: float = 0.0
    records: list[dict] = field(default_factory=list, repr=False)
    history: dict | None = None
    """With a history store: ``{"recorded": bool, "problem": str | None}`` once the outcome is
    recorded (``problem`` says why the history in the file is incomplete)."""

    @property
    def exit_code(self) -> int:
        code = EXIT_CODES.get(self.status, 1)
        return HISTORY_INCOMPLETE_EXIT if code == 0 and self.history_problem else code

    @property
    def history_problem(self) -> str | None:
        """Why this run's history is incomplete (None when it is complete or not kept)."""
        return (self.history or {}).get("problem")

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    def to_dict(self) -> dict[str, Any]:
        """What ``goflow run --json`` prints: every field but ``records``. Values are the
        result's own (not deep-copied: ``asdict`` would copy up to 10,000 records only to
        drop them, seconds for a big run)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "records"}
        if not self.history_problem:   # present only to say that the history is incomplete
            data.pop("history")
        if data["error"] is not None:
            data["error"] = {key: data["error"].get(key) for key in ("type", "message", "node_id")}
        return data

    @classmethod
    def from_summary(cls, summary: dict) -> "ExecutionResult":
        return cls(**{key: summary.get(key) for key in ("execution_id", "workflow", "status", "result", "variables",
                                                        "error", "duration_s", "records", "history")})


class EmbeddedRuntime:
    """A :class:`~goflow.coordinator.runtime.Runtime` on private ipc:// endpoints with
    ``workers`` local worker processes, for the duration of a ``with``."""

    def __init__(self, *, workers: int | None = None, publish: list[str] | None = None,
                 control: list[str] | None = None, python_paths: list[str] | None = None,
                 sndhwm: int | None = None, credits: int = protocol.DEFAULT_CREDITS, db: str | os.PathLike | None = None,
                 metrics: str | None = None, progress_interval: float = 0.1,
                 max_value_bytes: int | None = None, otlp_endpoint: str | None = None):
        self.tempdir = tempfile.mkdtemp(prefix="goflow-")
        os.chmod(self.tempdir, 0o700)
        self.events_endpoint = f"ipc://{self.tempdir}/events"
        self.control_endpoint = f"ipc://{self.tempdir}/control"
        self.worker_count = workers or os.cpu_count() or 2
        try:
            self.runtime = Runtime(
                coordinator={"workers_endpoint": f"ipc://{self.tempdir}/workers",
                             "event_endpoints": [self.events_endpoint, *(publish or [])],
                             "control_endpoints": [self.control_endpoint, *(control or [])],
                             "sndhwm": sndhwm, "progress_interval": progress_interval,
                             **({"max_value_bytes": max_value_bytes} if max_value_bytes else {})},
                db=db, metrics=metrics, otlp_endpoint=otlp_endpoint, local_workers=self.worker_count,
                pool={"python_paths": python_paths, "credits": credits})
        except BaseException:
            shutil.rmtree(self.tempdir, ignore_errors=True)
            raise
        self.coordinator = self.runtime.coordinator
        self.store = self.runtime.store
        self.metrics = self.runtime.metrics

    def __enter__(self) -> "EmbeddedRuntime":
        self.runtime.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.runtime.stop()
        finally:
            shutil.rmtree(self.tempdir, ignore_errors=True)

    def submit(self, workflow: Workflow, variables: dict[str, Any] | None = None, *, timeout: float | None = None,
               execution_id: str | None = None, source: str | None = None) -> Future:
        """Start ``workflow`` (``source``: its YAML text, which the coordinator records in the
        history); the path ``goflow run`` and :func:`goflow.start` share. Returns the Future
        of the execution's outcome."""
        return self.coordinator.submit(workflow, variables, timeout=timeout, execution_id=execution_id,
                                       source=source)[1]

    def wait_for_workers(self, count: int = 1, timeout: float = 30.0) -> bool:
        """Block until ``count`` workers have joined (False on timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.coordinator.call(lambda: len(self.coordinator.broker.workers)) >= count:
                return True
            time.sleep(0.02)
        return False
