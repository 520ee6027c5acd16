"""``mcp_tool`` nodes: call a tool through this worker's pooled MCP sessions."""

from __future__ import annotations

import time
from typing import Any

from goflow.workers.executors.base import ExecutorOutput, TaskError
from goflow.workers.executors.mcp import MCPSessionPool, MCPToolError

DEFAULT_TIMEOUT_S = 60.0


class McpNodeExecutor:
    """Task spec: ``server`` (the server spec), ``tool``, ``arguments``, ``timeout``, and
    ``traceparent`` when the coordinator traces the execution.

    The value is the tool result under the documented rule (docs/mcp.md); the raw MCP
    result travels in the node record's ``meta.raw``, the call's server, tool and times
    (worker clock) in ``meta.mcp`` (the tracer's MCP span).
    """

    def __init__(self) -> None:
        self.pool = MCPSessionPool()

    def __call__(self, spec: dict) -> Any:
        started = time.time()
        try:
            result = self.pool.call_tool(spec["server"], spec["tool"], spec.get("arguments") or {},
                                         timeout=spec.get("timeout") or DEFAULT_TIMEOUT_S,
                                         traceparent=spec.get("traceparent"))
        except MCPToolError as exc:
            raise TaskError(exc.error_type, str(exc)) from None
        call = {"server": spec["server"].get("id"), "tool": spec["tool"], "started": started, "finished": time.time()}
        return ExecutorOutput(result.value, {"raw": result.raw, "mcp": call})

    def list_tools(self, spec: dict) -> Any:
        """Task kind ``mcp_tools``: the server's tools (``[{name, description, input_schema}]``)."""
        try:
            return self.pool.list_tools(spec["server"], timeout=spec.get("timeout") or DEFAULT_TIMEOUT_S)
        except MCPToolError as exc:
            raise TaskError(exc.error_type, str(exc)) from None

    def cancel(self) -> None:
        self.pool.cancel()

    def close(self) -> None:
        self.pool.close()
