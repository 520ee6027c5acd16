"""One execution's state and scheduling rules. Runs on the coordinator's reactor thread only.

Semantics (docs/semantics.md):

* A node becomes ready once every incoming edge is resolved; it runs if at least one was
  taken and is skipped otherwise, and a skip resolves its outgoing edges as not taken. A
  condition node takes its ``"true"`` or ``"false"`` edge. Ready nodes run concurrently.
* ``loop`` and ``parallel`` nodes run *frames*: sequences of node ids with a scope of their
  own. A loop iteration sees ``<item>`` and ``<item>_index``; a sequential loop writes
  through to the enclosing scope, iterations that overlap (``max_parallel``) write to their
  own scope, merged back in item order. Parallel branches each write to their own scope,
  merged back in branch order (the deciding branch only, for ``wait_any``/``wait_first``).
* Leaf nodes are retried as :mod:`goflow.coordinator.retry` decides.
"""

from __future__ import annotations

import itertools
import time
from collections import ChainMap, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from goflow.errors import ErrorKind, ExpressionError, UndefinedVariableError
from goflow.coordinator.plan import initial_variables
from goflow.events.codec import bound_value
from goflow.redaction import SECRET_MASK, Redactor
from goflow.language.expr import compile_transform, interpolate
from goflow.coordinator.plan import Graph, Plan
from goflow.language.model import (
    ConditionNode,
    EndNode,
    LoopNode,
    McpToolNode,
    NodeBase,
    ParallelNode,
    PythonNode,
    TransformNode,
    WORKER_NODE_TYPES,
)
from goflow.language.references import resolve_reference
from goflow.coordinator.retry import max_attempts, retry_delay
from goflow.coordinator.task import NO_LABELS, Task
from goflow.states import TERMINAL_STATUSES

MAX_RECORDS = 10_000
"""Attempt records kept in memory per execution (the history store keeps all of them)."""
STEPS_PER_TURN = 1_000
"""Scheduling steps an execution runs before the host's loop gets a turn (see Execution.soon)."""
EDGES_PER_STEP = 100
"""Outgoing edges one scheduling step resolves (see Frame.resolve_edges)."""
RUNNING_SHOWN = 50
"""How many running node ids a progress event lists (the count is always exact)."""


class Host(Protocol):
    """What an execution needs from the coordinator that runs it."""

    def dispatch(self, task: "Task") -> None: ...
    def cancel_task(self, task: "Task") -> None: ...
    def call_later(self, delay: float, callback: Callable[[], None]) -> Any: ...
    def emit(self, execution: "Execution", type: str, run: "NodeRun | None" = None, status: str | None = None,
             error: dict | None = None, meta: dict | None = None, snapshot_change: bool = False) -> None: ...
    def progress(self, execution: "Execution", force: bool) -> None: ...
    def execution_finished(self, execution: "Execution") -> None: ...
    def server_spec(self, execution: "Execution", server_id: str) -> dict: ...
    max_value_bytes: int


class NodeFailure(Exception):
    """A node failed for good: ``error`` is the ``{type, message, node_id}`` map."""

    def __init__(self, error: dict):
        super().__init__(error.get("message"))
        self.error = error


class Scope:
    """Variables seen by a frame: ``reads`` falls through to enclosing scopes; writes go to ``target``."""

    def __init__(self, reads: ChainMap, target: dict):
        self.reads = reads
        self.target = target

    def child(self, *, isolated: bool, extra: dict | None = None) -> "Scope":
        local: dict = {}
        maps = ([local] if isolated else []) + ([extra] if extra else []) + list(self.reads.maps)
        return Scope(ChainMap(*maps), local if isolated else self.target)


@dataclass(slots=True)
class NodeRun:
    frame: "Frame"
    node: NodeBase
    attempt: int = 1
    state: str = "pending"
    task: Task | None = None
    child: Any = None
    timer: Any = None
    started: float = 0.0
    announced: int = 0
    """The attempt whose ``node.started`` was emitted."""


class Frame:
    """Runs one graph (the main graph, a loop iteration or a parallel branch)."""

    def __init__(self, execution: "Execution", graph: Graph, scope: Scope,
                 on_done: Callable[["Frame"], None] | None, context: dict | None = None):
        self.execution = execution
        self.graph = graph
        self.scope = scope
        self.on_done = on_done
        self.context = context or {}
        self.pending = dict(graph.incoming)
        self.taken: dict[str, bool] = {}
        self.unresolved = len(graph.nodes)
        self.runs: dict[str, NodeRun] = {}
        self.last_output: Any = None
        self.state = "running"
        self.error: dict | None = None

    def start(self) -> None:
        if not self.graph.nodes:
            self.execution.soon(self._finish)
            return
        for node_id in self.graph.entries:
            self.execution.soon(self.execution.ready, self, node_id)

    def resolve_edges(self, node_id: str, chosen: bool | None, *, skipped: bool = False, start: int = 0) -> None:
        """Resolve ``node_id``'s outgoing edges: none taken (``skipped``), all taken (``chosen``
        None), or per a condition's result.

        At most EDGES_PER_STEP edges are resolved in one call; the rest continue as a later
        agenda step, so no single step is O(fan-out) (a start node with 100k successors would
        otherwise hold the reactor for seconds and lose the workers' heartbeats). The frame
        cannot finish meanwhile: the targets still waiting count as unresolved nodes.
        """
        edges = self.graph.outgoing.get(node_id, ())
        stop = min(len(edges), start + EDGES_PER_STEP)
        pending, taken_by, execution = self.pending, self.taken, self.execution
        for index in range(start, stop):
            target, label = edges[index]
            if skipped:
                taken = False
            elif chosen is None:
                taken = True
            elif label is None:
                taken = chosen  # inside a sequence, a false condition skips the rest of it
            else:
                taken = label == ("true" if chosen else "false")
            pending[target] -= 1
            taken_by[target] = taken_by.get(target, False) or taken
            if pending[target] == 0 and self.state == "running":
                if taken_by[target]:
                    execution.soon(execution.ready, self, target)
                else:
                    execution.soon(execution.skip, self, target, "no incoming edge was taken")
        if stop < len(edges) and self.state == "running":
            execution.soon(self._resolve_rest, node_id, chosen, skipped, stop)

    def _resolve_rest(self, node_id: str, chosen: bool | None, skipped: bool, start: int) -> None:
        self.resolve_edges(node_id, chosen, skipped=skipped, start=start)

    def node_resolved(self) -> None:
        self.unresolved -= 1
        if self.unresolved == 0 and self.state == "running":
            self._finish()

    def _finish(self) -> None:
        if self.state != "running":
            return
        self.state = "completed"
        if self.on_done:
            self.on_done(self)

    def fail(self, error: dict) -> None:
        if self.state != "running":
            return
        self.state = "failed"
        self.error = error
        self.cancel_running(f"node '{error.get('node_id')}' failed")
        if self.on_done:
            self.on_done(self)

    def cancel(self, reason: str) -> None:
        if self.state != "running":
            return
        self.state = "cancelled"
        self.cancel_running(reason)

    def cancel_running(self, reason: str) -> None:
        """Stop every running node of this frame; each announced attempt ends with
        ``node.cancelled`` (inner nodes of a container before the container itself)."""
        for run in list(self.runs.values()):
            if run.timer is not None:
                run.timer.cancel()
                run.timer = None
            if run.state == "running":
                if run.task is not None and not run.task.done:
                    self.execution.host.cancel_task(run.task)
                if run.child is not None:
                    run.child.cancel(reason)
                self.execution.node_cancelled(run, reason)


class _ContainerRun:
    """What loop and parallel nodes share: child frames in ``active``, failing and cancelling."""

    execution: "Execution"
    run: NodeRun
    active: dict[int, Frame]
    state: str

    def fail(self, error: dict) -> None:
        if self.state != "running":
            return
        self.state = "failed"
        self.cancel_children(f"node '{self.run.node.id}' failed")
        self.execution.node_failed_final(self.run, error)

    def cancel(self, reason: str) -> None:
        self.state = "cancelled"
        self.cancel_children(reason)

    def cancel_children(self, reason: str) -> None:
        for child in list(self.active.values()):
            child.cancel(reason)


class LoopRun(_ContainerRun):
    """A loop node's iterations."""

    def __init__(self, execution: "Execution", run: NodeRun, items: list):
        self.execution = execution
        self.run = run
        self.node: LoopNode = run.node  # type: ignore[assignment]
        self.items = items
        self.limit = self.node.max_parallel or (len(items) or 1 if self.node.parallel else 1)
        self.next_index = 0
        self.active: dict[int, Frame] = {}
        self.results: dict[int, Any] = {}
        self.writes: dict[int, dict] = {}
        self.broken_at: int | None = None
        self.state = "running"

    def start(self) -> None:
        self.execution.emit("loop.started", self.run, meta={"count": len(self.items), "max_parallel": self.limit,
                                                           **self.run.frame.context})
        self.pump()

    def pump(self) -> None:
        execution, node, frame = self.execution, self.node, self.run.frame
        while self.state == "running" and self.broken_at is None and len(self.active) < self.limit \
                and self.next_index < len(self.items):
            index = self.next_index
            self.next_index += 1
            item = self.items[index]
            extra = {node.item: item, f"{node.item}_index": index}
            if node.break_condition:
                try:
                    condition = execution.plan.condition(node.id, "break_condition", node.break_condition)
                    verdict = condition.evaluate_bool(ChainMap(extra, frame.scope.reads))
                except ExpressionError as exc:
                    self.fail(execution.error_of(self.run, ErrorKind.EXPRESSION_ERROR, exc.message))
                    return
                execution.emit("condition.evaluated", self.run, meta={
                    "kind": "break_condition", "expression": node.break_condition, "result": verdict,
                    "index": index, **frame.context})
                if verdict:
                    self.broken_at = index
                    break
            isolated = self.limit > 1
            scope = frame.scope.child(isolated=isolated, extra=extra)
            context = {**frame.context, "loop": node.id, "index": index}
            execution.emit("loop.iteration", self.run, meta={"index": index, "item": execution.bounded(item),
                                                             **frame.context})
            for name, value in extra.items():
                execution.variable_changed(name, value, scope="iteration", node=self.run, meta=context)
            child = Frame(execution, execution.plan.bodies[node.id], scope,
                          lambda done, i=index: self.iteration_done(i, done), context)
            self.active[index] = child
            if isolated:
                self.writes[index] = scope.target
            child.start()
        if self.state == "running" and not self.active and (self.broken_at is not None
                                                            or self.next_index >= len(self.items)):
            self.complete()

    def iteration_done(self, index: int, frame: Frame) -> None:
        self.active.pop(index, None)
        if self.state != "running":
            return
        if frame.state == "failed":
            self.fail(frame.error or self.execution.error_of(self.run, "loop_error", "an iteration failed"))
            return
        self.results[index] = frame.last_output
        self.pump()

    def complete(self) -> None:
        self.state = "completed"
        outputs = [self.results[i] for i in sorted(self.results)]
        target = self.run.frame.scope.target
        merged: dict[str, Any] = {}
        for index in sorted(self.writes):  # item order: a later iteration's value wins
            merged.update(self.writes[index])
        for name, value in merged.items():  # one write per name, however many iterations wrote it
            self.execution.write(target, name, value, node=self.run, scope="merge")
        meta = {"iterations": len(outputs), "count": len(self.items), "broken": self.broken_at is not None,
                "break_index": self.broken_at, **self.run.frame.context}
        self.execution.emit("loop.completed", self.run, meta=meta)
        self.execution.node_succeeded(self.run, outputs, meta)


class ParallelRun(_ContainerRun):
    """A parallel node's branches and its merge strategy."""

    def __init__(self, execution: "Execution", run: NodeRun):
        self.execution = execution
        self.run = run
        self.node: ParallelNode = run.node  # type: ignore[assignment]
        self.graphs = execution.plan.branches[self.node.id]
        self.limit = self.node.max_parallel or len(self.graphs)
        self.next_index = 0
        self.active: dict[int, Frame] = {}
        self.finished: dict[int, Frame] = {}
        self.state = "running"

    def start(self) -> None:
        self.pump()

    def pump(self) -> None:
        frame = self.run.frame
        while self.state == "running" and len(self.active) < self.limit and self.next_index < len(self.graphs):
            index = self.next_index
            self.next_index += 1
            scope = frame.scope.child(isolated=True)
            context = {**frame.context, "parallel": self.node.id, "branch": index}
            child = Frame(self.execution, self.graphs[index], scope,
                          lambda done, i=index: self.branch_done(i, done), context)
            self.active[index] = child
            child.start()

    def branch_done(self, index: int, frame: Frame) -> None:
        self.active.pop(index, None)
        if self.state != "running":
            return
        self.finished[index] = frame
        strategy = self.node.merge_strategy
        if frame.state == "failed":
            if strategy in ("wait_all", "wait_first"):
                self.fail(frame.error or {})
                return
            if len(self.finished) == len(self.graphs) and not self.active:
                self.fail({**(frame.error or {}), "message": "all parallel branches failed; last: "
                                                             + str((frame.error or {}).get("message"))})
                return
        elif strategy in ("wait_any", "wait_first"):
            self.complete([index])
            return
        if len(self.finished) == len(self.graphs):
            self.complete(sorted(self.finished))
            return
        self.pump()

    def complete(self, winners: list[int]) -> None:
        self.state = "completed"
        self.cancel_children(f"parallel '{self.node.id}' was decided by branch {winners[0]}")
        target = self.run.frame.scope.target
        written: dict[str, int] = {}
        conflicts = set()
        for index in winners:
            for name, value in self.finished[index].scope.target.items():
                if name in written:
                    conflicts.add(name)
                written[name] = index
                self.execution.write(target, name, value, node=self.run, scope="merge")
        outputs = [self.finished[i].last_output for i in winners]
        meta = {"strategy": self.node.merge_strategy, "branches": winners, "conflicts": sorted(conflicts)}
        value = outputs if self.node.merge_strategy == "wait_all" else outputs[0]
        self.execution.node_succeeded(self.run, value, meta)


@dataclass
class Restored:
    """What main-graph nodes completed before a coordinator restart left behind (crash recovery)."""

    outputs: dict[str, Any]
    """Node id -> its recorded output: the node is not run again."""
    writes: dict[str, dict[str, Any]]
    """Node id -> the other changes it made to the execution's variables (a parallel node's or
    a concurrent loop's merge, a sequential loop's body): written again as it is restored."""


class Execution:
    """The state of one run of a workflow."""

    def __init__(self, execution_id: str, plan: Plan, variables: dict[str, Any], host: Host, *,
                 timeout: float | None = None, restored: "Restored | None" = None):
        self.id = execution_id
        self.plan = plan
        self.workflow = plan.workflow
        self.host = host
        self.variables: dict[str, Any] = {}
        self._initial = variables
        self.timeout = timeout
        self.status = "pending"
        self.result: Any = None
        self.error: dict | None = None
        self.started_at = 0.0
        self.finished_at = 0.0
        self.history: dict | None = None
        """Once finished, with a history store: ``{recorded, problem}`` (set by the store's writer)."""
        self.redactor = Redactor(plan.secrets, self.secret_values())
        """The one mask for everything this execution shows (events, replies, results, records)."""
        self.restored = restored
        """What main-graph nodes completed before a coordinator restart left behind."""
        self.root: Frame | None = None
        self.preflight: Any = None
        self.timer: Any = None
        self.node_states: dict[str, str] = {}
        self.records: deque[dict] = deque(maxlen=MAX_RECORDS)
        self.main_total = len(plan.main.nodes)
        self.main_resolved = 0
        self.counts = {"completed": 0, "failed": 0, "skipped": 0, "cancelled": 0, "running": 0, "retries": 0}
        self.running_nodes: dict[str, int] = {}
        self._agenda: deque[tuple[Callable[..., None], tuple]] = deque()
        self._draining = False
        self._resume: Any = None
        """The host timer that continues a drain cut at STEPS_PER_TURN, if one is pending."""
        self._deliver = self.task_result
        """Bound once: a queued fan-out holds one task per node, each with this route."""

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.status = "running"
        self.started_at = time.time()
        if self.restored is not None:
            self.emit("execution.resumed", None, meta={"completed_nodes": sorted(self.restored.outputs)})
        servers = list(dict.fromkeys(node.server for node in self.workflow.nodes if isinstance(node, McpToolNode)))
        self.emit("execution.started", None, meta={"inputs": {k: self.bounded(v) for k, v in
                                                              self.redactor.variables(self._initial).items()},
                                                   "total_nodes": self.main_total, "preflight": servers})
        for name, value in self._initial.items():
            self.write(self.variables, name, value, node=None, scope="execution")
        self.progress(force=True)
        if self.timeout:
            self.timer = self.host.call_later(self.timeout, self.timed_out)
        if servers:
            from goflow.coordinator.preflight import McpPreflight

            self.preflight = McpPreflight(self, self.preflight_done)
            self.preflight.start()
        else:
            self.run_graph()

    def preflight_done(self, error: dict | None) -> None:
        if not self.active:
            return
        if error is not None:
            self.finish("failed", error)
        else:
            self.run_graph()

    def run_graph(self) -> None:
        self.root = Frame(self, self.plan.main, Scope(ChainMap(self.variables), self.variables), self.root_done)
        if self.preflight is not None:
            self.progress(force=True)   # announces the end of the preflight phase
        self.root.start()

    @property
    def phase(self) -> str:
        """``preflight`` (MCP servers being checked), ``running`` (nodes), or the final status."""
        if not self.active:
            return self.status
        return "preflight" if self.root is None and self.preflight is not None else "running"

    def root_done(self, frame: Frame) -> None:
        if frame.state == "failed":
            self.finish("failed", frame.error)
        else:
            self.finish("completed", None)

    def finish(self, status: str, error: dict | None) -> None:
        if self.status in TERMINAL_STATUSES:
            return
        self.status = status
        self.error = self.public(error)
        self.finished_at = time.time()
        if self.timer is not None:
            self.timer.cancel()
        if self.root is not None and self.root.state == "running":
            self.root.cancel({"completed": "the execution completed", "cancelled": "the execution was cancelled",
                              "timed_out": "the execution timed out"}.get(status, "the execution failed"))
        if self.preflight is not None:
            self.preflight.cancel()
        self.progress(force=True)
        duration = self.finished_at - self.started_at
        if status == "completed":
            self.emit("execution.completed", None, status=status,
                      meta={"result": self.bounded(self.result), "duration_s": duration})
        elif status == "cancelled":
            self.emit("execution.cancelled", None, status=status, error=error, meta={"duration_s": duration})
        else:
            self.emit("execution.failed", None, status=status, error=error, meta={"duration_s": duration})
        self.host.execution_finished(self)

    def cancel(self, reason: str = "cancelled by request") -> None:
        self.finish("cancelled", {"type": ErrorKind.CANCELLED, "message": reason, "node_id": None})

    def timed_out(self) -> None:
        self.timer = None
        self.finish("timed_out", {"type": ErrorKind.TIMEOUT, "node_id": None,
                                  "message": f"the execution exceeded its timeout of {self.timeout:g}s"})

    @property
    def active(self) -> bool:
        return self.status == "running"

    # -- variables -------------------------------------------------------------------------
    def secret_values(self) -> list[Any]:
        """The values of this execution's secret variables (defaults included)."""
        initial = initial_variables(self.workflow, self._initial) if self.plan.secrets else {}
        return [initial[name] for name in self.plan.secrets if initial.get(name) is not None]

    def public(self, value: Any) -> Any:
        """``value`` as anything outside the execution may see it: secret texts masked."""
        return self.redactor.value(value)

    def bounded(self, value: Any) -> Any:
        """``value`` as events may carry it: secret texts masked, size bounded."""
        if not value:   # None, 0, "", [], {}: nothing to mask, nothing to bound
            return value
        if not self.redactor.texts and isinstance(value, (bool, int, float)):
            return value
        return bound_value(self.redactor.value(value), self.host.max_value_bytes)

    def outcome(self) -> dict:
        """The finished execution as callers receive it (``goflow run --json``, ``submit --wait``)."""
        return {"execution_id": self.id, "workflow": self.workflow.name, "status": self.status,
                "result": self.public(self.result), "variables": self.redactor.variables(self.variables),
                "error": self.error, "duration_s": (self.finished_at or time.time()) - self.started_at,
                "records": list(self.records)}

    def write(self, target: dict, name: str, value: Any, *, node: NodeRun | None, scope: str) -> None:
        old = target.get(name)
        target[name] = value
        self.variable_changed(name, value, scope=scope, node=node, old=old, snapshot=target is self.variables)

    def variable_changed(self, name: str, value: Any, *, scope: str, node: NodeRun | None,
                         old: Any = None, meta: dict | None = None, snapshot: bool = False) -> None:
        """Emit ``variable.changed``; ``snapshot``: it changed the execution's variables (the
        snapshot subscribers rebuild), not a loop item or a branch's local scope."""
        secret = name in self.plan.secrets
        self.emit("variable.changed", node, snapshot_change=snapshot, meta={
            "name": name, "value": SECRET_MASK if secret else self.bounded(value),
            "old": SECRET_MASK if secret else self.bounded(old), "scope": scope,
            **(meta or (node.frame.context if node else {}))})

    # -- events ----------------------------------------------------------------------------
    def emit(self, type: str, run: NodeRun | None, *, status: str | None = None, error: dict | None = None,
             meta: dict | None = None, snapshot_change: bool = False) -> None:
        self.host.emit(self, type, run, status, error, meta, snapshot_change)  # positional: 3 per node

    def progress(self, force: bool = False) -> None:
        """Report progress; the host conflates these and builds the payload only when it sends."""
        self.host.progress(self, force)

    def progress_meta(self) -> dict:
        total = self.main_total or 1
        return {"phase": self.phase, "total": self.main_total, "resolved": self.main_resolved,
                "percent": round(100.0 * min(self.main_resolved, total) / total, 2),
                **self.counts, "running_nodes": list(itertools.islice(self.running_nodes, RUNNING_SHOWN))}

    def error_of(self, run: NodeRun, error_type: str, message: str, **extra: Any) -> dict:
        """An error made by the coordinator itself (messages may quote values: masked here)."""
        return {"type": error_type, "message": self.public(message), "node_id": run.node.id, **extra}

    # -- scheduling ------------------------------------------------------------------------
    def soon(self, step: Callable[..., None], *args: Any) -> None:
        """Run ``step(*args)`` once the current step returns.

        Scheduling steps (a node becoming ready or skipped, a frame finishing) go through this
        agenda instead of calling each other, so the stack depth stays constant however long a
        chain of coordinator-side nodes (passthrough, condition, skips) or a loop is. A call on
        an idle agenda drains it (STEPS_PER_TURN steps per host turn); calls made while
        draining only append.
        """
        self._agenda.append((step, args))
        if not self._draining:
            self._drain()

    def _drain(self) -> None:
        """Run up to STEPS_PER_TURN agenda steps, then give the host's loop a turn (heartbeats,
        results, other executions) before going on: a 100k-node chain of coordinator-side
        nodes must not freeze the reactor while it runs."""
        self._draining = True
        try:
            for _ in range(STEPS_PER_TURN):
                if not self._agenda:
                    return
                step, args = self._agenda.popleft()
                step(*args)
            if self._agenda and self._resume is None:
                self._resume = self.host.call_later(0.0, self._resume_drain)
        finally:
            self._draining = False

    def _resume_drain(self) -> None:
        self._resume = None
        if not self._draining:
            self._drain()

    def ready(self, frame: Frame, node_id: str) -> None:
        if frame.state != "running":
            return  # the frame failed or was cancelled after this step was queued
        node = self.plan.nodes[node_id]
        run = frame.runs[node_id] = NodeRun(frame, node)
        if node.condition is not None and not isinstance(node, ConditionNode):
            try:
                verdict = self.plan.condition(node.id, "condition", node.condition).evaluate_bool(frame.scope.reads)
            except ExpressionError as exc:
                self.start_node(run)
                self.attempt_started(run)
                self.node_failed_final(run, self.error_of(run, ErrorKind.EXPRESSION_ERROR, exc.message))
                return
            self.emit("condition.evaluated", run, meta={"kind": "guard", "expression": node.condition,
                                                        "result": verdict, **frame.context})
            if not verdict:
                del frame.runs[node_id]
                self.skip(frame, node_id, "its guard condition is false")
                return
        self.start_node(run)
        if self.restored is not None and frame is self.root and node_id in self.restored.outputs:
            self.attempt_started(run)
            for name, written in self.restored.writes.get(node_id, {}).items():
                self.write(frame.scope.target, name, written, node=run, scope="merge")
            value = self.restored.outputs[node_id]
            if isinstance(node, EndNode):
                self.result = value
            self.node_succeeded(run, value, {"resumed": True},
                                chosen=bool(value) if isinstance(node, ConditionNode) else None)
            return
        self.execute(run)

    def start_node(self, run: NodeRun) -> None:
        """Count ``run`` as running (its ``node.started`` event comes with each attempt)."""
        run.state = "running"
        run.started = time.time()
        self.counts["running"] += 1
        self.running_nodes[run.node.id] = self.running_nodes.get(run.node.id, 0) + 1

    def attempt_started(self, run: NodeRun, inputs: dict | None = None) -> None:
        run.announced = run.attempt
        meta = dict(run.frame.context)
        if inputs is not None:
            meta["inputs"] = {key: self.bounded(value) for key, value in inputs.items()}
        self.emit("node.started", run, status="running", meta=meta)

    def _stop_running(self, run: NodeRun) -> None:
        self.counts["running"] -= 1
        left = self.running_nodes.get(run.node.id, 1) - 1
        if left:
            self.running_nodes[run.node.id] = left
        else:
            self.running_nodes.pop(run.node.id, None)

    def execute(self, run: NodeRun) -> None:
        """Run one attempt of ``run``'s node (emits its ``node.started``)."""
        node, scope = run.node, run.frame.scope.reads
        if node.type not in WORKER_NODE_TYPES:
            self.attempt_started(run)
        try:
            if node.type in WORKER_NODE_TYPES:
                self.dispatch(run)
            elif isinstance(node, ConditionNode):
                verdict = self.plan.condition(node.id, "condition", node.condition).evaluate_bool(scope)
                self.emit("condition.evaluated", run, meta={"kind": "condition", "expression": node.condition,
                                                            "result": verdict, **run.frame.context})
                self.node_succeeded(run, verdict, {"result": verdict}, chosen=verdict)
            elif isinstance(node, EndNode):
                value = interpolate(node.return_, scope) if node.return_ is not None else None
                self.result = value
                self.node_succeeded(run, value, {"return": self.bounded(value)})
            elif isinstance(node, LoopNode):
                items = resolve_reference(node.collection, scope)
                items = _as_items(node, items)
                run.child = LoopRun(self, run, items)
                run.child.start()
            elif isinstance(node, ParallelNode):
                run.child = ParallelRun(self, run)
                run.child.start()
            else:  # start, passthrough
                self.node_succeeded(run, None, {})
        except UndefinedVariableError as exc:
            self._failed_before_dispatch(run, self.error_of(run, ErrorKind.UNDEFINED_VARIABLE, exc.message))
        except ExpressionError as exc:
            self._failed_before_dispatch(run, self.error_of(run, ErrorKind.EXPRESSION_ERROR, exc.message))
        except NodeFailure as exc:
            self._failed_before_dispatch(run, exc.error)

    def _failed_before_dispatch(self, run: NodeRun, error: dict) -> None:
        if run.announced != run.attempt:
            self.attempt_started(run)
        self.node_failed_final(run, error)

    def dispatch(self, run: NodeRun) -> None:
        """Send one attempt of ``run``'s worker node; its ``node.started`` carries the inputs.

        Inputs the plan knows to be literal (:attr:`Plan.literal`) are sent as they are:
        interpolating them would only copy them.
        """
        node, scope = run.node, run.frame.scope.reads
        literal = node.id in self.plan.literal
        if isinstance(node, PythonNode):
            if literal:
                args, kwargs = node.args, node.kwargs
            else:
                args = interpolate(node.args, scope) if node.args else []
                kwargs = interpolate(node.kwargs, scope) if node.kwargs else {}
            kind, spec, inputs = "python", {"call": node.call, "args": args, "kwargs": kwargs}, \
                {"args": args, "kwargs": kwargs}
        elif isinstance(node, TransformNode):
            transform = compile_transform(expression=node.expression, template=node.template)
            spec = {"expression": node.expression, "template": node.template,
                    "variables": {name: scope[name] for name in transform.names if name in scope}}
            inputs = {"variables": spec["variables"]}
            if node.input is not None:
                spec["input"] = inputs["input"] = resolve_reference(node.input, scope)
            kind = "transform"
        elif isinstance(node, McpToolNode):
            arguments = node.parameters if literal else interpolate(node.parameters, scope)
            kind, spec, inputs = "mcp_tool", {"server": self.host.server_spec(self, node.server), "tool": node.tool,
                                              "arguments": arguments, "timeout": node.timeout}, \
                {"arguments": arguments}
        else:  # pragma: no cover - guarded by WORKER_NODE_TYPES
            raise NodeFailure(self.error_of(run, ErrorKind.UNSUPPORTED, f"cannot dispatch node type {node.type}"))
        run.task = Task(self.id, node.id, run.attempt, kind, spec, node.timeout, self._deliver, run,
                        node.worker.labels if node.worker else NO_LABELS)
        self.attempt_started(run, inputs)
        self.host.dispatch(run.task)

    # -- outcomes --------------------------------------------------------------------------
    def task_result(self, task: Task, message: dict) -> None:
        """A worker finished ``task`` (or the coordinator gave up on it): every task's ``deliver``."""
        run = task.run
        if run.task is not task or run.state != "running" or not self.active:
            return
        run.task = None
        if message.get("ok"):
            meta = {"started": message.get("started"), "finished": message.get("finished"),
                    "worker": message.get("worker")}
            if message.get("meta"):
                meta.update({key: self.bounded(value) for key, value in message["meta"].items()})
            self.node_succeeded(run, message.get("value"), meta, raw=(message.get("meta") or {}).get("raw"))
        else:
            error = self.public(dict(message.get("error") or {}))
            error.setdefault("type", "error")
            error.setdefault("message", "the task failed")
            error["node_id"] = run.node.id
            self.attempt_failed(run, error, worker=message.get("worker"))

    def attempt_failed(self, run: NodeRun, error: dict, worker: Any = None) -> None:
        node = run.node
        self.record(run, "failed", error=error, worker=worker)
        delay = retry_delay(node.retry, error, run.attempt) if run.frame.state == "running" else None
        if delay is not None:
            self.counts["retries"] += 1
            self.emit("node.retrying", run, status="retrying", error=error,
                      meta={"next_attempt": run.attempt + 1, "delay_s": delay, "worker": worker,
                            "max_attempts": max_attempts(node.retry, error), **run.frame.context})
            run.attempt += 1
            run.timer = self.host.call_later(delay, lambda: self._retry(run))
            return
        self.node_failed_final(run, error, recorded=True, worker=worker)

    def _retry(self, run: NodeRun) -> None:
        run.timer = None
        if run.state == "running" and run.frame.state == "running" and self.active:
            run.started = time.time()
            self.execute(run)

    def record(self, run: NodeRun, status: str, *, error: dict | None = None, worker: Any = None,
               raw: Any = None) -> None:
        """Append one attempt's record (``raw``: an MCP tool's unconverted result)."""
        entry = {"node_id": run.node.id, "node_type": run.node.type, "attempt": run.attempt, "status": status,
                 "started": run.started, "finished": time.time(), "error": error, "worker": worker,
                 "context": run.frame.context or None}
        if raw is not None:
            entry["raw"] = self.public(raw)
        self.records.append(entry)

    def node_succeeded(self, run: NodeRun, value: Any, meta: dict, chosen: bool | None = None,
                       raw: Any = None) -> None:
        if run.state != "running":
            return
        run.state = "completed"
        self._stop_running(run)
        frame = run.frame
        output = run.node.output_variable
        if output:
            self.write(frame.scope.target, output, value, node=run, scope="node")
        if run.node.type in WORKER_NODE_TYPES or output or isinstance(run.node, (LoopNode, ParallelNode)):
            frame.last_output = value
        self.counts["completed"] += 1
        self.record(run, "completed", worker=meta.get("worker"), raw=raw)
        finished = time.time()
        self.emit("node.completed", run, status="completed", meta={
            **meta, "output": self.bounded(value),
            "duration_s": finished - run.started, **frame.context})
        self._resolved(frame)
        frame.resolve_edges(run.node.id, chosen)
        frame.node_resolved()

    def node_failed_final(self, run: NodeRun, error: dict, recorded: bool = False, worker: Any = None) -> None:
        if run.state != "running":
            return
        run.state = "failed"
        self._stop_running(run)
        if not recorded:
            self.record(run, "failed", error=error)
        self.counts["failed"] += 1
        self.emit("node.failed", run, status="failed", error=error,
                  meta={"duration_s": time.time() - run.started, "worker": worker, **run.frame.context})
        self._resolved(run.frame)
        run.frame.fail(error)

    def node_cancelled(self, run: NodeRun, reason: str) -> None:
        """``run`` stopped being wanted while running: its announced attempt ends with
        ``node.cancelled`` (an attempt between retries has already ended with ``node.retrying``)."""
        if run.state != "running":
            return
        run.state = "cancelled"
        self._stop_running(run)
        self.counts["cancelled"] += 1
        if run.announced != run.attempt:
            return
        error = {"type": ErrorKind.CANCELLED, "message": reason, "node_id": run.node.id}
        worker = run.task.worker_name if run.task is not None else None   # None: not handed out yet
        self.record(run, "cancelled", error=error, worker=worker)
        self.emit("node.cancelled", run, status="cancelled", error=error,
                  meta={"duration_s": time.time() - run.started, "reason": reason, "worker": worker,
                        **run.frame.context})

    def skip(self, frame: Frame, node_id: str, reason: str) -> None:
        if frame.state != "running":
            return
        node = self.plan.nodes[node_id]
        run = frame.runs[node_id] = NodeRun(frame, node, state="skipped")
        self.counts["skipped"] += 1
        self.emit("node.skipped", run, status="skipped", meta={"reason": reason, **frame.context})
        self._resolved(frame)
        frame.resolve_edges(node_id, None, skipped=True)
        frame.node_resolved()

    def _resolved(self, frame: Frame) -> None:
        if frame is self.root:
            self.main_resolved += 1
        self.progress()

    # -- views for the control socket ------------------------------------------------------
    def summary(self) -> dict:
        return {"execution_id": self.id, "workflow": self.workflow.name, "status": self.status,
                "started_at": self.started_at, "finished_at": self.finished_at or None,
                "error": self.error, "progress": self.progress_meta()}


def _as_items(node: LoopNode, value: Any) -> list:
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError:
            pass
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, dict):
        return [{"key": key, "value": item} for key, item in value.items()]
    raise NodeFailure({"type": ErrorKind.EXPRESSION_ERROR, "node_id": node.id,
                       "message": f"loop '{node.id}': collection '{node.collection}' is a {type(value).__name__}, "
                                  f"not a list"})
