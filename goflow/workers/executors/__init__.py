"""Node executors: what a worker does with a task of each kind.

An executor is a callable ``(spec: dict) -> ExecutorOutput`` (or a plain value). It raises
:class:`TaskError` with an error class the retry policy can match (``python_error``,
``transform_error``, ``tool_error``, ...) for failures. Executors are created lazily, once
per worker process, so a worker that never runs an MCP node never imports the SDK.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


class TaskError(Exception):
    """A task failed; ``error_type`` is the class retry policies match on."""

    def __init__(self, error_type: str, message: str, *, detail: dict | None = None):
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.detail = detail or {}


class TaskCancelled(BaseException):
    """Raised inside a running task when the coordinator cancels it.

    A BaseException so user code's ``except Exception`` does not swallow it.
    """


@dataclass
class ExecutorOutput:
    """A task's value plus extra facts for the node record (e.g. an MCP raw result)."""

    value: Any
    meta: dict = field(default_factory=dict)


Executor = Callable[[dict], Any]


class ExecutorRegistry:
    """Creates each kind's executor on first use and routes cancellation to it."""

    def __init__(self) -> None:
        self._executors: dict[str, Any] = {}

    def get(self, kind: str) -> Any:
        if kind == "mcp_tools":  # listing tools shares the MCP executor's pooled sessions
            return self.get("mcp_tool").list_tools
        executor = self._executors.get(kind)
        if executor is None:
            executor = self._executors[kind] = _create(kind)
        return executor

    def cancel(self, kind: str) -> bool:
        """Ask the executor of ``kind`` to cancel its running call; False if it cannot."""
        executor = self._executors.get("mcp_tool" if kind == "mcp_tools" else kind)
        cancel = getattr(executor, "cancel", None)
        if cancel is None:
            return False
        cancel()
        return True

    def close(self) -> None:
        for executor in self._executors.values():
            close = getattr(executor, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # closing is best effort at worker exit
                    pass
        self._executors.clear()


def _create(kind: str) -> Any:
    if kind == "python":
        from goflow.workers.executors.python import PythonExecutor

        return PythonExecutor()
    if kind == "transform":
        from goflow.workers.executors.transform import TransformExecutor

        return TransformExecutor()
    if kind == "mcp_tool":
        from goflow.workers.executors.mcp_node import McpNodeExecutor

        return McpNodeExecutor()
    raise TaskError("unsupported", f"this worker cannot run tasks of kind '{kind}'")
