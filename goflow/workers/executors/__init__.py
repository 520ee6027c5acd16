"""Node executors: what a worker does with a task of each kind.

An executor is a callable ``(spec: dict) -> ExecutorOutput`` (or a plain value). It raises
:class:`TaskError` with an error class the retry policy can match (``python_error``,
``transform_error``, ``tool_error``, ...) for failures. Executors are created lazily, once
per worker process, so a worker that never runs an MCP node never imports the SDK.
"""

from __future__ import annotations

from typing import Any

from goflow.errors import ErrorKind
from goflow.workers.executors.base import Executor, ExecutorOutput, TaskCancelled, TaskError

__all__ = ["Executor", "ExecutorOutput", "ExecutorRegistry", "TaskCancelled", "TaskError"]


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

    def run(self, kind: str, spec: dict) -> dict:
        """Run one task: the result fields a worker reports, ``{"ok": True, "value", "meta"?}``
        or ``{"ok": False, "error": {"type", "message", ...detail}}``. :class:`TaskCancelled`
        propagates (the caller knows what a cancellation reports)."""
        try:
            output = self.get(kind)(spec)
        except TaskError as exc:
            return {"ok": False, "error": {"type": exc.error_type, "message": exc.message, **exc.detail}}
        except Exception as exc:  # an executor bug fails its task, never the worker
            return {"ok": False, "error": {"type": ErrorKind.WORKER_ERROR, "message": f"{type(exc).__name__}: {exc}"}}
        if isinstance(output, ExecutorOutput):
            return {"ok": True, "value": output.value, "meta": output.meta}
        return {"ok": True, "value": output}

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
    raise TaskError(ErrorKind.UNSUPPORTED, f"this worker cannot run tasks of kind '{kind}'")
