"""A validated workflow compiled for scheduling: graphs, parsed conditions, node lookups.

The main graph holds every node that is not inside a loop body or parallel branch; each
body and branch is a *sequence graph* (its nodes run in order). Compiling once per workflow
keeps per-node scheduling work to dictionary lookups.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from goflow.language.expr import Condition, parse_condition
from goflow.language.loader import gc_paused
from goflow.language.model import LoopNode, McpToolNode, NodeBase, ParallelNode, PythonNode, Variable, Workflow
from goflow.language.validation import TYPE_CHECKS, containers  # the one type policy, defaults' too


@dataclass
class Graph:
    """Nodes and edges one frame runs. ``outgoing`` holds ``(target, label)`` pairs."""

    nodes: list[str]
    incoming: dict[str, int]
    outgoing: dict[str, list[tuple[str, str | None]]]
    sequence: bool = False

    @property
    def entries(self) -> list[str]:
        return [node for node in self.nodes if self.incoming[node] == 0]


def _sequence(ids: list[str]) -> Graph:
    return Graph(
        nodes=list(ids),
        incoming={node: (0 if i == 0 else 1) for i, node in enumerate(ids)},
        outgoing={node: ([(ids[i + 1], None)] if i + 1 < len(ids) else []) for i, node in enumerate(ids)},
        sequence=True,
    )


@dataclass
class Plan:
    workflow: Workflow
    nodes: dict[str, NodeBase]
    main: Graph
    bodies: dict[str, Graph] = field(default_factory=dict)
    branches: dict[str, list[Graph]] = field(default_factory=dict)
    conditions: dict[tuple[str, str], Condition] = field(default_factory=dict)
    secrets: frozenset[str] = frozenset()
    literal: frozenset[str] = frozenset()
    """Worker nodes whose inputs (python ``args``/``kwargs``, MCP ``parameters``) hold no
    ``${``: interpolating them would return them unchanged, so dispatch sends them as they are."""

    def condition(self, node_id: str, field_name: str, text: str) -> Condition:
        key = (node_id, field_name)
        compiled = self.conditions.get(key)
        if compiled is None:
            compiled = self.conditions[key] = parse_condition(text)
        return compiled


def compile_plan(workflow: Workflow) -> Plan:
    """Compile a workflow that passed validation."""
    with gc_paused():
        return _compile(workflow)


def _compile(workflow: Workflow) -> Plan:
    nodes = {node.id: node for node in workflow.nodes}
    inside = containers(workflow.nodes)
    main_nodes = [node.id for node in workflow.nodes if node.id not in inside]
    incoming = {node: 0 for node in main_nodes}
    outgoing: dict[str, list[tuple[str, str | None]]] = {node: [] for node in main_nodes}
    for edge in workflow.edges:
        if edge.source in outgoing and edge.target in incoming:
            outgoing[edge.source].append((edge.target, edge.condition))
            incoming[edge.target] += 1
    plan = Plan(workflow=workflow, nodes=nodes, main=Graph(main_nodes, incoming, outgoing),
                secrets=workflow.secret_variables, literal=frozenset(
                    node.id for node in workflow.nodes if _literal_inputs(node)))
    for node in workflow.nodes:
        if isinstance(node, LoopNode):
            plan.bodies[node.id] = _sequence(node.body)
        elif isinstance(node, ParallelNode):
            plan.branches[node.id] = [_sequence(branch) for branch in node.branches]
    return plan


_LITERAL_DEPTH = 32
"""Values nested deeper than this take the general path (interpolate bounds depth itself)."""
_SCALARS = (int, float, bool, type(None))


def _literal_inputs(node: NodeBase) -> bool:
    if isinstance(node, PythonNode):
        return _literal(node.args) and _literal(node.kwargs)
    return isinstance(node, McpToolNode) and _literal(node.parameters)


def _literal(value: Any, depth: int = 0) -> bool:
    """Whether ``interpolate`` would return ``value`` unchanged (no string in it holds ``${``;
    dict keys are never interpolated). Unknown types answer False: the general path decides."""
    if isinstance(value, str):
        return "${" not in value
    if isinstance(value, _SCALARS):
        return True
    if depth >= _LITERAL_DEPTH:
        return False
    if type(value) is dict:
        return all(_literal(item, depth + 1) for item in value.values())
    if type(value) is list:
        return all(_literal(item, depth + 1) for item in value)
    return False


VARIABLE_EXAMPLES: dict[str, Any] = {"string": "text", "number": 3, "boolean": True,
                                     "object": {"key": "value"}, "array": [1, 2]}
"""A value of each declared type, for messages that say how to fix a refused value."""
_ARTICLES = {"object": "an", "array": "an"}
_SHOWN_CHARS = 60


@dataclass(frozen=True)
class Mismatch:
    """A supplied value that is not of its variable's declared type."""

    name: str
    expected: str
    """The declared type (``number``, ``boolean``...)."""
    received: str
    """What the value is: a JSON kind (``string``, ``null``...) or, for other values, its Python type."""


class VariablesError(ValueError):
    """Supplied variables that cannot start an execution.

    The message says what to supply without naming a caller's syntax (``--var`` is the
    CLI's): callers add their own hint from ``missing`` and ``mismatched``.
    """

    def __init__(self, message: str, missing: tuple[str, ...] = (), mismatched: tuple[Mismatch, ...] = ()):
        super().__init__(message)
        self.missing = missing
        self.mismatched = mismatched

    @property
    def names(self) -> tuple[str, ...]:
        """Every variable at fault, missing ones first."""
        return self.missing + tuple(m.name for m in self.mismatched)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    for kind in ("boolean", "number", "string", "object", "array"):   # boolean first: a bool is an int
        if TYPE_CHECKS[kind](value):
            return kind
    return type(value).__name__


def _a(kind: str) -> str:
    return f"{_ARTICLES.get(kind, 'a')} {kind}"


def _shown(value: Any) -> str:
    """``value`` in a message: as JSON when it is a JSON value, else its repr; cut short."""
    try:
        text = json.dumps(value, ensure_ascii=False) if _kind(value) in VARIABLE_EXAMPLES else repr(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "…"


def _mismatch_text(mismatch: Mismatch, value: Any, secret: bool) -> str:
    given = (f"{_a(mismatch.received)} (not shown: the variable is secret)" if secret
             else f"the {mismatch.received} {_shown(value)}" if mismatch.received in VARIABLE_EXAMPLES
             else f"{_a(mismatch.received)} {_shown(value)}")
    example = "true or false" if mismatch.expected == "boolean" else \
        f"{_a(mismatch.expected)}, e.g. {json.dumps(VARIABLE_EXAMPLES[mismatch.expected])}"
    return f"variable '{mismatch.name}' is declared as {_a(mismatch.expected)} but was given {given}: supply {example}"


def _missing_text(missing: list[Variable]) -> str:
    names = ", ".join(f"'{v.name}'" + (f" ({_a(v.type)})" if v.type != "any" else "") for v in missing)
    plural = len(missing) > 1
    return f"missing required variable{'s' if plural else ''} {names}: supply a value for {'each' if plural else 'it'}"


def initial_variables(workflow: Workflow, supplied: dict[str, Any]) -> dict[str, Any]:
    """Declared defaults overlaid with supplied values.

    Raises :class:`VariablesError` naming every required variable not supplied and every
    supplied value that is not of its declared type (the check defaults get at validation;
    null is accepted for every type, as for defaults). A secret's value is never shown.
    """
    values: dict[str, Any] = {}
    missing: list[Variable] = []
    mismatched: list[tuple[Mismatch, Any, bool]] = []
    for variable in workflow.variables:
        if variable.name in supplied:
            value = supplied[variable.name]
            if value is not None and not TYPE_CHECKS[variable.type](value):
                mismatched.append((Mismatch(variable.name, variable.type, _kind(value)), value, variable.secret))
        elif variable.required:
            missing.append(variable)
        elif variable.has_default:
            values[variable.name] = variable.default
    if missing or mismatched:
        parts = [_missing_text(missing)] if missing else []
        parts.extend(_mismatch_text(*item) for item in mismatched)
        raise VariablesError("; ".join(parts), tuple(v.name for v in missing), tuple(m for m, _, _ in mismatched))
    values.update(supplied)
    return values
