"""Before the first node runs: check every ``mcp_tool`` node against its server.

Each server's tool list is fetched by a worker (task kind ``mcp_tools``, so the session it
opens is pooled for the nodes that follow). Every node's tool must exist, and its
parameters must fit the tool's input schema where the server publishes one (after scalars
are converted to the types it asks for, :mod:`goflow.language.parameters`). Parameters
that reference node outputs are unknown before the run: only their presence is checked.
A mismatch fails the run before anything executes, naming the node, the tool and the fix.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any, Callable

from goflow.errors import ErrorKind, GoflowError
from goflow.language.expr import interpolate
from goflow.coordinator.task import Task
from goflow.language.model import McpToolNode
from goflow.language.parameters import coerce_arguments

if TYPE_CHECKING:
    from goflow.coordinator.execution import Execution

LIST_TIMEOUT_S = 60.0


class _Unknown:
    """Stands for a parameter whose value is only known at run time."""


UNKNOWN = _Unknown()


class McpPreflight:
    def __init__(self, execution: "Execution", on_done: Callable[[dict | None], None]):
        self.execution = execution
        self.on_done = on_done
        self.nodes = [n for n in execution.workflow.nodes if isinstance(n, McpToolNode)]
        self.pending: dict[int, str] = {}
        self.tools: dict[str, list[dict]] = {}
        self.tasks: list[Task] = []
        self.done = False

    def start(self) -> None:
        host = self.execution.host
        for server_id in dict.fromkeys(node.server for node in self.nodes):
            try:
                spec = host.server_spec(self.execution, server_id)
            except GoflowError as exc:
                node = next(n for n in self.nodes if n.server == server_id)
                self._finish({"type": ErrorKind.CONNECTION, "node_id": node.id, "message": str(exc)})
                return
            task = Task(self.execution.id, None, 1, "mcp_tools", {"server": spec, "timeout": LIST_TIMEOUT_S},
                        LIST_TIMEOUT_S + 10, deliver=self.result)
            self.tasks.append(task)
            host.dispatch(task)
            self.pending[task.id] = server_id

    def result(self, task: Task, message: dict) -> None:
        server_id = self.pending.pop(task.id, None)
        if server_id is None or self.done or not self.execution.active:
            return
        if not message.get("ok"):
            error = dict(message.get("error") or {})
            node = next(n for n in self.nodes if n.server == server_id)
            self._finish({"type": error.get("type", "connection"), "node_id": node.id,
                          "message": f"cannot list the tools of server '{server_id}' (needed by node '{node.id}'): "
                                     f"{error.get('message')}"})
            return
        self.tools[server_id] = list(message.get("value") or [])
        if not self.pending:
            self._finish(self.check())

    def check(self) -> dict | None:
        """The first problem found (as an execution error), or None when every node fits."""
        variables = self.execution.variables
        for node in self.nodes:
            tools = {tool.get("name"): tool for tool in self.tools.get(node.server, [])}
            tool = tools.get(node.tool)
            if tool is None:
                close = difflib.get_close_matches(node.tool, list(tools), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; it offers: {', '.join(sorted(tools)) or 'none'}"
                return {"type": ErrorKind.TOOL_NOT_FOUND, "node_id": node.id,
                        "message": f"node '{node.id}': server '{node.server}' has no tool '{node.tool}'{hint}"}
            schema = tool.get("input_schema")
            arguments = _static_arguments(node.parameters, variables)
            if isinstance(arguments, dict):
                arguments = coerce_arguments(schema, arguments)
            problems = _schema_problems(schema, arguments)
            if problems:
                return {"type": ErrorKind.INVALID_ARGUMENTS, "node_id": node.id,
                        "message": f"node '{node.id}': parameters do not fit tool '{node.tool}' of server "
                                   f"'{node.server}': " + "; ".join(problems)}
        return None

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            for task in self.tasks:
                if not task.done:
                    self.execution.host.cancel_task(task)

    def _finish(self, error: dict | None) -> None:
        if self.done:
            return
        self.done = True
        for task in self.tasks:
            if not task.done:
                self.execution.host.cancel_task(task)
        self.on_done(error)


def _static_arguments(parameters: Any, variables: dict) -> dict:
    """Parameters with every value that can be known before the run; the rest UNKNOWN."""
    if not isinstance(parameters, dict):
        return parameters
    arguments = {}
    for key, value in parameters.items():
        try:
            arguments[key] = interpolate(value, variables)
        except GoflowError:
            arguments[key] = UNKNOWN
    return arguments


def _schema_problems(schema: Any, arguments: Any) -> list[str]:
    if not isinstance(arguments, dict):
        return [f"parameters must be a mapping, got {type(arguments).__name__}"]
    if not isinstance(schema, dict) or not schema:
        return []
    import jsonschema

    unknown = {key for key, value in arguments.items() if value is UNKNOWN}
    instance = {key: (None if value is UNKNOWN else value) for key, value in arguments.items()}
    validator_class = jsonschema.validators.validator_for(schema)
    problems = []
    for error in validator_class(schema).iter_errors(instance):
        if error.path and error.path[0] in unknown:
            continue  # known only at run time
        where = "/".join(str(part) for part in error.path)
        problems.append(f"{where}: {error.message}" if where else error.message)
    return problems
