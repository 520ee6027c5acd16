"""A validated workflow compiled for scheduling: graphs, parsed conditions, node lookups.

The main graph holds every node that is not inside a loop body or parallel branch; each
body and branch is a *sequence graph* (its nodes run in order). Compiling once per workflow
keeps per-node scheduling work to dictionary lookups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from goflow.language.expr import Condition, parse_condition
from goflow.language.loader import gc_paused
from goflow.language.model import LoopNode, McpToolNode, NodeBase, ParallelNode, PythonNode, Workflow
from goflow.language.validation import containers


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


def initial_variables(workflow: Workflow, supplied: dict[str, Any]) -> dict[str, Any]:
    """Declared defaults overlaid with supplied values. Raises ValueError naming missing required ones."""
    values: dict[str, Any] = {}
    missing = []
    for variable in workflow.variables:
        if variable.name in supplied:
            continue
        if variable.required:
            missing.append(variable.name)
        elif variable.has_default:
            values[variable.name] = variable.default
    if missing:
        raise ValueError("missing required variable" + ("s " if len(missing) > 1 else " ")
                         + ", ".join(f"'{name}'" for name in missing)
                         + "; pass " + " ".join(f"--var {name}=VALUE" for name in missing))
    values.update(supplied)
    return values
