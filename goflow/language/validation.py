"""Semantic validation of a parsed workflow: every problem at once, each with its position.

Rules: node ids (syntax, duplicates); exactly one start and at least one end; edges
(endpoints exist, no self-loops, no duplicates); condition nodes with exactly one "true" and
one "false" edge; loop bodies and parallel branches (existing nodes, not in the main graph,
in at most one container); cycles, through edges and through loop bodies and parallel
branches; every unreachable node; references to undefined variables (scope-aware: loop
items and ``<item>_index`` only inside their loop); servers referenced but not declared or
registered; expressions, conditions, templates and interpolations that do not parse;
variables (names, duplicates, default vs type).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Iterable

from goflow.errors import ExpressionError
from goflow.language.expr import compile_transform, interpolation_references, parse_condition
from goflow.language.model import (
    ID_PATTERN,
    VARIABLE_PATTERN,
    CALL_PATTERN,
    ConditionNode,
    EndNode,
    LoopNode,
    McpToolNode,
    NodeBase,
    ParallelNode,
    PythonNode,
    TransformNode,
)
from goflow.language.references import reference_root

if TYPE_CHECKING:
    from goflow.language.loader import LoadedWorkflow

TYPE_CHECKS = {
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "any": lambda v: True,
}


def containers(nodes: Iterable[NodeBase]) -> dict[str, str]:
    """Map each loop-body / parallel-branch member id to the id of the node that contains it."""
    owner: dict[str, str] = {}
    for node in nodes:
        for member in members(node):
            owner.setdefault(member, node.id)
    return owner


def members(node: NodeBase) -> list[str]:
    """Ids that ``node`` runs itself: a loop's body or a parallel node's branches, in order."""
    if isinstance(node, LoopNode):
        return list(node.body)
    if isinstance(node, ParallelNode):
        return [member for branch in node.branches for member in branch]
    return []


class _Validator:
    def __init__(self, loaded: "LoadedWorkflow"):
        self.loaded = loaded
        self.workflow = loaded.workflow
        self.nodes = {node.id: node for node in self.workflow.nodes}

    # -- helpers ---------------------------------------------------------------------------
    def error(self, path: tuple, message: str, node: str | None = None, severity: str = "error") -> None:
        self.loaded.problem(path, message, node=node, severity=severity)

    def node_path(self, node_id: str, *rest: Any) -> tuple:
        return self.loaded.node_paths.get(node_id, ("nodes",)) + rest

    def known(self, node_id: str | None) -> bool:
        return node_id in self.nodes or node_id in self.loaded.broken_node_ids

    # -- rules -----------------------------------------------------------------------------
    def run(self) -> None:
        self.check_ids()
        self.check_start_end()
        self.check_variables()
        self.check_edges()
        self.check_conditions()
        self.check_containers()
        self.check_cycles()
        self.check_reachability()
        self.check_servers()
        self.check_node_fields()
        self.check_references()

    def check_ids(self) -> None:
        """Each id's syntax (nodes that parsed), and every repeated id at the repeating entry's
        own line, from the loader's list: that counts the entries that did not parse too."""
        valid = ID_PATTERN.match
        for node in self.workflow.nodes:
            node_id = node.id
            if not valid(node_id):
                self.error(self.node_path(node_id, "id"), f"invalid node id '{node_id}': use letters, digits, '_' and '-', "
                                 f"starting with a letter or '_'", node_id)
        for node_id, path in self.loaded.duplicate_ids:
            self.error(path + ("id",), f"duplicate node id '{node_id}'; node ids must be unique", node_id)

    def check_start_end(self) -> None:
        starts = [n.id for n in self.workflow.nodes if n.type == "start"]
        ends = [n.id for n in self.workflow.nodes if n.type == "end"]
        if len(starts) != 1:
            where = self.node_path(starts[1], "type") if len(starts) > 1 else ("nodes",)
            self.error(where, f"a workflow needs exactly one start node, found {len(starts)}"
                              + (f" ({', '.join(starts)})" if starts else "; add a node with 'type: start'"))
        if not ends:
            self.error(("nodes",), "a workflow needs at least one end node; add a node with 'type: end'")

    def check_variables(self) -> None:
        seen: set[str] = set()
        for index, variable in enumerate(self.workflow.variables):
            path = ("variables", index)
            if not VARIABLE_PATTERN.match(variable.name):
                self.error(path + ("name",), f"invalid variable name '{variable.name}': use letters, digits and '_', "
                                             f"starting with a letter or '_'")
            if variable.name in seen:
                self.error(path + ("name",), f"duplicate variable '{variable.name}'")
            seen.add(variable.name)
            if variable.has_default and variable.default is not None and not TYPE_CHECKS[variable.type](variable.default):
                self.error(path + ("default",), f"default of variable '{variable.name}' is a "
                                                f"{type(variable.default).__name__}, not a {variable.type}")
            if variable.required and variable.has_default:
                self.error(path + ("required",), f"variable '{variable.name}' is required and has a default; "
                                                 f"the default is never used", severity="warning")

    def check_edges(self) -> None:
        seen: set[tuple[str, str]] = set()
        nodes = self.nodes
        for edge, path in zip(self.workflow.edges, self.loaded.edge_paths):
            source_id, target_id = edge.source, edge.target
            source = nodes.get(source_id)
            if source is None or target_id not in nodes:  # the rare case: say which end
                for end, key in ((source_id, "from"), (target_id, "to")):
                    if not self.known(end):
                        self.error(path + (key,), f"edge {source_id} -> {target_id}: no node '{end}'"
                                                  + self._nearest_node(end))
            if source_id == target_id:
                self.error(path, f"edge {source_id} -> {target_id} is a self-loop", source_id)
            count = len(seen)
            seen.add((source_id, target_id))
            if len(seen) == count:
                self.error(path, f"duplicate edge {source_id} -> {target_id}", source_id)
            if source is None:
                continue
            if source.type == "end":
                self.error(path, f"edge leaves end node '{source_id}'; an end node finishes its path", source_id,
                           severity="warning")
            if edge.condition is not None and not isinstance(source, ConditionNode):
                self.error(path + ("condition",), f"edge {source_id} -> {target_id} has a condition but "
                                                  f"'{source_id}' is not a condition node; it is ignored",
                           source_id, severity="warning")

    def _nearest_node(self, name: str) -> str:
        import difflib

        close = difflib.get_close_matches(name, list(self.nodes), n=1)
        return f"; did you mean '{close[0]}'?" if close else ""

    def check_conditions(self) -> None:
        conditions = [node for node in self.workflow.nodes if isinstance(node, ConditionNode)]
        if not conditions:
            return
        outgoing: dict[str, list[tuple]] = {node.id: [] for node in conditions}
        for edge, path in zip(self.workflow.edges, self.loaded.edge_paths):
            if edge.source in outgoing:
                outgoing[edge.source].append((edge, path))
        for node in conditions:
            labels = [edge.condition for edge, _ in outgoing[node.id]]
            for edge, path in outgoing[node.id]:
                if edge.condition not in ("true", "false"):
                    self.error(path + ("condition",), f"edge {edge.source} -> {edge.target} leaves condition node "
                                                      f"'{node.id}' and must have condition \"true\" or \"false\""
                                                      f" (found {edge.condition!r})", node.id)
            for label in ("true", "false"):
                count = labels.count(label)
                if count != 1:
                    self.error(self.node_path(node.id), f"condition node '{node.id}' needs exactly one \"{label}\" "
                                                        f"edge, found {count}", node.id)

    def check_containers(self) -> None:
        if not any(isinstance(node, (LoopNode, ParallelNode)) for node in self.workflow.nodes):
            return
        with_edges = {e.source for e in self.workflow.edges} | {e.target for e in self.workflow.edges}
        owner: dict[str, str] = {}
        for node in self.workflow.nodes:
            if isinstance(node, LoopNode):
                groups = [("body", node.body)]
                if not node.body:
                    self.error(self.node_path(node.id, "body"), f"loop '{node.id}' has an empty body", node.id)
            elif isinstance(node, ParallelNode):
                groups = [(f"branches[{i}]", branch) for i, branch in enumerate(node.branches)]
                if not node.branches or any(not branch for branch in node.branches):
                    self.error(self.node_path(node.id, "branches"), f"parallel node '{node.id}' has an empty branch "
                                                                    f"list or an empty branch", node.id)
                elif len(node.branches) < 2:
                    self.error(self.node_path(node.id, "branches"), f"parallel node '{node.id}' has only one branch",
                               node.id, severity="warning")
            else:
                continue
            for label, ids in groups:
                for member in ids:
                    if not self.known(member):
                        self.error(self.node_path(node.id, label.split("[")[0]),
                                   f"{label} of '{node.id}' names missing node '{member}'{self._nearest_node(member)}",
                                   node.id)
                        continue
                    member_node = self.nodes.get(member)
                    if member_node is not None and member_node.type in ("start", "end"):
                        self.error(self.node_path(node.id), f"{label} of '{node.id}' names {member_node.type} node "
                                                            f"'{member}'", node.id)
                    if member in with_edges:
                        self.error(self.node_path(member), f"node '{member}' runs inside '{node.id}' ({label}) and "
                                                           f"must not also have edges in the main graph", member)
                    if member in owner and owner[member] != node.id:
                        self.error(self.node_path(member), f"node '{member}' is in both '{owner[member]}' and "
                                                           f"'{node.id}'; a node can run inside one container only",
                                   member)
                    owner.setdefault(member, node.id)

    @functools.cached_property
    def graph(self) -> dict[str, list[str]]:
        """Successors of each node: edge targets, then the members a container runs."""
        graph: dict[str, list[str]] = defaultdict(list)
        for edge in self.workflow.edges:
            graph[edge.source].append(edge.target)
        for node in self.workflow.nodes:
            if isinstance(node, (LoopNode, ParallelNode)):
                graph[node.id].extend(members(node))
        return graph

    @functools.cached_property
    def reached(self) -> tuple[dict[str, bool], bool] | None:
        """``(ids reachable from the start node, whether a path from it meets a cycle)``, by one
        depth-first walk; None unless there is exactly one start node."""
        starts = [n.id for n in self.workflow.nodes if n.type == "start"]
        if len(starts) != 1:
            return None
        graph = self.graph
        start = starts[0]
        on_path = {start: True}
        """Every id reached: True while it is on the walk's current path, then False."""
        path = [start]
        work = [iter(graph.get(start, ()))]
        cyclic = False
        while work:
            for child in work[-1]:
                state = on_path.get(child)
                if state is None:
                    on_path[child] = True
                    path.append(child)
                    work.append(iter(graph.get(child, ())))
                    break
                if state:
                    cyclic = True
            else:
                work.pop()
                on_path[path.pop()] = False
        return on_path, cyclic

    def check_cycles(self) -> None:
        reached = self.reached
        if reached is not None and not reached[1] and self.nodes.keys() <= reached[0].keys():
            return  # the walk from the start covered every node and edge and met no cycle
        graph = self.graph
        # Tarjan's strongly connected components: each cycle is reported once.
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        counter = [0]
        cycles: list[list[str]] = []

        def visit(root: str) -> None:
            work = [(root, iter(graph.get(root, ())))]
            index[root] = low[root] = counter[0]
            counter[0] += 1
            stack.append(root)
            on_stack.add(root)
            while work:
                node, children = work[-1]
                advanced = False
                for child in children:
                    if child not in index:
                        index[child] = low[child] = counter[0]
                        counter[0] += 1
                        stack.append(child)
                        on_stack.add(child)
                        work.append((child, iter(graph.get(child, ()))))
                        advanced = True
                        break
                    if child in on_stack:
                        low[node] = min(low[node], index[child])
                if advanced:
                    continue
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(component)

        for node_id in list(self.nodes):
            if node_id not in index:
                visit(node_id)
        order = {node.id: i for i, node in enumerate(self.workflow.nodes)}
        for component in cycles:
            component.sort(key=lambda n: order.get(n, 0))
            first = component[0]
            self.error(self.node_path(first), f"cycle through nodes {' -> '.join(component)} -> {first}; "
                                              f"workflows must be acyclic (use a loop node to repeat work)", first)

    def check_reachability(self) -> None:
        if self.reached is None:
            return
        seen = self.reached[0]
        for node in self.workflow.nodes:
            if node.id not in seen:
                self.error(self.node_path(node.id), f"node '{node.id}' is unreachable from the start node; "
                                                    f"add an edge to it or remove it", node.id)

    def check_servers(self) -> None:
        declared = {server.id for server in self.workflow.servers}
        registered: set[str] | None = None
        for index, server in enumerate(self.workflow.servers):
            path = ("servers", index)
            if server.transport == "stdio" and not server.command:
                self.error(path, f"server '{server.id}' uses the stdio transport and needs 'command'")
            if server.transport in ("sse", "http"):
                if not server.url or not server.url.startswith(("http://", "https://")):
                    self.error(path, f"server '{server.id}' uses the {server.transport} transport and needs 'url' "
                                     f"starting with http:// or https://")
        for node in self.workflow.nodes:
            if isinstance(node, McpToolNode) and node.server not in declared:
                if registered is None:
                    registered = _registered_servers()
                if node.server not in registered:
                    self.error(self.node_path(node.id, "server"),
                               f"node '{node.id}' uses server '{node.server}', which is neither declared under "
                               f"'servers:' nor registered (goflow server add {node.server} ...)", node.id)

    def check_node_fields(self) -> None:
        for node in self.workflow.nodes:
            if isinstance(node, PythonNode) and not CALL_PATTERN.match(node.call):
                self.error(self.node_path(node.id, "call"), f"python node '{node.id}': call '{node.call}' must look "
                                                            f"like 'package.module:function'", node.id)
            if isinstance(node, TransformNode):
                if (node.expression is None) == (node.template is None):
                    self.error(self.node_path(node.id), f"transform node '{node.id}' needs exactly one of "
                                                        f"'expression' or 'template'", node.id)
            if isinstance(node, LoopNode) and not VARIABLE_PATTERN.match(node.item):
                self.error(self.node_path(node.id, "item"), f"loop '{node.id}': item name '{node.item}' is not a "
                                                            f"valid variable name", node.id)
            value = getattr(node, "output", None)
            if value is not None and not VARIABLE_PATTERN.match(value):
                self.error(self.node_path(node.id, "output"), f"node '{node.id}': output '{value}' is not a valid "
                                                              f"variable name", node.id)

    # -- references ------------------------------------------------------------------------
    def check_references(self) -> None:
        global_names = {v.name for v in self.workflow.variables}
        for node in self.workflow.nodes:
            output = node.output_variable
            if output:
                global_names.add(output)
        owner = containers(self.workflow.nodes)
        no_names: frozenset[str] = frozenset()

        def loop_names(node_id: str) -> set[str] | frozenset[str]:
            """The item names of the loops around ``node_id`` (a few; never the global names)."""
            current, hops = owner.get(node_id), 0
            if current is None:  # most nodes
                return no_names
            names: set[str] = set()
            while current is not None and hops < 1000:
                container = self.nodes.get(current)
                if isinstance(container, LoopNode):
                    names.update((container.item, f"{container.item}_index"))
                current, hops = owner.get(current), hops + 1
            return names

        for node in self.workflow.nodes:
            local = loop_names(node.id)
            for field, names, error in self._node_references(node):
                if error is not None:
                    self.error(self.node_path(node.id, field), f"node '{node.id}': invalid {field}: {error}", node.id)
                    continue
                if not names:
                    continue
                undefined = [name for name in names if name not in global_names and name not in local]
                for name in sorted(undefined):
                    self.error(self.node_path(node.id, field), f"node '{node.id}': {field} refers to undefined "
                                                               f"variable '{name}'{_hint(name, global_names | local)}",
                               node.id)

    def _node_references(self, node: NodeBase):
        """Yield ``(field, referenced root names, parse error or None)`` for each expression."""
        condition, interpolation = _condition_references, _interpolation_references
        if node.condition is not None:
            yield condition("condition", node.condition)
        if isinstance(node, LoopNode):
            yield self._reference("collection", node.collection)
            if node.break_condition is not None:
                # The break condition sees the iteration's item, like the body.
                field, names, error = condition("break_condition", node.break_condition)
                yield field, names - {node.item, f"{node.item}_index"}, error
        elif isinstance(node, TransformNode):
            if node.input is not None:
                yield self._reference("input", node.input)
            field = "expression" if node.expression is not None else "template"
            text = node.expression if node.expression is not None else node.template
            if text is not None:
                try:
                    transform = compile_transform(expression=node.expression, template=node.template)
                    yield field, set(transform.names), None
                except ExpressionError as exc:
                    yield field, set(), exc.message
        elif isinstance(node, McpToolNode):
            yield interpolation("parameters", node.parameters)
        elif isinstance(node, PythonNode):
            if node.args:
                yield interpolation("args", node.args)
            if node.kwargs:
                yield interpolation("kwargs", node.kwargs)
        elif isinstance(node, EndNode) and node.return_ is not None:
            yield interpolation("return", node.return_)

    @staticmethod
    def _reference(field: str, text: str):
        try:
            return field, {reference_root(text)}, None
        except ExpressionError as exc:
            return field, set(), exc.message


def _condition_references(field: str, text: str) -> tuple[str, set[str], str | None]:
    try:
        return field, set(parse_condition(text).names), None
    except ExpressionError as exc:
        return field, set(), exc.message


def _interpolation_references(field: str, value: Any) -> tuple[str, set[str], str | None]:
    try:
        return field, interpolation_references(value), None
    except ExpressionError as exc:
        return field, set(), exc.message


def _hint(name: str, scope: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(scope), n=1)
    if close:
        return f"; did you mean '{close[0]}'?"
    return "; declare it under 'variables:' or set it as some node's 'output'"


def _registered_servers() -> set[str]:
    try:
        from goflow.servers import load_registry
    except ImportError:  # registry module not available
        return set()
    try:
        return set(load_registry())
    except Exception:  # an unreadable registry must not break validation; `goflow server list` reports it
        return set()


def validate_loaded(loaded: "LoadedWorkflow") -> None:
    """Append every semantic problem of ``loaded`` to ``loaded.problems``."""
    _Validator(loaded).run()
    loaded.problems.sort(key=lambda p: (p.line, p.column))
