"""A workflow's shape as plain data, for views that draw it (the web dashboard).

``workflow_graph`` lists every node with its type and the container (loop or parallel node)
that runs it, and every edge: the workflow's own edges plus the order inside each loop body
and parallel branch. It is a description, not a schedule (scheduling uses
``goflow.coordinator.plan``).
"""

from __future__ import annotations

from typing import Any

from goflow.language.model import LoopNode, ParallelNode, Workflow
from goflow.language.validation import containers


def workflow_graph(workflow: Workflow) -> dict[str, Any]:
    """``{"workflow", "nodes": [{id, type, container, branch}], "edges": [{source, target, condition, kind}]}``.

    ``container`` is the loop or parallel node whose body or branch holds the node (None in
    the main graph); ``branch`` its branch index in a parallel node. ``kind`` is ``edge``
    (declared), ``body`` (loop body order) or ``branch`` (parallel branch order).
    """
    owner = containers(workflow.nodes)
    branch_of: dict[str, int] = {}
    edges: list[dict[str, Any]] = [
        {"source": edge.source, "target": edge.target, "condition": edge.condition, "kind": "edge"}
        for edge in workflow.edges]
    for node in workflow.nodes:
        if isinstance(node, LoopNode):
            sequences, kind = [node.body], "body"
        elif isinstance(node, ParallelNode):
            sequences, kind = node.branches, "branch"
            for index, branch in enumerate(node.branches):
                for member in branch:
                    branch_of.setdefault(member, index)
        else:
            continue
        for sequence in sequences:
            edges.extend({"source": a, "target": b, "condition": None, "kind": kind}
                         for a, b in zip(sequence, sequence[1:]))
    nodes = [{"id": node.id, "type": node.type, "container": owner.get(node.id), "branch": branch_of.get(node.id)}
             for node in workflow.nodes]
    return {"workflow": workflow.name, "nodes": nodes, "edges": edges}
