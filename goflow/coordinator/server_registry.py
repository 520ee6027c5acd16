"""The user's MCP server registry as the coordinator sees it: read once, reloaded on demand.

``servers.yaml`` (:func:`goflow.servers.load_registry`) is read at the first ``mcp_tool``
dispatch that needs it, not on every dispatch; the daemon reloads it on SIGHUP, as it
reloads keys. Servers declared in a workflow take precedence (the execution checks those).
"""

from __future__ import annotations

from typing import Any

from goflow.control.framing import ControlError
from goflow.servers import load_registry


class ServerRegistry:
    """``fixed`` servers (given by the embedding program) over the user's ``servers.yaml``."""

    def __init__(self, fixed: dict[str, dict[str, Any]] | None = None):
        self.fixed = dict(fixed or {})
        self._loaded: dict[str, dict[str, Any]] | None = None

    def reload(self) -> int:
        """Re-read ``servers.yaml``; returns how many servers it names."""
        self._loaded = load_registry()
        return len(self._loaded)

    def spec(self, server_id: str) -> dict[str, Any]:
        """The spec of a registered server (a copy); ``not_found`` when there is none."""
        if server_id in self.fixed:
            return dict(self.fixed[server_id])
        if self._loaded is None:
            self._loaded = load_registry()
        if server_id in self._loaded:
            return dict(self._loaded[server_id])
        raise ControlError("not_found", f"server '{server_id}' is neither declared nor registered")
